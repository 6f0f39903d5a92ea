//! libtorch's CUDA half, loaded at run time instead of linked.
//!
//! Linked, `libtorch_cuda.so` and the CUDA libraries it needs (cuBLASLt,
//! nvJitLink, cuSPARSELt, cuFFT, ...) cost every process about 240 MB even
//! on a machine without a GPU: their relocations and static initialisers (the
//! registration of every CUDA kernel) touch 120 MB of file pages and 120 MB
//! of anonymous memory before `main`. On the Llama-3.2-1B shape at 512 tokens
//! that was 7% of a training run's peak. So the binary links libtorch's CPU
//! half only, and [`ensure_loaded`] opens `libtorch_cuda.so` (from the folder
//! of the `libtorch_cpu.so` in use) with `RTLD_GLOBAL` where an NVIDIA driver
//! can be opened: its initialisers then register the CUDA kernels and hooks as
//! at link time. Everything in peft-rs that asks whether CUDA is usable goes
//! through [`crate::device::cuda_is_available`], which calls it first; a
//! program that makes CUDA tensors itself calls [`ensure_loaded`] before.
//!
//! `PEFT_RS_LOAD_CUDA=1` loads it even without a driver (the tests use it to
//! show that loading works here), `PEFT_RS_LOAD_CUDA=0` never (CPU runs on a
//! GPU machine, without the 240 MB).

use std::ffi::{CStr, CString};
use std::os::raw::c_void;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Result};

/// What became of libtorch's CUDA library in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaLibrary {
    /// Loaded from this path.
    Loaded(PathBuf),
    /// This libtorch has no `libtorch_cuda.so` (a CPU-only build).
    NotInThisLibtorch,
    /// No NVIDIA driver (`libcuda.so.1`) could be opened, so CUDA could not
    /// run anyway.
    NoDriver,
    /// `PEFT_RS_LOAD_CUDA=0`.
    SwitchedOff,
    /// Opening it failed, with the loader's message.
    Failed(String),
}

impl std::fmt::Display for CudaLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Loaded(p) => write!(f, "loaded from {}", p.display()),
            Self::NotInThisLibtorch => write!(f, "not loaded: this libtorch is a CPU-only build"),
            Self::NoDriver => write!(
                f,
                "not loaded: no NVIDIA driver (libcuda.so.1) here; PEFT_RS_LOAD_CUDA=1 loads it anyway"
            ),
            Self::SwitchedOff => write!(f, "not loaded: PEFT_RS_LOAD_CUDA=0"),
            Self::Failed(why) => write!(f, "could not be loaded: {why}"),
        }
    }
}

/// Whether to open `libtorch_cuda.so`: where this libtorch `has_library`, when
/// `PEFT_RS_LOAD_CUDA` (`asked`) says 1, or, unset, where a `driver` exists.
/// A pure function, so that a GPU machine's choice is tested on a CPU one.
pub fn decide(has_library: bool, driver: bool, asked: Option<&str>) -> Result<(), CudaLibrary> {
    match asked.map(str::trim) {
        Some("0") => return Err(CudaLibrary::SwitchedOff),
        Some("1") | None | Some("") => {}
        Some(other) => {
            return Err(CudaLibrary::Failed(format!(
                "PEFT_RS_LOAD_CUDA={other}: use 1 (load it) or 0 (never), or leave it unset"
            )))
        }
    }
    if !has_library {
        return Err(CudaLibrary::NotInThisLibtorch);
    }
    if driver || asked.map(str::trim) == Some("1") {
        Ok(())
    } else {
        Err(CudaLibrary::NoDriver)
    }
}

/// Loads libtorch's CUDA library once, where [`decide`] says so, and says
/// what became of it.
pub fn ensure_loaded() -> &'static CudaLibrary {
    static STATE: OnceLock<CudaLibrary> = OnceLock::new();
    STATE.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let Some(dir) = crate::device::libtorch_dir(&maps) else {
            return CudaLibrary::Failed(
                "libtorch_cpu.so is not among this process's mappings".into(),
            );
        };
        let path = dir.join("libtorch_cuda.so");
        let asked = std::env::var("PEFT_RS_LOAD_CUDA").ok();
        if let Err(state) = decide(path.exists(), driver_present(), asked.as_deref()) {
            return state;
        }
        match open(&path, libc::RTLD_NOW | libc::RTLD_GLOBAL) {
            Ok(_) => CudaLibrary::Loaded(path),
            Err(why) => CudaLibrary::Failed(why),
        }
    })
}

