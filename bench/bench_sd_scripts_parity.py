"""Whole LoRA training steps of this trainer against upstream sd-scripts' ``anima_train_network.py`` (CPU).

Both trainers train the tiny setup (``examples/make_tiny_setup.py``) with the same flags, each in its own process,
sd-scripts with its model loaders pointed at the tiny sizes. The two draw different random numbers before the
network exists (see the README on seeds), so a probe saves sd-scripts' global torch generator state when the
network is created and when each step starts drawing noise and σ, and this trainer loads the same states at the
same two points. The figures per case: the largest |difference| over all tensors of the two LoRA files, and the
largest and mean |difference| of the first step's prediction (the DiT output).

    python bench/bench_sd_scripts_parity.py --sd_scripts ~/sd-scripts --work /tmp/sds_parity
    python bench/bench_sd_scripts_parity.py --sd_scripts ~/sd-scripts --work /tmp/sds_parity --cases base lion
    python bench/bench_sd_scripts_parity.py --sd_scripts ~/sd-scripts --work /tmp/sds_parity \\
        --custom "--mixed_precision bf16 --max_train_steps 1"   # any flags on top of the shared ones
    python bench/bench_sd_scripts_parity.py --list
    python bench/bench_sd_scripts_parity.py --sd_scripts ~/sd-scripts --work /tmp/sds_parity --layers

``--full_size`` runs the cases (default: base) on the released model sizes instead: random weights in the released
file layouts (written once by ``bench/bench_full_size_run.py``'s writer), 256 x 256 images, 512-token captions,
rank 16, 2 steps; sd-scripts with its own loaders and bundled tokenizer configs. ``--noise_floor`` also runs this
trainer a second time on two threads from the same generator states: the figures between its own two runs show how
far float32 rounding alone (another summation order) moves the result. The LoRA figures are the largest and the
root-sum-square |difference| over all tensors.

    python bench/bench_sd_scripts_parity.py --sd_scripts ~/sd-scripts --work /tmp/sds_full --full_size \
        --cases base qwen3_lora --noise_floor

``--inference`` instead runs both ``anima_minimal_inference.py`` scripts on one prompt (CFG with a negative prompt,
384 x 384, 4 steps), without and with a random LoRA, and gives the latent and pixel differences (tiny models, or
the released sizes with ``--full_size``).

``--layers`` instead runs one forward of the tiny DiT under CPU bf16 autocast in each process (same random
inputs, batch 1) with a hook on every module, and prints each module's largest |difference| in call order
(``EQUAL`` where the bits agree): where the two implementations' roundings part. ``--cuda_layer_norm`` runs
sd-scripts' layer_norm in float32 there, as CUDA autocast does (CPU autocast runs it in bf16).

The sd-scripts checkout needs its own extra packages (``pip install voluptuous imagesize``; lion-pytorch and
prodigyopt for those cases). Where torchvision does not import, a minimal stand-in of the few transforms that its
dataset code calls (``bench/sd_scripts_shims``) is put on its path. One line per case, then one JSON object
``{"<case>": {"lora": .., "first_prediction": .., "first_prediction_mean": ..}, ...}`` on the last line (``null``
where a trainer failed; its log is in ``--work``); a case that writes sample images also gets ``"samples"``:
{image: [largest difference in 8-bit levels, fraction of differing values]}.
Results are in docs/benchmarks.md, "Training steps against sd-scripts with the generators aligned".

This file must not import this project's ``library`` at module level: in the sd-scripts process that name is
sd-scripts' own package.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIMS = Path(__file__).resolve().parent / "sd_scripts_shims"
DEFAULT_TOKENIZERS = REPO_ROOT.parent / "shared" / "tokenizers"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_full_size_run as full_size  # noqa: E402  (standard library only at module level)

CACHED = "--cache_latents --cache_text_encoder_outputs --network_train_unet_only"
# name -> (dataset: "one" = one image, batch 1; "two" = two copies of it, batch 2), flags after shared_flags()
CASES: dict[str, tuple[str, str]] = {
    "base": ("one", CACHED),
    "checkpointing": ("one", f"{CACHED} --gradient_checkpointing"),
    "ip_noise": ("one", f"{CACHED} --ip_noise_gamma 0.1 --ip_noise_gamma_random_strength"),
    "accumulation": ("one", f"{CACHED} --gradient_accumulation_steps 2"),
    "scale_weight_norms": ("one", f"{CACHED} --scale_weight_norms 0.05"),
    "max_grad_norm": ("one", f"{CACHED} --max_grad_norm 0.01"),
    "polynomial": ("one", f"{CACHED} --lr_scheduler polynomial --lr_scheduler_power 2 --lr_warmup_steps 1"),
    "restarts": ("one", f"{CACHED} --lr_scheduler cosine_with_restarts --lr_warmup_steps 1 --lr_scheduler_num_cycles 2"),
    "dim8_alpha1": ("one", f"{CACHED} --network_dim 8 --network_alpha 1"),
    "dropouts": ("one", f'{CACHED} --network_args "rank_dropout=0.3" "module_dropout=0.2"'),
    "network_dropout": ("one", f"{CACHED} --network_dropout 0.2"),
    "shift": ("one", f"{CACHED} --timestep_sampling shift --discrete_flow_shift 3.0"),
    "flux_shift": ("one", f"{CACHED} --timestep_sampling flux_shift"),
    "logit_normal": ("one", f"{CACHED} --timestep_sampling sigma --weighting_scheme logit_normal"),
    "cosmap": ("one", f"{CACHED} --timestep_sampling sigma --weighting_scheme cosmap"),
    "sigma_sqrt": ("one", f"{CACHED} --timestep_sampling sigma --weighting_scheme sigma_sqrt"),
    "loraplus": ("one", f'{CACHED} --network_args "loraplus_lr_ratio=4"'),
    "loraplus_parts": ("one", '--cache_latents --network_args "loraplus_unet_lr_ratio=4" '
                              '"loraplus_text_encoder_lr_ratio=2"'),
    "module_patterns": ("one", f'{CACHED} --network_args "exclude_patterns=[\'.*blocks.*\']" '
                               '"include_patterns=[\'.*blocks\\.1\\..*\']"'),
    "exclude_mlp": ("one", f'{CACHED} --network_args "exclude_patterns=[\'.*mlp.*\']"'),
    "reg_dims_lrs": ("one", f'{CACHED} --network_args "network_reg_dims=.*mlp.*=8" "network_reg_lrs=.*attn.*=5e-4"'),
    "unsloth_offload": ("one", f"{CACHED} --gradient_checkpointing --unsloth_offload_checkpointing"),
    "cpu_offload": ("one", f"{CACHED} --gradient_checkpointing --cpu_offload_checkpointing"),
    "mode_scale": ("one", f"{CACHED} --timestep_sampling sigma --weighting_scheme mode --mode_scale 1.29"),
    "sigmoid": ("one", f"{CACHED} --timestep_sampling sigmoid --sigmoid_scale 2.0"),
    "uniform": ("one", f"{CACHED} --timestep_sampling uniform"),
    "optimizer_args": ("one", f'{CACHED} --optimizer_args "weight_decay=0.05" "betas=(0.8,0.95)"'),
    "constant_warmup": ("one", f"{CACHED} --lr_scheduler constant_with_warmup --lr_warmup_steps 2"),
    "l1": ("one", f"{CACHED} --loss_type l1"),
    "huber": ("one", f"{CACHED} --loss_type huber --huber_schedule constant --huber_c 0.2"),
    "adafactor": ("one", f'{CACHED} --optimizer_type Adafactor --optimizer_args "relative_step=False" '
                         '"scale_parameter=False" "warmup_init=False"'),
    "lion": ("one", f'{CACHED} --optimizer_type Lion --learning_rate 1e-4 --optimizer_args "weight_decay=0.1"'),
    "prodigy": ("one", f"{CACHED} --optimizer_type Prodigy --learning_rate 1.0"),
    "sgd": ("one", f"{CACHED} --optimizer_type SGD"),
    "live_latents": ("one", "--cache_text_encoder_outputs --network_train_unet_only"),
    "qwen3_lora": ("one", "--cache_latents"),
    "qwen3_lora_rates": ("one", "--cache_latents --text_encoder_lr 5e-4 --unet_lr 2e-3"),
    "adapter_lora": ("one", '--cache_latents --gradient_checkpointing --network_args "train_llm_adapter=True"'),
    "bf16_first_step": ("one", f"{CACHED} --mixed_precision bf16 --max_train_steps 1"),
    # Sample images before training and after the step: both trainers render the seeded prompts (CFG with a
    # negative prompt, a flow shift) from the same noise; the tool compares them pixel by pixel.
    "samples": ("one", f"{CACHED} --max_train_steps 1 --sample_prompts {{tiny}}/sample_prompts.txt --sample_at_first "
                       "--sample_every_n_steps 1"),
    "batch2": ("two", CACHED),
    "batch2_qwen3_lora": ("two", "--cache_latents"),
}


def shared_flags(tiny: Path, dataset_toml: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny / "dit.safetensors"), "--qwen3", str(tiny / "qwen3"),
        "--vae", str(tiny / "vae.safetensors"), "--t5_tokenizer_path", str(tiny / "t5_tokenizer"),
        "--dataset_config", str(dataset_toml), "--save_model_as", "safetensors",
        "--network_module", "networks.lora_anima", "--network_dim", "4", "--network_alpha", "2",
        "--learning_rate", "1e-3", "--seed", "42", "--mixed_precision", "no", "--max_data_loader_n_workers", "0",
        "--qwen3_max_token_length", "32", "--t5_max_token_length", "32", "--optimizer_type", "AdamW",
        "--max_train_steps", "3", "--output_name", "lora",
    ]


def full_size_flags(full: Path, dataset_toml: Path) -> list[str]:
    """The released model sizes (bench/bench_full_size_run.py's random files) at the default token lengths (512).
    sd-scripts reads its bundled tokenizer configs; this trainer's tokenizer flags (``--qwen3_tokenizer_path`` is
    not an sd-scripts flag) are added to its side only (run_full_size's ours_flags)."""
    return [
        "--pretrained_model_name_or_path", str(full / full_size.DIT_FILE), "--qwen3", str(full / full_size.QWEN3_FILE),
        "--vae", str(full / full_size.VAE_FILE),
        "--dataset_config", str(dataset_toml), "--save_model_as", "safetensors",
        "--network_module", "networks.lora_anima", "--network_dim", "16", "--network_alpha", "16",
        "--learning_rate", "1e-3", "--seed", "42", "--mixed_precision", "no", "--max_data_loader_n_workers", "0",
        "--optimizer_type", "AdamW", "--max_train_steps", "2", "--output_name", "lora",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Probes (both processes)


def _save_or_replay_rng(path: Path, save: bool) -> None:
    """sd-scripts' side saves the global torch generator state; ours loads it where sd-scripts saved one."""
    import torch

    if save:
        torch.save(torch.random.get_rng_state(), path)
    elif path.exists():
        torch.random.set_rng_state(torch.load(path, weights_only=True))


def _wrap_create_network(module, rng_dir: Path, save: bool) -> None:
    original = module.create_network

    def create_network(*args, **kwargs):
        _save_or_replay_rng(rng_dir / "network.pt", save)
        return original(*args, **kwargs)

    module.create_network = create_network


def _wrap_step(cls, method: str, rng_dir: Path, save: bool) -> None:
    original = getattr(cls, method)
    calls = [0]

    def step(self, *args, **kwargs):
        _save_or_replay_rng(rng_dir / f"step{calls[0]}.pt", save)
        calls[0] += 1
        return original(self, *args, **kwargs)

    setattr(cls, method, step)


def _wrap_first_prediction(cls, path: Path) -> None:
    original = cls.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if not path.exists():
            import torch

            torch.save(out.detach().float(), path)
        return out

    cls.forward = forward


# ---------------------------------------------------------------------------------------------------------------
# sd-scripts' process


def _prepare_sd_scripts_imports(sd_scripts: Path) -> None:
    try:
        import torchvision  # noqa: F401

        stand_in = False
    except Exception:  # not installed, or a build that does not import beside this torch
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        stand_in = True
    # After that attempt (a failed torchvision import replaces the transformers module object) and before the
    # stand-in is on the path (transformers would take it for torchvision).
    import transformers  # noqa: F401

    # Loading these (sd-scripts does, at import) resets the lazy module's names: load them before the stand-ins.
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, tokenization_utils_base  # noqa: F401

    module = sys.modules["transformers"]
    # Names sd-scripts imports from transformers at module level that transformers 5 no longer has; the Anima
    # path never calls them.
    for name in ("CLIPFeatureExtractor",):
        try:
            getattr(module, name)
        except Exception:
            setattr(module, name, type(name, (), {}))
    tokenizer_base = tokenization_utils_base.PreTrainedTokenizerBase
    if not hasattr(tokenizer_base, "batch_encode_plus"):
        tokenizer_base.batch_encode_plus = lambda self, *a, **kw: self(*a, **kw)
    if stand_in:
        sys.path.insert(0, str(SHIMS))
    sys.path.insert(0, str(sd_scripts))


def _point_sd_scripts_at_tiny_models(tiny: dict) -> None:
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from library import anima_models, anima_utils  # sd-scripts' package
    from library import qwen_image_autoencoder_kl as qwen_vae

    def load_anima_model(device, dit_path, attn_mode, split_attn, loading_device, dit_weight_dtype,
                         fp8_scaled=False, lora_weights_list=None, lora_multipliers=None):
        if fp8_scaled:
            raise SystemExit("error: the tiny loader does not do fp8_scaled")
        real_adapter = anima_models.LLMAdapter
        # Its model class builds the released adapter sizes; build the tiny one in its place, in the same
        # registration order (it fixes the order LoRA modules are made in, hence their initial weights).
        anima_models.LLMAdapter = lambda **kw: real_adapter(**tiny["adapter"], self_attn=True)
        try:
            with init_empty_weights():  # as upstream: building the model draws no random numbers
                model = anima_models.Anima(**tiny["dit"], use_llm_adapter=True, attn_mode=attn_mode,
                                           split_attn=split_attn)
        finally:
            anima_models.LLMAdapter = real_adapter
        if lora_weights_list:  # merged into the weights as it loads them, by sd-scripts' own loader
            state = anima_utils.load_safetensors_with_lora_and_fp8(
                model_files=dit_path, lora_weights_list=lora_weights_list, lora_multipliers=lora_multipliers,
                fp8_optimization=False, calc_device=device, move_to_device=False, dit_weight_dtype=dit_weight_dtype,
                target_keys=anima_utils.FP8_OPTIMIZATION_TARGET_KEYS,
                exclude_keys=anima_utils.FP8_OPTIMIZATION_EXCLUDE_KEYS,
                weight_transform_hooks=anima_utils.WeightTransformHooks(rename_hook=lambda k: k.removeprefix("net.")))
        else:
            state = {k.removeprefix("net."): v for k, v in load_file(dit_path).items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        buffers = ("seq", "dim_spatial_range", "dim_temporal_range", "inv_freq")  # not in the file
        missing = [k for k in missing if not k.endswith(buffers)]
        if missing or unexpected:
            raise SystemExit(f"error: tiny DiT keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if dit_weight_dtype is not None:
            model.to(dit_weight_dtype)
        return model.to(loading_device)

    real_vae = qwen_vae.AutoencoderKLQwenImage
    anima_utils.load_anima_model = load_anima_model
    qwen_vae.AutoencoderKLQwenImage = lambda **kw: real_vae(**{**kw, "base_dim": tiny["vae_base_dim"]})


def _start_sd_scripts_process(sd_scripts: Path, tiny: dict) -> None:
    """Import stand-ins, then the tiny loaders; tiny {}: the released sizes, its own loaders as they are."""
    _prepare_sd_scripts_imports(sd_scripts)
    if tiny:
        _point_sd_scripts_at_tiny_models(tiny)


def run_sd_scripts(sd_scripts: Path, rng_dir: Path, tiny: dict, argv: list[str]) -> None:
    _start_sd_scripts_process(sd_scripts, tiny)
    import anima_train_network
    from library import anima_models, train_util
    from networks import lora_anima

    _wrap_create_network(lora_anima, rng_dir, save=True)
    _wrap_step(anima_train_network.AnimaNetworkTrainer, "get_noise_pred_and_target", rng_dir, save=True)
    _wrap_first_prediction(anima_models.Anima, rng_dir / "pred_sd_scripts.pt")
    sys.argv = ["anima_train_network.py", *argv]
    parser = anima_train_network.setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    anima_train_network.AnimaNetworkTrainer().train(args)


def infer_sd_scripts(sd_scripts: Path, tiny: dict, argv: list[str]) -> None:
    """sd-scripts' ``anima_minimal_inference.py argv``, on the tiny models or (tiny {}) its own loaders."""
    import runpy

    _start_sd_scripts_process(sd_scripts, tiny)
    script = sd_scripts / "anima_minimal_inference.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


# One prompt with CFG and a negative prompt at 384 x 384 (576 image tokens): sd-scripts' inference script always
# runs with split_attn, which below 512 image tokens cuts the cross-attention keys to the image token count (see
# docs/benchmarks.md); from 512 up both attend to all 512 text tokens.
INFERENCE_FLAGS = ["--prompt", "a red circle on a white background", "--negative_prompt", "blurry",
                   "--image_size", "384", "384", "--infer_steps", "4", "--guidance_scale", "3", "--flow_shift", "2",
                   "--seed", "7", "--device", "cpu"]


def write_random_lora(dit_path: Path, path: Path, seed: int = 3, up_std: float = 0.3) -> None:
    """A rank-4 LoRA on every DiT module of the model in dit_path with random up weights (a trained LoRA's start at
    zero), so that it moves the image well beyond bf16 rounding."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from library.models.dit_loading import load_anima_model
    from networks import lora_anima

    torch.manual_seed(seed)
    network = lora_anima.create_network(1.0, 4, 2.0, None, None, load_anima_model(str(dit_path), dtype=torch.float32))
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name.endswith("lora_up.weight"):
                parameter.normal_(0.0, up_std)
    network.save_weights(str(path))


def compare_inference(sd_scripts: Path, folder: Path, models: dict[str, Path], tiny: dict,
                      ours_flags: list[str] = ()) -> int:
    """Both inference scripts render the same prompt (models: dit, vae, text_encoder), without and with a LoRA;
    prints the latent and pixel gaps. tiny: the tiny sizes, or {} for the released ones."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = folder / "random_lora.safetensors"
    write_random_lora(models["dit"], lora)
    model_flags = [flag for name, path in models.items() for flag in (f"--{name}", str(path))]
    # sd-scripts' script reads the T5 tokenizer shipped in its configs/t5_old; this one is given the same files.
    ours = [*ours_flags, "--t5_tokenizer_path", str(sd_scripts / "configs" / "t5_old")]
    results = {}
    for name, extra in (("base", []), ("lora", ["--lora_weight", str(lora), "--lora_multiplier", "0.8"])):
        result = results[name] = _compare_inference_run(sd_scripts, folder / name, tiny, model_flags + extra, ours)
        if result is None:
            return 1
        print(f"{name}: latent |difference| max {result['latent_max']:.3g}, mean {result['latent_mean']:.3g} (mean "
              f"|latent| {result['latent_scale']:.3g}); pixels max {result['pixel_max']} levels, mean "
              f"{result['pixel_mean']:.2f}, {result['pixels_differing']:.1%} of the values differ")
    base, with_lora = (load_latent(folder / n / "ours") for n in ("base", "lora"))
    results["lora"]["lora_effect_mean"] = (with_lora - base).abs().mean().item()
    print(f"the LoRA moves this trainer's latent by {results['lora']['lora_effect_mean']:.3g} mean")
    print(json.dumps(results))
    return 0


def load_latent(folder: Path):
    from safetensors.torch import load_file

    return next(iter(load_file(sorted(folder.glob("*.safetensors"))[0]).values())).float()


def _compare_inference_run(sd_scripts: Path, folder: Path, tiny: dict, flags: list[str],
                           ours_flags: list[str]) -> dict | None:
    """One render by each script into folder/sd_scripts and folder/ours; the gaps, or None where one failed."""
    import numpy as np
    from PIL import Image

    outputs = {}
    for side in ("sd_scripts", "ours"):
        out = folder / side
        if out.exists():
            for stale in out.iterdir():
                stale.unlink()
        out.mkdir(parents=True, exist_ok=True)
        argv = [*flags, *INFERENCE_FLAGS, "--output_type", "latent_images", "--save_path", str(out)]
        if side == "sd_scripts":
            rc = _run_side("infer_sd_scripts", sd_scripts, folder, tiny, ["--", *argv], folder / f"{side}.log")
        else:
            command = [sys.executable, str(REPO_ROOT / "anima_minimal_inference.py"), *argv, *ours_flags]
            with open(folder / f"{side}.log", "w", encoding="utf-8") as log:
                rc = subprocess.call(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                     stdout=log, stderr=subprocess.STDOUT)
        latents, images = sorted(out.glob("*.safetensors")), sorted(out.glob("*.png"))
        if rc != 0 or len(latents) != 1 or len(images) != 1:
            print(f"error: the {side} inference failed (exit {rc}); see {folder / (side + '.log')}", file=sys.stderr)
            return None
        outputs[side] = (load_latent(out), Image.open(images[0]))
    (theirs_latent, theirs_image), (ours_latent, ours_image) = outputs["sd_scripts"], outputs["ours"]
    latent_gap = (ours_latent - theirs_latent).abs()
    pixels = np.abs(np.asarray(ours_image, dtype=np.int16) - np.asarray(theirs_image, dtype=np.int16))
    return {"latent_max": latent_gap.max().item(), "latent_mean": latent_gap.mean().item(),
            "latent_scale": theirs_latent.abs().mean().item(), "pixel_max": int(pixels.max()),
            "pixel_mean": float(pixels.mean()), "pixels_differing": float((pixels > 0).mean())}


def _record_module_outputs(model) -> dict:
    """Forward hooks on every named module: {name: float32 copy of its (first) output}, in call order."""
    import torch

    outputs: dict = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, tuple):
                output = output[0]
            if torch.is_tensor(output) and name not in outputs:
                outputs[name] = output.detach().float().clone()

        return record

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name or "<model>"))
    return outputs


def _layer_norm_as_under_cuda_autocast() -> None:
    """CUDA autocast runs layer_norm in float32 (its float32 list); CPU autocast runs it in bf16. Patched in the
    sd-scripts process, its CPU forward rounds its modulation as it does on a GPU."""
    import torch
    import torch.nn.functional as F

    original = F.layer_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu") and x.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                return original(x.float(), shape, None if weight is None else weight.float(),
                                None if bias is None else bias.float(), eps)
        return original(x, shape, weight, bias, eps)

    F.layer_norm = layer_norm


