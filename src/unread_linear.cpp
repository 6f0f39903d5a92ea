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
//
// The same operation replays a product instead: given the value x Wᵀ + b
// that the forward pass kept (the MLP's gate and up projections under
// `--gradient-checkpointing-keep-mlp`), it returns that value and the
// backward pass is again dy W, so the recomputed layer does not multiply
// by W a second time.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

struct UnreadLinear : public torch::autograd::Function<UnreadLinear> {
  // The weight (and a replayed value) come in a vector so that autograd
  // counts them as constants, not as inputs that might want a gradient.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            std::vector<at::Tensor> weight_and_value) {
    const at::Tensor& weight = weight_and_value[0];
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = weight.size(0);
    ctx->save_for_backward({weight});
    if (weight_and_value.size() > 1) {
      const at::Tensor& value = weight_and_value[1];
      TORCH_CHECK(value.sizes() == at::IntArrayRef(sizes), "the replayed product has shape ",
                  value.sizes(), ", the layer's output ", at::IntArrayRef(sizes));
      TORCH_CHECK(value.scalar_type() == x.scalar_type(), "the replayed product is ",
                  value.scalar_type(), ", the input ", x.scalar_type());
      return value;
    }
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

// `value` (the product x Wᵀ + b kept from the forward pass, no graph) as
// the output of an operation whose backward gives `x` the gradient `dy W`.
// Same conventions as above.
void* peft_replayed_linear(void* x, void* weight, void* value, char** err) {
  try {
    at::Tensor out = UnreadLinear::apply(
        *static_cast<at::Tensor*>(x),
        std::vector<at::Tensor>{*static_cast<at::Tensor*>(weight), *static_cast<at::Tensor*>(value)});
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