/// Whether an NVIDIA driver's library opens, as CUDA's runtime will open it.
fn driver_present() -> bool {
    open(
        Path::new("libcuda.so.1"),
        libc::RTLD_LAZY | libc::RTLD_LOCAL,
    )
    .is_ok()
}

/// `dlopen`, with the loader's message on failure. The handle is never
/// closed: the library stays for the process's life.
fn open(path: &Path, flags: i32) -> Result<*mut c_void, String> {
    let name = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; dlerror's message is copied at once.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), flags);
        if handle.is_null() {
            let e = libc::dlerror();
            return Err(if e.is_null() {
                format!("dlopen({}) failed", path.display())
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            });
        }
        Ok(handle)
    }
}

#[cfg(peft_rs_nccl)]
static NCCL_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libpeft_rs_nccl.so"));

/// Whether this binary carries c10d's NCCL backend (built where libtorch has
/// CUDA and the CUDA and NCCL headers were found).
pub fn nccl_built() -> bool {
    cfg!(peft_rs_nccl)
}

/// The address of `peft_nccl_backend` (`src/dist/nccl_backend.cpp`), whose
/// library this binary carries: loaded once, from memory, after
/// libtorch's CUDA library, which it needs.
pub fn nccl_backend() -> Result<usize> {
    static NCCL: OnceLock<Result<usize, String>> = OnceLock::new();
    let made = NCCL.get_or_init(|| {
        if !nccl_built() {
            return Err("this build of peft-rs has no NCCL (built without a CUDA libtorch or CUDA's headers; \
                        run ./scripts/setup.sh and rebuild)"
                .into());
        }
        match ensure_loaded() {
            CudaLibrary::Loaded(_) => load_nccl_library(),
            other => Err(format!("NCCL needs libtorch's CUDA library, which is {other}")),
        }
    });
    match made {
        Ok(f) => Ok(*f),
        Err(why) => bail!("{why}"),
    }
}

#[cfg(peft_rs_nccl)]
fn load_nccl_library() -> Result<usize, String> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a NUL-terminated name; the descriptor is owned by `file` below.
    let fd = unsafe { libc::memfd_create(c"peft-rs-nccl".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "memfd_create for NCCL's library: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(NCCL_LIBRARY)
        .map_err(|e| format!("writing NCCL's library into memory: {e}"))?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let handle = open(&path, libc::RTLD_NOW | libc::RTLD_LOCAL)?;
    // SAFETY: a live handle and a NUL-terminated symbol name.
    let f = unsafe { libc::dlsym(handle, c"peft_nccl_backend".as_ptr()) };
    if f.is_null() {
        return Err("NCCL's library has no peft_nccl_backend".into());
    }
    Ok(f as usize)
}

#[cfg(not(peft_rs_nccl))]
fn load_nccl_library() -> Result<usize, String> {
    Err("this build of peft-rs has no NCCL".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_loaded_where_a_driver_is_or_where_asked() {
        assert_eq!(decide(true, true, None), Ok(()));
        assert_eq!(decide(true, false, None), Err(CudaLibrary::NoDriver));
        assert_eq!(decide(true, false, Some("1")), Ok(()));
        assert_eq!(decide(true, true, Some("0")), Err(CudaLibrary::SwitchedOff));
        assert_eq!(
            decide(false, true, None),
            Err(CudaLibrary::NotInThisLibtorch)
        );
        assert_eq!(
            decide(false, true, Some("1")),
            Err(CudaLibrary::NotInThisLibtorch)
        );
        let Err(CudaLibrary::Failed(why)) = decide(true, true, Some("yes")) else {
            panic!("a bad value passed");
        };
        assert!(
            why.contains("PEFT_RS_LOAD_CUDA=yes") && why.contains("use 1"),
            "{why}"
        );
    }
}
