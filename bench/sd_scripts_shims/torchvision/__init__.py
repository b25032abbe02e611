"""Stand-in for torchvision in bench/bench_sd_scripts_parity.py's sd-scripts process only (never on this
project's path): the few transforms sd-scripts' dataset code calls on the Anima path, on plain torch."""

from . import transforms  # noqa: F401

__version__ = "0.0+stand-in"
