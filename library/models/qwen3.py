"""The Qwen3 text encoder: loading a checkpoint, encoding captions, and the encoding object used by caches.

Qwen3-0.6B runs as the bare decoder (no LM head). Its ``last_hidden_state`` (after the final RMSNorm) with
rows of padding tokens set to exactly 0 is the caption embedding the DiT's LLM adapter reads. The T5 side is
ids only (see ``library.models.tokenizers``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

from library.errors import AnimaError
from library.io.checkpoints import (
    CheckpointFile,
    check_not_scaled_float8,
    guess_checkpoint_kind,
    open_checkpoint,
    sample_keys,
    strip_prefix,
)
from library.models.tokenizers import (
    AnimaTokenizer,
    TokenizedCaptions,
    load_qwen3_tokenizer,
    load_t5_tokenizer,
    tokenizer_digest,
)

__all__ = [
    "AnimaTextEncoding",
    "AnimaTokenizer",
    "TokenizedCaptions",
    "DEFAULT_QWEN3_CONFIG",
    "encode_qwen3",
    "load_qwen3_text_encoder",
    "load_qwen3_tokenizer",
    "load_t5_tokenizer",
    "text_encoder_identity",
    "tokenizer_digest",
]

DEFAULT_QWEN3_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "qwen3_06b" / "config.json"
# Bump when the encoding recipe changes so that cached embeddings are rebuilt.
ENCODING_RECIPE_VERSION = "anima-qwen3-last-hidden-zero-pad-v1"
# Set on a loaded encoder: identifies its weight files without reading them again.
SOURCE_IDENTITY_ATTR = "anima_source_identity"

QWEN3_FLAG = "--qwen3"
QWEN3_WHAT = "the Qwen3-0.6B text encoder (a model folder or a single .safetensors file)"
_CHECKPOINT_PREFIXES = ("model.",)
_IGNORED_KEYS = {"lm_head.weight"}  # tied to embed_tokens in Qwen3-0.6B; the bare decoder has no head


# --- locating and reading checkpoint files -----------------------------------------------------------------


def _weight_files_in_dir(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (single or sharded; safetensors preferred)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = directory / index_name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise AnimaError(
                    f"--qwen3: cannot read shard index {index_file} ({error}); re-download the model"
                ) from error
            shards = [directory / name for name in sorted(set(weight_map.values()))]
            missing = [str(shard) for shard in shards if not shard.is_file()]
            if missing:
                raise AnimaError(
                    f"--qwen3: shard {missing[0]} listed in {index_file} is missing; re-download the model"
                )
            return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    safetensors_files = sorted(directory.glob("*.safetensors"))
    if safetensors_files:
        return safetensors_files
    raise AnimaError(
        f"--qwen3 directory {directory} holds no weights (model.safetensors, sharded safetensors or pytorch_model.bin)"
    )


def _read_qwen3_config(config_file: Path):
    from transformers import Qwen3Config

    if not config_file.is_file():
        raise AnimaError(f"--qwen3: config {config_file} not found; a model directory needs its config.json")
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise AnimaError(f"--qwen3: cannot read config {config_file} ({error})") from error
    if values.get("model_type") != "qwen3":
        raise AnimaError(
            f"--qwen3: {config_file} describes model_type {values.get('model_type')!r}, not 'qwen3'; "
            "pass the Qwen3-0.6B text encoder"
        )
    config = Qwen3Config.from_dict(values)
    config._attn_implementation = "sdpa"
    return config


def _map_checkpoint_key(key: str) -> str | None:
    """Checkpoint key -> ``Qwen3Model`` key (None = ignored)."""
    key = strip_prefix(key, _CHECKPOINT_PREFIXES)
    return None if key in _IGNORED_KEYS else key


def _source_identity(files: list[Path]) -> str:
    """Identifies checkpoint files by path, size and modification time (no weight data is read)."""
    hasher = hashlib.sha256()
    for file in files:
        stat = file.stat()
        hasher.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]


# --- loading ---------------------------------------------------------------------------------------------------


def load_qwen3_text_encoder(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    config_path: str | os.PathLike | None = None,
):
    """Load Qwen3-0.6B as a frozen bare decoder (transformers ``Qwen3Model``, eval mode, no grad on weights).

    ``path``: a Hugging Face model folder (config.json + weights, possibly sharded) or a single checkpoint
    file, whose config is ``config_path`` or else the bundled ``configs/qwen3_06b/config.json``.
    A leading ``model.`` is stripped from keys and ``lm_head.weight`` ignored. Every other key must match.
    ``device="meta"`` checks the files from their headers and returns a weightless model.
    """
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    path = Path(path)
    if path.is_dir():
        weight_files = _weight_files_in_dir(path)
        config_file = Path(config_path) if config_path is not None else path / "config.json"
    else:
        weight_files = [path]
        config_file = Path(config_path) if config_path is not None else DEFAULT_QWEN3_CONFIG

    with contextlib.ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(file, QWEN3_FLAG, QWEN3_WHAT)) for file in weight_files]
        config = _read_qwen3_config(config_file)
        check_not_scaled_float8([key for checkpoint in checkpoints for key in checkpoint.keys()], QWEN3_FLAG, path)
        # Check every key and shape (from the file headers) before any weight is read.
        sources: dict[str, tuple[CheckpointFile, str]] = {}
        file_shapes: dict[str, tuple[int, ...]] = {}
        for checkpoint in checkpoints:
            for key, shape in checkpoint.shapes().items():
                mapped = _map_checkpoint_key(key)
                if mapped is not None:
                    sources[mapped] = (checkpoint, key)
                    file_shapes[mapped] = shape

        with torch.device("meta"):
            model = Qwen3Model(config)
        expected_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
        _check_keys(path, file_shapes, expected_shapes, config_file)
        state = {mapped: checkpoint.tensor(key, device, dtype) for mapped, (checkpoint, key) in sources.items()}
    # assign=True keeps the loaded tensors as the parameters: no second copy of the weights.
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # Non-persistent RoPE buffers are not in checkpoints: rebuild them on the target device (float32).
    with torch.device(device):
        model.rotary_emb = Qwen3RotaryEmbedding(config=config)
    leftovers = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    leftovers += [name for name, tensor in model.named_buffers() if tensor.is_meta]
    if leftovers and torch.device(device).type != "meta":  # a meta load is a header-only check
        raise RuntimeError(f"Qwen3 tensors left uninitialised after loading: {leftovers[:5]}")

    model.requires_grad_(False)
    model.eval()
    config_identity = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:16]
    setattr(model, SOURCE_IDENTITY_ATTR, f"{_source_identity(weight_files)}:{config_identity}")
    return model


def _check_keys(
    path: Path,
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    config_file: Path,
) -> None:
    """One clear error for a checkpoint that is not Qwen3, or not the Qwen3 the config describes."""
    looks_like_qwen3 = "embed_tokens.weight" in found and any(key.startswith("layers.") for key in found)
    if not looks_like_qwen3:
        raise AnimaError(
            f"{QWEN3_FLAG}: {path} is not a Qwen3 text encoder checkpoint (it looks like {guess_checkpoint_kind(found)}; "
            f"keys: {sample_keys(found, 3)}); pass the Qwen3-0.6B text encoder (keys model.embed_tokens.weight, "
            "model.layers.N.*)"
        )
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [key for key in sorted(set(expected) & set(found)) if tuple(found[key]) != expected[key]]
    problems = []
    if wrong:
        problems.append(
            f"{len(wrong)} tensors of the wrong size (e.g. {wrong[0]}: {found[wrong[0]]} vs {expected[wrong[0]]})"
        )
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise AnimaError(
            f"--qwen3: {path} does not fit the Qwen3 config {config_file}: {'; '.join(problems)}; "
            "pass a complete Qwen3-0.6B checkpoint, or a model directory with its own config.json"
        )


# --- encoding -----------------------------------------------------------------------------------------------


def encode_qwen3(text_encoder, qwen3_ids: torch.Tensor, qwen3_mask: torch.Tensor) -> torch.Tensor:
    """Qwen3 ``last_hidden_state`` with padding rows set to exactly 0: [B, Lq] ids/mask -> [B, Lq, Dq].

    Runs in the encoder's dtype on its device; the result stays there. Gradients flow if enabled (TE LoRA).
    """
    device = text_encoder.get_input_embeddings().weight.device
    qwen3_ids = qwen3_ids.to(device)
    qwen3_mask = qwen3_mask.to(device)
    # A caption without tokens would give attention rows with no key at all (NaN in some kernels): let it
    # attend to its first (pad) token instead; its output rows are zeroed below anyway.
    safe_mask = qwen3_mask.clone()
    empty_rows = qwen3_mask.sum(dim=1) == 0
    if qwen3_ids.shape[1] > 0:
        safe_mask[empty_rows, 0] = 1
    hidden = text_encoder(input_ids=qwen3_ids, attention_mask=safe_mask, use_cache=False).last_hidden_state
    return hidden.masked_fill(qwen3_mask.unsqueeze(-1) == 0, 0.0)  # hidden: [B, Lq, Dq]


def text_encoder_identity(text_encoder) -> str:
    """Identifies the encoder weights cheaply: the loaded files' path/size/mtime, or a digest of a few tensors."""
    source = getattr(text_encoder, SOURCE_IDENTITY_ATTR, None)
    if source is not None:
        return f"files:{source}"
    # An in-memory model: hash its config and a sample of its weights (first embedding rows, last layers).
    hasher = hashlib.sha256(text_encoder.config.to_json_string().encode())
    named = dict(text_encoder.named_parameters())
    sampled = ["embed_tokens.weight", "norm.weight"] + sorted(named)[-4:]
    for name in sampled:
        tensor = named[name].detach().reshape(-1)[:65536].to(device="cpu", dtype=torch.float32)
        hasher.update(name.encode())
        hasher.update(tensor.numpy().tobytes())
    return f"weights:{hasher.hexdigest()[:16]}"


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    # "cuda" means the current CUDA device: it matches any "cuda:N". There is one CPU device, whatever the
    # index ("cpu:0" from accelerate equals "cpu").
    if actual.type != wanted.type:
        return False
    return actual.type == "cpu" or wanted.index is None or actual.index == wanted.index


