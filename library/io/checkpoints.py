"""Reading checkpoint files: the one place that opens ``.safetensors`` and PyTorch weight files.

Every loader (DiT, VAE, Qwen3, LoRA) goes through ``open_checkpoint``:

* ``.safetensors`` is read through its header: keys, shapes and dtypes cost no tensor data, and tensors are
  then read one at a time;
* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` go through ``torch.load(weights_only=True, mmap=True)`` (never
  arbitrary pickled objects); nested ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are unwrapped and
  non-tensor entries (step counters, configs) ignored;
* a file with another or no extension is recognised by its first bytes.

Every floating tensor read is checked to be finite (one ``all_finite`` min/max pass per tensor): a file with
NaN or infinite weights ends in one error naming the flag, the file and the first bad tensor.

Reading casts floating tensors to the wanted dtype on the wanted device tensor by tensor, so a 2B model
loads with one copy of its weights in memory; the file is reopened after every ``REMAP_BYTES`` read, so that
the memory-mapped pages already read do not stay resident beside that copy. Problems with the file itself
(missing, a folder, unreadable, no tensors) end in one ``AnimaError`` line naming the flag, the file and the fix.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from library.errors import AnimaError
from library.io.files import all_finite

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# Wrappers that training frameworks put around a state dict; unwrapped in this order, repeatedly.
NESTED_STATE_DICT_KEYS = ("state_dict", "model")

SAFETENSORS = "safetensors"
TORCH = "torch"

# One file of a set split by size: ``<stem>00001-of-00003.safetensors`` (sd-scripts' and Hugging Face's names).
_SHARD_NAME = re.compile(r"^(.*?)(\d+)-of-(\d+)\.safetensors$")

# safe_open and torch.load(mmap=True) map the whole file, and every page a read touches stays resident in this
# process until the map is dropped: a 3.7 GiB bf16 DiT read into float32 would peak at its 7.4 GiB copy plus the
# whole file. Reopening the file after this many bytes keeps the mapped part small (the pages stay in the OS page
# cache, so reads stay fast).
REMAP_BYTES = 256 * 2**20

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_LEGACY_TORCH_MAGIC = b"\x80"  # a pickle protocol header: torch.save's legacy format


def sample_keys(keys: Iterable[str], limit: int = 5) -> str:
    """Short, sorted listing for error messages: ``"a, b, c (+4 more)"``."""
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def cast_tensor(
    tensor: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Move to ``device``; floating tensors also become ``dtype`` (None keeps theirs), others keep their dtype."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target)


def strip_prefix(key: str, prefixes: Iterable[str]) -> str:
    """``key`` without the first of ``prefixes`` it starts with (unchanged if none)."""
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def find_prefix(keys: Collection[str], anchor: str, prefixes: Iterable[str]) -> str | None:
    """The prefix ("" first, then ``prefixes`` in order) under which ``anchor`` is one of ``keys``; None if none."""
    for prefix in ("", *prefixes):
        if prefix + anchor in keys:
            return prefix
    return None


VIDEO_VAE_KIND = "a Qwen-Image / Wan video VAE (pass it as --vae)"
# Fragments of key names -> what a file holding them probably is. First match wins, so the more specific
# entries come first.
_KIND_FRAGMENTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lora_down", "lora_up", "lora_A", "lora_B", "lokr_", "hada_"), "a LoRA/network file"),
    (
        ("llm_adapter.", "x_embedder.", "t_embedder.", "net.blocks.", "adaln_modulation"),
        "an Anima DiT checkpoint (pass it as --pretrained_model_name_or_path)",
    ),
    (
        ("embed_tokens.", "self_attn.q_proj", "mlp.gate_proj"),
        "a text encoder (Qwen3/LLM) checkpoint (pass it as --qwen3)",
    ),
    (("encoder.block.", "shared.weight"), "a T5 text encoder checkpoint"),
    (
        ("encoder.head.0.gamma", "encoder.downsamples.0.residual.", "encoder.down_blocks.0.norm1.gamma"),
        VIDEO_VAE_KIND,
    ),
    (
        ("encoder.down.0.", "encoder.down_blocks.0.resnets.", "decoder.up.0."),
        "a 2-D image VAE (SD/SDXL/Flux style), not the Qwen-Image (Wan 2.1) VAE",
    ),
    (
        ("double_blocks.", "single_blocks.", "transformer_blocks.", "diffusion_model."),
        "a diffusion transformer/UNet checkpoint",
    ),
    (
        ("encoder.conv_in.", "encoder.conv1.", "decoder.upsamples.", "decoder.up_blocks."),
        "a VAE of another layout (e.g. Wan 2.2); Anima needs the Qwen-Image VAE",
    ),
)


# Keys of "scaled" float8 files (ComfyUI's scaled_fp8 and similar): float8 weights that mean something only once
# multiplied by a per-tensor scale stored next to them.
_SCALED_FLOAT8_KEY = re.compile(r"(^|\.)(scaled_fp8|scale_weight|scale_input|weight_scale|input_scale)$")


def check_not_scaled_float8(keys: Iterable[str], flag: str, path: str | os.PathLike) -> None:
    """One error for a scaled-float8 checkpoint: its weights are float8 values that need their stored scales.

    sd-scripts' loaders stop at the scale keys (DiT, VAE) or load the float8 values without their scales
    (Qwen3 single files); plain float8 files (no scale keys) are read like any other dtype, upcast.
    """
    found = sorted(key for key in keys if _SCALED_FLOAT8_KEY.search(key))
    if found:
        raise AnimaError(
            f"{flag}: {path} is a scaled-float8 checkpoint ({sample_keys(found, 2)}: float8 weights with "
            "per-tensor scales), which is not supported; pass the bf16, fp16 or fp32 release of the model"
        )


def guess_checkpoint_kind(keys: Iterable[str]) -> str:
    """A short description of what a state dict with these keys probably is (for error messages)."""
    joined = "\n".join(sorted(keys)[:2000])
    for fragments, kind in _KIND_FRAGMENTS:
        if any(fragment in joined for fragment in fragments):
            return kind
    return "not a model checkpoint this trainer knows"


def _sniff_format(path: Path) -> str | None:
    """Format from the first bytes: safetensors starts with an 8-byte header length and a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return TORCH
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return SAFETENSORS
    return None


