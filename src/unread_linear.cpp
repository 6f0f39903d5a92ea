// A frozen linear layer whose output is differentiated but never read:
// the last projection of a decoder layer recomputed under gradient
// checkpointing. The recomputed layer exists only to be backpropagated
// through; its output's value feeds nothing (the next layer's input was
// kept), so the forward product x Wᵀ is wasted work. This operation skips
// it: the forward pass returns zeros of the output's shape, the backward
// pass computes the input's gradient dy W, as a linear layer's would. The
// weight is frozen (never differentiated), the bias changes no gradient.
//
// At a Llama-3.2-1B shape the MLP's down projection is about an eighth of
// a layer's matmuls, so a recomputed step does 8% less work.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

struct UnreadLinear : public torch::autograd::Function<UnreadLinear> {
  // The weight comes in a vector so that autograd counts it as a constant,
  // not as an input that might want a gradient.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            std::vector<at::Tensor> weight) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = weight[0].size(0);
    ctx->save_for_backward(weight);
    return at::zeros(sizes, x.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor grad_x;
    if (grads[0].defined()) {
      grad_x = grads[0].matmul(ctx->get_saved_variables()[0]);
    }
    return {grad_x, at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Zeros of `x Wᵀ`'s shape whose backward gives `x` the gradient `dy W`.
// Tensors are at::Tensor* (tch's C_tensor), borrowed. Returns a new
// at::Tensor*, or null with `*err` set (malloc'ed).
void* peft_unread_linear(void* x, void* weight, char** err) {
  try {
    at::Tensor out = UnreadLinear::apply(*static_cast<at::Tensor*>(x),
                                         std::vector<at::Tensor>{*static_cast<at::Tensor*>(weight)});
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
