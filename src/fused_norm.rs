//! transformers' RMS norm on the CPU as one autograd operation
//! (`src/fused_norm.cpp`): one pass each way, and only the input and one
//! fp32 number per row kept for the backward pass, where ATen ops keep an
//! fp32 copy of the input and pass over memory about ten times. The weight
//! is frozen (LoRA never trains it); a trainable one takes the ATen path.

use tch::{Device, Kind, Tensor};

#[cfg(peft_rs_fused_norm)]
unsafe extern "C" {
    fn peft_rms_norm(
        x: *mut std::ffi::c_void,
        weight: *mut std::ffi::c_void,
        eps: f64,
        scale_in_fp32: std::ffi::c_int,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_fused_norm);

/// Whether the fused operation computes this norm: on the CPU, a float
/// input, a frozen weight of the input's dtype (or fp32, applied in fp32).
pub fn applies(x: &Tensor, weight: &Tensor, scale_in_fp32: bool) -> bool {
    let float = matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
    let weight_fits = weight.kind() == x.kind() || (scale_in_fp32 && weight.kind() == Kind::Float);
    AVAILABLE
        && float
        && weight_fits
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && x.dim() >= 1
        && weight.dim() == 1
        && !weight.requires_grad()
}

/// The RMS norm of `x` over its last dimension, transformers' arithmetic
/// (see [`crate::nn::RmsNorm`]); `None` where [`applies`] says no.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, scale_in_fp32: bool) -> Option<Tensor> {
    if !applies(x, weight, scale_in_fp32) {
        return None;
    }
    #[cfg(peft_rs_fused_norm)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: both pointers are live at::Tensors borrowed for the call;
        // the result is a new at::Tensor* that the returned Tensor owns.
        let out =
            unsafe { peft_rms_norm(ptr(x), ptr(weight), eps, scale_in_fp32.into(), &mut err) };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::take_tensor(out, err, "RMS norm") })
    }
    #[cfg(not(peft_rs_fused_norm))]
    {
        let _ = eps;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::RmsNorm;

    /// Forward and input gradient of `norm` on `x`, fused and as ATen ops.
    fn both(norm: &RmsNorm, x: &Tensor, g: &Tensor) -> [(Tensor, Tensor); 2] {
        let run = |fused: bool| {
            let x = x.detach().set_requires_grad(true);
            let y = if fused {
                rms_norm(&x, &norm.weight, norm.eps, norm.scale_in_fp32).expect("fused")
            } else {
                norm.forward_aten(&x)
            };
            (&y.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
            (y.detach(), x.grad())
        };
        [run(true), run(false)]
    }

    /// max |a - b| / max |b|.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    #[test]
    fn the_fused_norm_is_transformers_norm_in_every_dtype_and_shape() {
        let available = std::hint::black_box(AVAILABLE);
        assert!(
            available,
            "built without the fused norm (libtorch's headers missing?)"
        );
        tch::manual_seed(7);
        // (input dtype, weight dtype, Gemma's order, forward tolerance: an
        // ulp of the dtype, gradient tolerance)
        let cases = [
            (Kind::Float, Kind::Float, false, 1e-6, 1e-5),
            (
                Kind::BFloat16,
                Kind::BFloat16,
                false,
                1.0 / 128.0,
                1.0 / 64.0,
            ),
            (Kind::BFloat16, Kind::Float, true, 1.0 / 128.0, 1.0 / 64.0),
            (Kind::Half, Kind::Half, false, 1.0 / 1024.0, 1.0 / 512.0),
            (Kind::Float, Kind::Float, true, 1e-6, 1e-5),
        ];
        for (kind, wkind, gemma, fwd_tol, grad_tol) in cases {
            for shape in [vec![3i64, 5, 64], vec![2, 4, 7, 16], vec![1, 1, 2051]] {
                let n = *shape.last().unwrap();
                let norm = RmsNorm {
                    weight: (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.5 + 1.0)
                        .to_kind(wkind),
                    eps: 1e-6,
                    scale_in_fp32: gemma,
                };
                let x = (Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)) * 3.0)
                    .to_kind(kind);
                let g = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
                let [(y, gx), (y_ref, gx_ref)] = both(&norm, &x, &g);
                let what = format!("{kind:?} weight {wkind:?} gemma {gemma} {shape:?}");
                assert_eq!(y.kind(), y_ref.kind(), "{what}");
                assert_eq!(gx.kind(), gx_ref.kind(), "{what}");
                // Only the mean's order of additions differs, which a 16-bit
                // output almost never shows (fp32 ones do, by an ulp).
                let same = y.eq_tensor(&y_ref).to_kind(Kind::Float).mean(Kind::Float);
                assert!(
                    kind == Kind::Float || same.double_value(&[]) > 0.99,
                    "{what}: only {same} of outputs equal; first: {} vs {}",
                    y.masked_select(&y.ne_tensor(&y_ref)).narrow(0, 0, 4),
                    y_ref.masked_select(&y.ne_tensor(&y_ref)).narrow(0, 0, 4)
                );
                assert!(
                    rel(&y, &y_ref) <= fwd_tol,
                    "{what}: forward {}",
                    rel(&y, &y_ref)
                );
                assert!(
                    rel(&gx, &gx_ref) <= grad_tol,
                    "{what}: gradient {}",
                    rel(&gx, &gx_ref)
                );
            }
        }
    }

    #[test]
    fn a_strided_input_and_a_trainable_weight_are_handled() {
        let norm = RmsNorm {
            weight: Tensor::ones([8], (Kind::Float, Device::Cpu)),
            eps: 1e-5,
            scale_in_fp32: false,
        };
        let x = Tensor::randn([8, 6], (Kind::Float, Device::Cpu)).tr();
        let g = Tensor::ones([6, 8], (Kind::Float, Device::Cpu));
        let [(y, gx), (y_ref, gx_ref)] = both(&norm, &x, &g);
        assert!(rel(&y, &y_ref) < 1e-6 && rel(&gx, &gx_ref) < 1e-5);
        let trainable = norm.weight.detach().set_requires_grad(true);
        assert!(
            !applies(&x, &trainable, false),
            "a trainable weight needs ATen's gradient"
        );
        assert!(
            !applies(&x.to_kind(Kind::BFloat16), &norm.weight, false),
            "Llama's weight in another dtype"
        );
        assert!(applies(&x.to_kind(Kind::BFloat16), &norm.weight, true));
    }
}