def _save_bf16_forward_outputs(model, forward, out_path: Path) -> None:
    """Every module's output of ``forward(model)`` under CPU bf16 autocast, saved to out_path."""
    import torch

    torch.set_num_threads(1)
    model.requires_grad_(False)
    outputs = _record_module_outputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        forward(model)
    torch.save(outputs, out_path)


def layers_sd_scripts(sd_scripts: Path, tiny: dict, dit_path: Path, inputs_path: Path, out_path: Path,
                      cuda_layer_norm: bool = False) -> None:
    _start_sd_scripts_process(sd_scripts, tiny)
    import torch

    from library import anima_utils

    if cuda_layer_norm:
        _layer_norm_as_under_cuda_autocast()
    g = torch.load(inputs_path, weights_only=True)
    model = anima_utils.load_anima_model("cpu", str(dit_path), "torch", False, "cpu", torch.bfloat16)
    _save_bf16_forward_outputs(
        model,
        lambda m: m(g["latents"].bfloat16(), g["timesteps"], g["qwen3"].bfloat16(), padding_mask=g["padding"].bfloat16(),
                    target_input_ids=g["t5_ids"], target_attention_mask=g["t5_mask"],
                    source_attention_mask=g["qwen3_mask"]),
        out_path,
    )


def layers_ours(dit_path: Path, inputs_path: Path, out_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from library.models.dit_loading import load_anima_model

    g = torch.load(inputs_path, weights_only=True)

    def forward(model):
        context = model.encode_text(g["qwen3"].bfloat16(), g["qwen3_mask"], g["t5_ids"], g["t5_mask"])
        return model(g["latents"].bfloat16(), g["timesteps"], context, g["padding"].bfloat16())

    _save_bf16_forward_outputs(load_anima_model(str(dit_path), dtype=torch.bfloat16), forward, out_path)


def compare_layers(sd_scripts: Path, work: Path, tiny: dict, cuda_layer_norm: bool = False) -> int:
    """Both processes' per-module bf16 outputs on the same inputs; prints one line per module both have."""
    import torch

    layers = work / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    qwen3_tokens, t5_tokens = 10, 12
    inputs = {
        "latents": torch.randn(1, 16, 1, 8, 8, generator=gen),
        "timesteps": torch.tensor([0.6]),
        "padding": torch.zeros(1, 1, 8, 8),
        "qwen3": torch.randn(1, qwen3_tokens, tiny["adapter"]["source_dim"], generator=gen),
        "qwen3_mask": torch.tensor([[1] * 7 + [0] * (qwen3_tokens - 7)]),
        "t5_ids": torch.tensor([[5, 9, 17, 3, 1] + [0] * (t5_tokens - 5)]),
        "t5_mask": torch.tensor([[1] * 5 + [0] * (t5_tokens - 5)]),
    }
    torch.save(inputs, layers / "inputs.pt")
    options = ["--cuda_layer_norm"] if cuda_layer_norm else []
    for side in ("sd_scripts", "ours"):
        rc = _run_side(f"layers_{side}", sd_scripts, layers, tiny, options + ["--", str(work / "tiny" / "dit.safetensors")],
                       layers / f"{side}.log")
        if rc != 0:
            print(f"error: the {side} forward failed; see {layers / (side + '.log')}", file=sys.stderr)
            return 1
    theirs = torch.load(layers / "sd_scripts.pt", weights_only=True)
    ours = torch.load(layers / "ours.pt", weights_only=True)
    print(f"{'module':48s} {'max':>8s} {'mean':>9s}")
    for name, value in theirs.items():
        mine = ours.get(name)
        if mine is None or mine.numel() != value.numel():
            continue
        diff = (mine.reshape(value.shape) - value).abs()
        shown = "EQUAL" if diff.max() == 0 else f"{diff.max().item():8.3g} {diff.mean().item():9.3g}"
        print(f"{name:48s} {shown}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# This trainer's process


def run_ours(rng_dir: Path, argv: list[str], prediction_file: str = "pred_ours.pt") -> int:
    sys.path.insert(0, str(REPO_ROOT))
    import anima_train_network
    from library.models import dit
    from networks import lora_anima

    _wrap_create_network(lora_anima, rng_dir, save=False)
    _wrap_step(anima_train_network.AnimaNetworkTrainer, "noise_pred_and_target", rng_dir, save=False)
    _wrap_first_prediction(dit.Anima, rng_dir / prediction_file)
    return anima_train_network.main(argv)


# ---------------------------------------------------------------------------------------------------------------
# Driver


def tiny_sizes() -> dict:
    """sd-scripts' Anima / LLMAdapter keyword arguments for the tiny checkpoint, from library.models.tiny."""
    sys.path.insert(0, str(REPO_ROOT))
    from library.models.tiny import VAE_BASE_DIM, tiny_dit_config

    c = tiny_dit_config()
    dit = dict(
        max_img_h=512, max_img_w=512, max_frames=128, in_channels=c.in_channels, out_channels=c.out_channels,
        patch_spatial=c.patch_spatial, patch_temporal=c.patch_temporal, model_channels=c.model_channels,
        concat_padding_mask=True, crossattn_emb_channels=c.crossattn_emb_channels, pos_emb_cls="rope3d",
        pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True,
        adaln_lora_dim=c.adaln_lora_dim, num_blocks=c.num_blocks, num_heads=c.num_heads,
        extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=c.rope_h_extrapolation_ratio,
        rope_w_extrapolation_ratio=c.rope_w_extrapolation_ratio, rope_t_extrapolation_ratio=c.rope_t_extrapolation_ratio,
        extra_h_extrapolation_ratio=1.0, extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0,
        rope_enable_fps_modulation=False,
    )
    adapter = dict(source_dim=c.adapter_source_dim, target_dim=c.adapter_model_dim, model_dim=c.adapter_model_dim,
                   num_layers=c.adapter_num_layers, num_heads=c.adapter_num_heads)
    return {"dit": dit, "adapter": adapter, "vae_base_dim": VAE_BASE_DIM}


def _write_datasets(work: Path, at_full_size: bool = False) -> dict[str, Path]:
    """one/: the first image (64 x 64 tiny, or 256 x 256 at full size), batch 1; two/: two copies of it, batch 2
    (in-batch order cannot matter)."""
    from library.models.tiny import tiny_dataset_toml_text  # driver process: this project's library

    source = work / "full" / "images" if at_full_size else work / "tiny" / "images"
    toml_text = full_size.dataset_toml_text if at_full_size else tiny_dataset_toml_text
    first = sorted(source.glob("*.png"))[0]
    caption = first.with_suffix(".txt")
    tomls = {}
    for name, copies in (("one", 1), ("two", 2)):
        images = work / name / "images"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(copies):
            (images / f"{i}.png").write_bytes(first.read_bytes())
            (images / f"{i}.txt").write_bytes(caption.read_bytes())
        tomls[name] = work / name / "dataset.toml"
        tomls[name].write_text(toml_text(images, batch_size=copies), encoding="utf-8")
    return tomls


def lora_differences(a_path: Path, b_path: Path) -> tuple[float, float]:
    """The largest |difference| over all tensors of two LoRA files, and the root of the summed squares (one
    sensitive element sets the first, every element counts in the second)."""
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    if a.keys() != b.keys():
        raise SystemExit(f"error: the LoRA files have different keys: {sorted(a.keys() ^ b.keys())[:5]}")
    largest = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    squares = sum((a[k].double() - b[k].double()).square().sum().item() for k in a)
    return largest, squares ** 0.5


def _run_side(role: str, sd_scripts: Path, rng_dir: Path, tiny: dict, argv: list[str], log_path: Path) -> int:
    """This file in a fresh process as ``role`` (sd-scripts' roles run inside the checkout); its output to
    log_path; the exit code."""
    command = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--sd_scripts", str(sd_scripts),
               "--rng_dir", str(rng_dir), "--tiny_json", json.dumps(tiny), *argv]
    cwd = sd_scripts if role.endswith("sd_scripts") else REPO_ROOT
    threads = "2" if role == "ours_threads" else "1"  # the noise-floor run: other kernels' summation order
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONHASHSEED": "0"}
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.call(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_case(name: str, dataset: str, extra: str, sd_scripts: Path, work: Path, base_flags: dict[str, list[str]],
             tiny: dict, ours_flags: list[str] = (), noise_floor: bool = False) -> dict | None:
    """Max and root-sum-square |difference| over the LoRA tensors after the run, and max / mean |difference| of the
    first step's prediction; None where a trainer failed. base_flags: the shared flags per dataset name;
    ours_flags: added to this trainer's command line only (flags sd-scripts does not have). noise_floor: also run
    this trainer on two threads (same generator states) and give the same figures between its two runs, under
    "threads": how far float32 rounding alone moves the result."""
    case_dir = work / "cases" / name
    rng_dir = case_dir / "rng"
    roles = ("sd_scripts", "ours", "ours_threads") if noise_floor else ("sd_scripts", "ours")
    for sub in ("rng", *roles):
        (case_dir / sub).mkdir(parents=True, exist_ok=True)
    for stale in rng_dir.glob("*.pt"):
        stale.unlink()
    flags = base_flags[dataset] + shlex.split(extra.replace("{tiny}", str(work / "tiny")))
    for role in roles:
        out = case_dir / role
        own = list(ours_flags) if role.startswith("ours") else []
        rc = _run_side(role, sd_scripts, rng_dir, tiny, ["--", *flags, *own, "--output_dir", str(out)],
                       case_dir / f"{role}.log")
        if rc != 0 or not (out / "lora.safetensors").exists():
            print(f"{name}: {role} failed (exit {rc}), see {case_dir / (role + '.log')}", flush=True)
            return None
    import torch

    def figures(a: str, b: str) -> dict[str, float]:
        first = torch.load(rng_dir / f"pred_{b}.pt") - torch.load(rng_dir / f"pred_{a}.pt")
        lora_max, lora_rss = lora_differences(case_dir / a / "lora.safetensors", case_dir / b / "lora.safetensors")
        return {"lora": lora_max, "lora_rss": lora_rss, "first_prediction": first.abs().max().item(),
                "first_prediction_mean": first.abs().mean().item()}

    result: dict = figures("sd_scripts", "ours")
    if noise_floor:
        result["threads"] = figures("ours", "ours_threads")
    samples = compare_samples(case_dir / "sd_scripts" / "sample", case_dir / "ours" / "sample")
    if samples:
        result["samples"] = samples
    return result


def compare_samples(theirs: Path, ours: Path) -> dict[str, list[float]]:
    """{image: [largest difference in 8-bit levels, fraction of differing values]} for the sample images both
    trainers wrote (matched by name without the time stamp: <output>_<step>_<prompt index>_<time>_<seed>.png)."""
    import numpy as np
    from PIL import Image

    def by_key(folder: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            parts = path.stem.split("_")
            found["_".join(parts[:-2] + parts[-1:])] = path
        return found

    mine = by_key(ours)
    result = {}
    for key, path in by_key(theirs).items():
        if key in mine:
            a = np.asarray(Image.open(path), dtype=np.int16)
            b = np.asarray(Image.open(mine[key]), dtype=np.int16)
            if a.shape != b.shape:
                result[key] = [float("inf"), 1.0]
                continue
            difference = np.abs(a - b)
            result[key] = [int(difference.max()), float((difference > 0).mean())]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd_scripts", type=Path, help="an sd-scripts checkout (with anima_train_network.py)")
    parser.add_argument("--work", type=Path, help="scratch folder (tiny setup, logs, LoRA files)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), metavar="CASE",
                        help="cases to run (default: all; --list names them)")
    parser.add_argument("--custom", help='one extra case: flags on top of the shared ones (dataset "one")')
    parser.add_argument("--list", action="store_true", help="print the cases and their flags")
    parser.add_argument("--layers", action="store_true",
                        help="compare every module's output of one bf16 forward instead of training runs")
    parser.add_argument("--cuda_layer_norm", action="store_true",
                        help="with --layers: run sd-scripts' layer_norm in float32 under autocast, as CUDA autocast "
                             "does (CPU autocast runs it in bf16)")
    parser.add_argument("--full_size", action="store_true",
                        help="run the cases on the released model sizes (random weights written once into "
                             "--work/full by bench/bench_full_size_run.py's writer, 256 x 256 images, 512-token "
                             "captions, rank 16, 2 steps; about 10 GiB and a few minutes per trainer and case)")
    parser.add_argument("--tokenizers", type=Path, default=DEFAULT_TOKENIZERS,
                        help="with --full_size: folder with qwen3_06b/ and t5_old/ tokenizer files (this trainer's)")
    parser.add_argument("--inference", action="store_true",
                        help="instead of training runs: both anima_minimal_inference.py scripts render one prompt "
                             "(CFG, 384 x 384, 4 steps), without and with a random LoRA, on the tiny models (with "
                             "--full_size: the released sizes); latent and pixel differences")
    parser.add_argument("--noise_floor", action="store_true",
                        help="also run this trainer on two threads from the same generator states and give the same "
                             "figures between its own two runs: what float32 rounding alone moves")
    parser.add_argument("--role", choices=("sd_scripts", "ours", "ours_threads", "layers_sd_scripts", "layers_ours",
                                           "infer_sd_scripts"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--rng_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tiny_json", help=argparse.SUPPRESS)
    args, trainer_argv = parser.parse_known_args(argv)
    trainer_argv = [a for a in trainer_argv if a != "--"]

    if args.role == "sd_scripts":
        run_sd_scripts(args.sd_scripts.resolve(), args.rng_dir, json.loads(args.tiny_json), trainer_argv)
        return 0
    if args.role == "infer_sd_scripts":
        infer_sd_scripts(args.sd_scripts.resolve(), json.loads(args.tiny_json), trainer_argv)
        return 0
    if args.role in ("ours", "ours_threads"):
        return run_ours(args.rng_dir, trainer_argv, f"pred_{args.role}.pt")
    if args.role == "layers_sd_scripts":
        dit = Path(trainer_argv[0])
        layers_sd_scripts(args.sd_scripts.resolve(), json.loads(args.tiny_json), dit, args.rng_dir / "inputs.pt",
                          args.rng_dir / "sd_scripts.pt", cuda_layer_norm=args.cuda_layer_norm)
        return 0
    if args.role == "layers_ours":
        layers_ours(Path(trainer_argv[0]), args.rng_dir / "inputs.pt", args.rng_dir / "ours.pt")
        return 0
    if args.list:
        for name, (dataset, extra) in CASES.items():
            print(f"{name:18s} dataset {dataset}: {extra}")
        return 0
    if args.sd_scripts is None or args.work is None:
        parser.error("--sd_scripts and --work are required")
    sd_scripts = args.sd_scripts.expanduser().resolve()
    if not (sd_scripts / "anima_train_network.py").is_file():
        print(f"error: --sd_scripts {sd_scripts} has no anima_train_network.py; pass an sd-scripts checkout",
              file=sys.stderr)
        return 2
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.full_size:
        return run_full_size(args, sd_scripts, work)
    setup = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "make_tiny_setup.py"), str(work / "tiny")],
                           capture_output=True, text=True)
    if setup.returncode != 0:
        print(f"error: examples/make_tiny_setup.py failed: {setup.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 2
    tiny = tiny_sizes()
    tomls = _write_datasets(work)
    if args.layers:
        return compare_layers(sd_scripts, work, tiny, cuda_layer_norm=args.cuda_layer_norm)
    if args.inference:
        tiny_models = {"dit": work / "tiny" / "dit.safetensors", "vae": work / "tiny" / "vae.safetensors",
                       "text_encoder": work / "tiny" / "qwen3"}
        return compare_inference(sd_scripts, work / "inference", tiny_models, tiny)
    base_flags = {name: shared_flags(work / "tiny", toml) for name, toml in tomls.items()}
    return run_cases(args, sd_scripts, work, base_flags, tiny)


def run_full_size(args: argparse.Namespace, sd_scripts: Path, work: Path) -> int:
    """The cases at the released model sizes; default case: base."""
    if args.layers:
        print("error: --layers compares the tiny model; drop --full_size", file=sys.stderr)
        return 2
    tokenizers = args.tokenizers.expanduser().resolve()
    problem = full_size.tokenizers_problem(tokenizers)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    full = work / "full"
    full.mkdir(parents=True, exist_ok=True)
    full_size._write_models(full, tokenizers)
    if args.inference:
        models = {"dit": full / full_size.DIT_FILE, "vae": full / full_size.VAE_FILE,
                  "text_encoder": full / full_size.QWEN3_FILE}
        return compare_inference(sd_scripts, work / "inference_full", models, {},
                                 ["--qwen3_tokenizer_path", str(tokenizers / "qwen3_06b")])
    full_size._write_dataset(full)
    tomls = _write_datasets(work, at_full_size=True)
    base_flags = {name: full_size_flags(full, toml) for name, toml in tomls.items()}
    ours_flags = ["--qwen3_tokenizer_path", str(tokenizers / "qwen3_06b"),
                  "--t5_tokenizer_path", str(tokenizers / "t5_old")]
    if not args.cases and not args.custom:
        args.cases = ["base"]
    return run_cases(args, sd_scripts, work, base_flags, {}, ours_flags)


def run_cases(args: argparse.Namespace, sd_scripts: Path, work: Path, base_flags: dict[str, list[str]], tiny: dict,
              ours_flags: list[str] = ()) -> int:
    cases = {name: CASES[name] for name in (args.cases or ([] if args.custom else list(CASES)))}
    if args.custom:
        cases["custom_" + hashlib.md5(args.custom.encode()).hexdigest()[:6]] = ("one", args.custom)
    results: dict[str, dict | None] = {}
    columns = ("lora", "lora_rss", "first_prediction", "first_prediction_mean")
    print(f"{'case':18s} {'LoRA':>8s} {'LoRA rss':>8s} {'pred max':>8s} {'mean':>8s}   flags")
    for name, (dataset, extra) in cases.items():
        result = results[name] = run_case(name, dataset, extra, sd_scripts, work, base_flags, tiny, ours_flags,
                                          noise_floor=args.noise_floor)
        if result is None:
            shown = f"{'failed':>8s}" + " " * 27
        else:
            shown = " ".join(f"{result[k]:8.2g}" for k in columns)
        print(f"{name:18s} {shown}   {extra}", flush=True)
        if result is not None and "threads" in result:
            shown = " ".join(f"{result['threads'][k]:8.2g}" for k in columns)
            print(f"{'':18s} {shown}   (this trainer, 1 against 2 threads)", flush=True)
        for image, (levels, fraction) in (result or {}).get("samples", {}).items():
            print(f"{'':18s} sample {image}: max {levels} levels, {fraction:.2%} of the values differ", flush=True)
    print(json.dumps(results))
    return 0 if all(v is not None for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
