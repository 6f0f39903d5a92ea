//! Shared by the build scripts of peft-rs and peft-adapters (`#[path]`
//! modules): compiling a C++ custom autograd operation against libtorch.

/// Compiles `file`, a custom autograd operation against libtorch's headers
/// (`lib_dir` is libtorch's `lib` folder), into `libpeft_NAME.a` and sets
/// `cfg(peft_rs_NAME)` when it builds; `what` names the layers that fall
/// back to plain autograd otherwise. Always optimised: a debug build of the
/// tests runs it too, on every step.
///
/// `at::parallel_for` is a header template whose threads come from an
/// `omp parallel` pragma: compiled without OpenMP it runs on one thread
/// while libtorch's other threads spin. So where libtorch ships its OpenMP
/// runtime (`libgomp.so.1`, as the torch wheels do) the operation is built
/// with `-fopenmp` and linked to that same runtime, one thread pool for both.
pub fn build_autograd_op(lib_dir: &std::path::Path, file: &str, name: &str, what: &str) {
    println!("cargo:rustc-check-cfg=cfg(peft_rs_{name})");
    println!("cargo:rerun-if-changed={file}");
    let Some(include) = lib_dir.parent().map(|t| t.join("include")) else {
        return;
    };
    if !include
        .join("torch/csrc/autograd/custom_function.h")
        .exists()
    {
        println!(
            "cargo:warning={what} without their autograd function: libtorch's headers are missing"
        );
        return;
    }
    let openmp = lib_dir.join("libgomp.so.1").exists();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(3)
        .file(file)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    if openmp {
        build.flag("-fopenmp");
    }
    let built = build.try_compile(&format!("peft_{name}"));
    match built {
        Ok(()) => {
            println!("cargo:rustc-cfg=peft_rs_{name}");
            // Once per build script: rustc refuses the same library twice
            // with a modifier.
            static LINK_OPENMP: std::sync::Once = std::sync::Once::new();
            if openmp {
                LINK_OPENMP.call_once(|| {
                    println!("cargo:rustc-link-search=native={}", lib_dir.display());
                    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
                });
            }
        }
        Err(e) => println!("cargo:warning={what} without their autograd function: {e}"),
    }
}
