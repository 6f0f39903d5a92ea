//! A frozen linear layer whose output is differentiated but not read
//! (`src/unread_linear.cpp`): a decoder layer recomputed under gradient
//! checkpointing is only backpropagated through, so the frozen product of
//! its last projection, whose value feeds nothing, need not be computed.
//! The operation's value is zeros; its backward pass gives the input the
//! gradient a linear layer would (`dy W`).
//!
//! The same operation replays a frozen product kept from the forward pass
//! ([`replayed_linear`]): its value is the kept product, its backward pass
//! again `dy W`, so a recomputed layer need not multiply by the weight twice.

use tch::Tensor;

#[cfg(peft_rs_unread_linear)]
unsafe extern "C" {
    fn peft_unread_linear(
        x: *mut std::ffi::c_void,
        weight: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
    fn peft_replayed_linear(
        x: *mut std::ffi::c_void,
        weight: *mut std::ffi::c_void,
        value: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_unread_linear);

/// Zeros of `x Wᵀ`'s shape whose backward pass gives `x` the gradient of
/// `x Wᵀ` (the frozen `weight`, `[out, in]`, gets none); `None` without the
/// operation, or where the weight would want a gradient.
pub fn unread_linear(x: &Tensor, weight: &Tensor) -> Option<Tensor> {
    if !AVAILABLE || weight.requires_grad() || weight.kind() != x.kind() {
        return None;
    }
    #[cfg(peft_rs_unread_linear)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: both pointers are live at::Tensors borrowed for the call;
        // the result is a new at::Tensor* that the returned Tensor owns.
        let out = unsafe { peft_unread_linear(ptr(x), ptr(weight), &mut err) };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::take_tensor(out, err, "unread linear layer") })
    }
    #[cfg(not(peft_rs_unread_linear))]
    {
        None
    }
}

/// `value`, the frozen product `x Wᵀ + b` that the forward pass kept (no
/// graph), as the output of an operation whose backward pass gives `x` the
/// gradient of `x Wᵀ`; `None` without the operation, where the weight would
/// want a gradient, or where `value` is not of the product's dtype and shape
/// (then the caller computes the product).
pub fn replayed_linear(x: &Tensor, weight: &Tensor, value: Tensor) -> Option<Tensor> {
    let mut shape = x.size();
    *shape.last_mut()? = weight.size()[0];
    if !AVAILABLE
        || weight.requires_grad()
        || weight.kind() != x.kind()
        || value.kind() != x.kind()
        || value.size() != shape
    {
        return None;
    }
    #[cfg(peft_rs_unread_linear)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the three pointers are live at::Tensors borrowed for the
        // call; the result is a new at::Tensor* that the returned Tensor owns.
        let out = unsafe { peft_replayed_linear(ptr(x), ptr(weight), ptr(&value), &mut err) };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::take_tensor(out, err, "replayed linear layer") })
    }
    #[cfg(not(peft_rs_unread_linear))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn its_value_is_zero_and_its_input_gradient_that_of_the_linear_layer() {
        if !AVAILABLE {
            return;
        }
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16] {
            let opts = (kind, Device::Cpu);
            let w = Tensor::randn([24, 16], opts);
            let x0 = Tensor::randn([2, 5, 16], opts);
            let g = Tensor::randn([2, 5, 24], opts);
            let grad = |unread: bool| {
                let x = x0.detach().set_requires_grad(true);
                let y = if unread {
                    let y = unread_linear(&x, &w).expect("the operation is built");
                    assert_eq!(y.size(), [2, 5, 24]);
                    assert_eq!(y.abs().sum(Kind::Float).double_value(&[]), 0.0);
                    y
                } else {
                    x.linear::<Tensor>(&w, None)
                };
                (y * &g).sum(Kind::Float).backward();
                x.grad()
            };
            let (ours, theirs) = (grad(true), grad(false));
            assert_eq!(ours.kind(), kind);
            let diff = (ours.to_kind(Kind::Float) - theirs.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(diff, 0.0, "{kind:?}");
        }
        let trainable = Tensor::randn([4, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        assert!(unread_linear(
            &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            &trainable
        )
        .is_none());
    }
}
