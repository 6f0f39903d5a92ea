//! Link-time settings for the `peft-rs` binaries, tests and examples.
//!
//! Two things tch does not do for us:
//! * the linker drops `libtorch_cuda.so` because no symbol of it is referenced
//!   directly (`--as-needed`), after which CUDA is silently unavailable at run
//!   time even on a GPU machine; `--no-as-needed` keeps it;
//! * the binary should find libtorch without the user setting
//!   `LD_LIBRARY_PATH`, so we record the folder as a run path. The run path is
//!   emitted as RUNPATH, so `LD_LIBRARY_PATH` still wins where it is set (as on
//!   a machine whose libtorch lives elsewhere).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Set by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib_dir = PathBuf::from(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
