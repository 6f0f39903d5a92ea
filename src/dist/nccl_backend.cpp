// c10d's NCCL backend, built as a small shared library of its own that
// peft-rs loads (from memory) only when a run asks for NCCL. The binary
// itself links no CUDA library: libtorch_cuda and the CUDA libraries it pulls
// in are loaded at run time where a GPU driver exists (src/cuda_library.rs),
// and this library, which needs them, after them.
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <cstring>

extern "C" {

// An NCCL backend over `store` (a c10::intrusive_ptr<c10d::Store>*), bound to
// CUDA device `device`, which becomes the current device first, as torch's
// init_process_group(device_id=...) does. Returns a c10d::Backend* whose
// reference the caller takes over, or null with *err set (malloc'd).
void* peft_nccl_backend(void* store, int rank, int world, long timeout_ms, int device,
                        char** err) {
  try {
    auto index = static_cast<c10::DeviceIndex>(device);
    c10::cuda::set_device(index);
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = std::chrono::milliseconds(timeout_ms);
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    c10::intrusive_ptr<c10d::Backend> backend =
        c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, world, o);
    backend->setBoundDeviceId(c10::Device(c10::kCUDA, index));
    return backend.release();
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
