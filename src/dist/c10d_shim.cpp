// The few calls of PyTorch's c10d that peft-rs needs, with a C interface:
// a TCPStore rendezvous, a Gloo (CPU) or NCCL (CUDA) process group, an
// in-place sum all-reduce and a barrier. Everything c10d throws is caught and
// returned as a message; nothing crosses the FFI boundary as an exception.
// The implementation is libtorch's own (libtorch_cpu.so / libtorch_cuda.so).
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef PEFT_RS_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::exception& e) { return strdup(e.what()); }

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

}  // namespace

extern "C" {

// backend: 0 = gloo, 1 = nccl. Returns a Group* or null with *err set.
void* peft_c10d_new(const char* host, int port, int rank, int world, int backend,
                    long timeout_ms, char** err) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.timeout = timeout;
    auto group = new Group();
    group->store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (backend == 0) {
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, o);
    } else {
#ifdef PEFT_RS_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group->store, rank, world, o);
#else
      delete group;
      throw std::runtime_error("this build of peft-rs has no NCCL (built without the CUDA headers)");
#endif
    }
    return group;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return nullptr;
  }
}

// Sums `tensor` (an at::Tensor*, as tch's C_tensor) over all ranks, in place.
int peft_c10d_all_reduce_sum(void* group, void* tensor, char** err) {
  try {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> v{*static_cast<at::Tensor*>(tensor)};
    g->backend->allreduce(v)->wait();
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

int peft_c10d_barrier(void* group, char** err) {
  try {
    static_cast<Group*>(group)->backend->barrier()->wait();
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

int peft_c10d_has_nccl() {
#ifdef PEFT_RS_NCCL
  return 1;
#else
  return 0;
#endif
}

void peft_c10d_free(void* group) { delete static_cast<Group*>(group); }

void peft_c10d_free_message(char* message) { free(message); }

}  // extern "C"
