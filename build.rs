//! Link-time settings for the `peft-rs` binaries, tests and examples.
//!
//! * libtorch's CUDA half is not linked: `libtorch_cuda.so` and the CUDA
//!   libraries it needs cost a process ~240 MB even where no GPU exists, so
//!   peft-rs loads them at run time where a driver is found
//!   (`src/cuda_library.rs`), and c10d's NCCL backend, which needs them, is a
//!   small shared library of its own, built here and carried inside the
//!   binary ([`build_nccl_backend`]);
//! * the binary should find libtorch without the user setting
//!   `LD_LIBRARY_PATH`, so we record the folder as a run path. The run path is
//!   emitted as RUNPATH, so `LD_LIBRARY_PATH` still wins where it is set (as on
//!   a machine whose libtorch lives elsewhere).
use std::path::PathBuf;

#[path = "build_support/autograd_op.rs"]
mod autograd_op;
use autograd_op::build_autograd_op;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_support/autograd_op.rs");
    // Set by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib_dir = PathBuf::from(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    build_c10d_shim(&lib_dir);
    build_matmul_4bit(&lib_dir);
    build_fused_norm(&lib_dir);
    build_unread_linear(&lib_dir);
    build_flash_attention(&lib_dir);
    build_mapped_tensor(&lib_dir);
    build_optim_ops(&lib_dir);
}

/// Compiles `src/quant/matmul_4bit.cpp`, the 4-bit linear layer as one
/// autograd operation (tch binds no custom autograd functions). It needs only
/// libtorch's own headers; without them the layers fall back to plain
/// autograd, which keeps each dequantized weight until the backward pass.
fn build_matmul_4bit(lib_dir: &std::path::Path) {
    build_autograd_op(
        lib_dir,
        "src/quant/matmul_4bit.cpp",
        "matmul_4bit",
        "4-bit layers",
    );
}

/// Compiles `src/fused_norm.cpp`, the RMS norm as one fused autograd
/// operation; without libtorch's headers the norm runs as ATen ops.
fn build_fused_norm(lib_dir: &std::path::Path) {
    build_autograd_op(lib_dir, "src/fused_norm.cpp", "fused_norm", "RMS norms");
}

/// Compiles `src/flash_attention.cpp`, attention whose backward pass
/// runs in fp32 on the CPU; without libtorch's headers attention is
/// differentiated in the inputs' dtype.
fn build_flash_attention(lib_dir: &std::path::Path) {
    build_autograd_op(
        lib_dir,
        "src/flash_attention.cpp",
        "flash_attention",
        "attention layers",
    );
}

/// Compiles `src/unread_linear.cpp`, a frozen linear layer that only
/// differentiates (a recomputed layer's last projection); without
/// libtorch's headers that projection is computed as any other.
fn build_unread_linear(lib_dir: &std::path::Path) {
    build_autograd_op(
        lib_dir,
        "src/unread_linear.cpp",
        "unread_linear",
        "recomputed layers",
    );
}

/// Compiles `src/mapped_tensor.cpp`, tensors over a memory-mapped
/// checkpoint that keep the mapping alive; without libtorch's headers the
/// weights are copied out of the mapping.
fn build_mapped_tensor(lib_dir: &std::path::Path) {
    build_autograd_op(
        lib_dir,
        "src/mapped_tensor.cpp",
        "mapped_tensor",
        "weights read in place",
    );
}

/// Compiles `src/dist/c10d_shim.cpp` against the torch wheel's headers (c10d
/// ships inside libtorch, but tch binds none of it). The wheel lacks Gloo's
/// headers, which `scripts/setup.sh` unpacks into the cache ([`gloo_include`]);
/// NCCL is added when the wheel's CUDA and NCCL headers are present. Without
/// Gloo's headers the build stops on Linux, unless `PEFT_RS_WITHOUT_C10D` asks
/// for a binary without multi-process training.
fn build_c10d_shim(lib_dir: &std::path::Path) {
    println!("cargo:rustc-check-cfg=cfg(peft_rs_c10d)");
    println!("cargo:rerun-if-changed=src/dist/c10d_shim.cpp");
    for var in [
        "PEFT_RS_GLOO_INCLUDE",
        "PEFT_RS_CACHE",
        "PEFT_RS_WITHOUT_C10D",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Some(torch) = lib_dir.parent() else {
        return;
    };
    let include = torch.join("include");
    let gloo = gloo_include();
    if std::env::var_os("PEFT_RS_WITHOUT_C10D").is_some() {
        println!("cargo:warning=building without c10d (multi-process training): PEFT_RS_WITHOUT_C10D is set");
        return;
    }
    if !gloo.join("gloo/context.h").exists() {
        let why = format!(
            "Gloo's headers are not in {} (c10d, multi-process training, compiles against them); run ./scripts/setup.sh, or set PEFT_RS_GLOO_INCLUDE to a folder holding gloo/context.h, or set PEFT_RS_WITHOUT_C10D=1 to build without multi-process training",
            gloo.display()
        );
        // Where c10d should build (Linux), a binary quietly without it is a
        // surprise found only at `--nproc 2`: stop the build instead.
        if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
            panic!("{why}");
        }
        println!("cargo:warning=building without c10d: {why}");
        return;
    }
    println!(
        "cargo:rerun-if-changed={}",
        gloo.join("gloo/context.h").display()
    );
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/dist/c10d_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .define("USE_C10D_GLOO", None)
        // The ABI torch's wheels are built with (torch._C._GLIBCXX_USE_CXX11_ABI).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    build.compile("peft_c10d_shim");
    println!("cargo:rustc-cfg=peft_rs_c10d");
    build_nccl_backend(&build, lib_dir, torch);
}

