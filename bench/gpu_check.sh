#!/usr/bin/env bash
# One prepared GPU session (~8 minutes on one H200): CUDA tests, then DiT / training-step / VAE benchmarks.
#   OUT=/some/dir bash bench/gpu_check.sh        (default OUT: ./gpu_out)
# Every step has its own time limit and log under $OUT; a failing step does not stop the others.
# $OUT/summary.txt lists each step's exit status (124 = hit its time limit).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$OUT/$name.log"
    timeout --kill-after=10 "$seconds" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${SECONDS}s-total $((SECONDS - start))s" | tee -a "$SUMMARY"
    return 0
}

# Environment: torch with CUDA is expected to be preinstalled; the machine may have no network.
step env 30 bash -c 'nvidia-smi; python -c "import sys, torch; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0))"'
if ! python -c "import library.models.dit, networks.lora_anima, safetensors, einops, toml, accelerate, transformers" 2>/dev/null; then
    step install 90 python -m pip install --no-build-isolation -e .
fi

# CUDA tests (block swap, offload checkpointing and any other @pytest.mark.gpu test).
step pytest_gpu 90 python -m pytest -q -p no:cacheprovider -m gpu -rA tests/

# One LoRA training step of the full 2B DiT per memory configuration, 1024 px, bf16.
step train_step_1024 180 python bench/bench_train_step.py --device cuda --dtype bf16 --resolution 1024 --steps 3 \
    --configs plain ckpt cpu_offload unsloth swap14 swap14+ckpt swap26+ckpt

# DiT forward / forward+backward at 1024 and 512, bf16, plain and checkpointed.
step dit 75 python bench/bench_dit.py --device cuda --dtype bf16 --resolution 1024 512 --steps 3
step dit_ckpt 40 python bench/bench_dit.py --device cuda --dtype bf16 --resolution 1024 --steps 3 --gradient_checkpointing

# VAE encode/decode at 512 and 1024, bf16, ours (unchunked and chunked) vs diffusers.
step vae 75 python bench/bench_vae.py --device cuda --dtype bfloat16 --sizes 512 1024 --chunk-sizes 0 64

# Whatever is left: the training step at 512 (skipped if the time limit cuts it).
step train_step_512 40 python bench/bench_train_step.py --device cuda --dtype bf16 --resolution 512 --steps 3 \
    --configs plain ckpt unsloth swap26+ckpt

echo "done; logs in $OUT" | tee -a "$SUMMARY"
