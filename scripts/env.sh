# Sourced by the other scripts: where the Python environment with libtorch lives,
# and the variables tch's build needs. Kept outside the clone (a versioned folder
# under ~/.cache) so that fresh clones and CI reuse the 4.7 GB install.
PEFT_RS_TORCH_VERSION=2.11.0
PEFT_RS_CACHE="${PEFT_RS_CACHE:-$HOME/.cache/peft-rs}"
. "$(dirname "${BASH_SOURCE[0]}")/torch_variant.sh"
PEFT_RS_TORCH_VARIANT_RESOLVED="$(torch_variant)"
PEFT_RS_VENV="${PEFT_RS_VENV:-$PEFT_RS_CACHE/$(torch_venv_name "$PEFT_RS_TORCH_VARIANT_RESOLVED")}"
export VIRTUAL_ENV="$PEFT_RS_VENV"
export PATH="$PEFT_RS_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export PYTHON="$PEFT_RS_VENV/bin/python"
# Gloo's headers for the c10d shim (fetched by setup.sh; see build.rs).
export PEFT_RS_GLOO_INCLUDE="${PEFT_RS_GLOO_INCLUDE:-$PEFT_RS_CACHE/gloo-headers/include}"
# llama.cpp's GGUF converters, taken from llama-cpp-python's source by setup.sh.
export PEFT_RS_LLAMA_CPP_CONVERTERS="${PEFT_RS_LLAMA_CPP_CONVERTERS:-$PEFT_RS_CACHE/llama-cpp-python-0.3.36/converters}"
