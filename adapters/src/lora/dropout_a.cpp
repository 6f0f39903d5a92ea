// LoRA's first product with dropout, `dropout(x) @ A.T`, as one autograd
// operation on the CPU that keeps no mask and no dropped-out copy of x.
//
// The mask is drawn from a seed by a counter-based generator (SplitMix64
// per chunk of 2^16 elements, seeded `mix(seed, chunk)`: the same mask as
// peft_adapters::rng::keep_mask), so the backward pass draws it again
// instead of keeping it. Autograd keeps x (which the frozen base layer
// keeps anyway), A and the seed. Kept elements stay unscaled; the caller
// applies 1/(1-p) to the rank-r product.
//
// Without it, each adapted layer keeps a dropped-out copy of its input
// (2 bytes per element in bf16) and a one-byte mask: on a 135M model at
// 1,024 tokens, 40% of the activation memory of a training step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <algorithm>

namespace {

constexpr int64_t kChunk = 1 << 16;

inline uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a ^ (b + 0x9E3779B97F4A7C15ULL + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

// Copies n elements of `word_t` (the element's bits) from `in` to `out`,
// zeroing those whose 16-bit draw is below `threshold` (p * 65536,
// rounded): zero is all-zero bits in every float dtype.
template <typename word_t>
void drop_words(const word_t* in, word_t* out, int64_t n, uint64_t seed, uint64_t threshold) {
  int64_t chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      SplitMix64 g{mix(seed, static_cast<uint64_t>(c))};
      int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      for (int64_t i = lo; i < hi; i += 4) {
        uint64_t r = g.next();
        for (int64_t k = 0; k < 4 && i + k < hi; ++k) {
          bool keep = ((r >> (16 * k)) & 0xFFFF) >= threshold;
          out[i + k] = keep ? in[i + k] : word_t(0);
        }
      }
    }
  });
}

// A contiguous copy of `x` with its dropped elements zeroed.
at::Tensor drop(const at::Tensor& x, uint64_t seed, uint64_t threshold) {
  at::Tensor src = x.contiguous();
  at::Tensor out = at::empty_like(src);
  int64_t n = src.numel();
  switch (src.element_size()) {
    case 2:
      drop_words(static_cast<const uint16_t*>(src.data_ptr()), static_cast<uint16_t*>(out.data_ptr()),
                 n, seed, threshold);
      break;
    case 4:
      drop_words(static_cast<const uint32_t*>(src.data_ptr()), static_cast<uint32_t*>(out.data_ptr()),
                 n, seed, threshold);
      break;
    case 8:
      drop_words(static_cast<const uint64_t*>(src.data_ptr()), static_cast<uint64_t*>(out.data_ptr()),
                 n, seed, threshold);
      break;
    default:
      throw std::runtime_error("LoRA dropout: unsupported element size");
  }
  return out;
}

struct DropoutA : public torch::autograd::Function<DropoutA> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& a, int64_t seed, int64_t threshold) {
    at::Tensor h = at::linear(drop(x, static_cast<uint64_t>(seed), threshold), a);
    ctx->save_for_backward({x, a});
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["threshold"] = threshold;
    return h;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &a = saved[1];
    uint64_t seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
    uint64_t threshold = static_cast<uint64_t>(ctx->saved_data["threshold"].toInt());
    at::Tensor gh = grads[0];
    at::Tensor grad_x, grad_a;
    if (ctx->needs_input_grad(0)) {
      // The mask is its own derivative: drop the gradient where x was dropped.
      grad_x = drop(gh.matmul(a), seed, threshold).view(x.sizes());
    }
    if (ctx->needs_input_grad(1)) {
      at::Tensor xd = drop(x, seed, threshold);
      // As linear's own backward computes it (autograd's mm_mat2_backward
      // for a transposed weight), so the result is the plain path's bit for bit.
      grad_a = gh.reshape({-1, gh.size(-1)}).t().mm(xd.reshape({-1, xd.size(-1)}));
    }
    return {grad_x, grad_a, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// `dropout(x) @ a.T` with the mask drawn from `seed`; x and a are
// at::Tensor* (borrowed). Returns a new at::Tensor*, or null with `*err`
// set (malloc'ed).
void* peft_lora_dropout_a(void* x, void* a, uint64_t seed, uint64_t threshold, char** err) {
  try {
    at::Tensor h = DropoutA::apply(*static_cast<at::Tensor*>(x), *static_cast<at::Tensor*>(a),
                                   static_cast<int64_t>(seed), static_cast<int64_t>(threshold));
    return new at::Tensor(std::move(h));
  } catch (const std::exception& e) {
    *err = strdup(e.what());
    return nullptr;
  }
}

}  // extern "C"
