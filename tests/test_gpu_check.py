"""bench/gpu_check.sh is ready for the device: syntax, time limits, files it writes, collection without toml."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
# The device's per-command limit is 600 s; the script must finish well inside it.
DEVICE_COMMAND_SECONDS = 540
# Not on the device image: modules the GPU tests import must not need them.
ABSENT_ON_DEVICE = ("toml", "diffusers", "bitsandbytes", "flash_attn", "xformers", "sageattention")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def step_limits() -> dict[str, int]:
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^step (\w+) (\d+) ", SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)}


@needs_bash
def test_gpu_check_scripts_parse_as_bash():
    for script in (SCRIPT, REPO / "bench" / "prepare_gpu_check.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_gpu_check_step_limits_add_up_to_less_than_one_device_command():
    limits = step_limits()
    assert {"pytest_gpu", "parity", "sdpa", "train_1024", "profile_1024", "train_512"} <= set(limits)
    assert sum(limits.values()) < DEVICE_COMMAND_SECONDS, limits


def test_gpu_check_uses_python3_and_installs_nothing():
    text = SCRIPT.read_text(encoding="utf-8")
    assert 'PY="${PYTHON:-python3}"' in text and "PYTHONUNBUFFERED=1" in text
    assert "pip" not in text.replace("skipped", "")
    # Every python call goes through $PY (the device has python3 only).
    assert not re.search(r"(^|[\s;(])python\s", text)


def blocked_imports_script(body: str) -> str:
    """Python source that makes the packages missing on the device unimportable, then runs `body`."""
    return (
        "import importlib.abc, sys\n"
        f"absent = {ABSENT_ON_DEVICE!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in absent:\n"
        "            raise ImportError(f'{name} is not installed on the device')\n"
        "sys.meta_path.insert(0, Block())\n" + body
    )


def test_trainer_and_gpu_bench_modules_import_without_the_packages_missing_on_the_device():
    modules = ["anima_train_network", "train_network", "library.models.dit_loading", "library.training.args",
               "bench.bench_train_step", "bench.bench_gpu_parity", "bench.bench_sdpa", "bench.bench_vae_conv_bits"]
    script = blocked_imports_script("import importlib\n" + "".join(f"importlib.import_module({m!r})\n"
                                                                    for m in modules))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_gpu_test_files_collect_without_the_packages_missing_on_the_device():
    gpu_files = [str(p) for p in sorted((REPO / "tests").glob("test_*.py")) if "pytest.mark.gpu" in p.read_text()]
    assert gpu_files
    blocker = blocked_imports_script(
        "import pytest\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'gpu', *sys.argv[1:]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker, *gpu_files], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"\b[1-9]\d*/\d+ tests collected|\b[1-9]\d* tests? collected", result.stdout), result.stdout


def test_prepare_copies_the_golden_files_into_an_untracked_unignored_folder(tmp_path, golden_dir):
    env = {**os.environ, "ANIMA_SHARED_DIR": str(golden_dir.parent), "GPU_ASSETS": str(tmp_path / "assets")}
    subprocess.run(["bash", str(REPO / "bench" / "prepare_gpu_check.sh")], check=True, env=env,
                   capture_output=True)
    copied = {p.name for p in (tmp_path / "assets" / "golden").iterdir()}
    assert {"dit_tiny.safetensors", "dit_tiny_golden.safetensors", "lora_tiny.safetensors"} <= copied
    # The default destination must travel to the device: git may not ignore it.
    ignored = subprocess.run(["git", "check-ignore", "-q", "gpu_assets/golden/dit_tiny.safetensors"], cwd=REPO)
    assert ignored.returncode == 1


@needs_bash
@pytest.mark.slow
def test_gpu_check_dry_run_writes_two_files_and_prints_the_tables_last(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_STEPS": "env sdpa vae_bits", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    assert written == ["run.log", "summary.md"]  # the device returns at most 8 files
    out = result.stdout
    assert "env: exit 0" in out and "sdpa: exit 0" in out and "vae_bits: exit 0" in out
    assert "### VAE causal conv" in out[out.index("## Steps"):]
    assert out.index("## Steps") < out.index("### SDPA back-ends at the real shapes")  # tables come last
    assert out.rstrip().endswith("|")


def hidden_packages_script(body: str) -> str:
    """Python source that hides the packages missing on the device the way a machine without them does
    (`importlib.util.find_spec` answers None, `import` raises ModuleNotFoundError; the metadata of other
    distributions stays readable), then runs `body`. Unlike a finder that raises, this leaves libraries that
    probe for optional packages (transformers looking for flash_attn) working as they do on the device."""
    return (
        "import importlib.abc, sys\n"
        f"absent = {ABSENT_ON_DEVICE!r}\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def __init__(self, inner):\n"
        "        self.inner = inner\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.inner, name)\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in absent:\n"
        "            return None\n"
        "        find = getattr(self.inner, 'find_spec', None)\n"
        "        return find(name, path, target) if find else None\n"
        "sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]\n" + body
    )


def test_tiny_setup_and_json_dataset_config_need_no_toml(tmp_path):
    """The GPU tests' tiny setup (test_inference's CUDA render) and a JSON --dataset_config work on the device
    image, which has no toml; the TOML the setup writes is the text toml.dumps gives for its config."""
    toml = pytest.importorskip("toml")
    config = {"datasets": [{"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "setup" / "images")}]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(config), encoding="utf-8")
    body = (
        "from library.models.tiny import write_tiny_anima_setup\n"
        "from library.data.config import load_dataset_config\n"
        f"setup = write_tiny_anima_setup({str(tmp_path / 'setup')!r})\n"
        f"print(load_dataset_config({str(tmp_path / 'dataset.json')!r}))\n"
        "try:\n"
        "    import toml\n"
        "except ModuleNotFoundError:\n"
        "    print('toml hidden')\n"
    )
    result = subprocess.run([sys.executable, "-c", hidden_packages_script(body)], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == [repr(config), "toml hidden"]
    text = (tmp_path / "setup" / "dataset.toml").read_text(encoding="utf-8")
    parsed = toml.loads(text)
    assert toml.dumps(parsed) == text
    assert parsed["datasets"][0]["subsets"][0]["image_dir"] == str((tmp_path / "setup" / "images").resolve())
    assert parsed["general"] == {"caption_extension": ".txt", "shuffle_caption": False, "keep_tokens": 0}


def device_configs(option: str) -> list[str]:
    """The configuration names gpu_check.sh passes with --configs on the device (not the --dry lists)."""
    text = SCRIPT.read_text(encoding="utf-8")
    device_part = text[text.index("    DEVICE=cuda"):text.index("\nfi\n", text.index("    DEVICE=cuda"))]
    names = []
    for match in re.finditer(rf"^    {option}=\((.*?)\)", device_part, re.MULTILINE | re.DOTALL):
        words = match.group(1).split()
        if "--configs" in words:
            following = words[words.index("--configs") + 1:]
            stop = next((i for i, w in enumerate(following) if w.startswith("--")), len(following))
            names += following[:stop]
    return names


def test_gpu_check_entry_points_parse_their_device_arguments_without_the_missing_packages():
    """Every python entry point gpu_check.sh runs imports and answers --help on the device image, and the
    configuration names it passes on the device are ones the benchmarks accept."""
    scripts = ["bench/bench_gpu_parity.py", "bench/bench_sdpa.py", "bench/bench_train_step.py",
               "bench/bench_vae_conv_bits.py"]
    body = (
        "import runpy\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), (script, exc.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", hidden_packages_script(body), *scripts], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage:") == len(scripts)

    from bench.bench_gpu_parity import CONFIGS
    from bench.bench_train_step import parse_config

    train = device_configs("TRAIN_1024") + device_configs("TRAIN_512") + device_configs("PROFILE_1024")
    assert "swap26+ckpt" in train and "compile" in train
    for name in train:
        options = parse_config(name)  # SystemExit for an unknown part
        assert options["swap"] <= 26  # at most N - 2 of the 28 blocks (--blocks 28 on the device)
    assert set(device_configs("PARITY")) <= set(CONFIGS)
