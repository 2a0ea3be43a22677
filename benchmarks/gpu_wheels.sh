#!/usr/bin/env bash
# Build the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has no package index.
#
#   bash benchmarks/gpu_wheels.sh            # -> wheels/ (git-ignored through .git/info/exclude)
#   WHEELS_DIR=/tmp/w PY_VERSION=3.12 bash benchmarks/gpu_wheels.sh
#
# Run it on a machine WITH a package index (this CPU machine). The GPU image (torch 2.11 + Triton 3.6,
# Python 3.12, x86-64) already has torch, triton, numpy, einops, msgpack, ninja, psutil, py-cpuinfo,
# packaging, tqdm, pyyaml, rich, tensorboard and nvidia-ml-py; what the project needs beyond them:
#
#   hydra-core, omegaconf, antlr4-python3-runtime      the Hydra entry point (configs)
#   deepspeed, hjson, pydantic, pydantic-core,         the default training engine (backend=deepspeed)
#     annotated-types, typing-inspection, typing-extensions
#   fla-core                                           fla's chunk kernels, a benchmark baseline only
#
# Pure-python sdists (antlr4 4.9.3, deepspeed) are built into py3-none-any wheels here (DS_BUILD_OPS=0:
# no compiled DeepSpeed ops, they are JIT-built on the GPU machine if ever used). The flash-attn package
# is NOT carried: it has no wheel for torch 2.11/CUDA 13; the benchmark skips it when it is not importable.
# Total size is a few MB, well under the 64 MiB that travels with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${WHEELS_DIR:-wheels}
PYV=${PY_VERSION:-3.12}
mkdir -p "$OUT"
# keep wheels/ out of git without touching the tracked .gitignore
if [ -d .git ] && ! grep -qx '/wheels/' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/wheels/' >> .git/info/exclude
fi

BINARY=(
    hydra-core==1.3.2 omegaconf==2.3.0
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    fla-core==0.6.0
)
SOURCE=(antlr4-python3-runtime==4.9.3 deepspeed==0.19.8)

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT" "${BINARY[@]}"
for pkg in "${SOURCE[@]}"; do
    name=${pkg%%==*}
    if ls "$OUT"/"${name//-/_}"-*.whl >/dev/null 2>&1; then continue; fi
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$pkg"
done
ls -la "$OUT"
du -sh "$OUT"
