#!/usr/bin/env bash
# Run on the CPU machine before a GPU check: download the wheels the GPU machine lacks into .whl/ (ignored),
# for its Python (3.12, manylinux x86-64), and fail if they and the working tree that travels with them
# would exceed the device tool's 64 MiB. `make gpu-check` on the GPU machine installs them.
#
#   bash scripts/gpu_wheels.sh                       # the missing packages, at the versions tested here
#   EXTRA="transformers==5.24.0" bash scripts/gpu_wheels.sh   # also carry these (still size-checked)
#
# Missing on the GPU image (torch 2.11 + CUDA 13, transformers, peft, accelerate, typer, rich, pyyaml, pyarrow,
# pandas, xxhash and fsspec are there): bitsandbytes, trl, datasets, pydantic (with pydantic-core,
# annotated-types, typing-inspection and a typing-extensions new enough for them), dill, multiprocess and
# liger-kernel. Versions: the ones installed in .venv when it exists (what the tests ran with), else the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
LIMIT=$((64 * 1024 * 1024))
PACKAGES=(bitsandbytes trl datasets pydantic pydantic-core annotated-types typing-inspection typing-extensions
          dill multiprocess liger-kernel)

pinned() {  # NAME -> NAME==VERSION as installed in .venv, or NAME
  local version=""
  if [ -x .venv/bin/python ]; then
    version=$(.venv/bin/python -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1")
  fi
  if [ -n "$version" ]; then echo "$1==$version"; else echo "$1"; fi
}

rm -rf "$DEST" && mkdir -p "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
for package in "${PACKAGES[@]}" ${EXTRA:-}; do
  case "$package" in *==*) spec=$package ;; *) spec=$(pinned "$package") ;; esac
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>&1 | grep -v "^WARNING: Location" || true
  stem=$(echo "${spec%%==*}" | tr '-' '_')
  ls "$DEST" | grep -qi "^${stem}-" || { echo "gpu_wheels: no wheel for $spec (Python 3.12, manylinux x86-64)" >&2; exit 1; }
done

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s+0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
ls -s --block-size=K "$DEST" | tail -n +2 | sort -k1 -n -r
echo "gpu_wheels: $(ls "$DEST" | wc -l) wheels $(mib "$wheels") + working tree $(mib "$tree") = $(mib $((wheels + tree))) (limit 64 MiB)"
if [ $((wheels + tree)) -gt $LIMIT ]; then
  echo "gpu_wheels: over the device tool's 64 MiB: drop EXTRA packages or untracked files" >&2
  exit 1
fi
