//! The one rule for what the C++ autograd operations of both crates return
//! (`dropout_a.cpp` here, `fused_norm.cpp` and `matmul_4bit.cpp` in peft-rs):
//! a new `at::Tensor*`, or null with an error message made by `strdup`.

use tch::Tensor;

/// The tensor a C++ operation returned, owned from here on; a null result
/// panics with the operation's own message, prefixed by `what`.
///
/// # Safety
/// As [`try_take_tensor`].
pub unsafe fn take_tensor(
    out: *mut std::ffi::c_void,
    err: *mut std::ffi::c_char,
    what: &str,
) -> Tensor {
    // SAFETY: the caller's contract.
    unsafe { try_take_tensor(out, err) }.unwrap_or_else(|message| panic!("{what}: {message}"))
}

/// The tensor a C++ operation returned, owned from here on, or the
/// operation's own message where it returned null.
///
/// # Safety
/// `out` is null or a new `at::Tensor*` that nothing else owns; where it is
/// null, `err` points to a NUL-terminated string allocated with `malloc`.
pub unsafe fn try_take_tensor(
    out: *mut std::ffi::c_void,
    err: *mut std::ffi::c_char,
) -> Result<Tensor, String> {
    if out.is_null() {
        // SAFETY: the caller's contract.
        return Err(unsafe { take_message(err) });
    }
    // SAFETY: the caller's contract: a new at::Tensor*, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// The message a C++ operation left in `err`, freed.
///
/// # Safety
/// `err` points to a NUL-terminated string allocated with `malloc`
/// (`strdup`), which nothing else frees.
pub unsafe fn take_message(err: *mut std::ffi::c_char) -> String {
    // SAFETY: the caller's contract.
    let message = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: allocated with malloc, freed once here.
    unsafe { libc::free(err.cast()) };
    message
}
