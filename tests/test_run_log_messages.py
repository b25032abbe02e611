"""What a user reads in the console/log file of a run: the messages of the library modules (cache reuse and
re-encoding, skipped images, LoRA setup) reach the trainer's handlers, not only its own logger."""

from __future__ import annotations

import logging
import shutil

import anima_train_network
from library.training.reporting import logger


def test_log_says_disk_caches_were_reused_and_why_a_caption_was_re_encoded(tiny_setup, tmp_path, monkeypatch):
    tiny = tiny_setup
    images = tmp_path / "img" / "2_shape"  # DreamBooth folder mode: repeats_name
    shutil.copytree(tiny.dataset_toml.parent / "images", images)
    log = tmp_path / "run.log"

    def train() -> str:
        argv = [
            "--pretrained_model_name_or_path", str(tiny.dit), "--qwen3", str(tiny.qwen3_dir), "--vae", str(tiny.vae),
            "--t5_tokenizer_path", str(tiny.t5_tokenizer_dir), "--train_data_dir", str(images.parent),
            "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
            "--bucket_reso_steps", "16", "--caption_extension", ".txt", "--output_dir", str(tmp_path / "out"),
            "--network_module", "networks.lora_anima", "--network_dim", "4", "--max_train_steps", "1",
            "--qwen3_max_token_length", "8", "--t5_max_token_length", "8", "--max_data_loader_n_workers", "0",
            "--cache_latents", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
            "--cache_text_encoder_outputs_to_disk", "--console_log_file", str(log),
        ]
        assert anima_train_network.main(argv) == 0
        text = log.read_text()
        log.unlink()
        return text

    first = train()
    assert "0 reused from disk" in first
    caption = sorted(images.glob("*.txt"))[0]
    caption.write_text("a caption the user edited")
    second = train()
    count = len(list(images.glob("*.txt")))
    assert f"latent cache: {count} image(s), {count} reused from disk, 0 to encode" in second
    assert "re-encoding 1 text cache(s): caption changed" in second
    assert f"{count - 1} reused from disk, 1 to encode" in second
    # Latents normalised by an earlier formula are not reused: the formula is part of the VAE's identity.
    import library.models.vae

    monkeypatch.setattr(library.models.vae, "LATENT_NORMALISATION", "an earlier formula")
    third = train()
    assert f"latent cache: {count} image(s), 0 reused from disk, {count} to encode" in third
    assert "vae changed" in third


def test_only_the_main_process_logs_below_errors(monkeypatch):
    from library.training.reporting import setup_console_logging

    monkeypatch.setenv("RANK", "1")
    setup_console_logging("INFO")
    assert logger.level == logging.ERROR and logging.getLogger("library").level == logging.ERROR
    monkeypatch.setenv("RANK", "0")
    setup_console_logging("INFO")
    assert logger.level == logging.INFO
