"""Qwen3 and T5 tokenizers for Anima captions: where they are loaded from and how captions become ids.

Every caption is tokenised twice: by the Qwen3 tokenizer (its ids feed the Qwen3 text encoder) and by
the T5 tokenizer (its ids only index the LLM adapter's embedding table; no T5 weights exist here).

- Qwen3: raw caption text (no chat template), no BOS, no EOS, right padding with ``<|endoftext|>``,
  truncation to ``qwen3_max_length``. An empty caption has no real tokens (mask all 0).
- T5: ``</s>`` appended (and kept when truncating), pad id 0, right padding to ``t5_max_length``.
  An empty caption gives ids ``[1, 0, ...]`` and mask ``[1, 0, ...]``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from library.errors import AnimaError

QWEN3_HUB_REPO = "Qwen/Qwen3-0.6B"
T5_HUB_REPO = "google/t5-v1_1-xxl"
QWEN3_PAD_TOKEN = "<|endoftext|>"
# Rows of the LLM adapter's T5 embedding table; a tokenizer producing larger ids cannot be used.
T5_EMBEDDING_ROWS = 32128

# Files fetched from the hub when no local tokenizer is given (a complete tokenizer each).
_QWEN3_HUB_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
_T5_HUB_FILES = ("spiece.model",)

_QWEN3_NEEDED = "vocab.json + merges.txt (optionally tokenizer_config.json), or tokenizer.json"
_T5_NEEDED = "spiece.model or tokenizer.json"


@dataclass
class TokenizedCaptions:
    """Token ids and attention masks of a batch of captions (all int64, right-padded)."""

    qwen3_ids: torch.Tensor  # [B, Lq]
    qwen3_mask: torch.Tensor  # [B, Lq], 1 = real token
    t5_ids: torch.Tensor  # [B, Lt]
    t5_mask: torch.Tensor  # [B, Lt], 1 = real token (including </s>)

    def to(self, device: torch.device | str) -> TokenizedCaptions:
        return TokenizedCaptions(
            self.qwen3_ids.to(device), self.qwen3_mask.to(device), self.t5_ids.to(device), self.t5_mask.to(device)
        )


# --- locating tokenizer files -------------------------------------------------------------------------


def _has_qwen3_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def _has_t5_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "spiece.model").is_file()


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub only reads HF_HUB_OFFLINE when it is first imported.
    from huggingface_hub import constants

    env_value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env_value in {"1", "true", "yes", "on"}


def _download_from_hub(repo_id: str, filenames: tuple[str, ...]) -> Path:
    """Fetch ``filenames`` of ``repo_id`` into the standard HF cache (once) and return their folder.

    When the hub is offline or unreachable, files already in the cache are used.
    """
    from huggingface_hub import hf_hub_download

    offline = _hub_offline()
    paths = [Path(hf_hub_download(repo_id, name, local_files_only=offline)) for name in filenames]
    return paths[0].parent  # one snapshot folder holds every file of a revision


def _resolve_tokenizer_dir(
    explicit_dir: str | os.PathLike | None,
    explicit_flag: str,
    fallback_dir: Path | None,
    fallback_label: str,
    has_files: Callable[[Path], bool],
    needed_files: str,
    hub_repo: str,
    hub_files: tuple[str, ...],
    what: str,
) -> Path:
    """Pick the tokenizer folder: the explicit flag, then a model folder, then the hub cache."""
    if explicit_dir is not None:
        directory = Path(explicit_dir)
        if not directory.is_dir():
            raise AnimaError(f"{explicit_flag} {directory}: not a directory; pass a folder holding {needed_files}")
        if not has_files(directory):
            raise AnimaError(f"{explicit_flag} {directory}: no {what} tokenizer files there; it needs {needed_files}")
        return directory
    if fallback_dir is not None and fallback_dir.is_dir() and has_files(fallback_dir):
        return fallback_dir
    try:
        return _download_from_hub(hub_repo, hub_files)
    except Exception as error:  # offline, no network, not cached, gated, ...: all end in the same advice
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AnimaError(
            f"no {what} tokenizer found: {explicit_flag} not given, {fallback_label}, and the hub download of "
            f"{hub_repo} failed ({reason}). Put {needed_files} in a folder and pass it as {explicit_flag}"
            + (" (or into the --qwen3 model directory)" if what == "Qwen3" else "")
        ) from error


# --- loading ---------------------------------------------------------------------------------------------


def load_qwen3_tokenizer(qwen3_path: str | os.PathLike | None = None, tokenizer_path: str | os.PathLike | None = None):
    """The Qwen3 tokenizer from ``--qwen3_tokenizer_path``, else the ``--qwen3`` directory, else the hub.

    Returns a transformers ``Qwen2TokenizerFast`` with a pad token and right padding.
    """
    from transformers import (
        Qwen2TokenizerFast,
    )  # the tokenizers-backed class (an alias of Qwen2Tokenizer in transformers 5)

    model_dir = Path(qwen3_path) if qwen3_path is not None else None
    if model_dir is None:
        fallback_label = "--qwen3 not given"
    elif model_dir.is_dir():
        fallback_label = f"--qwen3 directory {model_dir} has no tokenizer files"
    else:
        fallback_label = "--qwen3 is a single file"
    directory = _resolve_tokenizer_dir(
        tokenizer_path,
        "--qwen3_tokenizer_path",
        model_dir,
        fallback_label,
        _has_qwen3_tokenizer_files,
        _QWEN3_NEEDED,
        QWEN3_HUB_REPO,
        _QWEN3_HUB_FILES,
        "Qwen3",
    )
    try:
        tokenizer = Qwen2TokenizerFast.from_pretrained(str(directory))
    except Exception as error:
        raise AnimaError(
            f"Qwen3 tokenizer in {directory} could not be read ({error}); it needs {_QWEN3_NEEDED}"
        ) from error
    if tokenizer.pad_token is None:
        if tokenizer.convert_tokens_to_ids(QWEN3_PAD_TOKEN) in (None, tokenizer.unk_token_id):
            raise AnimaError(
                f"Qwen3 tokenizer in {directory} has no pad token and no {QWEN3_PAD_TOKEN}; use the Qwen3 files"
            )
        tokenizer.pad_token = QWEN3_PAD_TOKEN
    tokenizer.padding_side = "right"
    return tokenizer


def load_t5_tokenizer(tokenizer_path: str | os.PathLike | None = None):
    """The T5 (v1.1 XXL vocabulary) tokenizer from ``--t5_tokenizer_path``, else the hub.

    Returns a transformers ``T5TokenizerFast`` that appends ``</s>`` and pads with id 0 on the right.
    """
    from transformers import T5TokenizerFast  # an alias of T5Tokenizer in transformers 5

    directory = _resolve_tokenizer_dir(
        tokenizer_path,
        "--t5_tokenizer_path",
        None,
        "no bundled copy",
        _has_t5_tokenizer_files,
        _T5_NEEDED,
        T5_HUB_REPO,
        _T5_HUB_FILES,
        "T5",
    )
    try:
        tokenizer = T5TokenizerFast.from_pretrained(str(directory))
    except Exception as error:
        raise AnimaError(f"T5 tokenizer in {directory} could not be read ({error}); it needs {_T5_NEEDED}") from error
    eos_only = tokenizer("")["input_ids"]
    if tokenizer.pad_token_id is None or eos_only != [tokenizer.eos_token_id] or len(tokenizer) > T5_EMBEDDING_ROWS:
        raise AnimaError(
            f"--t5_tokenizer_path {directory}: not a T5 v1.1 tokenizer (needs pad, appended </s> and at most "
            f"{T5_EMBEDDING_ROWS} tokens); use the google/t5-v1_1-xxl tokenizer files ({_T5_NEEDED})"
        )
    tokenizer.padding_side = "right"
    return tokenizer


# --- captions -> ids ---------------------------------------------------------------------------------------


def tokenizer_digest(tokenizer) -> str:
    """A short digest of everything that decides a tokenizer's ids (vocabulary, merges, special tokens)."""
    hasher = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        hasher.update(backend.to_str().encode())
    else:
        for token, index in sorted(tokenizer.get_vocab().items()):
            hasher.update(f"{token}\0{index}\n".encode())
    hasher.update(repr((tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)).encode())
    return hasher.hexdigest()[:16]


