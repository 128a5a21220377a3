#!/usr/bin/env bash
# Builds the side environment of the peers of benchmarks/bench_generate.py (issue 21): captum 0.9
# (LLMGradientAttribution with LayerGradientXActivation, scripts/captum_generate.py) and inseq 0.7
# (input_x_gradient, scripts/inseq_generate.py), beside torch 2.13 CPU and transformers.
#
#   bash scripts/make_captum_env.sh                 # env at /work/captum-env
#   CAPTUM_ENV=/somewhere bash scripts/make_captum_env.sh
#   RELFAST_CAPTUM_ENV=/somewhere .venv/bin/python -m pytest benchmarks/bench_generate.py --benchmark-only -q -s
#
# Pins (last checked on PyPI when written: captum 0.9.0 is the latest 0.9 release, inseq 0.7.1 the
# latest inseq):
# * torch 2.13.0, the CPU build (a local wheel of it is used where the machine keeps one);
# * captum 0.9.0 (needs torch >= 2.3, numpy, matplotlib, tqdm, packaging);
# * transformers 5.25.0: relfast's own lock (constraints.txt), so GPT2LMHeadModel is the same code on
#   both sides of the comparison; it runs with torch 2.13;
# * inseq 0.7.1 with its requirements. Its metadata asks for the nvidia-*-cu11 libraries under
#   `sys_platform == "Linux"`, a marker that is never true (Python says "linux"), so nothing of CUDA
#   comes with it. Under transformers 5.25 it imports and runs constrained attribution of a GPT-2
#   (checked when written); scripts/inseq_generate.py gives the tokenizer stand-in pad and bos tokens,
#   which inseq 0.7.1 requires at load time. Should inseq fail to install, captum's env is still
#   built and the inseq rows of the benchmark skip.
# Idempotent: an existing env with the pinned packages is reused. Needs PyPI only here; the
# benchmark runs offline (the scripts build an offline tokenizer stand-in; nothing downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${CAPTUM_ENV:-/work/captum-env}
PYTHON=${PYTHON:-python3}
CAPTUM=0.9.0
TRANSFORMERS=5.25.0
INSEQ=0.7.1

if [ ! -x "$ENV/bin/python" ]; then
  "$PYTHON" -m venv "$ENV"
fi
check() {
  "$ENV/bin/python" - "$@" <<PY 2>/dev/null
import importlib.metadata as m, sys
assert m.version("torch").startswith("2.13.0")
assert m.version("captum") == "$CAPTUM"
assert m.version("transformers") == "$TRANSFORMERS"
if "inseq" in sys.argv[1:]:
    assert m.version("inseq") == "$INSEQ"
    import inseq  # noqa: F401
from captum.attr import LLMGradientAttribution, LayerGradientXActivation, TextTokenInput  # noqa: F401
import transformers, tokenizers  # noqa: F401
PY
}
if ! check; then
  TORCH=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
  "$ENV/bin/python" -m pip install -q "${TORCH:-torch==2.13.0}"
  "$ENV/bin/python" -m pip install -q "captum==$CAPTUM" "transformers==$TRANSFORMERS"
  check
fi
if ! check inseq; then
  # the pins repeated so that inseq's requirements cannot move them
  "$ENV/bin/python" -m pip install -q "inseq==$INSEQ" "captum==$CAPTUM" "transformers==$TRANSFORMERS" \
    || echo "make_captum_env.sh: inseq $INSEQ did not install; the inseq rows of bench_generate.py will skip" >&2
  check inseq || echo "make_captum_env.sh: inseq $INSEQ does not import here; the inseq rows will skip" >&2
fi
"$ENV/bin/python" - <<'PY'
import importlib.metadata as m
installed = {d.metadata["Name"].lower() for d in m.distributions()}
names = ("captum", "inseq", "torch", "transformers", "tokenizers", "numpy")
print(" ".join(f"{n} {m.version(n)}" for n in names if n in installed))
PY
