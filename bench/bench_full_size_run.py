"""A whole LoRA training run at full model size on the CPU: wall time and peak memory, ours and sd-scripts'.

Writes random weights in the released file layouts once (2B DiT + adapter with ``net.`` keys, the single-file
Qwen3-0.6B with ``model.`` keys, the Qwen-Image VAE with ComfyUI keys; all bf16, about 5.5 GB) and two captioned
256 x 256 images, then runs this trainer's ``anima_train_network.py`` and, with ``--sd_scripts``, sd-scripts' one
on the same flags (float32, cached latents and text outputs, gradient checkpointing, LoRA rank 16 on the DiT,
AdamW, ``--steps`` steps, no loader workers), each in its own process. Peak memory is the process's maximum
resident set (``ru_maxrss`` from ``wait4``), which also counts pages of memory-mapped model files.

    python bench/bench_full_size_run.py --work /tmp/full [--sd_scripts /path/to/sd-scripts] [--steps 2]

sd-scripts runs with the import stand-ins of ``bench/bench_sd_scripts_parity.py`` (a torchvision stand-in where
torchvision does not import, two transformers-5 shims) and its own bundled tokenizer configs. The last line is
one JSON object: {"ours": {"seconds", "peak_gib", "exit"}, "sd_scripts": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
RESOLUTION = 256
# The random model files, in the released layouts, written into --work.
DIT_FILE, QWEN3_FILE, VAE_FILE = "dit.safetensors", "qwen_3_06b_base.safetensors", "qwen_image_vae.safetensors"


def tokenizers_problem(tokenizers: Path) -> str | None:
    """The error line for a --tokenizers folder without the Qwen3 or T5 tokenizer folder, else None."""
    for folder in ("qwen3_06b", "t5_old"):
        if not (tokenizers / folder).is_dir():
            return (f"error: --tokenizers {tokenizers} has no {folder}/ folder; pass the folder holding the Qwen3 "
                    "and T5 tokenizer files")
    return None


def dataset_toml_text(image_dir: Path, batch_size: int = 1) -> str:
    """A one-subset dataset config over image_dir at RESOLUTION, without buckets."""
    return (f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = {RESOLUTION}\n'
            f'batch_size = {batch_size}\nenable_bucket = false\n\n[[datasets.subsets]]\n'
            f'image_dir = "{image_dir.resolve().as_posix()}"\nnum_repeats = 1\n')


def _write_models(work: Path, tokenizers: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(REPO))
    from library.models.dit import Anima, AnimaConfig
    from library.models.tiny import _randomize_like_reference
    from library.models.vae import QwenImageVAE, VAEConfig
    from library.models.vae_keys import diffusers_to_original_keys

    generator = torch.Generator().manual_seed(0)

    def randomized(meta_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One tensor at a time, straight to bf16: the float32 draw of the whole 2B model would need 8 GB more.
        out = {}
        for key, tensor in meta_state.items():
            draw = _randomize_like_reference({key: torch.empty(tensor.shape, device="meta")}, generator)
            out[key] = draw[key].to(torch.bfloat16)
        return out

    dit_path = work / DIT_FILE
    if not dit_path.exists():
        with torch.device("meta"):
            dit = Anima(AnimaConfig())
        state = randomized(dit.state_dict())
        save_file({f"net.{k}": v for k, v in state.items()}, str(dit_path), metadata={"format": "pt"})
        del state
    qwen3_path = work / QWEN3_FILE
    if not qwen3_path.exists():
        config = Qwen3Config.from_pretrained(str(tokenizers / "qwen3_06b"))
        with torch.device("meta"):
            qwen3 = Qwen3ForCausalLM(config).model
        state = randomized(qwen3.state_dict())
        save_file({f"model.{k}": v for k, v in state.items()}, str(qwen3_path), metadata={"format": "pt"})
        del state
    vae_path = work / VAE_FILE
    if not vae_path.exists():
        torch.manual_seed(0)
        vae = QwenImageVAE(VAEConfig())  # PyTorch's default init: finite, image-like latents
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
        save_file(diffusers_to_original_keys(state), str(vae_path))


def _write_dataset(work: Path) -> Path:
    from PIL import Image

    image_dir = work / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i, caption in enumerate(["a red circle on a white background", "a blue square, masterpiece"]):
        image = Image.new("RGB", (RESOLUTION, RESOLUTION), tuple(rng.randrange(256) for _ in range(3)))
        for _ in range(64):  # some structure, so the VAE sees edges
            x, y = rng.randrange(RESOLUTION - 32), rng.randrange(RESOLUTION - 32)
            image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 32, y + 32))
        image.save(image_dir / f"img_{i}.png")
        (image_dir / f"img_{i}.txt").write_text(caption + "\n", encoding="utf-8")
    toml = work / "dataset.toml"
    toml.write_text(dataset_toml_text(image_dir), encoding="utf-8")
    return toml


def _shared_flags(work: Path, toml: Path, steps: int, name: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(work / DIT_FILE), "--qwen3", str(work / QWEN3_FILE),
        "--vae", str(work / VAE_FILE),
        "--dataset_config", str(toml), "--output_dir", str(work / f"out_{name}"), "--output_name", "full",
        "--save_model_as", "safetensors", "--network_module", "networks.lora_anima", "--network_dim", "16",
        "--network_alpha", "16", "--network_train_unet_only", "--learning_rate", "1e-4",
        "--max_train_steps", str(steps), "--seed", "42", "--mixed_precision", "no", "--cache_latents",
        "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0", "--gradient_checkpointing",
    ]


def _timed(command: list[str], cwd: Path, log: Path) -> dict[str, float | int]:
    """Run ``command``; its wall time, peak resident memory (of it and its waited children) and exit code."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_gib": round(usage.ru_maxrss / 2**20, 2),
            "exit": process.returncode}


