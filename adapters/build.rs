//! The run path of this crate's test binaries (`cargo test -p` runs them
//! without `LD_LIBRARY_PATH`, as the root crate's build.rs arranges for its
//! own), and `src/lora/dropout_a.cpp`, LoRA's dropout and first product as
//! one autograd operation (tch binds no custom autograd functions). Without
//! libtorch's headers the layers fall back to plain autograd, which keeps a
//! dropped-out copy of each input and its mask.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(peft_rs_dropout_a)");
    println!("cargo:rerun-if-changed=src/lora/dropout_a.cpp");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    let Some(include) = std::path::Path::new(&dir)
        .parent()
        .map(|t| t.join("include"))
    else {
        return;
    };
    if !include
        .join("torch/csrc/autograd/custom_function.h")
        .exists()
    {
        println!("cargo:warning=LoRA dropout without its autograd function: libtorch's headers are missing");
        return;
    }
    // Always optimised: a debug build of the tests runs it on every step.
    let built = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .opt_level(3)
        .file("src/lora/dropout_a.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .try_compile("peft_dropout_a");
    match built {
        Ok(()) => println!("cargo:rustc-cfg=peft_rs_dropout_a"),
        Err(e) => println!("cargo:warning=LoRA dropout without its autograd function: {e}"),
    }
}
