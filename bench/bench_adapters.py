"""Size of each adapter kind on the full Anima DiT, and the cost of one adapted layer's update.

Counts (exact): modules, parameters and bf16 bytes of a default network (rank --rank, the default layer
choice) for LoRA, LoKr (factor -1 and --factor), LoKr full_matrix and LoHa, built on a weightless (meta) DiT.
Times (noisy): forward + backward of the update alone for one 2048 -> 2048 layer on --tokens tokens, LoKr with
the Kronecker structure kept (w1 @ X @ w2^T, what networks.lokr runs) vs the [out, in] matrix built first
(kron(w1, w2), what a merge computes), and LoHa / LoRA for reference.

    python bench/bench_adapters.py --tokens 1024 --repeats 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from library.models.dit import Anima, AnimaConfig  # noqa: E402
from networks import loha, lokr, lora_anima  # noqa: E402
from networks.loha import LoHaModule  # noqa: E402
from networks.lokr import LoKrModule  # noqa: E402
from networks.lora_anima import LoRAModule  # noqa: E402


def sizes(rank: int, factor: int) -> None:
    with torch.device("meta"):
        dit = Anima(AnimaConfig())
    print(f"| network (rank {rank}) | modules | parameters | bf16 MiB |\n|---|---|---|---|")
    for name, module, kwargs in (
        ("LoRA (networks.lora_anima)", lora_anima, {}),
        ("LoKr (networks.lokr)", lokr, {}),
        (f"LoKr factor={factor}", lokr, {"factor": str(factor)}),
        ("LoKr full_matrix=true", lokr, {"full_matrix": "true"}),
        ("LoHa (networks.loha)", loha, {}),
    ):
        network = module.create_network(1.0, rank, 1.0, None, None, dit, **kwargs)
        count = sum(p.numel() for p in network.parameters())
        print(f"| {name} | {len(network.unet_loras)} | {count:,} | {count * 2 / 2**20:.2f} |")


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x).square().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).square().mean().backward()
    return (time.perf_counter() - start) / repeats * 1e3


def layer_times(rank: int, tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, 2048)
    lokr_module = LoKrModule("l", "l", 2048, 2048, rank, 1.0)
    loha_module = LoHaModule("h", "h", 2048, 2048, rank, 1.0)
    lora_module = LoRAModule("r", "r", 2048, 2048, rank, 1.0)
    for module in (lokr_module, loha_module, lora_module):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(std=0.02)
    rows = (
        ("LoKr, Kronecker structure kept (networks.lokr)", lokr_module.delta),
        ("LoKr, kron(w1, w2) built, then F.linear", lambda v: F.linear(v, lokr_module.delta_weight())),
        ("LoHa (networks.loha)", loha_module.delta),
        ("LoRA (networks.lora_anima)", lora_module.delta),
    )
    print(f"\n| update of one 2048 -> 2048 layer, {tokens} tokens, rank {rank} | forward + backward |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {timed(fn, x, repeats):.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes(args.rank, args.factor)
    layer_times(args.rank, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
