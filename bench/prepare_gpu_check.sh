#!/usr/bin/env bash
# Run before handing the checkout to the device: copies the golden files the GPU tests read from ../shared
# (or $ANIMA_SHARED_DIR) into gpu_assets/golden/ (or $GPU_ASSETS/golden/). The device receives tracked files and
# untracked files that git does not ignore, and not ../shared, so gpu_assets/ is deliberately NOT in
# .gitignore; do not commit it (delete it after the device run). About 12 MB: the tiny DiT, its golden outputs
# and the tiny LoRA; the large tiny-Qwen3 and VAE files stay behind (tests needing them skip with a reason).
set -eu
cd "$(dirname "$0")/.."
SOURCE="${ANIMA_SHARED_DIR:-../shared}/golden"
DEST="${GPU_ASSETS:-gpu_assets}/golden"
FILES="dit_tiny.safetensors dit_tiny_golden.safetensors lora_tiny.safetensors text_tiny_golden.safetensors
vae_tiny_golden.safetensors README.md"
mkdir -p "$DEST"
for name in $FILES; do
    if [ ! -f "$SOURCE/$name" ]; then
        echo "error: $SOURCE/$name not found; set ANIMA_SHARED_DIR to the shared reference folder" >&2
        exit 2
    fi
    cp "$SOURCE/$name" "$DEST/$name"
done
echo "copied $(echo $FILES | wc -w) files ($(du -sh "$DEST" | cut -f1)) to $DEST; delete $(dirname "$DEST") after the device run"
