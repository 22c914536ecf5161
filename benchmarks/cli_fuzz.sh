#!/usr/bin/env bash
# The CLI property test of tests/test_cli_fuzz.py at 10,000 generated command lines (CI runs 300):
# never a traceback, never exit 0 on invalid input, nothing written before validation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 EFFDIFF_FUZZ_EXAMPLES="${1:-10000}"
python -m pytest tests/test_cli_fuzz.py -q -p no:cacheprovider
