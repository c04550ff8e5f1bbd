"""The linear probe command on encoders that pretrain wrote: deterministic, above chance, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import run_short, tiny_params
from transferpipe.cli import main
from transferpipe.errors import UserError
from transferpipe.probe import linear_probe


@pytest.fixture
def pretrained(tmp_path: Path, tiny_csv: Path) -> Path:
    """tmp_path after prepare, tokenize and pretrain on the tiny corpus: t (tokenized), m (pretrained), s (scratch)."""
    params = str(tiny_params(tmp_path, prepare={"source": str(tiny_csv)}, tracking={"enabled": False}))
    run_short(params, tmp_path)
    return tmp_path


def test_probe_scores_frozen_features_of_both_encoders(pretrained: Path) -> None:
    d = pretrained
    result = linear_probe(d / "m", d / "t", 3, seed=1)
    assert result["train_documents"] == 15 and result["test_documents"] == 12  # 5 classes x 3; the test split
    assert result == linear_probe(d / "m", d / "t", 3, seed=1)  # frozen features, seeded subsample
    # Mean-pooled word features separate the synthetic topics even untrained: far above chance (0.2).
    assert linear_probe(d / "s", d / "t", "all", seed=1)["accuracy"] >= 0.6


def test_probe_command_prints_a_line_per_encoder(pretrained: Path, capsys: pytest.CaptureFixture) -> None:
    d = pretrained
    main(["probe", "--encoder", str(d / "m"), str(d / "s"), "--data", str(d / "t"), "--labels-per-class", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("probe ")]
    assert [line.split(":")[0] for line in lines] == [f"probe {d / 'm'}", f"probe {d / 's'}"]
    assert all("(10 training documents, 12 test documents)" in line for line in lines)


def test_probe_mistakes_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a saved model folder"):
        linear_probe(tmp_path / "nope", tmp_path, 20, seed=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "--encoder", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
