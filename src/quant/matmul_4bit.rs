//! The 4-bit linear layer as one autograd operation (`matmul_4bit.cpp`), as
//! bitsandbytes' `MatMul4Bit`: autograd keeps the packed weight, and the
//! backward pass dequantizes it again for the input's gradient, instead of
//! keeping every layer's dense weight from the forward pass to the backward.

use tch::{Kind, Tensor};

use super::{NestedAbsmax, QuantType, Quantized4bit};

/// What the C++ side hands back to [`dequantize_callback`] about the weight,
/// beside its tensors: opaque bytes to it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Meta {
    quant_type: u8,
    dtype: u8,
    compute: u8,
    ndim: u8,
    nested_offset: f32,
    blocksize: i64,
    nested_blocksize: i64,
    shape: [i64; 4],
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        other => unreachable!("a 4-bit weight dequantizes to a float kind, not {other:?}"),
    }
}

fn code_kind(code: u8) -> Kind {
    [Kind::Float, Kind::BFloat16, Kind::Half][code as usize]
}

impl Meta {
    fn of(q: &Quantized4bit, compute: Kind) -> Self {
        let mut shape = [0; 4];
        shape[..q.shape.len()].copy_from_slice(&q.shape);
        Self {
            quant_type: matches!(q.quant_type, QuantType::Fp4) as u8,
            dtype: kind_code(q.dtype),
            compute: kind_code(compute),
            ndim: q.shape.len() as u8,
            nested_offset: q.nested.as_ref().map_or(0.0, |n| n.offset),
            blocksize: q.blocksize,
            nested_blocksize: q.nested.as_ref().map_or(0, |n| n.blocksize),
            shape,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: a plain repr(C) value, read as its bytes for its lifetime.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}

/// The dense weight in the compute dtype, as [`super::FrozenWeight::dense`]
/// makes it for a 4-bit weight.
pub fn dense_4bit(q: &Quantized4bit, compute: Kind) -> Tensor {
    let d = q.data.device();
    // bitsandbytes rounds the f32 products to the weight's dtype, then to
    // the compute dtype; one rounding gives the same bits when either of the
    // two is the identity.
    if q.dtype == Kind::Float || q.dtype == compute {
        q.dequantize(compute, d)
    } else {
        q.dequantize(q.dtype, d).to_kind(compute)
    }
}

type DequantizeFn = unsafe extern "C" fn(
    tensors: *mut *mut std::ffi::c_void,
    count: usize,
    meta: *const u8,
    meta_len: usize,
    err: *mut *mut std::ffi::c_char,
) -> *mut std::ffi::c_void;

#[cfg(peft_rs_matmul_4bit)]
unsafe extern "C" {
    fn peft_matmul_4bit(
        x: *mut std::ffi::c_void,
        data: *mut std::ffi::c_void,
        absmax: *mut std::ffi::c_void,
        code: *mut std::ffi::c_void,
        nested_absmax: *mut std::ffi::c_void,
        nested_code: *mut std::ffi::c_void,
        meta: *const u8,
        meta_len: usize,
        dequantize: DequantizeFn,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// Called by both passes of the C++ operation: rebuilds the weight from the
/// tensors it owns now (data, absmax, code, nested absmax, nested code) and
/// returns its dense form, or null with `err` set.
unsafe extern "C" fn dequantize_callback(
    tensors: *mut *mut std::ffi::c_void,
    count: usize,
    meta: *const u8,
    meta_len: usize,
    err: *mut *mut std::ffi::c_char,
) -> *mut std::ffi::c_void {
    let result = std::panic::catch_unwind(|| {
        // SAFETY: the C++ side passes `count` owned tensor pointers (or null)
        // and the bytes of a `Meta` it got from `matmul_4bit`.
        let owned: Vec<Option<Tensor>> = (0..count)
            .map(|i| unsafe {
                let p = *tensors.add(i);
                (!p.is_null()).then(|| Tensor::from_ptr(p.cast()))
            })
            .collect();
        assert_eq!(
            meta_len,
            std::mem::size_of::<Meta>(),
            "a 4-bit weight's description"
        );
        let m: Meta = unsafe { std::ptr::read_unaligned(meta.cast::<Meta>()) };
        let mut it = owned.into_iter();
        let mut next = || it.next().flatten();
        let (data, absmax, code) = (
            next().expect("packed codes"),
            next().expect("absmax"),
            next().expect("code book"),
        );
        let nested = match (next(), next()) {
            (Some(absmax), Some(code)) => Some(NestedAbsmax {
                offset: m.nested_offset,
                absmax,
                code,
                blocksize: m.nested_blocksize,
            }),
            _ => None,
        };
        let q = Quantized4bit {
            data,
            quant_type: if m.quant_type == 1 {
                QuantType::Fp4
            } else {
                QuantType::Nf4
            },
            blocksize: m.blocksize,
            absmax,
            code,
            nested,
            shape: m.shape[..m.ndim as usize].to_vec(),
            dtype: code_kind(m.dtype),
        };
        let w = dense_4bit(&q, code_kind(m.compute));
        let p = w.as_ptr() as *mut std::ffi::c_void;
        std::mem::forget(w);
        p
    });
    match result {
        Ok(p) => p,
        Err(_) => {
            // SAFETY: `err` is the C++ caller's out-pointer; it frees with free().
            unsafe { *err = libc::strdup(c"dequantizing a 4-bit weight panicked".as_ptr()) };
            std::ptr::null_mut()
        }
    }
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_matmul_4bit);

/// `x @ dequantize(q).T` in `compute` (x already in it), as one autograd
/// operation that saves only `q`'s own tensors. `None` in a build without
/// the operation.
pub fn matmul_4bit(x: &Tensor, q: &Quantized4bit, compute: Kind) -> Option<Tensor> {
    #[cfg(peft_rs_matmul_4bit)]
    {
        let ptr = |t: &Tensor| t.as_ptr() as *mut std::ffi::c_void;
        let nested = |f: fn(&NestedAbsmax) -> &Tensor| {
            q.nested
                .as_ref()
                .map_or(std::ptr::null_mut(), |n| ptr(f(n)))
        };
        let meta = Meta::of(q, compute);
        let bytes = meta.bytes();
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: every pointer is a live at::Tensor borrowed for the call;
        // the result is a new at::Tensor* that the returned Tensor owns.
        let out = unsafe {
            peft_matmul_4bit(
                ptr(x),
                ptr(&q.data),
                ptr(&q.absmax),
                ptr(&q.code),
                nested(|n| &n.absmax),
                nested(|n| &n.code),
                bytes.as_ptr(),
                bytes.len(),
                dequantize_callback,
                &mut err,
            )
        };
        // SAFETY: `out` and `err` are what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::take_tensor(out, err, "4-bit matmul") })
    }
    #[cfg(not(peft_rs_matmul_4bit))]
    {
        let _ = (x, q, compute, dequantize_callback as DequantizeFn);
        None
    }
}
