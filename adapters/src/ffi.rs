//! The one rule for what the C++ autograd operations of both crates return
//! (`dropout_a.cpp` here, `fused_norm.cpp` and `matmul_4bit.cpp` in peft-rs):
//! a new `at::Tensor*`, or null with an error message made by `strdup`.

use tch::Tensor;

/// The tensor a C++ operation returned, owned from here on; a null result
/// panics with the operation's own message, prefixed by `what`.
///
/// # Safety
/// `out` is null or a new `at::Tensor*` that nothing else owns; where it is
/// null, `err` points to a NUL-terminated string allocated with `malloc`.
pub unsafe fn take_tensor(
    out: *mut std::ffi::c_void,
    err: *mut std::ffi::c_char,
    what: &str,
) -> Tensor {
    if out.is_null() {
        // SAFETY: the caller's contract: set by the C++ side with strdup.
        let message = unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { libc::free(err.cast()) };
        panic!("{what}: {message}");
    }
    // SAFETY: the caller's contract: a new at::Tensor*, owned from here on.
    unsafe { Tensor::from_ptr(out.cast()) }
}