/// Builds `src/dist/nccl_backend.cpp` into `$OUT_DIR/libpeft_rs_nccl.so`,
/// linked to libtorch_cuda, and sets `cfg(peft_rs_nccl)`; the binary carries
/// it (`include_bytes!`) and loads it from memory when a run asks for NCCL.
/// Needs a CUDA libtorch and the headers of NCCL (the wheel's) and of CUDA's
/// runtime, CCCL's `<nv/target>` and crt (two small packages that
/// `scripts/setup.sh` adds; `PEFT_RS_CUDA_INCLUDE` names a CUDA toolkit's
/// include folder instead).
fn build_nccl_backend(build: &cc::Build, lib_dir: &std::path::Path, torch: &std::path::Path) {
    println!("cargo:rustc-check-cfg=cfg(peft_rs_nccl)");
    println!("cargo:rerun-if-changed=src/dist/nccl_backend.cpp");
    println!("cargo:rerun-if-env-changed=PEFT_RS_CUDA_INCLUDE");
    let complete = |d: &PathBuf| {
        d.join("nv/target").exists()
            && d.join("crt/host_config.h").exists()
            && d.join("cuda_runtime_api.h").exists()
    };
    let cuda = std::env::var_os("PEFT_RS_CUDA_INCLUDE")
        .map(PathBuf::from)
        .or_else(|| wheel_cuda_include(torch))
        .filter(complete);
    let nccl = torch
        .parent()
        .map(|p| p.join("nvidia/nccl/include"))
        .filter(|d| d.join("nccl.h").exists());
    let (Some(cuda), Some(nccl), true) = (cuda, nccl, lib_dir.join("libtorch_cuda.so").exists())
    else {
        return;
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let library = out.join("libpeft_rs_nccl.so");
    let mut cmd = build.get_compiler().to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-DUSE_C10D_NCCL", "-DUSE_CUDA"])
        .arg("-I")
        .arg(&cuda)
        .arg("-I")
        .arg(&nccl)
        .arg("src/dist/nccl_backend.cpp")
        .arg("-o")
        .arg(&library)
        .arg(format!("-L{}", lib_dir.display()))
        .args(["-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10"])
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    match cmd.output() {
        Ok(o) if o.status.success() => println!("cargo:rustc-cfg=peft_rs_nccl"),
        Ok(o) => println!(
            "cargo:warning=c10d without NCCL: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("the NCCL backend did not compile")
        ),
        Err(e) => println!("cargo:warning=c10d without NCCL: {e}"),
    }
}

/// Where Gloo's headers are: `PEFT_RS_GLOO_INCLUDE`, else where
/// `scripts/setup.sh` puts them (`$PEFT_RS_CACHE`, default `~/.cache/peft-rs`,
/// then `gloo-headers/include`), so that a plain `cargo build` or `cargo
/// install --path .` finds them as the scripts do.
fn gloo_include() -> PathBuf {
    if let Some(g) = std::env::var_os("PEFT_RS_GLOO_INCLUDE") {
        return PathBuf::from(g);
    }
    let cache = std::env::var_os("PEFT_RS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/peft-rs")
        });
    cache.join("gloo-headers/include")
}

/// The CUDA include folder of the wheel's `nvidia-cuda-runtime` package
/// (`site-packages/nvidia/cu13/include` for CUDA 13), if there is one.
fn wheel_cuda_include(torch: &std::path::Path) -> Option<PathBuf> {
    let nvidia = torch.parent()?.join("nvidia");
    std::fs::read_dir(nvidia)
        .ok()?
        .flatten()
        .map(|e| e.path().join("include"))
        .find(|d| d.join("cuda_runtime_api.h").exists())
}

/// Compiles `src/train/optim_ops.cpp`, AdamW's update as ATen's fused
/// kernel and the clearing of gradients (tch binds no operation on tensor
/// lists); without libtorch's headers the update runs as ATen operations
/// per tensor and gradients are zeroed.
fn build_optim_ops(lib_dir: &std::path::Path) {
    build_autograd_op(
        lib_dir,
        "src/train/optim_ops.cpp",
        "optim_ops",
        "AdamW updates",
    );
}
