#!/usr/bin/env bash
# Set up a CPU environment and run the whole test suite (this is the README's test command and
# what CI runs). Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
# The CPU build; an unpinned torch would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"

python -m ruff check .
# pytest exits 5 when nothing was collected; treat that as a failure too.
python -m pytest -q -p no:cacheprovider "$@"
