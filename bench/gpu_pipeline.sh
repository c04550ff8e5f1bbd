#!/usr/bin/env bash
# The GPU check in one device call (docs/gpu.md: Running the GPU check), from the repository root with .whl/
# carried (bench/gpu_wheels.sh fetches it):
#   1. installs the carried wheels into /tmp/site (dvc, MLflow, datasets, the corpus: the device lacks them);
#   2. writes params.yaml: the GPU-scale configuration (bench/gpu_scale.py's GPU_SCALE, what the documented
#      `dvc exp run -S ...` sets) with pretrain.max_steps=$PRETRAIN_STEPS, MLflow on;
#   3. `dvc repro tokenize` (prepare, tokenize), then a torch.profiler profile of pretraining steps with MFU
#      and HFU (bench/gpu_profile.py), then `dvc repro` of the rest (pretrain, finetune x 2, evaluate), cut
#      at the deadline so that the last steps still run;
#   4. the pipeline pretrain's own tokens/s as MFU and HFU, the MLflow store exported (bench/export_mlflow.py);
#   5. into $OUT: run.log (every step's output, written as it runs: a call cut off at its limit still
#      returns it), profile.txt, and results.tar.gz (params, dvc.lock, metrics/, plots/, the MLflow export,
#      the profile's numbers and trace, versions).
# A rehearsal on a CPU: REQUIRE_CUDA=0 GPU_SCALE=0 BASE_PARAMS=tests/fixtures/params-tiny.yaml WHEELS=none
#   OUT=/tmp/out bash bench/gpu_pipeline.sh   (in a copy of the repository: it rewrites params.yaml)
set -euo pipefail
export PYTHONUNBUFFERED=1

PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000} # GPU_SCALE's; ~100 s at the 345,000 tokens/s an H200 ran (64 x 512 a step)
BUDGET_S=${BUDGET_S:-500}              # this script's wall time; dvc repro is stopped in time for steps 4 and 5
PROFILE_STEPS=${PROFILE_STEPS:-20}     # steps under torch.profiler (after 5 warm-up and 20 timed ones)
GPU_SCALE=${GPU_SCALE:-1}              # 0: BASE_PARAMS as they are
BASE_PARAMS=${BASE_PARAMS:-params.yaml}
WHEELS=${WHEELS:-.whl}                 # none: the packages are installed already
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
OUT=${OUT:-/tmp/gpu_pipeline}

start=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/run.log"
RESULTS=$(mktemp -d /tmp/gpu-results.XXXXXX)
: >"$LOG"
say() { echo "=== [$((SECONDS - start)) s] $*" | tee -a "$LOG"; }
step() {
    say "$*"
    "$@" 2>&1 | tee -a "$LOG"
}

say "1. carried wheels"
if [[ $WHEELS != none ]]; then
    wheels=("$WHEELS"/*.whl)
    say "installing ${#wheels[@]} wheels from $WHEELS into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${wheels[@]}" 2>&1 | tee -a "$LOG"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD"
# dvc.yaml's commands say `python`: the python3 that holds torch, whatever `python` is here.
mkdir -p /tmp/gpu-bin
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >/tmp/gpu-bin/python
chmod +x /tmp/gpu-bin/python
export PATH="/tmp/gpu-bin:$PATH"
# No network there: nothing may wait on a hub, telemetry or a git binary that is not installed.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 GIT_PYTHON_REFRESH=quiet MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

step nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
step python3 - "$REQUIRE_CUDA" <<'EOF'
import sys

import datasets, dvc, mlflow, sklearn, torch, transformers
from dvc import __version__ as dvc_version

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, datasets {datasets.__version__}, dvc {dvc_version}, mlflow {mlflow.__version__}, "
      f"scikit-learn {sklearn.__version__}; GPU: {torch.cuda.get_device_name() if cuda else 'none'}")
if sys.argv[1] == "1" and not cuda:
    sys.exit("no CUDA device: the GPU-scale pipeline would take hours on this CPU")
EOF
say "pip check: the carried wheels' requirements against the versions the device has"
python3 -m pip check >"$RESULTS/pip-check.txt" 2>&1 || true
head -40 "$RESULTS/pip-check.txt" | tee -a "$LOG"

say "2. params.yaml and the repository's SCM"
if [[ ! -e .git ]]; then
    # The device gets the working tree without .git: a fresh repository (or none, if git is missing).
    if command -v git >/dev/null; then
        git init -q
        printf '/.whl/\n' >>.git/info/exclude
        git add -A
        git -c user.name=gpu-check -c user.email=gpu-check@localhost commit -qm "the working tree as sent"
    else
        python3 -m dvc config --local core.no_scm true
    fi
fi
step python3 - "$BASE_PARAMS" "$GPU_SCALE" "$PRETRAIN_STEPS" <<'EOF'
import sys
from pathlib import Path

from bench.gpu_scale import GPU_SCALE, write_params
from transferpipe.params import read_params_file

base, scale, steps = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
overrides = {**GPU_SCALE, "pretrain.max_steps": steps} if scale else {}
write_params(Path("params.yaml"), read_params_file(base), {**overrides, "tracking.enabled": True})
print(f"params.yaml: {base} with {overrides}")
EOF
cp params.yaml "$RESULTS/params.yaml"

say "3. dvc repro tokenize, the profile, dvc repro"
step python3 -m dvc repro tokenize
if ! step python3 -m bench.gpu_profile --params params.yaml --data data/blocks --tokenizer models/tokenizer \
    --steps 20 --profile-steps "$PROFILE_STEPS" --out "$RESULTS/profile" --trace; then
    say "the profile failed; the pipeline goes on"
fi
cp "$RESULTS/profile/profile.txt" "$OUT/" 2>/dev/null || true
left=$((BUDGET_S - (SECONDS - start) - 60)) # a minute kept for steps 4 and 5
status=0
if ((left < 30)); then
    status=1
    say "no time left for dvc repro"
elif ! step timeout -k 20 "$left" python3 -m dvc repro; then
    status=1
    say "dvc repro failed or reached the deadline ($left s)"
fi

say "4. utilization of the pipeline's pretrain, the MLflow export"
if [[ -f metrics/pretrain.json ]]; then
    step python3 -m bench.gpu_profile --params params.yaml --tokenizer models/tokenizer \
        --from-metrics metrics/pretrain.json --out "$RESULTS/profile" || status=1
fi
step python3 -m bench.export_mlflow --out "$RESULTS/mlflow" || status=1
step python3 -m dvc metrics show || true

say "5. results"
cp -r dvc.lock metrics plots "$RESULTS/" 2>/dev/null || true
pack() { tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .; }
pack
if (($(stat -c %s "$OUT/results.tar.gz") > 15 * 1024 * 1024)); then
    rm -f "$RESULTS/profile/trace.json.gz" && pack # what comes back is at most 16 MiB a file
fi
say "done in $((SECONDS - start)) s, status $status; $OUT: $(cd "$OUT" && echo *)"
exit "$status"