def _pad_and_truncate(tokenizer, captions: list[str], max_length: int, add_special_tokens: bool):
    """ids and attention mask [B, max_length], right-padded and truncated to exactly ``max_length``."""
    return tokenizer(
        captions,
        add_special_tokens=add_special_tokens,
        padding="max_length",
        padding_side="right",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )


class AnimaTokenizer:
    """Turns captions into the Qwen3 and T5 ids/masks the Anima text path needs."""

    def __init__(self, qwen3_tokenizer, t5_tokenizer, qwen3_max_length: int = 512, t5_max_length: int = 512):
        for flag, value, minimum in (
            ("--qwen3_max_token_length", qwen3_max_length, 1),
            # T5 always keeps its </s>, so one slot is the least that makes sense.
            ("--t5_max_token_length", t5_max_length, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise AnimaError(f"{flag} must be an integer >= {minimum}, got {value!r}")
        self.qwen3_tokenizer = qwen3_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.qwen3_max_length = qwen3_max_length
        self.t5_max_length = t5_max_length
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        """Changes whenever either tokenizer or a max length changes (used in cache identities)."""
        if self._identity is None:
            self._identity = (
                f"qwen3:{tokenizer_digest(self.qwen3_tokenizer)}:{self.qwen3_max_length}"
                f"|t5:{tokenizer_digest(self.t5_tokenizer)}:{self.t5_max_length}"
            )
        return self._identity

    def __call__(self, captions: list[str]) -> TokenizedCaptions:
        if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
            raise TypeError("AnimaTokenizer expects a list of caption strings")
        captions = list(captions)
        if not captions:
            empty = torch.zeros(0, self.qwen3_max_length, dtype=torch.long)
            empty_t5 = torch.zeros(0, self.t5_max_length, dtype=torch.long)
            return TokenizedCaptions(empty, empty.clone(), empty_t5, empty_t5.clone())
        # Raw text only: special tokens are never added on the Qwen3 side, whatever the tokenizer config says.
        qwen3 = _pad_and_truncate(self.qwen3_tokenizer, captions, self.qwen3_max_length, add_special_tokens=False)
        # add_special_tokens appends </s>; truncation shortens the text and keeps the </s>.
        t5 = _pad_and_truncate(self.t5_tokenizer, captions, self.t5_max_length, add_special_tokens=True)
        return TokenizedCaptions(
            qwen3_ids=qwen3["input_ids"].long(),
            qwen3_mask=qwen3["attention_mask"].long(),
            t5_ids=t5["input_ids"].long(),
            t5_mask=t5["attention_mask"].long(),
        )