def checkpoint_format(path: str | os.PathLike, flag: str, what: str) -> str:
    """``"safetensors"`` or ``"torch"`` for an existing file; one clear error for a missing file, a folder or
    a file that is neither."""
    path = Path(path)
    if not path.exists():
        raise AnimaError(f"{flag}: file not found: {path}; pass the path of {what}")
    if path.is_dir():
        raise AnimaError(f"{flag}: {path} is a folder; pass the single weights file of {what}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return SAFETENSORS
    if suffix in TORCH_SUFFIXES:
        return TORCH
    try:
        sniffed = _sniff_format(path)
    except OSError as error:
        raise AnimaError(f"{flag}: cannot read {path} ({error})") from None
    if sniffed is None:
        raise AnimaError(
            f"{flag}: {path} is neither a .safetensors nor a PyTorch weights file "
            f"({', '.join(TORCH_SUFFIXES)}); pass {what}"
        )
    return sniffed


def shard_paths(path: str | os.PathLike, flag: str) -> list[Path]:
    """Every file of the split set ``path`` belongs to (``...-00002-of-00003.safetensors`` -> all three, in
    order), as sd-scripts' DiT loader reads them; ``[path]`` for any other name. A missing part is one error."""
    path = Path(path)
    match = _SHARD_NAME.match(path.name)
    if match is None or path.is_dir():
        return [path]
    stem, index, count = match.group(1), match.group(2), match.group(3)
    parts = [path.with_name(f"{stem}{i:0{len(index)}d}-of-{count}.safetensors") for i in range(1, int(count) + 1)]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing and path.is_file():
        raise AnimaError(
            f"{flag}: {path} is part of a file split in {int(count)}, but {missing[0]} is missing; put all parts "
            "in the same folder"
        )
    return parts if not missing else [path]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _unwrap_state_dict(loaded: object) -> object:
    unwrapped = True
    while unwrapped and isinstance(loaded, Mapping):
        unwrapped = False
        for key in NESTED_STATE_DICT_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded, unwrapped = loaded[key], True
                break
    return loaded


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class CheckpointFile:
    """An open checkpoint file. Use as a context manager, or call ``close``.

    ``keys``/``shapes``/``meta_state_dict`` read no tensor data (safetensors header; for torch files the
    memory-mapped load). ``tensor``/``read`` read tensors one by one, cast with ``cast_tensor``.
    """

    def __init__(self, path: str | os.PathLike, flag: str, what: str) -> None:
        self.path = Path(path)
        self.flag = flag
        self.what = what
        self.format = checkpoint_format(self.path, flag, what)
        self._safetensors = None
        self._torch_tensors: dict[str, torch.Tensor] = {}
        self._metadata: dict[str, str] = {}
        self._identity = _file_identity(self.path)
        self._mapped_bytes = 0  # tensor bytes read through the current memory map
        self._torch_mapped = False  # a torch file loaded with mmap=True (the legacy format cannot be)
        try:
            if self.format == SAFETENSORS:
                self._safetensors = self._open_safetensors()
                self._metadata = dict(self._safetensors.metadata() or {})
                self._keys = list(self._safetensors.keys())
            else:
                self._torch_tensors = self._load_torch()
                self._keys = list(self._torch_tensors)
        except AnimaError:
            raise
        except Exception as error:  # safetensors, zip and pickle errors come in many types
            kind = ".safetensors" if self.format == SAFETENSORS else "PyTorch weights"
            raise AnimaError(
                f"{flag}: cannot read {self.path} as a {kind} file ({_first_line(error)}); "
                f"the file is damaged or not {what}"
            ) from None
        if not self._keys:
            raise AnimaError(f"{flag}: {self.path} holds no tensors; pass {what}")

    def _load_torch(self) -> dict[str, torch.Tensor]:
        try:
            loaded = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            self._torch_mapped = True
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # The legacy (non-zip) torch format cannot be memory-mapped: read it whole.
            loaded = torch.load(self.path, map_location="cpu", weights_only=True)
            self._torch_mapped = False
        state = _unwrap_state_dict(loaded)
        if not isinstance(state, Mapping):
            raise AnimaError(f"{self.flag}: {self.path} does not hold a state dict (found {type(state).__name__})")
        tensors = {
            key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, torch.Tensor)
        }
        if not tensors:
            raise AnimaError(f"{self.flag}: {self.path} holds no tensors, so it is not a state dict; pass {self.what}")
        return tensors

    # -- inspection (no tensor data) ------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._keys)

    def metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (empty for torch files)."""
        return dict(self._metadata)

    def meta_tensor(self, key: str) -> torch.Tensor:
        """``key`` as a tensor on the meta device with the file's shape and dtype (reads no data)."""
        if self._safetensors is None:
            return torch.empty_like(self._torch_tensors[key], device="meta")
        tensor_slice = self._safetensors.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype(), torch.float32)
        return torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every key as a tensor on the meta device with the file's shape and dtype (costs no memory)."""
        return {key: self.meta_tensor(key) for key in self._keys}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in self.meta_state_dict().items()}

    # -- reading --------------------------------------------------------------------------------------------

    def tensor(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, cast with ``cast_tensor``. On the meta device nothing is read: loaders called with
        ``device="meta"`` check a file completely from its header (the trainer's up-front input check)."""
        if torch.device(device).type == "meta":
            return cast_tensor(self.meta_tensor(key), device, dtype)
        try:
            raw = self._torch_tensors[key] if self._safetensors is None else self._safetensors.get_tensor(key)
        except Exception as error:  # a truncated data section shows up only here
            raise AnimaError(f"{self.flag}: cannot read tensor {key} of {self.path} ({_first_line(error)})") from None
        out = cast_tensor(raw, device, dtype)
        if out.is_floating_point() and not all_finite(out):
            # One check per tensor while loading: a damaged or diverged file must not start a run that trains
            # on NaN. A finite file can still overflow when cast to a narrower dtype (e.g. float16).
            overflow = all_finite(raw)
            cause = (f"overflows {dtype} when cast; use a wider --mixed_precision (bf16 or no)" if overflow
                     else "holds NaN or infinite values; the file is damaged or comes from a diverged run")
            raise AnimaError(f"{self.flag}: tensor {key} of {self.path} {cause}")
        if out is raw:
            # Still a view of the memory-mapped file (both formats map it): own the data, so that a file
            # overwritten or truncated while training can never change (or crash) the loaded weights.
            out = out.clone()
        if self._safetensors is not None or self._torch_mapped:
            self._mapped_bytes += raw.numel() * raw.element_size()
            del raw  # the last view of the map: reopening below then unmaps it
            if self._mapped_bytes >= REMAP_BYTES:
                self._remap()
        return out

    def _open_safetensors(self):
        return safe_open(str(self.path), framework="pt", device="cpu")

    def _remap(self) -> None:
        """Drop the file's memory map (and the resident pages read through it) and map the file again."""
        self._safetensors = None
        self._torch_tensors = {}  # a torch file's tensors are views of its one map
        self._mapped_bytes = 0
        if _file_identity(self.path) != self._identity:
            raise AnimaError(f"{self.flag}: {self.path} changed while it was being read; start again once the file "
                             "is completely written")
        if self.format == SAFETENSORS:
            self._safetensors = self._open_safetensors()
        else:
            self._torch_tensors = self._load_torch()

    def read(
        self,
        keys: Mapping[str, str] | Iterable[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tensors one at a time. ``keys``: None (all), file keys, or {new name: file key} to rename."""
        if keys is None:
            keys = self._keys
        names = keys if isinstance(keys, Mapping) else {key: key for key in keys}
        return {name: self.tensor(file_key, device, dtype) for name, file_key in names.items()}

    def close(self) -> None:
        self._safetensors = None  # safe_open releases its memory map when dropped
        self._torch_tensors = {}

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def open_checkpoint(path: str | os.PathLike, flag: str, what: str) -> CheckpointFile:
    """Open a checkpoint for inspection and reading. ``flag`` (e.g. ``--vae``) and ``what`` (e.g. ``the
    Qwen-Image VAE``) make the error messages."""
    return CheckpointFile(path, flag, what)


def load_state_dict(
    path: str | os.PathLike,
    flag: str,
    what: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read one at a time and cast with ``cast_tensor``."""
    with open_checkpoint(path, flag, what) as checkpoint:
        return checkpoint.read(device=device, dtype=dtype)
