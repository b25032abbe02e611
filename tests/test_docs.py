"""The user documentation stays honest: the flag reference is generated from the real parser, every flag the
docs name exists, and every trainer flag the docs teach is exercised by a test (or is GPU-only with a named
GPU test)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from library.training.args import setup_parser
from library.training.flags_doc import REGENERATE_COMMAND, render_flags_markdown
from networks.convert_lora import build_parser as build_converter_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
GENERATED_REFERENCE = REPO / "docs" / "flags.md"

# `accelerate launch` options the docs use in front of the trainer script.
ACCELERATE_FLAGS = {"--num_processes", "--multi_gpu", "--cpu", "--num_cpu_threads_per_process", "--num_machines",
                    "--main_process_port", "--gpu_ids", "--mixed_precision", "--dynamo_backend"}
# Per-prompt options inside a --sample_prompts file (not command-line flags).
PROMPT_FILE_OPTIONS = {"--n", "--w", "--h", "--d", "--s", "--l", "--fs", "--g", "--ss", "--cn", "--ctr", "--rcfg"}
# Other tools the docs show: TensorBoard's viewer and pytest.
OTHER_TOOL_FLAGS = {"--logdir", "--help"}

FLAG_PATTERN = re.compile(r"(?<![\w-])--[A-Za-z][A-Za-z0-9_-]*")
BENCH_SCRIPT_PATTERN = re.compile(r"bench/(\w+\.(?:py|sh))")
GPU_ONLY_PATTERN = re.compile(r"GPU[- ]only", re.IGNORECASE)
GPU_TEST_PATTERN = re.compile(r"tests/[\w/]+\.py::test_\w+")


def trainer_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (trailing backslash) joined, so a command's flags share its line."""
    return text.replace("\\\n", " ").splitlines()


def bench_script_flags(script: str) -> set[str]:
    source = (REPO / "bench" / script).read_text(encoding="utf-8")
    if script.endswith(".sh"):  # a shell script compares its arguments with quoted literals
        return set(re.findall(r"\"(--[\w-]+)\"", source))
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))


def doc_flag_mentions(paths: list[Path]) -> list[tuple[str, int, str, str]]:
    """(file, line number, flag, logical line) for every `--flag` written in the given files."""
    mentions = []
    for path in paths:
        for number, line in enumerate(logical_lines(path.read_text(encoding="utf-8")), start=1):
            for flag in FLAG_PATTERN.findall(line):
                mentions.append((path.relative_to(REPO).as_posix(), number, flag, line))
    return mentions


def test_flags_reference_matches_the_parser():
    expected = render_flags_markdown(setup_parser())
    actual = GENERATED_REFERENCE.read_text(encoding="utf-8") if GENERATED_REFERENCE.is_file() else ""
    assert actual == expected, f"docs/flags.md is out of date with the parser; regenerate it: {REGENERATE_COMMAND}"


