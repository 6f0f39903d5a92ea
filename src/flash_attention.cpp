// Attention without a mask on the CPU as one autograd operation: libtorch's flash
// kernel forward in the inputs' dtype, its backward in fp32.
//
// For bf16 inputs the forward is the call scaled_dot_product_attention
// makes (the same kernel, so the same bits as transformers' SDPA). Its
// backward kernel, though, is slow on short sequences: at 64-128 keys it
// took up to 2.35 times as long in bf16 as on fp32 copies of its inputs,
// and its gradients are less accurate (the probabilities are rounded to
// bf16 before they meet the output's gradient). So the backward
// pass upcasts what it reads (grad_out, q, k, v, the bf16 output) and runs
// the fp32 kernel with the forward's fp32 log-sum-exp; the gradients are
// rounded once, to the inputs' dtype, at the end. The caller decides where
// this pays (see flash_attention.rs).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <optional>
#include <stdexcept>

namespace {

struct FlashAttentionFp32Backward
    : public torch::autograd::Function<FlashAttentionFp32Backward> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, bool is_causal,
                            double scale) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        q, k, v, /*dropout_p=*/0.0, is_causal, /*attn_mask=*/std::nullopt, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3],
                     &lse = saved[4];
    auto fp32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [gq, gk, gv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        fp32(grads[0]), fp32(q), fp32(k), fp32(v), fp32(out), lse, /*dropout_p=*/0.0,
        ctx->saved_data["is_causal"].toBool(), /*attn_mask=*/std::nullopt,
        ctx->saved_data["scale"].toDouble());
    return {gq.to(q.scalar_type()), gk.to(k.scalar_type()), gv.to(v.scalar_type()),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Attention of `q` `[b, h, t, d]` over `k`, `v` `[b, h_kv, s, d]` (at::Tensor*,
// borrowed; `h` a multiple of `h_kv`), causal or not, scores scaled by
// `scale`. Returns a new at::Tensor*, or null with `*err` set (malloc'ed).
void* peft_flash_attention_fp32_backward(void* q, void* k, void* v, int is_causal, double scale,
                                         char** err) {
  try {
    at::Tensor out = FlashAttentionFp32Backward::apply(
        *static_cast<at::Tensor*>(q), *static_cast<at::Tensor*>(k),
        *static_cast<at::Tensor*>(v), is_causal != 0, scale);
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
