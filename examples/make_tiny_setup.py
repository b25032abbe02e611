"""Write a tiny random Anima setup (models, tokenizers, captioned images, dataset TOML, sample prompts).

    python examples/make_tiny_setup.py examples/quickstart_work/tiny [--num_images 8] [--seed 0]

Everything is random and tiny: it only shows that the pipeline runs, not what a trained model draws.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from library.models.tiny import write_tiny_anima_setup  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to write into (reused if it already holds this setup)")
    parser.add_argument("--num_images", type=int, default=8, help="number of captioned training images")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be >= 1")
    setup = write_tiny_anima_setup(args.root, num_images=args.num_images, seed=args.seed)
    for name, path in asdict(setup).items():
        print(f"{name:17s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
