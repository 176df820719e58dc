#!/usr/bin/env bash
# GPU checks of offset-cir, in one run on a CUDA machine, ending in under 8 minutes:
#   1. the machine: GPU, driver, python3's torch;
#   2. install the wheels carried in .whl/ (the packages the machine's image lacks) into /tmp/site;
#   3. pytest -m cuda tests/test_cuda.py (mixed-precision steps, resume on cuda, cuda vs CPU features, masks);
#   4. a 1-process torchrun of the trainer on the GPU (tiny backbone, synthetic data, fp16), plus an NCCL
#      all-reduce/all-gather under torchrun (the trainer opens a process group only for WORLD_SIZE > 1);
#   5. benchmarks/train_speed.py --device cuda (ViT-H-14 random init, bf16 and fp16, with and without
#      gradient checkpointing).
# Every step has its own timeout inside an overall budget (GPU_CHECK_BUDGET_S, default 450 s; a step is killed
# 10 s after its timeout); a step that fails or times out is reported and the next one still runs. The log goes
# to $OUT/gpu_check.log (the device tool's folder that comes back), or runs/gpu_check/ when OUT is unset.
# Exit status: the number of failed steps.
#
# Run it from the repository root, on the device machine:
#     bash benchmarks/gpu_check.sh            (the device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"])
#
# The wheels (fetched once, on a machine with the package index, into the ignored folder .whl/; the device
# machine has Python 3.12 with its own torch/torchvision/transformers/timm and no network). All four are pure
# Python; pins as in pyproject.toml:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
# (open_clip_torch needs ftfy and wcwidth, which the image lacks; timm is carried to match our pin; regex, tqdm,
# huggingface-hub and safetensors are on the image.) offset_cir itself runs from this checkout (PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOG_DIR=${OUT:-$ROOT/runs/gpu_check}
mkdir -p "$LOG_DIR"
LOG=$LOG_DIR/gpu_check.log
: >"$LOG"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
PY=${PYTHON:-python3}
# The trainer step's device and precision (GPU_CHECK_TRAIN_DEVICE=cpu checks that step on a machine without a GPU).
TRAIN_DEVICE=${GPU_CHECK_TRAIN_DEVICE:-cuda}
TRAIN_PRECISION=$([ "$TRAIN_DEVICE" = cuda ] && echo fp16 || echo fp32)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8
FAILED=0
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME SECONDS FUNCTION: run the shell function in a child bash under a timeout of at most SECONDS and at
# most what the budget leaves (timeout runs programs, not functions: the functions and variables are exported).
step() {
    local name=$1 want=$2 fn=$3
    local t
    t=$(left)
    [ "$want" -lt "$t" ] && t=$want
    if [ "$t" -lt 10 ]; then
        say "== $name: SKIPPED (budget spent)"
        SUMMARY+=("$name: skipped (budget)")
        FAILED=$((FAILED + 1))
        return
    fi
    say "== $name (timeout ${t}s, $(left)s of the budget left)"
    local s0 rc
    s0=$(date +%s)
    timeout --kill-after=10 "$t" bash -c "set -o pipefail; $fn" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - s0))
    if [ "$rc" -eq 0 ]; then
        SUMMARY+=("$name: ok (${took}s)")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        SUMMARY+=("$name: TIMED OUT after ${took}s")
        FAILED=$((FAILED + 1))
    else
        SUMMARY+=("$name: FAILED, exit $rc (${took}s)")
        FAILED=$((FAILED + 1))
    fi
}

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available()); assert torch.cuda.is_available()'
}

install_wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no wheels in .whl/ (see this script's header for how to fetch them); using the image's packages"
        "$PY" -c 'import open_clip' || return 1
        return 0
    fi
    ls .whl/*.whl
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

cuda_tests() {
    "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -o addopts="-ra" --timeout 240
}

torchrun_trainer() {
    "$PY" -m offset_cir.cli synth --out "$WORK/synth" --seed 0 --train 64 --val 16 --test 16 --no-progress &&
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m offset_cir.cli train --config synthetic \
        --no-progress "data.root=$WORK/synth" "out_dir=$WORK/run" "device=$TRAIN_DEVICE" "precision=$TRAIN_PRECISION" \
        batch_size=16 \
        max_steps=20 eval_every_epochs=1 tensorboard=false &&
    "$PY" - "$WORK/run" <<'EOF'
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
losses = [r["loss"] for r in rows if "loss" in r]
print(f"{len(rows)} metric rows, losses {losses[:3]} ... {losses[-3:]}")
assert losses and all(math.isfinite(x) for x in losses), "non-finite or missing training losses"
assert (run / "last" / "model.safetensors").is_file(), "no last/ checkpoint"
EOF
}

nccl_collectives() {
    cat >"$WORK/nccl_check.py" <<'EOF'
import os, torch, torch.distributed as dist
from offset_cir.distributed import gather_with_grad
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.arange(6, dtype=torch.float32, device="cuda").view(3, 2).requires_grad_(True)
t = x.detach().clone()
dist.all_reduce(t)
rows, offset = gather_with_grad(x)
rows.sum().backward()
assert torch.equal(t, x.detach() * dist.get_world_size()) and offset == 0 and rows.shape[0] == 3 * dist.get_world_size()
print("nccl", torch.cuda.nccl.version(), "world", dist.get_world_size(), "all_reduce and all_gather ok; grad", x.grad.flatten().tolist())
dist.destroy_process_group()
EOF
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 "$WORK/nccl_check.py"
}

train_speed() {
    "$PY" benchmarks/train_speed.py --device cuda --steps 3
}

export PY ROOT WORK TRAIN_DEVICE TRAIN_PRECISION
export -f machine install_wheels cuda_tests torchrun_trainer nccl_collectives train_speed

say "offset-cir GPU check, $(date -u +%FT%TZ), budget ${BUDGET}s, log $LOG"
step machine 60 machine
step wheels 90 install_wheels
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
step cuda-tests 200 cuda_tests
step torchrun-trainer 100 torchrun_trainer
step nccl 40 nccl_collectives
step train-speed 240 train_speed
say "== summary ($(($(date +%s) - START))s)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
rm -rf "$WORK"
exit "$FAILED"
