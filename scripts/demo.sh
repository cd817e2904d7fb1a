#!/usr/bin/env bash
# Set up, then run the demo on the built-in test-bed: build -> detect -> aggregate -> evaluate (before/after table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/depn demo "$@"
