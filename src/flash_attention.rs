//! Attention without a mask on the CPU whose backward pass runs in fp32
//! (`src/flash_attention.cpp`): libtorch's flash kernel forward in the
//! inputs' dtype (the bits `scaled_dot_product_attention` gives, and so
//! transformers' SDPA), its backward kernel on fp32 copies of what it reads.
//!
//! On short sequences libtorch's bf16 backward kernel is the slow one:
//! measured on a 2-core AVX512-BF16 EPYC (libtorch 2.11, 2 threads), the
//! fp32 backward (casts included) against the bf16 one took 0.43–0.67× the
//! time at 64 keys, 0.45–0.93× at 128, 0.86–0.98× at 192, 0.91–1.06× at 256
//! and 1.1–1.5× at 512 and more (heads of 64 and 128). fp16's backward is
//! emulated on CPUs without fp16 arithmetic: fp32 took 0.10–0.24× its time
//! at every length from 64 to 1024 keys. The fp32 gradients are also the
//! more accurate ones: the bf16 kernel rounds the probabilities to bf16
//! before they meet the output's gradient.

use tch::{Device, Kind, Tensor};

#[cfg(peft_rs_flash_attention)]
unsafe extern "C" {
    fn peft_flash_attention_fp32_backward(
        q: *mut std::ffi::c_void,
        k: *mut std::ffi::c_void,
        v: *mut std::ffi::c_void,
        is_causal: std::ffi::c_int,
        scale: f64,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_flash_attention);

/// The most keys at which a bf16 backward pass runs in fp32: up to here it
/// was faster in every measured shape (see the module's note).
pub const BF16_MAX_KEYS: i64 = 192;

/// Whether attention over `keys` keys of dtype `kind` on `device` is
/// differentiated in fp32: on the CPU, fp16 always, bf16 up to
/// [`BF16_MAX_KEYS`] keys. A pure function of its inputs, so that a test
/// can ask it about any device.
pub fn fp32_backward_pays(kind: Kind, device: Device, keys: i64) -> bool {
    device == Device::Cpu
        && match kind {
            Kind::Half => true,
            Kind::BFloat16 => keys <= BF16_MAX_KEYS,
            _ => false,
        }
}

/// Attention of `q` `[b, h, t, d]` over `k`, `v` `[b, h_kv, s, d]` (`h` a
/// multiple of `h_kv`), causal or not, with no mask: the forward pass of
/// `scaled_dot_product_attention`, the backward pass in fp32. `None` where
/// [`fp32_backward_pays`] says no, where nothing needs a gradient, or
/// without the operation.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    is_causal: bool,
    scale: f64,
) -> Option<Tensor> {
    let wants_grad = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let same_kind = k.kind() == q.kind() && v.kind() == q.kind();
    if !AVAILABLE
        || !wants_grad
        || !same_kind
        || !fp32_backward_pays(q.kind(), q.device(), k.size()[2])
    {
        return None;
    }
    #[cfg(peft_rs_flash_attention)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the three pointers are live at::Tensors borrowed for the
        // call; the result is a new at::Tensor* that the returned Tensor owns.
        let out = unsafe {
            peft_flash_attention_fp32_backward(
                ptr(q),
                ptr(k),
                ptr(v),
                is_causal.into(),
                scale,
                &mut err,
            )
        };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::take_tensor(out, err, "flash attention") })
    }
    #[cfg(not(peft_rs_flash_attention))]
    {
        let _ = (is_causal, scale);
        None
    }
}

/// libtorch's `scaled_dot_product_attention` with no mask, grouped heads
/// as they are (`h` a multiple of `h_kv`).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, is_causal: bool, scale: f64) -> Tensor {
    let grouped = k.size()[1] != q.size()[1];
    Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        None::<&Tensor>,
        0.0,
        is_causal,
        Some(scale),
        grouped,
    )
}

