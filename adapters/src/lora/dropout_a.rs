//! LoRA's dropout and first product, `dropout(x) @ A.T`, as one autograd
//! operation on the CPU (`dropout_a.cpp`) that keeps neither the mask nor the
//! dropped-out input: the backward pass draws the mask again from its seed.
//! The mask is [`crate::rng::keep_mask`]'s, so the result is the one the
//! plain path (`where` with that mask, then `linear`) gives, bit for bit.

use tch::{Device, Kind, Tensor};

#[cfg(peft_rs_dropout_a)]
unsafe extern "C" {
    fn peft_lora_dropout_a(
        x: *mut std::ffi::c_void,
        a: *mut std::ffi::c_void,
        seed: u64,
        threshold: u64,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_dropout_a);

/// `dropout(x) @ a.T` with each element of `x` dropped with probability `p`
/// (kept ones unscaled: multiply by 1/(1-p) after) by the mask
/// `keep_mask(x.numel(), p, seed)`. `None` off the CPU or in a build
/// without the operation.
pub fn dropout_a(x: &Tensor, a: &Tensor, p: f64, seed: u64) -> Option<Tensor> {
    let float = matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
    if !(AVAILABLE && float && x.device() == Device::Cpu && a.kind() == x.kind()) {
        return None;
    }
    #[cfg(peft_rs_dropout_a)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let threshold = crate::rng::drop_threshold(p);
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: both pointers are live at::Tensors borrowed for the call;
        // the result is a new at::Tensor* that the returned Tensor owns.
        let out = unsafe { peft_lora_dropout_a(ptr(x), ptr(a), seed, threshold, &mut err) };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { crate::ffi::take_tensor(out, err, "LoRA dropout") })
    }
    #[cfg(not(peft_rs_dropout_a))]
    {
        let _ = (p, seed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::keep_mask;

    /// h = dropout(x) Aᵀ and the gradients of x and A, fused and by the
    /// plain path (the mask made on the host, `where`, `linear`).
    fn both(x: &Tensor, a: &Tensor, p: f64, seed: u64) -> [(Tensor, Tensor, Tensor); 2] {
        let g = Tensor::randn(
            [x.numel() as i64 / x.size().last().unwrap(), a.size()[0]],
            (Kind::Float, Device::Cpu),
        );
        let run = |fused: bool| {
            let x = x.detach().set_requires_grad(true);
            let a = a.detach().set_requires_grad(true);
            let h = if fused {
                dropout_a(&x, &a, p, seed).expect("fused")
            } else {
                let keep =
                    Tensor::from_slice(&keep_mask(x.numel(), p, seed)).view(x.size().as_slice());
                x.where_scalarother(&keep, 0.0).linear::<Tensor>(&a, None)
            };
            let flat = h.reshape([-1, a.size()[0]]).to_kind(Kind::Float);
            (&flat * &g).sum(Kind::Float).backward();
            (h.detach(), x.grad(), a.grad())
        };
        [run(true), run(false)]
    }

    #[test]
    fn fused_dropout_and_product_equal_the_plain_path_bit_for_bit() {
        let available = std::hint::black_box(AVAILABLE);
        assert!(
            available,
            "built without the fused LoRA dropout (libtorch's headers missing?)"
        );
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16] {
            // Several 2^16-element chunks and a ragged end.
            for shape in [vec![3i64, 50, 1001], vec![7, 16]] {
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)).to_kind(kind);
                let a = (Tensor::randn([4, *shape.last().unwrap()], (Kind::Float, Device::Cpu))
                    * 0.1)
                    .to_kind(kind);
                // p = 1 rounds to a threshold above every 16-bit draw.
                for (p, seed) in [(0.1, 11u64), (0.5, 12), (1.0, 13)] {
                    let [(h, gx, ga), (h_ref, gx_ref, ga_ref)] = both(&x, &a, p, seed);
                    let what = format!("{kind:?} {shape:?} p {p}");
                    assert!(h.equal(&h_ref), "{what}: product");
                    assert!(gx.equal(&gx_ref), "{what}: input gradient");
                    assert!(ga.equal(&ga_ref), "{what}: A's gradient");
                    // Teeth: the mask drops about p of the inputs' gradient.
                    let dropped = gx.eq(0.0).to_kind(Kind::Float).mean(Kind::Float);
                    let sd = (p * (1.0 - p) / x.numel() as f64).sqrt();
                    assert!(
                        (dropped.double_value(&[]) - p).abs() <= 5.0 * sd,
                        "{what}: dropped {dropped}"
                    );
                }
            }
        }
    }
}
