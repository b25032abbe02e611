"""Gradient all-reduce calls per optimizer step for the full-width 2B DiT's LoRA: one per trainable tensor
(the former hand-written loop) against the buckets of the DistributedDataParallel wrapper the trainer uses.

    python bench/bench_ddp_collectives.py [--network_dim 16] [--bucket_cap_mb 25] [--json]

The DiT is built on the meta device (no weights), the LoRA on the CPU; DDP is constructed in a one-process
gloo group and run for two steps of a stand-in loss (DDP re-buckets after the first backward), which buckets
the parameters as it would on N GPUs (the bucket layout depends on the sizes and the gradient order, not on
the world size). The last line is one JSON object with `per_tensor_all_reduces`, `ddp_buckets`,
`lora_mib` and `bucket_mib`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.models.dit import Anima, AnimaConfig  # noqa: E402
from library.training.distributed import TrainingModule  # noqa: E402
from networks.lora_anima import create_network  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network_dim", type=int, default=16)
    parser.add_argument("--bucket_cap_mb", type=float, default=25.0, help="DDP's default is 25")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()

    with torch.device("meta"):
        dit = Anima(AnimaConfig())
    network = create_network(1.0, args.network_dim, args.network_dim, None, None, dit, train_llm_adapter="true")
    network.to_empty(device="cpu")
    network.apply_to(None, dit, False, True)
    trainable = [p for p in network.parameters() if p.requires_grad]

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TrainingModule(network, "cpu"),
                                                          bucket_cap_mb=args.bucket_cap_mb)
        buckets: list[int] = []  # bytes of each bucket all-reduced in the last step

        def counting_all_reduce(state, bucket):  # no annotations: DDP checks them against real classes
            buckets.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(None, counting_all_reduce)
        # DDP starts with one bucket and re-buckets by the order the gradients became ready in the first
        # backward; three steps of a stand-in loss (every LoRA weight used once, in module order) get there.
        for _ in range(3):
            buckets.clear()
            model(lambda: sum((p.float() ** 2).sum() for p in trainable)).backward()
    finally:
        dist.destroy_process_group()
    lora_bytes = sum(p.numel() * p.element_size() for p in trainable)
    result = {
        "network_dim": args.network_dim,
        "trainable_tensors": len(trainable),
        "per_tensor_all_reduces": len(trainable),
        "ddp_buckets": len(buckets),
        "lora_mib": round(lora_bytes / 2**20, 2),
        "bucket_mib": [round(b / 2**20, 2) for b in buckets],
    }
    if not args.json:
        print(f"LoRA rank {args.network_dim}: {len(trainable)} trainable tensors, {result['lora_mib']} MiB fp32")
        print(f"hand-written loop: {len(trainable)} all-reduce calls per step, after the backward")
        print(f"DDP wrapper: {len(buckets)} bucket all-reduces per step, started during the backward")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