def _run_sd_scripts_child(checkout: Path, argv: list[str]) -> None:
    """Child process: sd-scripts' trainer with the import stand-ins, as ``python anima_train_network.py argv``."""
    import runpy

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sd_scripts_parity import _prepare_sd_scripts_imports

    _prepare_sd_scripts_imports(checkout)
    os.chdir(checkout)
    script = checkout / "anima_train_network.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench_full_size_work"),
                        help="folder for the model files, images and outputs (about 6 GB)")
    parser.add_argument("--sd_scripts", type=Path, default=None, help="an sd-scripts checkout to run as well")
    parser.add_argument("--steps", type=int, default=2, help="training steps per run")
    parser.add_argument("--runs", nargs="+", choices=["ours", "sd_scripts"], default=["ours", "sd_scripts"],
                        help="which trainers to run (sd_scripts needs --sd_scripts)")
    parser.add_argument("--tokenizers", type=Path, default=DEFAULT_TOKENIZERS,
                        help="folder with qwen3_06b/ and t5_old/ tokenizer files (for this trainer)")
    parser.add_argument("--_sd_scripts_child", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args._sd_scripts_child is not None:
        _run_sd_scripts_child(args._sd_scripts_child, rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    problem = tokenizers_problem(args.tokenizers)
    if problem:
        raise SystemExit(problem)
    if args.sd_scripts is not None and not (args.sd_scripts / "anima_train_network.py").is_file():
        raise SystemExit(f"error: --sd_scripts {args.sd_scripts} has no anima_train_network.py; pass an "
                         "sd-scripts checkout")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _write_models(work, args.tokenizers.resolve())
    toml = _write_dataset(work)

    results = {}
    ours = [sys.executable, str(REPO / "anima_train_network.py"), *_shared_flags(work, toml, args.steps, "ours"),
            "--qwen3_tokenizer_path", str(args.tokenizers.resolve() / "qwen3_06b"),
            "--t5_tokenizer_path", str(args.tokenizers.resolve() / "t5_old")]
    if "ours" in args.runs:
        results["ours"] = _timed(ours, REPO, work / "ours.log")
    if args.sd_scripts is not None and "sd_scripts" in args.runs:
        theirs = [sys.executable, str(Path(__file__).resolve()), "--_sd_scripts_child", str(args.sd_scripts.resolve()),
                  *_shared_flags(work, toml, args.steps, "sd_scripts")]
        results["sd_scripts"] = _timed(theirs, REPO, work / "sd_scripts.log")
    for name, figures in results.items():
        state = "ok" if figures["exit"] == 0 else f"failed (exit {figures['exit']}, see {work / (name + '.log')})"
        print(f"{name:10s} {figures['seconds']:7.1f} s  peak {figures['peak_gib']:.2f} GiB  {state}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
