#!/usr/bin/env bash
# One-command CPU quick start: writes tiny random Anima models and a small captioned image set, then trains
# a LoRA on them for a few dozen steps with sample images, exactly as a real run would (same trainer, same
# flags). The models are random, so the pictures are noise-like: this checks the pipeline, not the art.
#
#   bash examples/quickstart.sh            # everything lands in examples/quickstart_work/
#   STEPS=60 bash examples/quickstart.sh   # longer run
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=examples/quickstart_work
TINY="$WORK/tiny"
OUT="$WORK/output"
LOGS="$WORK/logs"
STEPS="${STEPS:-30}"

# Install only what is missing (the CPU torch build first: an unpinned torch pulls a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install torch==2.13.0
python -c "import accelerate, transformers, safetensors, toml, einops, PIL, tensorboard, matplotlib" 2>/dev/null \
  || python -m pip install -e .

python examples/make_tiny_setup.py "$TINY"

rm -rf "$OUT"
# --cpu keeps the run on the CPU even where a GPU exists; drop it to use the GPU.
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  --num_cpu_threads_per_process 2 anima_train_network.py \
  --pretrained_model_name_or_path "$TINY/dit.safetensors" \
  --qwen3 "$TINY/qwen3" \
  --vae "$TINY/vae.safetensors" \
  --t5_tokenizer_path "$TINY/t5_tokenizer" \
  --dataset_config "$TINY/dataset.toml" \
  --output_dir "$OUT" --output_name tiny_lora --save_model_as safetensors \
  --network_module networks.lora_anima --network_dim 4 --network_alpha 2 --network_train_unet_only \
  --learning_rate 1e-3 --max_train_steps "$STEPS" --seed 42 --mixed_precision no \
  --cache_latents --cache_text_encoder_outputs \
  --qwen3_max_token_length 32 --t5_max_token_length 32 \
  --sample_prompts "$TINY/sample_prompts.txt" --sample_every_n_steps $((STEPS / 2)) --sample_at_first \
  --logging_dir "$LOGS" --log_with tensorboard

echo
echo "LoRA:          $(ls "$OUT"/tiny_lora*.safetensors)"
echo "sample images: $OUT/sample/ ($(ls "$OUT/sample" | wc -l) files)"
echo "pictures:      $OUT/tiny_lora_loss.png (loss / learning rate), $OUT/tiny_lora_samples.png (latest samples)"
echo "logs:          $LOGS  (tensorboard --logdir $LOGS)"
