"""The `transferpipe` command: `report` (working tree vs a base revision, Markdown + PNGs), `rerun` (the stale
stages within a time budget, for a pull request's review), `compare`
(MLflow finetune runs side by side), `label-efficiency` (a labels-per-class sweep of DVC experiments as a
table and a plot) and `probe` (a linear probe of frozen encoders). Mistakes print one line, `error: ...`, and
exit 2.

    transferpipe report --base main --out report.md --images-dir report_images
    transferpipe rerun --within-minutes 30 --record rerun.json && transferpipe report --base main --rerun rerun.json
    transferpipe compare --csv runs.csv --markdown runs.md
    transferpipe label-efficiency --out reports/label_efficiency
    transferpipe probe --encoder models/pretrained models/scratch --labels-per-class 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferpipe.errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferpipe", description="Report on and compare transferpipe runs (DVC metrics, MLflow runs)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    report = sub.add_parser("report", help="Markdown report of the working tree against a base git revision")
    report.add_argument("--base", required=True, help="git revision to compare against (main, origin/main, a sha)")
    report.add_argument("--out", type=Path, default=Path("report.md"), help="report file (default: report.md)")
    report.add_argument(
        "--images-dir",
        type=Path,
        default=Path("report_images"),
        help="folder for the PNG figures; a relative path is taken next to the report (default: report_images)",
    )
    report.add_argument(
        "--section",
        metavar="TITLE",
        help="write the report as a section titled TITLE (its headings one level down), to append to another",
    )

    report.add_argument(
        "--rerun", type=Path, metavar="RECORD", help="record of `transferpipe rerun`: the first line says what it did"
    )

    rerun = sub.add_parser(
        "rerun", help="rerun the stale stages (dvc repro) if they finish within a time budget, else restore"
    )
    rerun.add_argument(
        "--within-minutes", type=_positive_minutes, required=True, help="stop and restore after this many minutes"
    )
    rerun.add_argument("--record", type=Path, default=Path("rerun.json"), help="what it did (default: rerun.json)")

    compare = sub.add_parser("compare", help="MLflow finetune runs side by side: differing params, key metrics")
    compare.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment_name of --params)")
    compare.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    compare.add_argument("--csv", type=Path, help="also write the table as CSV (every param that differs, run ids)")
    compare.add_argument("--markdown", type=Path, help="also write the table as Markdown")

    sweep = sub.add_parser(
        "label-efficiency", help="test macro-F1 against finetune.labels_per_class from finished DVC experiments"
    )
    sweep.add_argument(
        "--out",
        type=Path,
        default=Path("reports/label_efficiency"),
        help="folder for label_efficiency.csv, .md and .png (default: reports/label_efficiency)",
    )
    sweep.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep experiments with this param value, e.g. finetune.freeze_layers=0 (repeatable)",
    )
    sweep.add_argument(
        "--by",
        metavar="KEY",
        help="one system per value of this param, side by side, e.g. model.architecture",
    )
    sweep.add_argument(
        "--rev",
        action="append",
        default=[],
        metavar="COMMIT",
        help="read the experiments of this commit or branch instead of HEAD's (repeatable: --rev main --rev lstm)",
    )

    probe = sub.add_parser(
        "probe", help="linear probe: logistic regression on frozen encoder features, test macro-F1 (no fine-tuning)"
    )
    probe.add_argument(
        "--encoder", type=Path, nargs="+", default=[Path("models/pretrained")], help="encoder folders (pretrain's)"
    )
    probe.add_argument("--data", type=Path, default=Path("data/tokenized"), help="tokenized datasets (tokenize's)")
    probe.add_argument(
        "--labels-per-class", type=_labels_per_class, default=20, help="training labels per class, or all (default 20)"
    )
    probe.add_argument("--seed", type=int, default=1, help="seed of the labeled subsample (default 1)")
    return parser


def _labels_per_class(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {value!r}") from None


def _positive_minutes(value: str) -> float:
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {value!r}")
    return minutes


def _report(args: argparse.Namespace) -> None:
    from transferpipe.io import read_json
    from transferpipe.report import build_report
    from transferpipe.vcs import git_toplevel

    root = git_toplevel(Path.cwd())
    images_dir = args.images_dir if args.images_dir.is_absolute() else args.out.parent / args.images_dir
    if args.rerun and not args.rerun.is_file():
        raise UserError(f"no rerun record at {args.rerun}; run `transferpipe rerun --record {args.rerun}` first")
    rerun = read_json(args.rerun) if args.rerun else None
    out = build_report(root, args.base, args.out, images_dir, section=args.section, rerun=rerun)
    print(f"wrote {out} and figures in {images_dir}")


def _rerun(args: argparse.Namespace) -> None:
    from transferpipe.report import rerun_line
    from transferpipe.rerun import rerun_stale
    from transferpipe.vcs import git_toplevel

    result = rerun_stale(git_toplevel(Path.cwd()), args.within_minutes * 60, args.record)
    print(f"{rerun_line(result)} (record: {args.record})")


def _compare(args: argparse.Namespace) -> None:
    from transferpipe.compare import compare
    from transferpipe.params import TrackingParams, load_section

    experiment = args.experiment or load_section(args.params, "tracking", TrackingParams).experiment_name
    print(compare(experiment, csv=args.csv, markdown=args.markdown))


def _label_efficiency(args: argparse.Namespace) -> None:
    from transferpipe.label_efficiency import label_efficiency
    from transferpipe.vcs import git_toplevel

    print(label_efficiency(git_toplevel(Path.cwd()), args.out, args.only, args.by, args.rev))


def _probe(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from transferpipe.probe import linear_probe

    logging.set_verbosity_error()  # no load report for the head the probe never uses
    for encoder in args.encoder:
        result = linear_probe(encoder, args.data, args.labels_per_class, args.seed)
        print(
            f"probe {encoder}: test macro-F1 {result['macro_f1']:.4f}, accuracy {result['accuracy']:.4f} "
            f"({result['train_documents']} training documents, {result['test_documents']} test documents)"
        )


def _main(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    handlers = {
        "report": _report,
        "rerun": _rerun,
        "compare": _compare,
        "label-efficiency": _label_efficiency,
        "probe": _probe,
    }
    handlers[args.command](args)


def main(argv: list[str] | None = None) -> None:
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
