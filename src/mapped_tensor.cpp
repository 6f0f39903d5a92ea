// A CPU tensor over bytes of a memory-mapped checkpoint, without copying
// them, that keeps the mapping alive: the tensor's storage holds an owner
// (a Rust `Arc` of the mapping, behind an opaque pointer) and hands it back
// to `release` when libtorch frees the storage. tch binds `from_blob`
// without a deleter only, which would leave a tensor pointing into a
// mapping that may be gone. Also host tensors in page-locked memory, the
// other source a load copies from.

#include <ATen/ATen.h>

#include <cstring>
#include <stdexcept>

extern "C" {

// A tensor of `sizes` (`ndim` of them) and the dtype of `like`
// (at::Tensor*, borrowed) over `data`. `release(owner)` is called once
// when the storage is freed. Returns a new at::Tensor*, or null with
// `*err` set (malloc'ed); on an error the owner is not released.
void* peft_tensor_from_mapping(void* data, const int64_t* sizes, size_t ndim, void* like,
                               void* owner, void (*release)(void*), char** err) {
  try {
    auto options = static_cast<at::Tensor*>(like)->options().device(at::kCPU);
    at::Tensor t = at::from_blob(
        data, at::IntArrayRef(sizes, ndim), [owner, release](void*) { release(owner); },
        options);
    return new at::Tensor(std::move(t));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

// An uninitialised tensor of `sizes` (`ndim` of them) and the dtype of
// `like` (at::Tensor*, borrowed) in page-locked host memory, for a copy to
// a GPU by DMA. tch binds only `pin_memory(device)`, whose device argument
// libtorch 2.11 deprecates with a warning on every call (two lines per
// tensor loaded). Returns a new at::Tensor*, or null with `*err` set.
void* peft_empty_pinned(const int64_t* sizes, size_t ndim, void* like, char** err) {
  try {
    auto options = static_cast<at::Tensor*>(like)->options().device(at::kCPU).pinned_memory(true);
    return new at::Tensor(at::empty(at::IntArrayRef(sizes, ndim), options));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
