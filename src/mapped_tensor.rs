//! CPU tensors over the bytes of a memory-mapped checkpoint
//! (`src/mapped_tensor.cpp`), each holding the mapping alive until
//! libtorch frees its storage: a frozen bf16 weight read in place instead
//! of copied, as transformers reads its memory-mapped safetensors. At a
//! Llama-3.1-8B shape the copy cost 16 s of a load (16 GB faulted into
//! fresh memory page by page); in place it costs nothing until the first
//! forward pass reads the pages.

use std::sync::Arc;

use memmap2::MmapMut;
use tch::{Device, Kind, Tensor};

#[cfg(peft_rs_mapped_tensor)]
unsafe extern "C" {
    fn peft_tensor_from_mapping(
        data: *mut std::ffi::c_void,
        sizes: *const i64,
        ndim: usize,
        like: *mut std::ffi::c_void,
        owner: *mut std::ffi::c_void,
        release: extern "C" fn(*mut std::ffi::c_void),
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

#[cfg(peft_rs_mapped_tensor)]
unsafe extern "C" {
    fn peft_empty_pinned(
        sizes: *const i64,
        ndim: usize,
        like: *mut std::ffi::c_void,
        err: *mut *mut std::ffi::c_char,
    ) -> *mut std::ffi::c_void;
}

/// An uninitialised `kind` host tensor of `shape` in page-locked memory
/// (the source of a DMA copy to a GPU), allocated so without the warning
/// tch's `pin_memory(device)` makes libtorch print for every tensor; `None`
/// without the operation, `Some(Err)` where libtorch cannot pin (no GPU).
pub fn empty_pinned(shape: &[i64], kind: Kind) -> Option<Result<Tensor, String>> {
    #[cfg(peft_rs_mapped_tensor)]
    {
        let like = Tensor::empty([0], (kind, Device::Cpu));
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: `shape` and `like` are live for the call; the result is a
        // new at::Tensor* or null with `err` set.
        let out = unsafe {
            peft_empty_pinned(
                shape.as_ptr(),
                shape.len(),
                like.as_ptr() as *mut std::ffi::c_void,
                &mut err,
            )
        };
        // SAFETY: what the C++ side just returned.
        Some(unsafe { peft_adapters::ffi::try_take_tensor(out, err) })
    }
    #[cfg(not(peft_rs_mapped_tensor))]
    {
        let _ = (shape, kind);
        None
    }
}

/// Whether this build has the operation (libtorch's headers were found).
pub const AVAILABLE: bool = cfg!(peft_rs_mapped_tensor);

/// Drops the mapping's reference a tensor's storage held.
#[cfg(peft_rs_mapped_tensor)]
extern "C" fn release(owner: *mut std::ffi::c_void) {
    // SAFETY: `owner` is the Box<Arc<MmapMut>> leaked in `tensor_in`, and
    // libtorch calls the deleter once.
    drop(unsafe { Box::from_raw(owner.cast::<Arc<MmapMut>>()) });
}

/// The `kind` tensor of `shape` whose bytes start at `mmap[from]`, in
/// place; `None` without the operation or where the bytes are not aligned
/// to the element size. The caller checks that the bytes lie in the mapping.
pub fn tensor_in(mmap: &Arc<MmapMut>, from: usize, shape: &[i64], kind: Kind) -> Option<Tensor> {
    let numel: i64 = shape.iter().product();
    let len = numel as usize * kind.elt_size_in_bytes();
    let data = mmap.get(from..from + len)?.as_ptr();
    if !AVAILABLE || !(data as usize).is_multiple_of(kind.elt_size_in_bytes()) || len == 0 {
        return None;
    }
    #[cfg(peft_rs_mapped_tensor)]
    {
        let like = Tensor::empty([0], (kind, Device::Cpu));
        let owner = Box::into_raw(Box::new(Arc::clone(mmap))).cast::<std::ffi::c_void>();
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: `data..data + len` lies in the mapping, which `owner` keeps
        // alive until libtorch calls `release`; the mapping is private and
        // writable, so writes through the tensor are allowed. `like` is a
        // live at::Tensor borrowed for the call.
        let out = unsafe {
            peft_tensor_from_mapping(
                data.cast_mut().cast(),
                shape.as_ptr(),
                shape.len(),
                like.as_ptr() as *mut std::ffi::c_void,
                owner,
                release,
                &mut err,
            )
        };
        // SAFETY: `out` and `err` are what the C++ side just returned. On an
        // error the owner may or may not have been handed to libtorch: it is
        // left alone (the mapping then stays until exit).
        match unsafe { peft_adapters::ffi::try_take_tensor(out, err) } {
            Ok(t) => Some(t),
            Err(message) => {
                eprintln!("note: a weight is copied out of its file: {message}");
                None
            }
        }
    }
    #[cfg(not(peft_rs_mapped_tensor))]
    {
        let _ = (data, Device::Cpu);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page-locked where libtorch can use a GPU; elsewhere (this CPU
    /// machine) an error naming why, never a panic or an ordinary tensor.
    #[test]
    fn empty_pinned_is_page_locked_where_a_gpu_is_usable_and_an_error_elsewhere() {
        let Some(result) = empty_pinned(&[2, 3], Kind::BFloat16) else {
            assert!(!std::hint::black_box(AVAILABLE));
            return;
        };
        match (crate::device::cuda_is_available(), result) {
            (true, Ok(t)) => {
                assert_eq!((t.size(), t.kind()), (vec![2, 3], Kind::BFloat16));
                assert_eq!(t.device(), Device::Cpu);
                assert!(t.is_pinned(Device::Cuda(0)), "not page-locked");
            }
            (false, Err(message)) => assert!(!message.is_empty()),
            (gpu, result) => panic!(
                "GPU usable: {gpu}, but empty_pinned gave {:?}",
                result.map(|t| t.size())
            ),
        }
    }
}
