#!/usr/bin/env bash
# Wheels for the GPU check (docs/gpu.md: Running the GPU check), fetched here where pip reaches the registry:
# everything the GPU machine lacks to run `dvc repro` with MLflow (bench/gpu_wheels.py says what and why)
# goes into .whl/ (git-ignored through .git/info/exclude), each requirement is checked against the carried
# wheels and the device's packages, and the size of what will travel is printed against the 64 MiB limit.
#
# Run from the repository root: bash bench/gpu_wheels.sh   (--check-only: check .whl/ as it is)
set -euo pipefail
cd "$(dirname "$0")/.."

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

python3 -m bench.gpu_wheels --dest .whl "$@"

# What a device call sends: tracked files, untracked files git does not ignore, and the carried .whl/.
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null || true) |
    awk '{ s += $1 } END { print s + 0 }')
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$((tree + wheels))
limit=$((64 * 1024 * 1024))
awk -v t="$tree" -v w="$wheels" 'BEGIN { m = 1048576; printf "gpu_wheels: working tree %.1f MiB + wheels %.1f MiB = %.1f MiB of the 64 MiB a device call may send\n", t / m, w / m, (t + w) / m }'
if ((total > limit - 4 * 1024 * 1024)); then
    echo "gpu_wheels: less than 4 MiB left under the limit; carry fewer wheels" >&2
    exit 1
fi
