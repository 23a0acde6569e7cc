#!/usr/bin/env bash
# Create a clean virtual environment, install the package with its test dependencies and the original
# OpenFlamingo (the parity reference), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-test}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv --clear "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# open_clip (needed by the original) imports torchvision, which only imports beside this torch release.
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[test]"
# The original implementation pins torch 2.0.1 and old transformers; it runs on ours without them.
pip install -q --no-deps open-flamingo==2.0.1

"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m pytest -q "$@"