class AnimaTextEncoding:
    """Captions -> everything the DiT needs from text; used by the text-output cache and the trainer.

    ``text_encoder`` must already be on ``device`` with weights of ``dtype``; both are part of ``identity``
    because they change the embeddings.
    """

    def __init__(self, tokenizer: AnimaTokenizer, text_encoder, device: torch.device | str, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self._encoder_identity = text_encoder_identity(text_encoder)

    @property
    def identity(self) -> str:
        """Changes whenever the encoder weights, the tokenizers, the max lengths or the dtype change."""
        return f"{ENCODING_RECIPE_VERSION}|{self.tokenizer.identity}|te:{self._encoder_identity}|{self.dtype}"

    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"qwen3_embeds": [B,Lq,Dq] float32 (pad rows 0), "qwen3_mask", "t5_ids", "t5_mask": [B,L] int64}, on CPU."""
        return self.encode_tokens(self.tokenizer(captions))

    def encode_tokens(
        self, tokens: TokenizedCaptions, output_device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Encode already tokenised captions (e.g. tokenised in a data loader).

        Gradients are tracked when grad mode is on (a Qwen3 LoRA trains); call under ``torch.no_grad()``
        otherwise.
        """
        weight = self.text_encoder.get_input_embeddings().weight
        if not _same_device(weight.device, self.device) or weight.dtype != self.dtype:
            raise ValueError(
                f"text encoder is on {weight.device} / {weight.dtype}, but this AnimaTextEncoding was built for "
                f"{self.device} / {self.dtype}; move the encoder first"
            )
        # Follow the caller's grad mode: a LoRA acts through forward hooks with its own parameters, so the
        # encoder's parameters say nothing about whether a graph is needed. Caches encode under no_grad.
        embeds = encode_qwen3(self.text_encoder, tokens.qwen3_ids, tokens.qwen3_mask)
        return {
            "qwen3_embeds": embeds.to(device=output_device, dtype=torch.float32),
            "qwen3_mask": tokens.qwen3_mask.to(output_device),
            "t5_ids": tokens.t5_ids.to(output_device),
            "t5_mask": tokens.t5_mask.to(output_device),
        }
