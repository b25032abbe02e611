#!/usr/bin/env bash
# The prepared device check: one command, under 9 minutes on one H200, for the device image as it is
# (python3 with torch+CUDA, accelerate, transformers, safetensors, einops, pillow, pytest; no toml, diffusers,
# bitsandbytes or attention packages; no network, nothing installed).
#
#   bash bench/prepare_gpu_check.sh     # first, on the machine that holds ../shared: copies the golden files the
#                                       # GPU tests read into gpu_assets/ (untracked, not ignored: it travels)
#   OUT=/some/dir bash bench/gpu_check.sh         # on the device; default OUT: ./gpu_out
#   bash bench/gpu_check.sh --dry                 # on a CPU: the same steps with tiny sizes (checks the script)
#
# Each step has its own time limit (the limits add up to 525 s < 540 s); a failing step does not stop the
# others. Everything a step prints goes to $OUT/run.log; the tables go to $OUT/summary.md. Only those two files
# are written under $OUT. The step status and the tables are printed last.
# GPU_CHECK_STEPS="env sdpa" runs only the named steps.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu_out}"
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; fi
mkdir -p "$OUT"
LOG="$OUT/run.log"
SUMMARY="$OUT/summary.md"
: > "$LOG"
: > "$SUMMARY"
STATUS="| step | exit | seconds | limit |"$'\n'"|---|---|---|---|"
ONLY=" ${GPU_CHECK_STEPS:-} "

if [ -d gpu_assets/golden ]; then
    export ANIMA_SHARED_DIR="$PWD/gpu_assets"  # the golden files prepare_gpu_check.sh copied
fi

step() {  # step NAME SECONDS COMMAND...   (exit 124: hit its time limit)
    local name="$1" seconds="$2"
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return 0; fi
    local start=$SECONDS
    echo "== $name (limit ${seconds}s): $*" >> "$LOG"
    timeout --kill-after=5 "$seconds" "$@" >> "$LOG" 2>&1
    local rc=$?
    local used=$((SECONDS - start))
    echo "$name: exit $rc after ${used}s (limit ${seconds}s)"
    STATUS="$STATUS"$'\n'"| $name | $rc | $used | $seconds |"
    return 0
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    TRAIN_SIZE=(--blocks 3 --model_channels 128 --num_heads 2 --context_length 16 --warmup 1 --steps 1)
    TRAIN_1024=(--resolution 64 --configs plain swap1+ckpt fp8 fp16 --config_timeout 60 --compile_timeout 60)
    PROFILE_1024=(--resolution 64 --configs plain --config_timeout 60)
    TRAIN_512=(--resolution 32 --configs ckpt --config_timeout 60)
    PARITY=(--blocks 3 --model_channels 128 --num_heads 2 --tokens 16 --configs ckpt swap swap-forward fp8 fp16)
    SDPA=(--scale 0.0625 --steps 1)
    VAE_BITS=(--scale 0.0625)
else
    DEVICE=cuda
    TRAIN_SIZE=(--blocks 28 --warmup 1 --steps 3)
    # compile's first step compiles the block (a cold inductor cache, unless the parity step warmed it).
    TRAIN_1024=(--resolution 1024 --config_timeout 60 --compile_timeout 110 --configs plain ckpt unsloth cpu_offload
                swap8 swap8+ckpt swap26 swap26+ckpt fp8 fp16 compile)
    PROFILE_1024=(--resolution 1024 --config_timeout 30 --configs plain swap26+ckpt)
    TRAIN_512=(--resolution 512 --config_timeout 20 --configs plain ckpt swap26+ckpt fp8)
    PARITY=(--blocks 4 --tokens 4096 16)
    SDPA=(--steps 10)
    VAE_BITS=()
fi
# test_compile.py last: its inductor compile is the slow one, and a time limit that cuts it leaves the others run.
GPU_TESTS="$(grep -l "pytest.mark.gpu" tests/test_*.py | grep -v test_compile.py | tr '\n' ' ') tests/test_compile.py"

step env 15 bash -c "nvidia-smi || true; $PY -c 'import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'; $PY -c 'import importlib.util as u; print({m: bool(u.find_spec(m)) for m in (\"toml\", \"diffusers\", \"bitsandbytes\", \"flash_attn\", \"xformers\")})'"
# CUDA tests: every test file with a @pytest.mark.gpu test (they import without toml/diffusers/bitsandbytes).
step pytest_gpu 90 "$PY" -m pytest -v -p no:cacheprovider -m gpu -rA $GPU_TESTS  # -v: a cut run still shows each result
# Swap / offload / fp8 / compile against the plain model at full width, at 4096 tokens and at 16.
step parity 75 "$PY" bench/bench_gpu_parity.py --device "$DEVICE" "${PARITY[@]}" --summary "$SUMMARY"
step sdpa 25 "$PY" bench/bench_sdpa.py --device "$DEVICE" "${SDPA[@]}" --summary "$SUMMARY"
# Whether the VAE's one-slice 2-D causal conv rounds like sd-scripts' padded 3-D conv on this backend.
step vae_bits 20 "$PY" bench/bench_vae_conv_bits.py --device "$DEVICE" "${VAE_BITS[@]}" --summary "$SUMMARY"
# Step time, peak allocated/reserved memory and MFU of the 2B DiT's LoRA step per configuration, bf16.
step train_1024 220 "$PY" bench/bench_train_step.py --device "$DEVICE" "${TRAIN_SIZE[@]}" "${TRAIN_1024[@]}" \
    --summary "$SUMMARY"
# Kernel time by kind (GEMM / attention / memcpy / other) from torch.profiler, one step each.
step profile_1024 35 "$PY" bench/bench_train_step.py --device "$DEVICE" "${TRAIN_SIZE[@]}" "${PROFILE_1024[@]}" \
    --profile --summary "$SUMMARY"
step train_512 45 "$PY" bench/bench_train_step.py --device "$DEVICE" "${TRAIN_SIZE[@]}" "${TRAIN_512[@]}" \
    --summary "$SUMMARY"

echo
echo "## Steps (logs in $LOG)"
echo "$STATUS"
echo
echo "pytest -m gpu: $(grep -E "[0-9]+ (passed|failed|skipped|deselected|error)" "$LOG" | tail -n 1)"
cat "$SUMMARY"