def test_flags_reference_lists_every_flag_with_its_default():
    parser = setup_parser()
    text = render_flags_markdown(parser)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `--")}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        key = ", ".join(f"`{o}`" for o in action.option_strings)
        assert key in rows, f"{key} missing from the rendered reference"
        if isinstance(action.default, int | float | str) and not isinstance(action.default, bool) and action.default:
            assert f"`{action.default}`" in rows[key], f"{key}: default {action.default!r} not shown"


def test_rendered_reference_escapes_table_breaking_text():
    parser = argparse.ArgumentParser(prog="demo")
    group = parser.add_argument_group("demo group")
    group.add_argument("--sep", type=str, default="|", help="a | b, 10%% off")
    group.add_argument("--mode", choices=["a", "b"], default="a", help="mode")
    group.add_argument("--on", action="store_true", help="switch")
    text = render_flags_markdown(parser)
    assert "| `--sep` | str | `\\|` | a \\| b, 10% off |" in text
    assert "| `--mode` | `a` \\| `b` | `a` | mode |" in text
    assert "| `--on` | switch | off | switch |" in text
    assert "## Demo group" in text
    assert "| `--help`" not in text


def test_every_flag_in_the_docs_exists():
    trainer = trainer_options(setup_parser())
    converter = trainer_options(build_converter_parser())
    unknown = []
    for file, number, flag, line in doc_flag_mentions(DOCS):
        if flag in trainer or flag in converter or flag in ACCELERATE_FLAGS:
            continue
        if flag in PROMPT_FILE_OPTIONS or flag in OTHER_TOOL_FLAGS:
            continue
        # A benchmark flag must belong to the bench script named on the same command line.
        if any(flag in bench_script_flags(script) for script in BENCH_SCRIPT_PATTERN.findall(line)):
            continue
        unknown.append(f"{file}:{number}: {flag}")
    assert not unknown, "flags named in the docs that no parser accepts: " + ", ".join(unknown)


def referenced_in_tests(action: argparse.Action, test_sources: str) -> bool:
    """The flag is passed (`--flag`), or its namespace attribute / keyword / key is used, in some test."""
    patterns = [re.escape(option) + r"(?![\w-])" for option in action.option_strings]
    patterns += [rf"args\.{action.dest}\b", rf"[\"']{action.dest}[\"']", rf"\b{action.dest}\s*="]
    return any(re.search(pattern, test_sources) for pattern in patterns)


def test_every_trainer_flag_the_docs_teach_is_exercised_by_a_test():
    options = trainer_options(setup_parser())
    this_file = Path(__file__).resolve()
    test_sources = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "tests").rglob("*.py"))
                             if p.resolve() != this_file)
    taught = [p for p in DOCS if p != GENERATED_REFERENCE]
    offenders = {}
    for file, _number, flag, _line in doc_flag_mentions(taught):
        action = options.get(flag)
        if action is None or isinstance(action, argparse._HelpAction):
            continue
        if referenced_in_tests(action, test_sources):
            continue
        help_text = action.help or ""
        if GPU_ONLY_PATTERN.search(help_text) and GPU_TEST_PATTERN.search(help_text):
            continue
        offenders.setdefault(flag, file)
    assert not offenders, (
        "trainer flags described in the docs but exercised by no test under tests/ (add a test, or mark the flag "
        "GPU-only in its --help with the GPU test that covers it, e.g. tests/test_x.py::test_y): "
        + ", ".join(f"{flag} ({file})" for flag, file in sorted(offenders.items()))
    )


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md", "docs/dataset.md", "docs/lora-formats.md",
                                 "docs/architecture.md", "docs/benchmarks.md"])
def test_relative_links_in_the_docs_point_to_existing_files(doc):
    path = REPO / doc
    assert path.is_file(), f"{doc} is missing"
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (path.parent / target).exists():
            broken.append(target)
    assert not broken, f"{doc}: links to missing files: {', '.join(broken)}"


def test_readme_keeps_the_ci_test_command():
    assert "bash tests/run.sh" in (REPO / "README.md").read_text(encoding="utf-8")


def test_training_guide_lists_exactly_the_valid_network_args():
    from networks.lora_anima import VALID_NETWORK_ARGS

    guide = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    table = guide.split("`--network_args` (`key=value` items):", 1)[1].split("\n\n", 2)[1]
    keys = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert sorted(keys) == sorted(VALID_NETWORK_ARGS), (
        f"docs/training.md network_args table {sorted(keys)} differs from VALID_NETWORK_ARGS {sorted(VALID_NETWORK_ARGS)}")


def test_tests_cited_in_the_docs_and_flag_help_exist():
    parser = setup_parser()
    cited = {(path, name) for text in [*(p.read_text(encoding="utf-8") for p in DOCS),
                                       *(action.help or "" for action in parser._actions)]
             for path, name in re.findall(r"(tests/[\w/]+\.py)::(test_\w+)", text)}
    assert cited, "expected the memory-feature docs to cite their GPU tests"
    missing = [f"{path}::{name}" for path, name in sorted(cited)
               if not (REPO / path).is_file()
               or not re.search(rf"^def {name}\(", (REPO / path).read_text(encoding="utf-8"), re.MULTILINE)]
    assert not missing, "docs or --help cite tests that do not exist: " + ", ".join(missing)
