"""The transformer's and the LSTM's label-efficiency sweeps in one table and plot, from their committed CSVs.

The two sweeps ran on different days from different commits, so they are not experiments of one HEAD that
`transferpipe label-efficiency --by model.architecture` could read together; this joins what each wrote.

    python -m bench.label_efficiency_both   # reports/label_efficiency_both.{md,png}
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferpipe.io import write_text_atomic
from transferpipe.label_efficiency import plot, to_markdown

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {"transformer": "reports/label_efficiency", "LSTM": "reports/label_efficiency_lstm"}


def main() -> None:
    rows = []
    for system, folder in SWEEPS.items():
        for row in pd.read_csv(REPO / folder / "label_efficiency.csv", dtype={"labels_per_class": str}).to_dict(
            "records"
        ):
            rows.append({"system": system, **row})
    out = REPO / "reports" / "label_efficiency_both"
    table = to_markdown(rows, by="system")
    write_text_atomic(out.with_suffix(".md"), f"# Label efficiency, both systems\n\n{table}")
    plot(rows, out.with_suffix(".png"), by="system")
    print(table)


if __name__ == "__main__":
    main()
