"""Caption files and caption processing (prefix/suffix, dropout, wildcards, tag shuffling/dropout, warm-up).

Processing order for one sample (sd-scripts compatible):
  1. prefix + " " + caption + " " + suffix
  2. caption dropout (rate, or every N epochs) -> ""
  3. wildcards: one random line of a multi-line caption, `{a|b}` choices, `{{`/`}}` literal braces
     (without wildcards only the first line is kept)
  4. tag operations: keep_tokens / keep_tokens_separator split, token warm-up, shuffle, tag dropout,
     joined with ", "
  5. secondary_separator replaced by caption_separator

Deliberate difference: a `keep_tokens_separator` that occurs in the caption is always removed (the tags are
re-joined with ", "), even when no tag operation is on; upstream leaves the separator text in the caption then.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import AnimaError

# A choice group is "{" + one or more characters other than "}" + "}", as sd-scripts matches it: "{}" stays literal
# text, and in "{a{b|c}" the group starts at the first brace.
_WILDCARD = re.compile(r"\{([^}]+)\}")
_OPEN_ESCAPE = "\x00LBRACE\x00"
_CLOSE_ESCAPE = "\x00RBRACE\x00"


@dataclass(frozen=True)
class CaptionOptions:
    """Caption settings of one subset (defaults = sd-scripts argparse defaults)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @property
    def has_tag_operations(self) -> bool:
        return self.shuffle_caption or self.token_warmup_step > 0 or self.caption_tag_dropout_rate > 0


def read_caption_file(path: Path, enable_wildcard: bool) -> str:
    """The caption of a caption file: the first line, or all non-empty lines joined by "\\n" with wildcards.

    A file that is not UTF-8 or holds no text raises AnimaError naming it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AnimaError(f"caption file {path} is not UTF-8 text; re-save it as UTF-8") from exc
    except OSError as exc:
        raise AnimaError(f"cannot read caption file {path}: {exc.strerror or exc}") from exc
    text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark is not caption text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise AnimaError(f"caption file {path} is empty; write a caption in it or delete it")
    return "\n".join(lines) if enable_wildcard else lines[0]


def caption_file_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """Where an image's caption may be: `<stem><ext>`, and for face-crop names `a_b_cx_cy_w_h` also `a_b<ext>`."""
    candidates = [image_path.with_name(image_path.stem + caption_extension)]
    parts = image_path.stem.split("_")
    if len(parts) >= 5:
        candidates.append(image_path.with_name("_".join(parts[:-4]) + caption_extension))
    return candidates


def can_drop_caption(options: CaptionOptions) -> bool:
    """Whether is_caption_dropped can ever be true for these options."""
    return options.caption_dropout_rate > 0 or options.caption_dropout_every_n_epochs > 0


def is_caption_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whether this sample's caption is replaced by "" (epochs are 1-based while training)."""
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return True
    every = options.caption_dropout_every_n_epochs
    return every > 0 and epoch % every == 0


def transform_caption(caption: str, options: CaptionOptions, rng: random.Random, *, step: int = 0,
                      max_train_steps: int = 0) -> str:
    """All caption steps except dropout (see the module docstring for the order)."""
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix

    if options.enable_wildcard:
        lines = [line for line in caption.split("\n") if line.strip()] or [""]
        # A random line only when there is a choice: a one-line caption draws nothing, as in sd-scripts, so the
        # same generator state gives sd-scripts' wildcard choices, shuffles and tag dropouts.
        caption = expand_wildcards(rng.choice(lines) if len(lines) > 1 else lines[0], rng)
    else:
        caption = caption.split("\n")[0]

    separator_present = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if options.has_tag_operations or separator_present:
        caption = _tag_operations(caption, options, rng, step, max_train_steps)

    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def process_caption(caption: str, options: CaptionOptions, rng: random.Random, *, epoch: int, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption the model sees for one sample: "" if dropped, else `transform_caption`."""
    if is_caption_dropped(options, rng, epoch):
        return ""
    return transform_caption(caption, options, rng, step=step, max_train_steps=max_train_steps)


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each `{a|b|c}` by one random option; `{{` and `}}` stay as literal braces."""
    text = text.replace("{{", _OPEN_ESCAPE).replace("}}", _CLOSE_ESCAPE)
    text = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), text)
    return text.replace(_OPEN_ESCAPE, "{").replace(_CLOSE_ESCAPE, "}")


def warmup_steps(options: CaptionOptions, max_train_steps: int) -> int:
    """token_warmup_step in steps: a value below 1 is a fraction of the whole run."""
    if options.token_warmup_step < 1:
        return int(options.token_warmup_step * max_train_steps)
    return int(options.token_warmup_step)


def _split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def _tag_operations(caption: str, options: CaptionOptions, rng: random.Random, step: int,
                    max_train_steps: int) -> str:
    separator = options.caption_separator
    fixed_tail: list[str] = []
    if options.keep_tokens_separator and options.keep_tokens_separator in caption:
        fixed_text, flexible_text = caption.split(options.keep_tokens_separator, 1)
        if options.keep_tokens_separator in flexible_text:
            flexible_text, tail_text = flexible_text.split(options.keep_tokens_separator, 1)
            fixed_tail = _split_tags(tail_text.replace(options.keep_tokens_separator, separator), separator)
        fixed = _split_tags(fixed_text, separator)
        flexible = _split_tags(flexible_text, separator)
    else:
        tags = [tag.strip() for tag in caption.strip().split(separator)]
        fixed, flexible = tags[: options.keep_tokens], tags[options.keep_tokens:]

    total_warmup = warmup_steps(options, max_train_steps)
    if total_warmup > 0 and step < total_warmup:
        keep = int(step * (len(flexible) - options.token_warmup_min) / total_warmup) + options.token_warmup_min
        flexible = flexible[:keep]

    if options.shuffle_caption:
        rng.shuffle(flexible)
    if options.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_tail)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """How many of these captions hold each tag, lower-cased, split at commas (ss_tag_frequency as sd-scripts
    counts it: each image once whatever its repeats and the subset's caption_separator)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def cached_caption_text(caption: str, options: CaptionOptions) -> str:
    """The caption that is encoded into the text cache: every deterministic caption step, no dropout.

    Caching is only allowed when no random caption step is configured (see DatasetGroup.check_caching_options),
    so the fixed generator here never influences the result.
    """
    return transform_caption(caption, options, random.Random(0))
