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

// SplitMix64's increment: the generator's j-th output (from 1) after
// `state` is the finalizer of `state + j * kGamma`.
constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;

// Draws per block: the 16-bit lanes of 256 outputs, one lane per element.
constexpr int64_t kBlock = 1024;
static_assert(kChunk % kBlock == 0, "blocks tile a chunk");

// Built for AVX-512 and AVX2 beside the baseline, picked at load time by the
// CPU: the per-element draw and select vectorize (9x faster than one
// generator call per four elements on a Zen 4 core).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFT_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define PEFT_CLONES
#endif

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the 16-bit lanes of a draw are read little-endian, as peft_adapters::rng::keep_mask does"
#endif

// `words` outputs of the SplitMix64 generator at `state`, written as
// 4 * words 16-bit lanes (lane k of output j is its bits 16k..16k+15).
PEFT_CLONES
void draw_lanes(uint64_t state, int64_t words, uint16_t* lanes) {
  for (int64_t j = 0; j < words; ++j) {
    uint64_t z = state + static_cast<uint64_t>(j + 1) * kGamma;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    std::memcpy(lanes + 4 * j, &z, sizeof z);
  }
}

// out[k] = in[k] where the element's lane is at least `threshold`, else 0.
template <typename word_t>
PEFT_CLONES void keep_where(const word_t* in, word_t* out, const uint16_t* lanes, int64_t m,
                            uint16_t threshold) {
  for (int64_t k = 0; k < m; ++k) {
    out[k] = lanes[k] >= threshold ? in[k] : word_t(0);
  }
}

// Copies n elements of `word_t` (the element's bits) from `in` to `out`,
// zeroing those whose 16-bit draw is below `threshold` (p * 65536,
// rounded): zero is all-zero bits in every float dtype.
template <typename word_t>
void drop_words(const word_t* in, word_t* out, int64_t n, uint64_t seed, uint64_t threshold) {
  if (threshold > 0xFFFF) {  // p rounds to 1: every 16-bit draw is below it
    std::fill(out, out + n, word_t(0));
    return;
  }
  int64_t chunks = (n + kChunk - 1) / kChunk;
  // On one thread: at 0.1 ns an element even an 8B model's [2048, 4096]
  // input takes under a millisecond, and on SmolLM2's small inputs waking
  // libtorch's other thread for it made the end-to-end run 3-10% slower
  // (alternated runs). Each chunk keeps its own stream all the same.
  alignas(64) uint16_t lanes[kBlock];
  for (int64_t c = 0; c < chunks; ++c) {
    uint64_t state = mix(seed, static_cast<uint64_t>(c));
    int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t i = lo; i < hi; i += kBlock) {
      int64_t m = std::min(kBlock, hi - i);
      int64_t words = (m + 3) / 4;
      draw_lanes(state, words, lanes);
      state += static_cast<uint64_t>(words) * kGamma;
      keep_where(in + i, out + i, lanes, m, static_cast<uint16_t>(threshold));
    }
  }
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
