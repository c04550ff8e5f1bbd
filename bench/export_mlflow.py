"""Everything an MLflow store holds about its runs, as files: for a GPU machine's store that does not come back.

Writes to --out:
- runs.json: every run of every experiment: its info (id, name, status, start and end times), params,
  latest metrics, tags, and the whole history of each metric (step, value, timestamp);
- runs.csv: one row per run (run id, experiment, name, status, then params.*, metrics.*, tags.*);
- metric_history.csv: one row per logged value (run id, run name, key, step, value, timestamp);
- registry.json: registered models, their versions, tags and aliases.

The store is transferpipe.tracking's (mlflow.db at the repository root, or MLFLOW_TRACKING_URI).

Run: python -m bench.export_mlflow --out DIR
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from transferpipe.tracking import tracking_uri


def history(client: MlflowClient, run_id: str, key: str) -> list[dict]:
    values = client.get_metric_history(run_id, key)
    return [{"step": m.step, "value": m.value, "timestamp": m.timestamp} for m in values]


def export_runs(client: MlflowClient) -> list[dict]:
    runs = []
    for experiment in client.search_experiments():
        found = client.search_runs([experiment.experiment_id], max_results=10_000, order_by=["attributes.start_time"])
        for run in found:
            runs.append(
                {
                    "experiment": experiment.name,
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "start_time": run.info.start_time,
                    "end_time": run.info.end_time,
                    "params": dict(run.data.params),
                    "metrics": dict(run.data.metrics),
                    "tags": dict(run.data.tags),
                    "metric_history": {key: history(client, run.info.run_id, key) for key in run.data.metrics},
                }
            )
    return runs


def export_registry(client: MlflowClient) -> list[dict]:
    models = []
    for model in client.search_registered_models():
        versions = [
            {"version": v.version, "run_id": v.run_id, "source": v.source, "tags": v.tags, "aliases": list(v.aliases)}
            for v in client.search_model_versions(f"name='{model.name}'")
        ]
        models.append({"name": model.name, "aliases": dict(model.aliases), "versions": versions})
    return models


def write_tables(runs: list[dict], out: Path) -> None:
    columns = ["run_id", "experiment", "run_name", "status", "start_time", "end_time"]
    for part in ("params", "metrics", "tags"):
        columns += sorted({f"{part}.{key}" for run in runs for key in run[part]})
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for run in runs:
            row = {key: run[key] for key in columns[:6]}
            row |= {f"{part}.{k}": v for part in ("params", "metrics", "tags") for k, v in run[part].items()}
            writer.writerow(row)
    with (out / "metric_history.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_id", "run_name", "key", "step", "value", "timestamp"])
        for run in runs:
            for key, values in run["metric_history"].items():
                for m in values:
                    writer.writerow([run["run_id"], run["run_name"], key, m["step"], m["value"], m["timestamp"]])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.export_mlflow", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri())
    runs, registry = export_runs(client), export_registry(client)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=2), encoding="utf-8")
    (args.out / "registry.json").write_text(json.dumps(registry, indent=2), encoding="utf-8")
    write_tables(runs, args.out)
    values = sum(len(v) for run in runs for v in run["metric_history"].values())
    print(f"export_mlflow: {len(runs)} runs, {values} metric values, {len(registry)} registered models -> {args.out}")
    return {"runs": len(runs), "metric_values": values, "registered_models": len(registry)}


if __name__ == "__main__":
    main()
