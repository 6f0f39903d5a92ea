// A linear layer on a 4-bit weight that autograd sees as one operation,
// as bitsandbytes' `MatMul4Bit` is: the forward pass dequantizes the weight,
// multiplies and drops it; the backward pass dequantizes it again for the
// input's gradient. Autograd keeps only the packed weight (its own tensors,
// which the layer holds anyway), never the dequantized copy: without this,
// every layer's dense weight lives from the forward pass to the backward.
//
// Dequantization stays in Rust (one implementation, bit for bit
// bitsandbytes'): both passes call back into it through `dequantize`, a
// function pointer, with the packed tensors and an opaque description of
// the weight.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Returns a new at::Tensor* holding the dense weight, or null with `*err`
// set (malloc'ed). Takes ownership of the `tensors` it is given (new
// at::Tensor* each, null for an absent one).
using dequantize_fn = void* (*)(void** tensors, size_t count, const char* meta,
                                size_t meta_len, char** err);

at::Tensor dequantize(int64_t fn, const std::vector<at::Tensor>& packed,
                      const std::string& meta) {
  std::vector<void*> args;
  args.reserve(packed.size());
  for (const auto& t : packed) {
    args.push_back(t.defined() ? new at::Tensor(t) : nullptr);
  }
  char* err = nullptr;
  void* out = reinterpret_cast<dequantize_fn>(fn)(args.data(), args.size(), meta.data(),
                                                  meta.size(), &err);
  if (out == nullptr) {
    std::string message = err ? err : "dequantizing a 4-bit weight failed";
    std::free(err);
    throw std::runtime_error(message);
  }
  auto* w = static_cast<at::Tensor*>(out);
  at::Tensor weight = std::move(*w);
  delete w;
  return weight;
}

struct Matmul4bit : public torch::autograd::Function<Matmul4bit> {
  // `packed` (data, absmax, code, nested absmax, nested code; the last two
  // undefined without double quantization) is a vector, so autograd does
  // not count its tensors as inputs: they are constants.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            std::vector<at::Tensor> packed, std::string meta, int64_t fn) {
    at::Tensor weight = dequantize(fn, packed, meta);
    ctx->save_for_backward(packed);
    ctx->saved_data["meta"] = meta;
    ctx->saved_data["fn"] = fn;
    return at::linear(x, weight);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad_x;
    if (grads[0].defined()) {
      at::Tensor weight = dequantize(ctx->saved_data["fn"].toInt(),
                                     ctx->get_saved_variables(),
                                     ctx->saved_data["meta"].toStringRef());
      grad_x = grads[0].matmul(weight);
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor or_undefined(void* t) { return t ? *static_cast<at::Tensor*>(t) : at::Tensor(); }

}  // namespace

extern "C" {

// `x @ dequantize(weight).T` as one autograd operation. Tensors are
// at::Tensor* (tch's C_tensor), borrowed; the nested ones may be null.
// Returns a new at::Tensor*, or null with `*err` set (malloc'ed).
void* peft_matmul_4bit(void* x, void* data, void* absmax, void* code, void* nested_absmax,
                       void* nested_code, const char* meta, size_t meta_len,
                       dequantize_fn fn, char** err) {
  try {
    std::vector<at::Tensor> packed{
        *static_cast<at::Tensor*>(data), *static_cast<at::Tensor*>(absmax),
        *static_cast<at::Tensor*>(code), or_undefined(nested_absmax), or_undefined(nested_code)};
    at::Tensor out = Matmul4bit::apply(*static_cast<at::Tensor*>(x), std::move(packed),
                                       std::string(meta, meta_len),
                                       reinterpret_cast<int64_t>(fn));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
