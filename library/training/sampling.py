"""Sample images during training: prompt files, the Euler flow sampler and PNG writing.

Prompt files come in three formats (same as sd-scripts' ``--sample_prompts``):

* ``.txt``: one prompt per line, ``#`` lines skipped, options after the prompt, each introduced by `` --``:
  ``a cat --n lowres --w 512 --h 768 --d 42 --s 30 --l 4.5 --fs 3.0``;
* ``.toml``: a ``[prompt]`` table of shared keys and a ``[[prompt.subset]]`` array, each merged over them;
* ``.json``: a list of dicts (or of strings, parsed like ``.txt`` lines).

Images are written to ``<output_dir>/sample/<output_name>_<step:06d | e<epoch:06d>>_<idx:02d>_<timestamp>[_<seed>].png``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.errors import AnimaError
from library.io.files import atomic_write
from library.models.precision import FLOAT16_OVERFLOW_ADVICE
from library.training.flow_matching import sampling_sigmas

logger = logging.getLogger(__name__)

DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
DEFAULT_FLOW_SHIFT = 3.0
MAX_STEPS = 1000
MIN_SIDE = 64
SIDE_MULTIPLE = 16  # VAE stride 8 x DiT patch 2
LATENT_CHANNELS = 16
VAE_STRIDE = 8


@dataclass(frozen=True)
class SamplePrompt:
    """One image to render. ``index`` is the prompt's position in the file (used in the file name)."""

    index: int
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    seed: int | None = None
    sample_steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    flow_shift: float = DEFAULT_FLOW_SHIFT


# ---------------------------------------------------------------------------------------------------------------
# Prompt-file parsing


