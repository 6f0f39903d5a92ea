//! `peft-rs env`.

use anyhow::Result;

/// `peft-rs env`: the libtorch build, the devices it sees and whether
/// CUDA is usable, proved by running kernels on each GPU.
pub fn run() -> Result<()> {
    println!("peft-rs {}", env!("CARGO_PKG_VERSION"));
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let (version, lib_dir) = crate::device::libtorch_version(&maps);
    println!("libtorch: {version} (tch 0.24), from {lib_dir}");
    let cuda = crate::device::cuda_is_available();
    println!("libtorch_cuda: {}", crate::cuda_library::ensure_loaded());
    let smi = crate::device::NvidiaSmi::query();
    match &smi {
        Some(smi) => {
            println!("nvidia driver: {}", smi.driver);
            for (i, (name, cap)) in smi.gpus.iter().enumerate() {
                println!("gpu {i}: {name}, compute capability {cap}");
            }
        }
        None => println!("nvidia driver: none found (no nvidia-smi)"),
    }
    println!("cuda usable: {cuda}");
    if !cuda
        && matches!(
            crate::cuda_library::ensure_loaded(),
            crate::cuda_library::CudaLibrary::Loaded(_)
        )
    {
        // What CUDA's runtime says when asked for memory: the driver's own
        // reason, now that libtorch's CUDA kernels are registered.
        if let Err(e) = tch::Tensor::f_zeros([1], (tch::Kind::Float, tch::Device::Cuda(0))) {
            println!("cuda:0: {}", first_line(&e.to_string()));
        }
    }
    if let Some(why) = crate::device::cpu_fallback_reason(smi.as_ref()) {
        println!("{why}");
    }
    if cuda {
        println!(
            "cuda devices: {} (cudnn {})",
            tch::Cuda::device_count(),
            if tch::Cuda::cudnn_is_available() {
                "available"
            } else {
                "not available"
            }
        );
        // Kernels for this GPU exist in this build only if they run: try them.
        for i in 0..tch::Cuda::device_count() as usize {
            match crate::device::prove_device(tch::Device::Cuda(i)) {
                Ok(()) => println!(
                    "cuda:{i}: bf16 matmul and attention ran (this libtorch has kernels for it)"
                ),
                Err(e) => println!(
                    "cuda:{i}: FAILED a bf16 matmul/attention: {}",
                    first_line(&e.to_string())
                ),
            }
        }
    }
    let mut devices = vec!["cpu".to_owned()];
    if cuda {
        devices.extend((0..tch::Cuda::device_count()).map(|i| format!("cuda:{i}")));
    }
    println!("devices: {}", devices.join(", "));
    println!("cpu threads: {}", tch::get_num_threads());
    let (c10d, nccl) = crate::dist::capabilities();
    let groups = match (c10d, nccl) {
        (false, _) => "not built (Gloo's headers were missing: run ./scripts/setup.sh and rebuild)".to_owned(),
        (true, false) => "gloo (NCCL not built: it needs a CUDA libtorch and CUDA's CCCL and crt headers; run ./scripts/setup.sh, or set PEFT_RS_CUDA_INCLUDE to a CUDA toolkit's include folder, and rebuild)".to_owned(),
        // NCCL's library is loaded here as a run would load it.
        (true, true) => match crate::cuda_library::nccl_backend() {
            Ok(_) => "gloo, nccl".to_owned(),
            Err(e) => format!("gloo; nccl built, not usable in this process: {e}"),
        },
    };
    println!("multi-process training (c10d): {groups}");
    let auto = crate::device::place(
        crate::device::DeviceArg::Auto,
        None,
        crate::device::visible_gpus(),
    )?;
    println!(
        "--device auto picks: {}",
        crate::device::Placement {
            device: auto,
            kind: crate::device::DtypeArg::Auto.resolve(auto)
        }
        .describe_choice(crate::device::DtypeArg::Auto)
    );
    report_cpu_matmul();
    Ok(())
}

/// The CPU's bf16 flags and both matmul rates (the probe's own, or measured
/// here where the flags spared the probe), so a reader sees what
/// `--dtype auto` weighs on the CPU, with the same numbers as its reason.
fn report_cpu_matmul() {
    let flags = crate::cpu::flags();
    let native = crate::cpu::bf16_flags(&flags);
    let choice = crate::cpu::dtype();
    let r = choice
        .rates
        .unwrap_or_else(crate::cpu::measure_matmul_rates);
    println!(
        "cpu bf16 flags: {}",
        if native.is_empty() {
            "none".to_owned()
        } else {
            native.join(", ")
        }
    );
    println!(
        "cpu matmul (one thread): fp32 {:.0} GFLOP/s, bf16 {:.0} GFLOP/s ({:.2}×); --dtype auto on the cpu: {}",
        r.fp32,
        r.bf16,
        r.bf16 / r.fp32,
        choice.reason
    );
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
