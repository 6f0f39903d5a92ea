// The optimizer's operations on all adapter tensors at once, which tch
// does not bind: AdamW's update as ATen's fused kernel
// (`torch.optim.AdamW(fused=True)`, the optimizer transformers' Trainer
// picks by default on torch >= 2.8), one pass over each tensor instead of
// about ten ATen operations, each with its own temporary; and clearing the
// gradients (`zero_grad(set_to_none=True)`, PyTorch's default).

#include <ATen/ATen.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

std::vector<at::Tensor> borrow(void** ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i) v.push_back(*static_cast<at::Tensor*>(ts[i]));
  return v;
}

}  // namespace

extern "C" {

// One AdamW step (`step` counts this one) over `n` parameters with their
// gradients and moments (at::Tensor*, borrowed, all on one device, the
// moments in the parameters' dtype). Returns 0, or -1 with `*err` set
// (malloc'ed).
int peft_fused_adamw(void** params, void** grads, void** exp_avgs, void** exp_avg_sqs, int64_t n,
                     double step, double lr, double beta1, double beta2, double weight_decay,
                     double eps, char** err) {
  try {
    if (n == 0) return 0;
    auto p = borrow(params, n);
    // The kernel reads the step count from a tensor per parameter, on the
    // parameters' device; one shared tensor serves them all.
    at::Tensor t = at::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(n, t);
    at::_fused_adamw_(p, borrow(grads, n), borrow(exp_avgs, n), borrow(exp_avg_sqs, n), {}, steps,
                      lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return -1;
  }
}

// Sets the `.grad` of `n` tensors (at::Tensor*, borrowed) to undefined, as
// `zero_grad(set_to_none=True)`: the next backward pass hands its gradient
// over instead of adding it to zeros.
void peft_clear_grads(void** ts, int64_t n) {
  for (int64_t i = 0; i < n; ++i) static_cast<at::Tensor*>(ts[i])->mutable_grad().reset();
}

}  // extern "C"
