#!/usr/bin/env bash
# The GPU figures of bench/results/README.md in one go, on one H100/H200, in under 10 minutes:
#
#   bench/gpu_check.sh            # from the repository root, with the project's Python environment active
#
# 1. bench.attention: FlexAttention vs SDPA, every mode, packed rows of the PT (2,048) and SFT (4,096) widths;
# 2. bench.train_step, single process (upper bound): pt-packed and sft-packed at aki-4b;
# 3. bench.train_step --engine deepspeed, world size 1: the trainer's step with the recipes' tuned ZeRO-3;
# 4. the same step with ZeRO-2 (ds_configs/zero2_single_gpu.json): the cost of sharding on one GPU;
# 5. LoRA and QLoRA (4-bit base through bitsandbytes) of the single-process step, sft-packed at aki-4b:
#    trainable parameters, optimizer and gradient memory, step time against step 2's full fine-tuning.
#
# Each step has its own time limit (9 min 15 s in all, 9 min 50 s with the kill grace periods) so one
# slow or failing step cannot eat the others' time; each writes bench/results/<benchmark>-gpu.json
# (device name, command, settings, peak memory) and refreshes bench/results/README.md. The log goes to bench/results/gpu_check.log. World size 1 holds every
# shard of the model states (~71 GB for AKI-4B): the DeepSpeed steps need the 141 GB of an H200.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT_DIR:-bench/results}
LOG="$OUT/gpu_check.log"
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$LOG"
status=0

step() {   # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

step 55  attention-L2048 "$PY" -m bench.attention --seq-len 2048 --warmup 2 --iters 10 --out "$OUT"
step 55  attention-L4096 "$PY" -m bench.attention --seq-len 4096 --batch 2 --warmup 2 --iters 10 --tag L4096 --out "$OUT"
step 115 train_step-torch "$PY" -m bench.train_step --runs pt-packed sft-packed --warmup 2 --iters 5 --out "$OUT"
step 135 train_step-zero3 "$PY" -m bench.train_step --engine deepspeed --runs pt-packed sft-packed --warmup 2 \
    --iters 5 --out "$OUT"
step 75  train_step-zero2 "$PY" -m bench.train_step --engine deepspeed --runs pt-packed --warmup 2 --iters 4 \
    --deepspeed ds_configs/zero2_single_gpu.json --out "$OUT"
step 60  train_step-lora "$PY" -m bench.train_step --runs sft-packed --lora --warmup 2 --iters 5 --out "$OUT"
step 60  train_step-qlora "$PY" -m bench.train_step --runs sft-packed --qlora --warmup 2 --iters 5 --out "$OUT"
echo "gpu_check: done in $SECONDS s, exit $status" | tee -a "$LOG"
exit $status
