#!/usr/bin/env bash
# The GPU checks, for whoever has a CUDA device: run as is from the repository root, in the project's environment
# (make install TORCH=torch for a CUDA build of torch). At most ten minutes on one large GPU; each result is written
# to experiments/results/ as soon as it exists, so a check cut short keeps what it finished.
#
#   1. pytest -m gpu (the tests marked gpu say what each checks) -> gpu_tests.txt, gpu_fsdp_cycle.json and
#      gpu_fsdp_cycle_snapshot.pickle (one hift_fsdp cycle's allocator history: https://pytorch.org/memory_viz)
#   2. experiments/gpu_memory.py --shape 7b: full fine-tuning and HiFT against the planner -> gpu_memory.md
#   3. the same for hift_fsdp (FSDP2, world size 1) in bf16-true -> gpu_memory_fsdp.md
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=experiments/results
mkdir -p "$RESULTS"

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: these checks need one'" || exit 1
"$PYTHON" - <<'PY' > "$RESULTS/gpu_tests.txt"
import torch
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
HIFT_GPU_RESULTS="$RESULTS" timeout 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rA 2>&1 | tee -a "$RESULTS/gpu_tests.txt"
timeout 180 "$PYTHON" experiments/gpu_memory.py --shape 7b --precisions 32-true bf16-true --out "$RESULTS/gpu_memory.md"
timeout 120 "$PYTHON" experiments/gpu_memory.py --shape 7b --precisions bf16-true --methods hift_fsdp \
    --out "$RESULTS/gpu_memory_fsdp.md"
