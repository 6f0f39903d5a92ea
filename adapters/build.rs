//! The run path of this crate's test binaries (`cargo test -p` runs them
//! without `LD_LIBRARY_PATH`, as the root crate's build.rs arranges for its
//! own), and `src/lora/dropout_a.cpp`, LoRA's dropout and first product as
//! one autograd operation (tch binds no custom autograd functions). Without
//! libtorch's headers the layers fall back to plain autograd, which keeps a
//! dropped-out copy of each input and its mask.

#[path = "../build_support/autograd_op.rs"]
mod autograd_op;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../build_support/autograd_op.rs");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:rustc-check-cfg=cfg(peft_rs_dropout_a)");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    autograd_op::build_autograd_op(
        std::path::Path::new(&dir),
        "src/lora/dropout_a.cpp",
        "dropout_a",
        "LoRA dropout",
    );
}
