#!/usr/bin/env bash
# The GPU checks, for whoever has a CUDA device: run as is from the repository root, in the project's environment
# (make install TORCH=torch for a CUDA build of torch). At most ten minutes on one large GPU; each result is written
# to experiments/results/ as soon as it exists, so a check cut short keeps what it finished.
#
#   1. pytest -m gpu: side-stream copies behind a busy compute stream, pinned buffers and their accounting, fused and
#      foreach AdamW, resume on the device, no device memory left after fit, a run under TORCH_CUDA_SANITIZER=1,
#      layers_per_block="auto" on the device's budget (traced activations against the real CUDA steps);
#      hift_fsdp (FSDP2, world size 1, bf16-true): the waiting blocks' masters and AdamW state in pinned host memory
#      read from each DTensor's local shard, a consolidated checkpoint resumed bit for bit, a run under the sanitizer,
#      and one cycle's allocator history -> experiments/results/gpu_tests.txt, gpu_fsdp_cycle.json and
#      gpu_fsdp_cycle_snapshot.pickle (open it at https://pytorch.org/memory_viz)
#   2. experiments/gpu_memory.py --shape 7b: peak device memory of full fine-tuning and HiFT, one process per row,
#      beside the planner's total with activations
#      -> experiments/results/gpu_memory.md
#   3. the same for hift_fsdp (FSDP2, world size 1) in bf16-true -> experiments/results/gpu_memory_fsdp.md
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
