#!/usr/bin/env bash
# Builds the side environment with lxt 2.1 (the AttnLRP authors' library) and writes the
# reference tensors that tests/test_attnlrp_lxt.py compares relfast's `attnlrp` with.
#
#   bash scripts/make_lxt_env.sh               # env at /work/lxt-env, references at tests/lxt_reference/
#   LXT_ENV=/somewhere OUT_DIR=/elsewhere bash scripts/make_lxt_env.sh
#   RELFAST_LXT_REFERENCE=/elsewhere pytest tests/test_attnlrp_lxt.py   # where the test reads them
#
# lxt 2.1 patches the model code of transformers < 4.54, so it cannot live in relfast's own
# environment (transformers 5.x). Idempotent: an existing env with the pinned packages is reused; the references are
# rewritten each run (deterministic: seeded tiny float64 models). Needs PyPI only here; the test
# reads the written files and needs no network.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${LXT_ENV:-/work/lxt-env}
OUT_DIR=${OUT_DIR:-tests/lxt_reference}
PYTHON=${PYTHON:-python3}

if [ ! -x "$ENV/bin/python" ]; then
  "$PYTHON" -m venv "$ENV"
fi
if ! "$ENV/bin/python" - <<'PY' 2>/dev/null; then
import importlib.metadata as m
assert m.version("lxt") == "2.1"
assert m.version("torch").startswith("2.13.0")
from packaging.version import Version
assert Version(m.version("transformers")) < Version("4.54")
import torchvision  # noqa: F401
PY
  # torch 2.13.0, the CPU build (small; a local wheel of it is used where the machine keeps one),
  # and the torchvision of that release.
  TORCH=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  "$ENV/bin/python" -m pip install -q "${TORCH:-torch==2.13.0}"
  # PyPI's torchvision is a CUDA build: its C ops do not load with the CPU torch, which the ViT
  # does not need (scripts/lxt_reference.py lets it import; see import_torchvision there).
  "$ENV/bin/python" -m pip install -q --no-deps "torchvision==0.28.0"
  # lxt's own requirements list also bitsandbytes, open_clip_torch, zennit, matplotlib and
  # accelerate, which its efficient AttnLRP (lxt.efficient) does not import: left out.
  "$ENV/bin/python" -m pip install -q --no-deps "lxt==2.1"
  "$ENV/bin/python" -m pip install -q "transformers<4.54" tabulate packaging numpy pillow
fi
"$ENV/bin/python" -c "import importlib.metadata as m; print('lxt', m.version('lxt'), 'torch', m.version('torch'), \
'transformers', m.version('transformers'), 'torchvision', m.version('torchvision'))"
"$ENV/bin/python" scripts/lxt_reference.py --out "$OUT_DIR"
