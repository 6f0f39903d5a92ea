# Sourced by env.sh and setup.sh: which build of torch 2.11.0 (the libtorch
# tch 0.24 links to) fits this machine's NVIDIA driver.
#
# The default wheel from the Python package index is built for CUDA 13.0, which
# needs driver 580 or newer; with an older driver libtorch cannot open the GPU
# and --device auto trains on the CPU. PyTorch publishes the same release for
# older CUDA versions on its own wheel index:
#   driver >= 580: the default wheel (CUDA 13.0)
#   driver >= 570: cu128 (CUDA 12.8)
#   driver >= 525: cu126 (CUDA 12.6, runs on any 12.x driver)
#   older, or no NVIDIA driver at all: a GPU-less machine keeps the default
#   wheel (it runs on the CPU); a too-old driver gets the cpu build and a note.
# Override with PEFT_RS_TORCH_VARIANT=default|cu128|cu126|cpu. Variants other
# than the default are installed from "$PEFT_RS_TORCH_INDEX/<variant>": set
# PEFT_RS_TORCH_INDEX to PyTorch's wheel index (the --index-url PyTorch's
# install selector prints, without its last /cuXXX part).

# The driver version nvidia-smi reports, or nothing.
torch_driver_version() {
  command -v nvidia-smi > /dev/null 2>&1 || return 0
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' ' || true
}

# Prints the variant for this machine: default, cu128, cu126 or cpu.
torch_variant() {
  if [ -n "${PEFT_RS_TORCH_VARIANT:-}" ]; then
    case "$PEFT_RS_TORCH_VARIANT" in
      default|cu130) echo default ;;
      cu128|cu126|cpu) echo "$PEFT_RS_TORCH_VARIANT" ;;
      *) echo "error: PEFT_RS_TORCH_VARIANT=$PEFT_RS_TORCH_VARIANT: expected default, cu128, cu126 or cpu" >&2; return 1 ;;
    esac
    return 0
  fi
  local driver major
  driver=$(torch_driver_version)
  major=${driver%%.*}
  if ! [[ "$major" =~ ^[0-9]+$ ]]; then
    echo default
  elif [ "$major" -ge 580 ]; then
    echo default
  elif [ "$major" -ge 570 ]; then
    echo cu128
  elif [ "$major" -ge 525 ]; then
    echo cu126
  else
    echo "note: NVIDIA driver $driver is too old for any CUDA build of torch 2.11 (525 or newer is needed); using the CPU build" >&2
    echo cpu
  fi
}

# The folder of the Python environment for a variant (default keeps the
# historical name, so existing installs and CI caches stay valid).
torch_venv_name() {
  if [ "$1" = default ]; then echo "torch-$PEFT_RS_TORCH_VERSION"; else echo "torch-$PEFT_RS_TORCH_VERSION-$1"; fi
}

# The pip arguments that install torch for a variant.
torch_pip_args() {
  if [ "$1" = default ]; then
    echo "torch==$PEFT_RS_TORCH_VERSION"
    return 0
  fi
  if [ -z "${PEFT_RS_TORCH_INDEX:-}" ]; then
    echo "error: this machine needs the $1 build of torch $PEFT_RS_TORCH_VERSION (NVIDIA driver $(torch_driver_version)); set PEFT_RS_TORCH_INDEX to PyTorch's wheel index (the --index-url its install selector prints, without the last /cuXXX part), or PEFT_RS_TORCH_VARIANT=default to install the default CUDA 13.0 wheel anyway" >&2
    return 1
  fi
  echo "torch==$PEFT_RS_TORCH_VERSION --index-url ${PEFT_RS_TORCH_INDEX%/}/$1"
}
