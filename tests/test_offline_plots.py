"""`dvc plots show` renders offline: the project's HTML template (.dvc/offline_plots/page.html, set as
plots.html_template in .dvc/config) carries vega, vega-lite and vega-embed, which DVC's own page loads from a
CDN. Checked in a real headless Chromium with the network cut, against DVC's own page as the control."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium here (apt-get install chromium)")

# After the page's scripts ran: per plot div, the inked pixels of its canvas (0 for none or an empty one).
PROBE = """<script>
setTimeout(() => {
  const ink = (c) => {
    if (!c.width || !c.height) return 0;
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  };
  const rows = [...document.querySelectorAll("body > div[id]")].map(
    (d) => [d.id, [...d.querySelectorAll("canvas")].reduce((sum, c) => sum + ink(c), 0)]);
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(rows);
  document.body.appendChild(pre);
}, 3000);
</script>"""


def drawn(page: Path) -> dict[str, int]:
    """Plot id -> inked pixels, the page opened in headless Chromium with every network request refused."""
    html = page.read_text(encoding="utf-8")
    at = html.rfind("</body>")
    probed = page.with_name("probed.html")
    probed.write_text(html[:at] + PROBE + html[at:], encoding="utf-8")
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000", "--dump-dom",
               probed.as_uri()]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, f"the probe did not run:\n{dom[-2000:]}"
    return dict(json.loads(found.group(1)))


def test_dvc_plots_show_draws_every_plot_offline(tmp_path: Path) -> None:
    def sh(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    shutil.copy(REPO / ".dvc/config", tmp_path / ".dvc/config")
    shutil.copytree(REPO / ".dvc/offline_plots", tmp_path / ".dvc/offline_plots")
    (tmp_path / "train.csv").write_text("step,loss\n1,2.0\n2,1.2\n3,0.7\n4,0.5\n")
    confusion = [{"actual": a, "predicted": p} for a, p in [("x", "x"), ("x", "y"), ("y", "y"), ("y", "y")]]
    (tmp_path / "confusion.json").write_text(json.dumps(confusion))
    (tmp_path / "dvc.yaml").write_text(
        "plots:\n"
        "  - train.csv:\n      x: step\n      y: loss\n"
        "  - confusion.json:\n      template: confusion\n      x: predicted\n      y: actual\n"
    )
    sh("dvc", "plots", "show", "-o", "offline")
    assert "cdn.jsdelivr" not in (tmp_path / "offline/index.html").read_text()
    offline = drawn(tmp_path / "offline/index.html")
    assert len(offline) == 2 and all(pixels > 1000 for pixels in offline.values()), offline

    # The control: DVC's own page, whose libraries come from a CDN, draws nothing without a network.
    sh("dvc", "config", "--unset", "plots.html_template")
    sh("dvc", "plots", "show", "-o", "cdn")
    assert set(drawn(tmp_path / "cdn/index.html").values()) == {0}
