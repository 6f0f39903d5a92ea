// transformers' RMS norm on the CPU as one autograd operation over a frozen
// weight: one pass forward, one pass backward, and only the input (which
// the caller keeps anyway) and one fp32 number per row saved in between.
//
// Written with ATen ops, the norm saves an fp32 copy of its input and runs
// about ten passes over memory in each direction; on a bf16 model that is
// 4 bytes per element per norm of activation memory and, at 1B, a tenth of
// a training step.
//
// The arithmetic is transformers' (LlamaRMSNorm, and Gemma3RMSNorm with
// `scale_in_fp32`): the mean square in fp32, x * rsqrt(mean + eps) in fp32,
// then either cast back and multiplied by the weight in the input's dtype
// (Llama) or multiplied by the fp32 weight and cast back (Gemma). Only the
// order of the mean's additions differs from ATen's; the gradient is the
// same formula autograd derives, with its roundings.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace {

// Rounds to `scalar_t` and back, as a cast to the input's dtype does.
template <typename scalar_t>
inline float round_to(float v) {
  return static_cast<float>(static_cast<scalar_t>(v));
}

// The mean square of `n` values: the sum in double, rounded once to fp32,
// so that it is the correctly rounded sum ATen's cascade summation almost
// always finds too (an fp32 running sum drifts by ulps over a long row),
// then divided in fp32 as ATen's mean does.
template <typename scalar_t>
inline float mean_square(const scalar_t* x, int64_t n) {
  double lane[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    for (int k = 0; k < 4; ++k) {
      double v = static_cast<float>(x[j + k]);
      lane[k] += v * v;
    }
  }
  double acc = (lane[0] + lane[1]) + (lane[2] + lane[3]);
  for (; j < n; ++j) {
    double v = static_cast<float>(x[j]);
    acc += v * v;
  }
  return static_cast<float>(acc) / static_cast<float>(n);
}

// out = norm(x) * w; rstd[row] = rsqrt(mean(x^2) + eps).
template <typename scalar_t, typename weight_t>
void forward_rows(const scalar_t* x, const weight_t* w, scalar_t* out, float* rstd,
                  int64_t rows, int64_t n, float eps, bool scale_in_fp32) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * n;
      scalar_t* yr = out + r * n;
      float s = 1.0f / std::sqrt(mean_square(xr, n) + eps);
      rstd[r] = s;
      if (scale_in_fp32) {
        for (int64_t j = 0; j < n; ++j) {
          yr[j] = static_cast<scalar_t>(static_cast<float>(xr[j]) * s * static_cast<float>(w[j]));
        }
      } else {
        for (int64_t j = 0; j < n; ++j) {
          float h = round_to<scalar_t>(static_cast<float>(xr[j]) * s);
          yr[j] = static_cast<scalar_t>(round_to<weight_t>(static_cast<float>(w[j])) * h);
        }
      }
    }
  });
}

// The input's gradient: with gy the gradient at the fp32 normalised value,
// gx = s * gy - x * s^3 * sum(gy * x) / n.
template <typename scalar_t, typename weight_t>
void backward_rows(const scalar_t* g, const scalar_t* x, const weight_t* w, const float* rstd,
                   scalar_t* gx, int64_t rows, int64_t n, bool scale_in_fp32) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gy(n);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = g + r * n;
      const scalar_t* xr = x + r * n;
      float s = rstd[r];
      float dot = 0;
      for (int64_t j = 0; j < n; ++j) {
        float gw = static_cast<float>(gr[j]) * static_cast<float>(w[j]);
        // Llama's product is in the input's dtype, so is its gradient.
        gy[j] = scale_in_fp32 ? gw : round_to<scalar_t>(gw);
        dot += gy[j] * static_cast<float>(xr[j]);
      }
      float c = dot * s * s * s / static_cast<float>(n);
      for (int64_t j = 0; j < n; ++j) {
        gx[r * n + j] = static_cast<scalar_t>(s * gy[j] - c * static_cast<float>(xr[j]));
      }
    }
  });
}

// The weight has the input's dtype or, for Gemma's `1 + w`, fp32.
#define PEFT_DISPATCH_NORM(x, w, CALL)                                               \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (x).scalar_type(), "peft_rms_norm", \
                                  [&] {                                              \
                                    if ((w).scalar_type() == (x).scalar_type()) {    \
                                      using weight_t = scalar_t;                     \
                                      CALL;                                          \
                                    } else {                                         \
                                      TORCH_CHECK((w).scalar_type() == at::kFloat,   \
                                                  "RMS norm: weight must be fp32 or the input's dtype"); \
                                      using weight_t = float;                        \
                                      CALL;                                          \
                                    }                                                \
                                  })

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  // `weight` is frozen: passed in a vector, autograd does not count it as
  // an input.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            std::vector<at::Tensor> weight, double eps, bool scale_in_fp32) {
    const at::Tensor& w = weight[0];
    at::Tensor x = input.contiguous();
    int64_t n = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "RMS norm: weight of ", w.sizes(),
                " for rows of ", n);
    int64_t rows = n == 0 ? 0 : x.numel() / n;
    at::Tensor out = at::empty_like(x);
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    at::Tensor wc = w.contiguous();
    PEFT_DISPATCH_NORM(x, wc,
                       (forward_rows<scalar_t, weight_t>(
                           x.data_ptr<scalar_t>(), wc.data_ptr<weight_t>(), out.data_ptr<scalar_t>(),
                           rstd.data_ptr<float>(), rows, n, static_cast<float>(eps), scale_in_fp32)));
    ctx->save_for_backward({x, wc, rstd});
    ctx->saved_data["scale_in_fp32"] = scale_in_fp32;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    bool scale_in_fp32 = ctx->saved_data["scale_in_fp32"].toBool();
    at::Tensor g = grads[0].to(x.scalar_type()).contiguous();
    int64_t n = x.size(-1);
    int64_t rows = n == 0 ? 0 : x.numel() / n;
    at::Tensor gx = at::empty_like(x);
    PEFT_DISPATCH_NORM(x, w,
                       (backward_rows<scalar_t, weight_t>(
                           g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<weight_t>(),
                           rstd.data_ptr<float>(), gx.data_ptr<scalar_t>(), rows, n, scale_in_fp32)));
    return {gx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// RMS norm of `x` (at::Tensor*, borrowed) over its last dimension with the
// frozen `weight`. Returns a new at::Tensor*, or null with `*err` set
// (malloc'ed).
void* peft_rms_norm(void* x, void* weight, double eps, int scale_in_fp32, char** err) {
  try {
    at::Tensor out = RmsNorm::apply(*static_cast<at::Tensor*>(x),
                                    std::vector<at::Tensor>{*static_cast<at::Tensor*>(weight)},
                                    eps, scale_in_fp32 != 0);
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
