"""The registered model's predictions against evaluate's, on the test split of the reproduced pipeline.

Loads `models:/<tracking.registered_model_name>@candidate` through mlflow.pyfunc (what `mlflow models serve`
runs), predicts every test text of data/prepared, and prints its test macro-F1 beside the one evaluate wrote to
metrics/evaluate.json for the pretrained model, with the agreement of their per-document predictions
(plots/evaluate/confusion_pretrained.json). They must be equal: a gap means the served model is not the
evaluated one. Needs a reproduced pipeline (dvc repro) and its MLflow store.

Run: python -m bench.served_model [--alias candidate]
"""

from __future__ import annotations

import argparse
import json
import time

from bench.common import REPO, machine
from transferpipe.data import read_prepared
from transferpipe.evaluation import classification_metrics
from transferpipe.params import TrackingParams, load_section
from transferpipe.tracking import tracking_uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="candidate")
    args = parser.parse_args(argv)
    import mlflow

    tracking = load_section(REPO / "params.yaml", "tracking", TrackingParams)
    mlflow.set_tracking_uri(tracking_uri())
    splits, label_names, _ = read_prepared(REPO / "data/prepared")
    test = splits["test"]
    uri = f"models:/{tracking.registered_model_name}@{args.alias}"
    model = mlflow.pyfunc.load_model(uri)
    start = time.perf_counter()
    served = model.predict(test["text"].tolist())["label"].tolist()
    seconds = time.perf_counter() - start
    rows = json.loads((REPO / "plots/evaluate/confusion_pretrained.json").read_text())
    evaluated = [row["predicted"] for row in rows]
    ids = {name: i for i, name in enumerate(label_names)}
    y_true = test["label"].tolist()
    served_f1 = classification_metrics(y_true, [ids[x] for x in served], label_names)["macro_f1"]
    reported = json.loads((REPO / "metrics/evaluate.json").read_text())["test"]["pretrained"]["macro_f1"]
    agree = sum(a == b for a, b in zip(served, evaluated, strict=True)) / len(served)
    print(f"machine: {machine()}")
    print(f"test documents: {len(served)}; served model {uri}, predicted in {seconds:.1f} s")
    print(f"  served (pyfunc) macro-F1   {served_f1:.4f}")
    print(f"  evaluate macro-F1          {reported:.4f}")
    print(f"  agreement per document     {agree:.2%}")


if __name__ == "__main__":
    main()