/// Attention with no mask as the models run it: [`attention`] where it
/// applies, [`sdpa`] elsewhere.
pub fn unmasked(q: &Tensor, k: &Tensor, v: &Tensor, is_causal: bool, scale: f64) -> Tensor {
    attention(q, k, v, is_causal, scale).unwrap_or_else(|| sdpa(q, k, v, is_causal, scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp32_backward_on_the_cpu_for_fp16_and_short_bf16_only() {
        let gpu = Device::Cuda(0);
        assert!(fp32_backward_pays(Kind::BFloat16, Device::Cpu, 1));
        assert!(fp32_backward_pays(
            Kind::BFloat16,
            Device::Cpu,
            BF16_MAX_KEYS
        ));
        assert!(!fp32_backward_pays(
            Kind::BFloat16,
            Device::Cpu,
            BF16_MAX_KEYS + 1
        ));
        assert!(fp32_backward_pays(Kind::Half, Device::Cpu, 4096));
        assert!(!fp32_backward_pays(Kind::Float, Device::Cpu, 64));
        assert!(!fp32_backward_pays(Kind::BFloat16, gpu, 64));
        assert!(!fp32_backward_pays(Kind::Half, gpu, 64));
    }

    /// Output and gradients of q, k, v (fp64) for `y · g` summed.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        qkv: [&Tensor; 3],
        g: &Tensor,
    ) -> (Tensor, [Tensor; 3]) {
        let [q, k, v] = qkv.map(|t| t.detach().set_requires_grad(true));
        let y = f(&q, &k, &v);
        (&y.to_kind(Kind::Double) * g).sum(Kind::Double).backward();
        (
            y.detach(),
            [q, k, v].map(|t| t.grad().to_kind(Kind::Double)),
        )
    }

    /// |a - b| / |b| in the Frobenius norm: the error of the whole
    /// gradient, where a maximum would only see one element's rounding.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_kind(Kind::Double);
        (&a - b).norm().double_value(&[]) / b.norm().double_value(&[])
    }

    #[test]
    fn forward_is_sdpas_bit_for_bit_and_gradients_closer_to_fp64_than_sdpas() {
        let available = std::hint::black_box(AVAILABLE);
        assert!(
            available,
            "built without the attention operation (libtorch's headers missing?)"
        );
        tch::manual_seed(11);
        let scale = 0.125;
        // (dtype, query heads, key heads, queries, keys, causal)
        let cases = [
            (Kind::BFloat16, 6, 2, 40, 40, true),
            (Kind::BFloat16, 4, 4, 33, 33, true),
            (Kind::BFloat16, 4, 2, 7, 19, false),
            (Kind::Half, 6, 3, 24, 24, true),
        ];
        for (kind, h, h_kv, t, s, causal) in cases {
            let opts = (kind, Device::Cpu);
            // [b, t, h, d] transposed, as the model's heads are.
            let q = Tensor::randn([2, t, h, 16], opts).transpose(1, 2);
            let k = Tensor::randn([2, s, h_kv, 16], opts).transpose(1, 2);
            let v = Tensor::randn([2, s, h_kv, 16], opts).transpose(1, 2);
            let g = Tensor::randn([2, h, t, 16], (Kind::Double, Device::Cpu));
            let theirs = |q: &Tensor, k: &Tensor, v: &Tensor| sdpa(q, k, v, causal, scale);
            let ours = |q: &Tensor, k: &Tensor, v: &Tensor| {
                attention(q, k, v, causal, scale).expect("the operation applies")
            };
            let (y_ours, g_ours) = run(ours, [&q, &k, &v], &g);
            let (y_sdpa, g_sdpa) = run(theirs, [&q, &k, &v], &g);
            let wide = [&q, &k, &v].map(|t| t.to_kind(Kind::Double));
            let (y64, g64) = run(theirs, [&wide[0], &wide[1], &wide[2]], &g);
            let case = format!("{kind:?} {h}/{h_kv} heads, {t}x{s}, causal {causal}");
            let ulp = if kind == Kind::Half {
                2f64.powi(-11)
            } else {
                2f64.powi(-8)
            };
            assert_eq!(y_ours.kind(), kind, "{case}");
            assert!(y_ours.equal(&y_sdpa), "{case}: forward differs from SDPA");
            assert!(rel(&y_ours, &y64) < ulp, "{case}: forward far from fp64");
            for (name, (ours, (sdpa, exact))) in ["q", "k", "v"]
                .iter()
                .zip(g_ours.iter().zip(g_sdpa.iter().zip(&g64)))
            {
                let (e_ours, e_sdpa) = (rel(ours, exact), rel(sdpa, exact));
                // Rounded once, to the input's dtype: within an ulp of it.
                assert!(e_ours < ulp, "{case}: grad {name} off by {e_ours}");
                assert!(
                    e_ours < e_sdpa,
                    "{case}: grad {name} {e_ours} against SDPA's {e_sdpa}"
                );
            }
        }
    }

    #[test]
    fn fp32_and_long_bf16_inputs_and_inference_take_sdpa() {
        let q = Tensor::randn([1, 2, 8, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(attention(&q, &q, &q, true, 0.25).is_none());
        let long = Tensor::randn([1, 2, BF16_MAX_KEYS + 1, 16], (Kind::BFloat16, Device::Cpu))
            .set_requires_grad(true);
        assert!(attention(&long, &long, &long, true, 0.25).is_none());
        let frozen = Tensor::randn([1, 2, 8, 16], (Kind::BFloat16, Device::Cpu));
        assert!(attention(&frozen, &frozen, &frozen, true, 0.25).is_none());
    }
}
