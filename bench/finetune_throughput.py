"""Fine-tuning throughput at equal or better validation accuracy: our finetune path against the classic example.

Same data (the default splits and a tokenizer trained on train), same width, depth, feed-forward FLOPs and
vocabulary (params.yaml `model`; common.reference_bert_config), same batch size, epochs, learning rates, warmup
and weight decay (`finetune`), same seed, both from random initialization (a BERT cannot load our encoder's
weights, so neither is pretrained here):
- ours: transferpipe.finetuning.finetune: inputs truncated and unpadded on disk, padded per batch to the
  longest example, the configured encoder as the stage builds it (ModernBERT-style, modeling.padding_safe
  attention: plain matrix products on the CPU), best epoch kept by macro-F1;
- reference: the path of the method's example: one tokenizer call per example (encode_plus, which
  transformers 5 folds into __call__) with padding='max_length' and truncation to the same max_length, fp32,
  fixed batches, BertForSequenceClassification, a plain loop;
  its best epoch by validation macro-F1 is reported the same way.
Examples per second count optimizer steps only (evaluation excluded), for both. With --torch-compile ours is
compiled (finetune.torch_compile); the steady state leaves out the compile time (dynamo's and inductor's own
timers, forward and backward graphs), which is printed apart.
With --repeat N the two paths run N times each, alternating which runs first, and the means are compared.
Run: python -m bench.finetune_throughput [--epochs N] [--quick] [--torch-compile] [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification, get_scheduler

from bench.common import REPO, default_data, load, machine, reference_bert_config, report
from transferpipe.evaluation import classification_metrics
from transferpipe.finetuning import finetune
from transferpipe.modeling import new_encoder_config, padding_safe
from transferpipe.params import FinetuneParams, load_section
from transferpipe.tokenization import tokenize_for_classification
from transferpipe.tracking import Run
from transferpipe.training import use_bf16


def reference_finetune(
    model: torch.nn.Module,
    train: dict[str, torch.Tensor],
    validation: dict[str, torch.Tensor],
    label_names: list[str],
    params: FinetuneParams,
) -> tuple[float, dict[str, float]]:
    """The example's loop: fixed (max_length-padded) batches, AdamW, warmup then linear decay, clipping.
    Returns (training examples per second, the best epoch's validation accuracy and macro-F1)."""
    steps_per_epoch = math.ceil(len(train["labels"]) / params.batch_size)
    total = steps_per_epoch * params.epochs
    head = {id(p) for p in model.classifier.parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if id(p) not in head], "lr": params.encoder_learning_rate},
            {"params": list(model.classifier.parameters()), "lr": params.head_learning_rate},
        ],
        weight_decay=params.weight_decay,
    )
    scheduler = get_scheduler("linear", optimizer, math.ceil(params.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(params.seed)
    best, seconds, examples = {"macro_f1": -1.0}, 0.0, 0
    for _ in range(params.epochs):
        model.train()
        start = time.perf_counter()
        for batch_ids in torch.randperm(len(train["labels"]), generator=generator).split(params.batch_size):
            batch = {k: v[batch_ids] for k, v in train.items()}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            examples += len(batch_ids)
        seconds += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            inputs = {k: v for k, v in validation.items() if k != "labels"}
            logits = torch.cat([model(**{k: v[i : i + 64] for k, v in inputs.items()}).logits for i in
                                range(0, len(validation["labels"]), 64)])  # fmt: skip
        scores = classification_metrics(validation["labels"].numpy(), logits.argmax(-1).numpy(), label_names)
        if scores["macro_f1"] > best["macro_f1"]:
            best = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    return examples / seconds, best


def compile_time() -> float:
    """Seconds torch.compile spent so far in this process: dynamo with the forward graphs, and the backward
    graphs, which compile at the first backward."""
    timed = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    seconds = dict(zip(timed[0], map(float, timed[1]), strict=True)) if timed else {}
    return seconds.get("_compile.compile_inner", 0.0) + seconds.get("compile_fx.<locals>.bw_compiler", 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: finetune.epochs of params.yaml")
    parser.add_argument("--quick", action="store_true", help="300 training examples, one epoch (a smoke run)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="ours; default: finetune.precision")
    parser.add_argument("--intermediate-size", type=int, help="ours only (the reference keeps params.yaml's FLOPs)")
    parser.add_argument("--torch-compile", action="store_true", help="ours compiled; compile time reported apart")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, alternating which path runs first")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    datasets.disable_progress_bars()
    params = load()
    ft = load_section(REPO / "params.yaml", "finetune", FinetuneParams)
    epochs = 1 if args.quick else args.epochs or ft.epochs
    ft = dataclasses.replace(
        ft,
        epochs=epochs,
        early_stopping_patience=epochs,  # as many as there are validations: never stops early, like the reference
        precision=args.precision or ft.precision,
        torch_compile=args.torch_compile or ft.torch_compile,
    )
    m, max_length = params["model"], params["tokenize"].max_length
    splits, tokenizer = default_data(params)
    if args.quick:
        splits = {**splits, "train": splits["train"].iloc[:300]}
    label_names = [str(i) for i in range(int(splits["train"]["label"].max()) + 1)]
    texts = {name: splits[name]["text"].tolist() for name in ("train", "validation")}
    labels = {name: splits[name]["label"].tolist() for name in ("train", "validation")}

    # Ours: the tokenize stage's classification inputs, then the finetune stage's path.
    start = time.perf_counter()
    ours_data = datasets.DatasetDict(
        {name: tokenize_for_classification(tokenizer, texts[name], labels[name], max_length) for name in texts}
    )
    ours_tokenize = time.perf_counter() - start
    config = new_encoder_config(m, tokenizer)
    config.intermediate_size = args.intermediate_size or config.intermediate_size
    config.num_labels = len(label_names)
    config.classifier_dropout = ft.classifier_dropout
    if hasattr(config, "classifier_pooling"):
        config.classifier_pooling = ft.classifier_pooling

    def run_ours() -> tuple[float, dict[str, float], float]:
        torch._dynamo.reset()  # compiled: each round compiles as a new process would (inductor's disk cache stays)
        torch.manual_seed(ft.seed)
        ours = padding_safe(AutoModelForSequenceClassification.from_config(config))
        compiled_before = compile_time()
        result = finetune(ours, tokenizer, ours_data, label_names, ft, Run(None), torch.device("cpu"))
        compiling = compile_time() - compiled_before
        trained = ft.epochs * len(ours_data["train"])  # every step runs: no early stopping here
        return trained / (trained / result.examples_per_second - compiling), result.best, compiling

    # Reference: per-example encode_plus padded to max_length, BertForSequenceClassification, a plain loop.
    start = time.perf_counter()
    ref_data = {}
    for name in texts:
        encoded = [tokenizer(t, padding="max_length", truncation=True, max_length=max_length) for t in texts[name]]
        ref_data[name] = {
            "input_ids": torch.tensor([e["input_ids"] for e in encoded]),
            "attention_mask": torch.tensor([e["attention_mask"] for e in encoded]),
            "labels": torch.tensor(labels[name]),
        }
    ref_tokenize = time.perf_counter() - start

    def run_reference() -> tuple[float, dict[str, float]]:
        torch.manual_seed(ft.seed)
        reference = BertForSequenceClassification(reference_bert_config(m, tokenizer, num_labels=len(label_names)))
        return reference_finetune(reference, ref_data["train"], ref_data["validation"], label_names, ft)

    # Rounds alternate which path runs first (ours, reference, reference, ours, ...): the machine's speed drifts
    # by 10-20% within minutes, and a linear drift cancels out of the means of such pairs.
    ours_runs, ref_runs = [], []
    for round_ in range(args.repeat):
        for path in ("ours", "reference") if round_ % 2 == 0 else ("reference", "ours"):
            if path == "ours":
                ours_runs.append(run_ours())
            else:
                ref_runs.append(run_reference())

    lengths = np.array([len(ids) for ids in ours_data["train"]["input_ids"]])
    print(
        f"machine: {machine()}; {len(texts['train'])} training examples x {ft.epochs} epochs, batch {ft.batch_size}, "
        f"max_length {max_length} ({(lengths < max_length).mean():.0%} of examples shorter; mean {lengths.mean():.0f} "
        f"tokens), hidden {m.hidden_size}, {m.num_hidden_layers} layers, vocabulary {len(tokenizer)}; ours in "
        f"{'bf16 autocast' if use_bf16(ft.precision, torch.device('cpu')) else 'fp32'}"
        f"{', compiled' if ft.torch_compile else ''}, reference in fp32"
    )
    print(f"  tokenizing train + validation: ours {ours_tokenize:.2f} s, reference {ref_tokenize:.2f} s")
    if args.repeat > 1:
        for i, (ours_run, ref_run) in enumerate(zip(ours_runs, ref_runs, strict=True)):
            first = "ours" if i % 2 == 0 else "reference"
            print(f"  round {i + 1} ({first} first): ours {ours_run[0]:.1f}, reference {ref_run[0]:.1f} examples/s, "
                  f"{ours_run[0] / ref_run[0]:.2f}x")  # fmt: skip
    # The worst of ours against the best of the reference (one seed: the runs agree unless kernels differ).
    ours_best = min((run[1] for run in ours_runs), key=lambda best: best["accuracy"])
    ref_best = max((run[1] for run in ref_runs), key=lambda best: best["accuracy"])
    for name, best in (("ours", ours_best), ("reference", ref_best)):
        print(f"  {name:<10} best validation accuracy {best['accuracy']:.3f}, macro-F1 {best['macro_f1']:.3f}")
    equal_or_better = ours_best["accuracy"] >= ref_best["accuracy"]
    print(f"  equal or better validation accuracy: {'yes' if equal_or_better else 'NO'}")
    if args.torch_compile:
        compiling = " + ".join(f"{run[2]:.1f}" for run in ours_runs)
        print(f"  ours compiled: {compiling} s of compiling left out of its examples/s (steady state)")
    ours_eps = statistics.mean(run[0] for run in ours_runs)
    ref_eps = statistics.mean(run[0] for run in ref_runs)
    report("fine-tuning throughput" + (f", mean of {args.repeat} rounds" if args.repeat > 1 else ""), "examples/s",
           ours_eps, ref_eps, target=2.5)  # fmt: skip


if __name__ == "__main__":
    main()
