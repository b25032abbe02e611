"""Generate the command-line reference (docs/flags.md) from the trainer's real argument parser.

    python -m library.training.flags_doc > docs/flags.md

The parser is the one place where flag names, types, choices, defaults and help live; this module only
renders it, so the reference cannot drift from what `anima_train_network.py` accepts (tests/test_docs.py
checks that the committed file equals a fresh rendering).
"""

from __future__ import annotations

import argparse
import sys

REGENERATE_COMMAND = "python -m library.training.flags_doc > docs/flags.md"

# Readable names for the `type=` callables the parser uses (anything else shows its function name).
_TYPE_NAMES = {int: "int", float: "float", str: "str"}
_TYPE_NAMES_BY_FUNCTION = {"parse_int_or_float": "int, float or N%"}


def _cell(text: str) -> str:
    """Make text safe inside one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)


def _type_column(action: argparse.Action) -> str:
    if _is_switch(action):
        return "switch"
    if action.choices is not None:
        return " \\| ".join(_code(str(c)) for c in action.choices if c is not None)
    kind = action.type
    if kind is None:
        name = "str"
    else:
        name = _TYPE_NAMES.get(kind) or _TYPE_NAMES_BY_FUNCTION.get(getattr(kind, "__name__", ""), "")
        name = name or getattr(kind, "__name__", str(kind))
    if action.nargs in ("*", "+"):
        name += " …"
    return name


def _default_column(action: argparse.Action) -> str:
    if _is_switch(action):
        return "off" if action.default is False else "on"
    if action.default is None or action.default == "":
        return "—"
    if isinstance(action.default, list | tuple):
        return _code(" ".join(str(v) for v in action.default))
    return _code(str(action.default))


def _help_column(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    # argparse help strings may use %(default)s-style fields and "%%"; expand them as --help would.
    params = {**vars(action), "prog": parser.prog}
    try:
        text = text % params
    except (KeyError, TypeError, ValueError):
        pass
    return _cell(text)


def _grouped_actions(parser: argparse.ArgumentParser) -> list[tuple[str, list[argparse.Action]]]:
    """(group title, actions) in parser order; groups with the same title are merged, help is left out."""
    groups: dict[str, list[argparse.Action]] = {}
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.option_strings and not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]
        if actions:
            groups.setdefault(group.title or "other", []).extend(actions)
    return list(groups.items())


def render_flags_markdown(parser: argparse.ArgumentParser) -> str:
    """The Markdown reference of every flag of `parser`: one table per argument group."""
    lines = [
        "# Command-line flags",
        "",
        f"<!-- Generated from the trainer's argument parser by `{REGENERATE_COMMAND}`; do not edit. -->",
        "",
        f"Every flag `{parser.prog}` accepts, grouped as in `--help`. Flags marked [GPU only] need a CUDA device.",
        "Any flag can also be given as a key in a `--config_file` TOML (the command line wins).",
        "",
    ]
    for title, actions in _grouped_actions(parser):
        lines += [f"## {title[0].upper()}{title[1:]}", "", "| flag | type / choices | default | help |",
                  "|---|---|---|---|"]
        for action in actions:
            flag = ", ".join(_code(option) for option in action.option_strings)
            lines.append(f"| {flag} | {_type_column(action)} | {_default_column(action)} | "
                         f"{_help_column(parser, action)} |")
        lines.append("")
    lines += _no_effect_section(parser)
    return "\n".join(lines)


def _no_effect_section(parser: argparse.ArgumentParser) -> list[str]:
    """The sd-scripts flags that are accepted but change nothing (args.NO_EFFECT_FLAGS), each with the reason."""
    from library.training.args import NO_EFFECT_FLAGS

    names = [name for name in NO_EFFECT_FLAGS if f"--{name}" in parser._option_string_actions]
    if not names:
        return []
    lines = ["## Flags with no effect for Anima", "",
             "Accepted so that sd-scripts command lines and configs run unchanged; giving one prints a warning.", ""]
    lines += [f"- `--{name}`: {_cell(NO_EFFECT_FLAGS[name])}" for name in names]
    return lines + [""]


def main() -> int:
    from library.training.args import setup_parser

    sys.stdout.write(render_flags_markdown(setup_parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
