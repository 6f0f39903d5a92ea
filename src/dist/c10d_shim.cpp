// The few calls of PyTorch's c10d that peft-rs needs, with a C interface:
// a TCPStore rendezvous (and its key-value store), a Gloo (CPU) or NCCL
// (CUDA) process group, an in-place sum all-reduce, an asynchronous
// (coalesced) all-gather and a barrier. Everything c10d throws is caught and
// returned as a message; nothing crosses the FFI boundary as an exception.
// The implementation is libtorch's own (libtorch_cpu.so); NCCL's backend is
// made by a function of a library loaded at run time (nccl_backend.cpp), so
// that the binary links no CUDA library.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <c10/util/Logging.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

char* copy_message(const std::exception& e) { return strdup(e.what()); }

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  // How long a wait for a Gloo collective may last: the group's timeout
  // plus a margin, so that Gloo's own (more precise) error comes first.
  // Without it a collective whose transport got stuck hung the rank for
  // good (seen: a Gloo thread spinning in a buffer's destructor after its
  // connection failed). NCCL keeps none (0): a limit would make the CPU
  // wait for the GPU, and NCCL's watchdog bounds its collectives itself.
  std::chrono::milliseconds wait_limit{0};  // 0: kNoTimeout
};

// A started collective and how long a wait for it may last.
struct Pending {
  c10::intrusive_ptr<c10d::Work> work;
  std::chrono::milliseconds wait_limit;
};

}  // namespace

extern "C" {

// peft_nccl_backend's signature (nccl_backend.cpp).
typedef void* (*NcclBackendFn)(void* store, int rank, int world, long timeout_ms, int device,
                               char** err);

// backend: 0 = gloo, 1 = nccl, made by `nccl` (peft_nccl_backend, from the
// library loaded at run time); device: this rank's CUDA device (NCCL), made
// the current device before the group exists and bound to it, as torch's
// init_process_group(device_id=...) does. Returns a Group* or null with *err set.
void* peft_c10d_new(const char* host, int port, int rank, int world, int backend,
                    long timeout_ms, int device, void* nccl, char** err) {
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
      // One worker thread: Gloo runs the collectives one at a time, in the
      // order every rank started them. With its default two, --fsdp's
      // prefetch (a whole layer's all-gather) ran beside the loss's small
      // collectives on the same connection: the only mode that overlaps
      // collectives, and the only one seen to fail (a resumed 2-rank run
      // crashed on a corrupted heap; another hung with rank 0 past a
      // collective that rank 1 still waited in). The prefetch still
      // overlaps the model's compute.
      o->threads = 1;
      group->wait_limit = timeout + std::chrono::seconds(10);
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, o);
    } else {
      if (nccl == nullptr) {
        delete group;
        throw std::runtime_error("NCCL's library is not loaded");
      }
      char* nccl_err = nullptr;
      void* made = reinterpret_cast<NcclBackendFn>(nccl)(&group->store, rank, world, timeout_ms,
                                                          device, &nccl_err);
      if (made == nullptr) {
        delete group;
        *err = nccl_err;
        return nullptr;
      }
      group->backend =
          c10::intrusive_ptr<c10d::Backend>::reclaim(static_cast<c10d::Backend*>(made));
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
    g->backend->allreduce(v)->wait(g->wait_limit);
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

// Starts gathering `count` tensors at once: every rank's `inputs[i]` into
// `outputs[i]` (world x inputs[i], flat, contiguous), rank r's at
// outputs[i][r * len .. (r + 1) * len]. One collective for all of them, each
// written straight into its own output (no staging buffer to copy from).
void* peft_c10d_all_gather_parts_start(void* group, void** outputs, void** inputs, int count,
                                       char** err) {
  try {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> outs, ins;
    for (int i = 0; i < count; ++i) {
      outs.push_back(*static_cast<at::Tensor*>(outputs[i]));
      ins.push_back(*static_cast<at::Tensor*>(inputs[i]));
    }
    auto work = g->backend->allgather_into_tensor_coalesced(outs, ins);
    return new Pending{std::move(work), g->wait_limit};
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return nullptr;
  }
}

// Waits for a Work from peft_c10d_all_gather_parts_start and frees it (also on error).
int peft_c10d_work_wait(void* work, char** err) {
  auto w = static_cast<Pending*>(work);
  try {
    w->work->wait(w->wait_limit);
    delete w;
    return 0;
  } catch (const std::exception& e) {
    delete w;
    *err = copy_message(e);
    return 1;
  }
}

int peft_c10d_barrier(void* group, char** err) {
  try {
    auto g = static_cast<Group*>(group);
    g->backend->barrier()->wait(g->wait_limit);
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

// Stores `len` bytes under `key` in the rendezvous store (visible to every rank).
int peft_c10d_store_set(void* group, const char* key, const unsigned char* data, long len,
                        char** err) {
  try {
    std::vector<uint8_t> value(data, data + len);
    static_cast<Group*>(group)->store->set(std::string(key), value);
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

// Reads `key`, waiting at most timeout_ms for some rank to set it; *out is
// malloc'ed (free with peft_c10d_free_message).
int peft_c10d_store_get(void* group, const char* key, long timeout_ms, unsigned char** out,
                        long* len, char** err) {
  try {
    auto& store = static_cast<Group*>(group)->store;
    std::vector<std::string> keys{std::string(key)};
    store->wait(keys, std::chrono::milliseconds(timeout_ms));
    auto value = store->get(keys[0]);
    *out = static_cast<unsigned char*>(malloc(value.size() + 1));
    std::memcpy(*out, value.data(), value.size());
    *len = static_cast<long>(value.size());
    return 0;
  } catch (const std::exception& e) {
    *err = copy_message(e);
    return 1;
  }
}

// c10's log threshold (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL): c10d logs each
// retry of a rendezvous with a C++ backtrace; peft-rs reports failures itself.
// Makes `grad` (an at::Tensor*) the .grad of `tensor`, or leaves `tensor`
// without one when `grad` is null, as `param.grad = g` / `param.grad = None`
// do in Python: tch can only zero a gradient in place, which keeps its memory.
void peft_c10d_set_grad(void* tensor, void* grad) {
  auto& slot = static_cast<at::Tensor*>(tensor)->mutable_grad();
  if (grad) {
    slot = *static_cast<at::Tensor*>(grad);
  } else {
    slot.reset();
  }
}

void peft_c10d_set_log_level(int level) { FLAGS_caffe2_log_level = level; }

void peft_c10d_free(void* group) { delete static_cast<Group*>(group); }

void peft_c10d_free_message(void* message) { free(message); }

}  // extern "C"
