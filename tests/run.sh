#!/usr/bin/env bash
# Create a clean virtual environment, install the package with its test dependencies and the original
# OpenFlamingo (the parity reference), then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-test}"
PYTHON="${PYTHON:-python3}"

# Evaluation metrics: CIDEr's PTB tokenizer runs on Java; OK-VQA stemming reads WordNet 3.0 from Debian's packages
# (NLTK's punkt_tab/tagger data cannot be installed from a package registry: see evaluation/metrics.py). The DeepSpeed
# test needs a C++ compiler. The web app's page is tested in Debian's headless Chromium, driven through chromedriver.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    missing=()
    command -v java >/dev/null || missing+=(default-jre-headless)
    command -v g++ >/dev/null || missing+=(g++)  # DeepSpeed's CPU backend compiles its communication op
    [ -f /usr/share/wordnet/data.noun ] || missing+=(wordnet-base)
    [ -f /usr/share/wordnet/index.sense ] || missing+=(wordnet-sense-index)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

"$PYTHON" -m venv --clear "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# open_clip (needed by the original) imports torchvision, which only imports beside this torch release.
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q -e ".[test]"
# --- transformers versions (pyproject.toml: the supported range) ---------------------------------------------------
# The whole suite runs on the newest supported release; the tests that lean hardest on transformers' internals
# (parity, modelling, MosaicGPT, processing, conversion, remote code) run again on the oldest, in the same venv.
TRANSFORMERS_HIGHEST="${TRANSFORMERS_HIGHEST:-5.25.0}"
TRANSFORMERS_LOWEST="${TRANSFORMERS_LOWEST:-5.20.0}"
LOWEST_TESTS=(tests/test_parity.py tests/test_modeling.py tests/test_mosaic_gpt.py tests/test_processing.py
    tests/test_convert.py tests/test_convert_errors.py tests/test_hub_code.py)
pip install -q "transformers==$TRANSFORMERS_HIGHEST"
# -------------------------------------------------------------------------------------------------------------------
# The original implementation pins torch 2.0.1 and old transformers; it runs on ours without them.
pip install -q --no-deps open-flamingo==2.0.1

"$VENV/bin/python" -m ruff check .
"$VENV/bin/python" -m pytest -q "$@"
if [ "$#" -eq 0 ] && [ "$TRANSFORMERS_LOWEST" != "$TRANSFORMERS_HIGHEST" ]; then
    echo "== again on transformers $TRANSFORMERS_LOWEST (the oldest supported): ${LOWEST_TESTS[*]}"
    pip install -q "transformers==$TRANSFORMERS_LOWEST"
    status=0
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${LOWEST_TESTS[@]}" || status=$?
    pip install -q "transformers==$TRANSFORMERS_HIGHEST"  # leave the venv on the newest release
    exit "$status"
fi
