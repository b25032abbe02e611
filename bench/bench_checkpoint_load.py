"""Peak memory and time of reading a large ``.safetensors`` file with ``library.io.checkpoints`` (CPU, Linux).

Writes a bf16 file of about the released DiT's size (``--size_mib``, default 3808 MiB in 2048 x 2048 tensors)
unless ``--file`` names one, then reads it in a fresh process per (dtype, window) pair and reports the process's
peak resident memory (VmHWM), the most file-backed memory it held mapped at once (RssFile, sampled after every
tensor) and its anonymous memory at the end. ``--remap_mib`` sets the reader's reopening window
(``REMAP_BYTES``); ``0`` never reopens the file, which is how the reader behaved before the window existed.

    python bench/bench_checkpoint_load.py --work /tmp/ckpt --remap_mib 0 256 --dtypes float32 bfloat16

The last line is one JSON object: {"<dtype>/remap<mib>": {"peak_gib", "mapped_gib", "anon_gib", "seconds"}}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_gib() -> dict[str, float]:
    values = {}
    for line in open("/proc/self/status"):
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 2**20
    return values


def _read_once(path: str, dtype_name: str, remap_mib: int) -> None:
    """Child process: read every tensor, print one JSON line of figures."""
    sys.path.insert(0, str(REPO))
    import torch

    from library.io import checkpoints

    checkpoints.REMAP_BYTES = remap_mib * 2**20 if remap_mib > 0 else 2**62
    dtype = getattr(torch, dtype_name)
    start_mapped = _status_gib()["RssFile"]
    most_mapped = 0.0
    start = time.perf_counter()
    loaded = {}
    with checkpoints.open_checkpoint(path, "--file", "a weights file") as checkpoint:
        for key in checkpoint.keys():
            loaded[key] = checkpoint.tensor(key, dtype=dtype)
            most_mapped = max(most_mapped, _status_gib()["RssFile"] - start_mapped)
    seconds = time.perf_counter() - start
    status = _status_gib()
    print(json.dumps({"peak_gib": round(status["VmHWM"], 2), "mapped_gib": round(most_mapped, 2),
                      "anon_gib": round(status["RssAnon"], 2), "seconds": round(seconds, 1)}))


def _write_file(path: Path, size_mib: int) -> None:
    import torch
    from safetensors.torch import save_file

    count = max(1, size_mib // 8)  # 8 MiB per bf16 2048 x 2048 tensor
    tensors = {f"net.blocks.{i // 16}.w{i % 16}": torch.full((2048, 2048), 0.01 * (i + 1), dtype=torch.bfloat16)
               for i in range(count)}
    save_file(tensors, str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench_checkpoint_work"), help="folder for the file")
    parser.add_argument("--file", type=Path, default=None, help="read this .safetensors file instead")
    parser.add_argument("--size_mib", type=int, default=3808, help="size of the written file")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to read into")
    parser.add_argument("--remap_mib", nargs="+", type=int, default=[0, 256],
                        help="reopening windows to compare (0: never reopen)")
    parser.add_argument("--_child", nargs=3, metavar=("FILE", "DTYPE", "REMAP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        _read_once(args._child[0], args._child[1], int(args._child[2]))
        return
    if not Path("/proc/self/status").exists():
        raise SystemExit("error: this benchmark reads memory figures from /proc (Linux only)")
    path = args.file
    if path is None:
        args.work.mkdir(parents=True, exist_ok=True)
        path = args.work / f"bf16_{args.size_mib}mib.safetensors"
        if not path.exists():
            _write_file(path, args.size_mib)
    print(f"file: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    results = {}
    for dtype in args.dtypes:
        for remap in args.remap_mib:
            run = subprocess.run([sys.executable, __file__, "--_child", str(path), dtype, str(remap)],
                                 capture_output=True, text=True, check=True)
            figures = json.loads(run.stdout.strip().splitlines()[-1])
            results[f"{dtype}/remap{remap}"] = figures
            print(f"{dtype:9s} window {remap or 'none':>4} MiB: peak {figures['peak_gib']:.2f} GiB, "
                  f"mapped at most {figures['mapped_gib']:.2f} GiB, anonymous {figures['anon_gib']:.2f} GiB, "
                  f"{figures['seconds']:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