def _parse_int(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool):
        raise AnimaError(f"{where}: {what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise AnimaError(f"{where}: {what} must be an integer, got {value!r}")


def _parse_float(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool):
        raise AnimaError(f"{where}: {what} must be a number, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise AnimaError(f"{where}: {what} must be a number, got {value!r}") from None
    else:
        raise AnimaError(f"{where}: {what} must be a number, got {value!r}")
    if not np.isfinite(number):
        raise AnimaError(f"{where}: {what} must be a finite number, got {value!r}")
    return number


# Dict keys understood by the sampler, with their parsers; the .txt options map onto the same keys.
_INT_KEYS = ("width", "height", "seed", "sample_steps")
_FLOAT_KEYS = ("scale", "flow_shift")
_TEXT_KEYS = ("prompt", "negative_prompt")
# Keys other model families use; accepted so shared prompt files keep working, but they do nothing here.
_IGNORED_KEYS = ("guidance_scale", "sample_sampler", "controlnet_image", "cfg_trunc_ratio", "renorm_cfg")
_KNOWN_KEYS = _INT_KEYS + _FLOAT_KEYS + _TEXT_KEYS + _IGNORED_KEYS

# .txt option name (lower case) -> dict key
_TXT_OPTIONS = {
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "sample_steps",
    "l": "scale",
    "fs": "flow_shift",
    "n": "negative_prompt",
    "g": "guidance_scale",
    "ss": "sample_sampler",
    "cn": "controlnet_image",
    "ctr": "cfg_trunc_ratio",
    "rcfg": "renorm_cfg",
}


def parse_prompt_line(line: str, where: str) -> dict[str, str]:
    """Split a ``.txt`` line into ``{"prompt": ..., <key>: <raw text>}``; ``where`` names the file and line."""
    parts = (" " + line).split(" --")  # the leading space lets a line that starts with an option fail clearly
    fields: dict[str, str] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        match = re.fullmatch(r"([A-Za-z]+)(?:\s+(.*))?", part.strip(), flags=re.DOTALL)
        name = match.group(1).lower() if match else part.strip()
        if not match or name not in _TXT_OPTIONS:
            known = " ".join(f"--{o}" for o in _TXT_OPTIONS)
            raise AnimaError(f"{where}: unknown sample option '--{part.strip()}' (known options: {known})")
        value = (match.group(2) or "").strip()
        key = _TXT_OPTIONS[name]
        if not value and key != "negative_prompt":
            raise AnimaError(f"{where}: option --{name} needs a value")
        fields[key] = value
    return fields


def prompt_from_fields(fields: Mapping[str, Any], index: int, where: str) -> SamplePrompt:
    """One prompt from a dict of prompt-file keys; ``where`` names its origin in error messages."""
    unknown = sorted(set(fields) - set(_KNOWN_KEYS))
    if unknown:
        raise AnimaError(f"{where}: unknown sample prompt key(s) {unknown} (known keys: {', '.join(_KNOWN_KEYS)})")
    ignored = [k for k in _IGNORED_KEYS if k in fields]
    if ignored:
        logger.warning("%s: %s have no effect on Anima sampling and are ignored", where, ", ".join(ignored))

    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise AnimaError(f"{where}: the prompt text is missing or empty")
    negative = fields.get("negative_prompt", "")
    if negative is None:
        negative = ""
    if not isinstance(negative, str):
        raise AnimaError(f"{where}: negative_prompt must be text, got {negative!r}")

    values: dict[str, Any] = {}
    for key in _INT_KEYS:
        if fields.get(key) is not None:
            values[key] = _parse_int(fields[key], key, where)
    for key in _FLOAT_KEYS:
        if fields.get(key) is not None:
            values[key] = _parse_float(fields[key], key, where)

    if values.get("seed") is not None and values["seed"] < 0:
        raise AnimaError(f"{where}: seed must be >= 0, got {values['seed']}")
    steps = values.get("sample_steps", DEFAULT_STEPS)
    clamped_steps = min(max(steps, 1), MAX_STEPS)
    if clamped_steps != steps:
        logger.warning("%s: sample_steps %d clamped to %d", where, steps, clamped_steps)
    if values.get("flow_shift", DEFAULT_FLOW_SHIFT) <= 0:
        raise AnimaError(f"{where}: flow_shift must be > 0, got {values['flow_shift']}")

    sides = {}
    for key, default in (("width", DEFAULT_WIDTH), ("height", DEFAULT_HEIGHT)):
        requested = values.get(key, default)
        rounded = max(requested - requested % SIDE_MULTIPLE, MIN_SIDE)
        if rounded != requested:
            logger.info("%s: %s %d rounded to %d (multiple of %d, at least %d)", where, key, requested, rounded,
                        SIDE_MULTIPLE, MIN_SIDE)
        sides[key] = rounded

    return SamplePrompt(
        index=index,
        prompt=prompt.strip(),
        negative_prompt=negative.strip(),
        width=sides["width"],
        height=sides["height"],
        seed=values.get("seed"),
        sample_steps=clamped_steps,
        scale=values.get("scale", DEFAULT_SCALE),
        flow_shift=values.get("flow_shift", DEFAULT_FLOW_SHIFT),
    )


def is_prompt_line(line: str) -> bool:
    """Whether a line of a ``.txt`` prompt file (or the console) holds a prompt: blank and ``#`` lines do not."""
    line = line.strip()
    return bool(line) and not line.startswith("#")


def _read_txt(path: Path) -> list[tuple[dict[str, Any], str]]:
    entries = []
    for line_no, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not is_prompt_line(line):
            continue
        where = f"{path}:{line_no}"
        entries.append((parse_prompt_line(line, where), where))
    return entries


def _read_toml(path: Path) -> list[tuple[dict[str, Any], str]]:
    import toml  # imported when a TOML file is read: GPU-only runs need no toml

    try:
        data = toml.load(path)
    except toml.TomlDecodeError as err:
        raise AnimaError(f"{path}: not valid TOML ({err})") from None
    unknown_tables = sorted(set(data) - {"prompt"})
    if unknown_tables or not isinstance(data.get("prompt"), dict):
        raise AnimaError(f"{path}: a sample prompt TOML needs one [prompt] table with a [[prompt.subset]] array"
                         + (f"; unexpected top-level key(s) {unknown_tables}" if unknown_tables else ""))
    shared = dict(data["prompt"])
    subsets = shared.pop("subset", None)
    if not isinstance(subsets, list) or not subsets:
        raise AnimaError(f"{path}: [prompt] has no [[prompt.subset]] entries")
    entries = []
    for i, subset in enumerate(subsets):
        if not isinstance(subset, dict):
            raise AnimaError(f"{path}: prompt.subset[{i}] must be a table")
        entries.append(({**shared, **subset}, f"{path}: prompt.subset[{i}]"))
    return entries


def _read_json(path: Path) -> list[tuple[dict[str, Any], str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnimaError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise AnimaError(f"{path}: a sample prompt JSON file must hold a list of prompts (dicts or strings)")
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if isinstance(item, str):
            entries.append((parse_prompt_line(item.strip(), where), where))
        elif isinstance(item, dict):
            entries.append((item, where))
        else:
            raise AnimaError(f"{where}: each prompt must be a dict or a string, got {type(item).__name__}")
    return entries


# Parsed prompt files by (path, modification time, size). A run reads its prompt file when the flags are
# checked, when the prompts are encoded for the cache and at every sampling; parsing it once keeps each of
# its warnings (ignored keys, clamped steps) to one line per run. An edited file is parsed (and warned) again.
_PARSED_PROMPT_FILES: dict[tuple[str, int, int], list[SamplePrompt]] = {}


def load_sample_prompts(path: str | os.PathLike[str], defaults: Mapping[str, Any] | None = None,
                        guidance_is_scale: bool = False, flag: str = "--sample_prompts") -> list[SamplePrompt]:
    """Read and validate a prompt file (.txt, .toml or .json). Raises AnimaError on bad input.

    ``defaults``: values (same keys as a prompt dict: width, height, seed, sample_steps, scale, flow_shift,
    negative_prompt) for what a prompt leaves out, instead of the trainer's defaults. ``guidance_is_scale``:
    read ``guidance_scale`` (``--g``) as the CFG scale when ``scale`` (``--l``) is not given, as sd-scripts'
    inference script does. ``flag`` names the option in error messages. The trainer's form (no defaults, no
    alias) is parsed once per file version.
    """
    path = Path(path)
    if not path.is_file():
        raise AnimaError(f"{flag}: file not found: {path}")
    if defaults is not None or guidance_is_scale:
        return _parse_sample_prompts(path, defaults, guidance_is_scale, flag)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _PARSED_PROMPT_FILES:
        _PARSED_PROMPT_FILES[key] = _parse_sample_prompts(path, None, False, flag)
    return list(_PARSED_PROMPT_FILES[key])


def _parse_sample_prompts(path: Path, defaults: Mapping[str, Any] | None, guidance_is_scale: bool,
                          flag: str) -> list[SamplePrompt]:
    readers: dict[str, Callable[[Path], list[tuple[dict[str, Any], str]]]] = {
        ".txt": _read_txt, ".toml": _read_toml, ".json": _read_json,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise AnimaError(f"{flag}: {path} must end in .txt, .toml or .json")
    prompts = [_prompt_with_defaults(fields, defaults, guidance_is_scale, index, where)
               for index, (fields, where) in enumerate(reader(path))]
    if not prompts:
        raise AnimaError(f"{flag}: {path} contains no prompts")
    return prompts


def _prompt_with_defaults(fields: Mapping[str, Any], defaults: Mapping[str, Any] | None, guidance_is_scale: bool,
                          index: int, where: str) -> SamplePrompt:
    fields = dict(fields)
    if guidance_is_scale and "guidance_scale" in fields:
        fields.setdefault("scale", fields.pop("guidance_scale"))
    return prompt_from_fields({**(defaults or {}), **fields}, index, where)


def prompt_from_line(line: str, index: int, where: str, defaults: Mapping[str, Any] | None = None,
                     guidance_is_scale: bool = False) -> SamplePrompt:
    """One prompt from a line in the ``.txt`` prompt-file form (``text --w 832 --d 5 ...``), read as
    ``load_sample_prompts`` reads a line of a file with the same ``defaults`` and ``guidance_is_scale``."""
    return _prompt_with_defaults(parse_prompt_line(line.strip(), where), defaults, guidance_is_scale, index, where)


def prompt_texts(prompts: Sequence[SamplePrompt]) -> list[str]:
    """Every distinct positive and negative text, in first-use order (what must be encoded up front)."""
    texts: dict[str, None] = {}
    for p in prompts:
        texts.setdefault(p.prompt)
        texts.setdefault(p.negative_prompt)
    return list(texts)


# ---------------------------------------------------------------------------------------------------------------
# Text encodings


class PromptEncoder(Protocol):
    """Anything that turns captions into the four text tensors (``AnimaTextEncoding`` or the cache below)."""

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]: ...


class CachedPromptEncodings:
    """Encodings of the sample prompts made once at start-up, so the text encoder can leave the device.

    Looked up by exact text; an unknown text raises KeyError (the sampler then skips that prompt).
    """

    def __init__(self, encodings: Mapping[str, dict[str, torch.Tensor]]):
        self._encodings = dict(encodings)

    @classmethod
    def from_encoder(cls, encoder: PromptEncoder, prompts: Sequence[SamplePrompt]) -> CachedPromptEncodings:
        encodings = {}
        with torch.no_grad():
            for text in prompt_texts(prompts):
                encoded = encoder.encode([text])
                encodings[text] = {k: v.detach().to("cpu") for k, v in encoded.items()}
        return cls(encodings)

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        missing = [c for c in captions if c not in self._encodings]
        if missing:
            raise KeyError(f"no cached text encoding for {missing!r}")
        per_caption = [self._encodings[c] for c in captions]
        return {k: torch.cat([e[k] for e in per_caption]) for k in per_caption[0]}


# ---------------------------------------------------------------------------------------------------------------
# Sampler


def euler_flow_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor,
    negative_context: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Integrate the velocity field from σ=sigmas[0] to σ=sigmas[-1] with Euler steps.

    noise: [B, 16, 1, H, W] (any float dtype; computed in fp32); sigmas: [steps+1] decreasing.
    The model is called as ``model(x, t [B], context, padding_mask=zeros [B,1,H,W])`` in the dtype of ``context``.
    With ``negative_context`` and ``scale != 1`` the velocity is ``v_neg + scale * (v_pos - v_neg)``
    (two separate passes). Returns the fp32 latent at the last σ.
    """
    dtype = context.dtype
    x = noise.to(torch.float32)
    batch, _, _, height, width = x.shape
    padding_mask = torch.zeros(batch, 1, height, width, dtype=dtype, device=x.device)
    use_cfg = negative_context is not None and scale != 1.0
    for i in range(len(sigmas) - 1):
        t = sigmas[i].to(device=x.device, dtype=dtype).expand(batch)
        x_in = x.to(dtype)
        velocity = model(x_in, t, context, padding_mask=padding_mask).to(torch.float32)
        if use_cfg:
            v_neg = model(x_in, t, negative_context, padding_mask=padding_mask).to(torch.float32)
            velocity = v_neg + scale * (velocity - v_neg)
        x = x + velocity * float(sigmas[i + 1] - sigmas[i])
    return x


@contextmanager
def preserved_training_state(*modules: torch.nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every submodule's train/eval flag and the torch RNG states afterwards.

    Sampling must not change the training trajectory, so the CPU and CUDA generators are put back exactly.
    """
    modes = {m: m.training for module in modules for m in module.modules()}
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def sample_image_filename(output_name: str | None, step: int, epoch: int | None, index: int,
                          seed: int | None, timestamp: str) -> str:
    """``[<output_name>_]<step:06d | e<epoch:06d>>_<index:02d>_<timestamp>[_<seed>].png``."""
    name = f"{output_name}_" if output_name else ""
    name += f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    name += f"_{index:02d}_{timestamp}"
    if seed is not None:
        name += f"_{seed}"
    return name + ".png"


def save_png_atomic(pixels: torch.Tensor, path: Path, text: Mapping[str, str] | None = None) -> None:
    """pixels: [3, H, W] in [-1, 1] -> 8-bit PNG (values truncated, not rounded), written via temp + rename.
    ``text``: PNG text chunks (e.g. the prompt and seed)."""
    array = ((pixels.float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0).to(torch.uint8)
    image = Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def _initial_noise(prompt: SamplePrompt, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 noise [1, 16, 1, H/8, W/8] drawn on a CPU generator, so the image does not depend on the device.

    A seeded prompt re-seeds ``generator`` (the values of ``torch.manual_seed(seed)`` then ``torch.randn``); an
    unseeded one draws from it where it stands. Without ``generator`` a fresh one is used (random if unseeded).
    """
    if generator is None:
        generator = torch.Generator(device="cpu")
        if prompt.seed is None:
            generator.seed()
    if prompt.seed is not None:
        generator.manual_seed(prompt.seed)
    shape = (1, LATENT_CHANNELS, 1, prompt.height // VAE_STRIDE, prompt.width // VAE_STRIDE)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def training_noise_generator() -> torch.Generator:
    """A CPU generator at the global torch CPU random state: the noise of a sampling pass, as sd-scripts draws it.

    sd-scripts seeds the global generator for each seeded prompt and draws every prompt's noise from it, so an
    unseeded prompt continues the training's random stream (or the stream of the seeded prompt before it) and
    repeats in a run with the same ``--seed``. A copy gives the same values and leaves the global state alone.
    """
    generator = torch.Generator(device="cpu")
    generator.set_state(torch.random.get_rng_state())
    return generator


def _encode_context(model: Any, encoder: PromptEncoder, text: str, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    encoded = encoder.encode([text])
    return model.encode_text(
        encoded["qwen3_embeds"].to(device=device, dtype=dtype),
        encoded["qwen3_mask"].to(device),
        encoded["t5_ids"].to(device),
        encoded["t5_mask"].to(device),
    )


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def generate_sample_images(
    model: torch.nn.Module,
    vae: torch.nn.Module,
    prompt_encoder: PromptEncoder,
    prompts: Sequence[SamplePrompt],
    *,
    output_dir: str | os.PathLike[str],
    output_name: str | None,
    step: int,
    epoch: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    network: torch.nn.Module | None = None,
) -> list[tuple[Path, SamplePrompt]]:
    """Render every prompt with the Euler flow sampler and write PNGs under ``<output_dir>/sample/``.

    ``model`` is the DiT (with its LLM adapter, and any LoRA already applied); ``epoch`` is given for
    epoch-triggered and first-step sampling (file names use ``e<epoch>`` then), else ``step`` names the files.
    ``network`` (the LoRA, if it is a separate module) is put in eval mode too, so its dropout is off.
    A prompt whose text cannot be encoded is skipped with a warning. The noise of each prompt is drawn as
    sd-scripts draws it (``training_noise_generator``). Train/eval modes and the torch RNG states are restored
    afterwards. Returns the written files with their prompts.
    """
    model_device, model_dtype = _module_device_dtype(model)
    vae_dtype = _module_device_dtype(vae)[1]
    device = torch.device(device) if device is not None else model_device
    sample_dir = Path(output_dir) / "sample"
    written: list[tuple[Path, SamplePrompt]] = []

    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device.type, enabled=False))
    eval_modules = [model] if network is None else [model, network]
    noise_generator = training_noise_generator()
    with preserved_training_state(*eval_modules), torch.no_grad(), autocast:
        for prompt in prompts:
            try:
                context, negative = encode_prompt_contexts(model, prompt_encoder, prompt, device, model_dtype)
            except KeyError as err:
                logger.warning("sample prompt %d skipped: its text could not be encoded (%s)", prompt.index, err)
                continue
            latents = sample_latents(model, prompt, context, negative, generator=noise_generator)
            problem = _training_sample_problem(latents, "DiT", model_dtype if autocast_dtype is None else autocast_dtype)
            if problem is None:
                pixels = decode_latents(vae, latents[:, :, 0], device)  # [1, 3, H, W]
                problem = _training_sample_problem(pixels, "VAE", vae_dtype)
            if problem is not None:
                logger.warning("sample prompt %d: %s; no image written", prompt.index, problem)
                continue
            timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            path = sample_dir / sample_image_filename(output_name, step, epoch, prompt.index, prompt.seed, timestamp)
            save_png_atomic(pixels[0], path)
            written.append((path, prompt))
    return written


def non_finite_values(values: torch.Tensor, made_by: str, dtype: torch.dtype) -> str | None:
    """"the DiT produced NaN/inf values in bfloat16" for sampled latents or decoded pixels holding NaN/inf (they
    would be written as a black or noise image without a word), else None."""
    if bool(torch.isfinite(values).all()):
        return None
    return f"the {made_by} produced NaN/inf values in {str(dtype).replace('torch.', '')}"


def _training_sample_problem(values: torch.Tensor, made_by: str, dtype: torch.dtype) -> str | None:
    """`non_finite_values` with the trainer's advice for the DiT's latents or the VAE's pixels."""
    problem = non_finite_values(values, made_by, dtype)
    if problem is None:
        return None
    if made_by == "VAE":
        advice = "a 16-bit VAE can overflow: --no_half_vae" if dtype != torch.float32 else "check the --vae file"
    elif dtype == torch.float16:
        advice = FLOAT16_OVERFLOW_ADVICE
    else:
        advice = "the LoRA may have diverged: check the loss and --learning_rate"
    return f"{problem} ({advice})"


def encode_prompt_contexts(model: Any, encoder: PromptEncoder, prompt: SamplePrompt, device: torch.device,
                           dtype: torch.dtype, guidance_below_one: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, negative context or None without CFG) [1, Lt, D] of one prompt; KeyError if a text is unknown.

    CFG runs for a scale above 1, as in sd-scripts' training samples; with ``guidance_below_one`` also for a
    scale below 1, as in sd-scripts' inference script (a scale of 1 is the conditional pass alone either way).
    """
    context = _encode_context(model, encoder, prompt.prompt, device, dtype)
    use_cfg = prompt.scale > 1.0 or (guidance_below_one and prompt.scale < 1.0)
    negative = _encode_context(model, encoder, prompt.negative_prompt, device, dtype) if use_cfg else None
    return context, negative


def sample_latents(model: Callable[..., torch.Tensor], prompt: SamplePrompt, context: torch.Tensor,
                   negative_context: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Euler flow sampler run for one prompt: its seed's noise, its schedule and scale -> fp32 latents
    [1, 16, 1, H/8, W/8] on the device of ``context``. ``generator``: the CPU generator of an unseeded prompt's
    noise (re-seeded by a seeded prompt); without it an unseeded prompt gets random noise."""
    logger.info("sampling prompt %d: %r (negative %r, %dx%d, %d steps, scale %g, shift %g, seed %s)",
                prompt.index, prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height,
                prompt.sample_steps, prompt.scale, prompt.flow_shift, prompt.seed)
    noise = _initial_noise(prompt, generator).to(context.device)
    sigmas = sampling_sigmas(prompt.sample_steps, prompt.flow_shift)
    return euler_flow_sample(model, noise, sigmas, context, negative_context, prompt.scale)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """latents [B, 16, h, w] -> fp32 pixels [B, 3, 8h, 8w] in [-1, 1]."""
    # The VAE may live on the CPU between samplings; borrow the sampling device for the decode only.
    vae_device, vae_dtype = _module_device_dtype(vae)
    vae.to(device)
    try:
        with torch.autocast(device.type, enabled=False):
            return vae.decode_latents_to_pixels(latents.to(device=device, dtype=vae_dtype)).float()
    finally:
        vae.to(vae_device)
