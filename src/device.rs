//! Choosing the device and the dtype of the frozen weights.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::{Cuda, Device, Kind};

/// `--device`: where the model runs, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// CUDA when libtorch can use it, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// `cuda`: the GPU of this process (cuda:0, or cuda:LOCAL_RANK for one of
    /// several processes on a machine).
    CudaAny,
    /// `cuda:N`: CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::CudaAny,
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => bail!("`{other}`: expected auto, cpu, cuda or cuda:N"),
            },
        })
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::CudaAny => f.write_str("cuda"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    /// The device this resolves to on this machine, for a single process.
    pub fn resolve(self) -> Result<Device> {
        place(self, None, visible_gpus_for(self))
    }
}

/// [`visible_gpus`] where `asked` may use one; none for `--device cpu`, which
/// so never loads libtorch's CUDA library (a CPU run on a GPU machine keeps
/// its 240 MB, [`crate::cuda_library`]).
fn visible_gpus_for(asked: DeviceArg) -> usize {
    match asked {
        DeviceArg::Cpu => 0,
        _ => visible_gpus(),
    }
}

/// Where a process sits on its machine in a multi-process run (torchrun's
/// `LOCAL_RANK` and `LOCAL_WORLD_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRank {
    /// `LOCAL_RANK`: this process among those of its machine.
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`, when the launcher sets it.
    pub local_world_size: Option<usize>,
}

/// The folder of the `libtorch_cpu.so` a process has mapped, from its
/// `/proc/self/maps`.
pub fn libtorch_dir(maps: &str) -> Option<std::path::PathBuf> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(std::path::Path::new)
        .and_then(std::path::Path::parent)
        .map(std::path::Path::to_path_buf)
}

/// Whether libtorch can use CUDA here, after loading its CUDA library where
/// that can help ([`crate::cuda_library::ensure_loaded`]).
pub fn cuda_is_available() -> bool {
    crate::cuda_library::ensure_loaded();
    Cuda::is_available()
}

/// The CUDA devices libtorch can use here (0 without CUDA).
pub fn visible_gpus() -> usize {
    if cuda_is_available() {
        Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// The device of one process, decided from `--device`, the process's place
/// on its machine (`None` for a single process) and the GPUs it can see, as
/// torch's DDP places processes: each process of a machine on its own GPU,
/// `cuda:LOCAL_RANK`. A pure function, so that the choices of a machine with
/// eight GPUs are tested on one with none.
pub fn place(asked: DeviceArg, local: Option<LocalRank>, visible_gpus: usize) -> Result<Device> {
    let cuda_usable = || {
        if visible_gpus == 0 {
            bail!("--device {asked}: CUDA is not usable here (run `peft-rs env` to see what libtorch finds)");
        }
        Ok(())
    };
    match asked {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Auto if visible_gpus == 0 => Ok(Device::Cpu),
        DeviceArg::Auto | DeviceArg::CudaAny => {
            cuda_usable()?;
            let Some(LocalRank {
                local_rank,
                local_world_size,
            }) = local
            else {
                return Ok(Device::Cuda(0));
            };
            let here = local_world_size
                .unwrap_or(local_rank + 1)
                .max(local_rank + 1);
            if here > visible_gpus {
                bail!(
                    "{here} processes on this machine (LOCAL_WORLD_SIZE/LOCAL_RANK) but {visible_gpus} visible GPU{}: \
                     each process needs its own; start at most {visible_gpus} per machine (or check CUDA_VISIBLE_DEVICES)",
                    if visible_gpus == 1 { "" } else { "s" }
                );
            }
            Ok(Device::Cuda(local_rank))
        }
        DeviceArg::Cuda(n) => {
            cuda_usable()?;
            if let Some(l) = local.filter(|l| l.local_world_size.unwrap_or(l.local_rank + 1) > 1) {
                bail!(
                    "--device cuda:{n} would put all {} processes of this machine on one GPU; \
                     use --device cuda (or auto): each process takes cuda:LOCAL_RANK",
                    l.local_world_size.unwrap_or(l.local_rank + 1)
                );
            }
            if n >= visible_gpus {
                bail!(
                    "--device cuda:{n}: only {visible_gpus} CUDA device{} (run `peft-rs env` to see what libtorch finds)",
                    if visible_gpus == 1 { "" } else { "s" }
                );
            }
            Ok(Device::Cuda(n))
        }
    }
}

/// `--dtype`: the dtype of the frozen weights, as the user asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DtypeArg {
    /// bf16 on CUDA; on the CPU bf16 where it is native (AVX512-BF16,
    /// AMX, Arm BF16) and not measured emulated, else fp32.
    #[default]
    Auto,
    /// 32-bit float.
    #[value(alias = "float32", alias = "f32")]
    Fp32,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
    /// IEEE half precision (training uses dynamic loss scaling).
    #[value(alias = "float16", alias = "f16", alias = "half")]
    Fp16,
}

peft_adapters::value_enum_text!(DtypeArg, "--dtype");

impl DtypeArg {
    /// The flag that names `kind` exactly (what a run records, not "auto").
    pub fn naming(kind: Kind) -> Self {
        match kind {
            Kind::BFloat16 => Self::Bf16,
            Kind::Half => Self::Fp16,
            _ => Self::Fp32,
        }
    }

    /// The libtorch kind on `device` (this CPU probed once if it decides).
    pub fn resolve(self, device: Device) -> Kind {
        self.resolve_with(device, || crate::cpu::dtype().kind)
    }

    /// The libtorch kind on `device`, with `cpu_auto` what `auto` means on
    /// the CPU (asked only then), so a test decides for CPUs of every kind.
    pub fn resolve_with(self, device: Device, cpu_auto: impl FnOnce() -> Kind) -> Kind {
        match self {
            Self::Auto if device == Device::Cpu => cpu_auto(),
            Self::Auto | Self::Bf16 => Kind::BFloat16,
            Self::Fp32 => Kind::Float,
            Self::Fp16 => Kind::Half,
        }
    }
}

/// Serialises through `Display`/`FromStr`, so files hold the command-line spelling.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_string!(DeviceArg);
serde_as_string!(DtypeArg);

/// What `nvidia-smi` reports about the machine's GPUs, when it is installed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NvidiaSmi {
    /// The driver version, e.g. `580.65.06`.
    pub driver: String,
    /// One `(name, compute capability)` per GPU, e.g. `("NVIDIA H200", "9.0")`.
    pub gpus: Vec<(String, String)>,
}

impl NvidiaSmi {
    /// Runs `nvidia-smi` (from `PATH`); `None` when it is absent or fails.
    pub fn query() -> Option<Self> {
        let out = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=name,driver_version,compute_cap",
                "--format=csv,noheader",
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Self::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Parses `name, driver, capability` lines.
    pub fn parse(text: &str) -> Option<Self> {
        let mut smi = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < 3 {
                continue;
            }
            smi.driver = f[1].to_owned();
            smi.gpus.push((f[0].to_owned(), f[2].to_owned()));
        }
        (!smi.gpus.is_empty()).then_some(smi)
    }
}

/// Why `--device auto` would run on the CPU although the machine has a GPU, in
/// one line; `None` when it uses CUDA or no GPU is visible.
pub fn cpu_fallback_reason(smi: Option<&NvidiaSmi>) -> Option<String> {
    if cuda_is_available() {
        return None;
    }
    let smi = smi?;
    let driver_major: u32 = smi.driver.split('.').next()?.parse().ok()?;
    let library = crate::cuda_library::ensure_loaded();
    let why = if let crate::cuda_library::CudaLibrary::Failed(_) = library {
        format!("libtorch's CUDA library {library}")
    } else if driver_major < MIN_DRIVER_CUDA13 {
        format!(
            "driver {} is older than the {MIN_DRIVER_CUDA13} this libtorch's CUDA 13.0 needs; \
             ./scripts/setup.sh installs the torch 2.11.0 build that matches the driver",
            smi.driver
        )
    } else {
        format!(
            "libtorch cannot open it although driver {} is recent enough (check `peft-rs env`)",
            smi.driver
        )
    };
    Some(format!(
        "note: --device auto is using the CPU although nvidia-smi sees {}: {why}",
        smi.gpus[0].0
    ))
}

/// The oldest driver major version that runs CUDA 13.0 builds.
pub const MIN_DRIVER_CUDA13: u32 = 580;

/// Lets cuBLAS use TF32 tensor cores for fp32 matmuls (`--tf32`), as
/// `torch.backends.cuda.matmul.allow_tf32 = True` does. libtorch reads this
/// switch once, at its first CUDA matmul, so call it before loading a model.
pub fn allow_tf32() {
    std::env::set_var("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1");
}

/// Where a command runs and in which dtype, resolved from the flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// The device tensors live on.
    pub device: Device,
    /// The dtype of the frozen weights.
    pub kind: Kind,
}

impl Placement {
    /// Resolves `--device` and `--dtype` for a single process, saying in one
    /// line (on stderr) why `auto` falls back to the CPU on a machine with a GPU.
    pub fn resolve(device: DeviceArg, dtype: DtypeArg) -> Result<Self> {
        Self::resolve_for(device, dtype, None)
    }

    /// [`Placement::resolve`] for a process at `local` on its machine.
    pub fn resolve_for(
        device: DeviceArg,
        dtype: DtypeArg,
        local: Option<LocalRank>,
    ) -> Result<Self> {
        let resolved = place(device, local, visible_gpus_for(device))?;
        if device == DeviceArg::Auto && resolved == Device::Cpu {
            if let Some(why) = cpu_fallback_reason(NvidiaSmi::query().as_ref()) {
                eprintln!("{why}");
            }
        }
        Ok(Self {
            device: resolved,
            kind: dtype.resolve(resolved),
        })
    }

    /// The flags that name this placement exactly (what `training_args.json` records).
    pub fn as_args(&self) -> (DeviceArg, DtypeArg) {
        let device = match self.device {
            Device::Cuda(n) => DeviceArg::Cuda(n),
            _ => DeviceArg::Cpu,
        };
        (device, DtypeArg::naming(self.kind))
    }

    /// [`Placement::as_args`] as `training_args.json` records it: with
    /// several processes each takes its own GPU, which `--device cuda` says
    /// (`cuda:0`, rank 0's, would put every process on one GPU if the file
    /// were used again).
    pub fn recorded(&self, several_processes: bool) -> (DeviceArg, DtypeArg) {
        match self.as_args() {
            (DeviceArg::Cuda(_), dtype) if several_processes => (DeviceArg::CudaAny, dtype),
            args => args,
        }
    }

    /// `device cuda:0, dtype bf16`, printed by every command that loads a model.
    pub fn describe(&self) -> String {
        let (d, t) = self.as_args();
        format!("device {d}, dtype {t}")
    }

    /// [`Placement::describe`], with the CPU's reason where `--dtype auto`
    /// (`asked`) was decided by probing it.
    pub fn describe_choice(&self, asked: DtypeArg) -> String {
        match (asked, self.device) {
            (DtypeArg::Auto, Device::Cpu) => {
                format!("{} (auto: {})", self.describe(), crate::cpu::dtype().reason)
            }
            _ => self.describe(),
        }
    }
}

/// A bf16 matmul and a scaled-dot-product attention on `device`, checked
/// against the same computation on the CPU (what `peft-rs env` runs on each
/// GPU; on the CPU it checks the check).
pub fn prove_device(device: tch::Device) -> Result<()> {
    use tch::{Kind, Tensor};
    let x = Tensor::f_randn([64, 64], (Kind::BFloat16, tch::Device::Cpu))?;
    let on = x.f_to_device(device)?;
    let mm = on.f_matmul(&on)?.f_to_device(tch::Device::Cpu)?;
    let want = x.to_kind(Kind::Float).matmul(&x.to_kind(Kind::Float));
    let err = (mm.to_kind(Kind::Float) - &want)
        .abs()
        .max()
        .double_value(&[]);
    if err > 0.05 * want.abs().max().double_value(&[]) {
        bail!("matmul differs from the CPU by {err}");
    }
    let q = on.f_view([1, 4, 16, 64])?;
    let att =
        Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &q, &q, None, 0.0, true, None, false)?;
    if !bool::try_from(att.f_isfinite()?.f_all()?)? {
        bail!("attention returned non-finite values");
    }
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
    Ok(())
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N` for a single process; `auto`
/// picks CUDA when usable.
pub fn parse_device(s: &str) -> Result<Device> {
    let arg: DeviceArg = s.parse().map_err(|e| anyhow::anyhow!("--device {e}"))?;
    arg.resolve()
}

/// Parses `auto`, `fp32`, `bf16` or `fp16` (and their torch spellings).
///
/// `auto` is bf16 on CUDA and on CPUs with native bf16, else fp32
/// ([`crate::cpu::dtype`]).
pub fn parse_dtype(s: &str, device: Device) -> Result<Kind> {
    let arg: DtypeArg = s.parse()?;
    Ok(arg.resolve(device))
}

/// A short name for a kind, as used on the command line.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "fp32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "fp16",
        _ => "other",
    }
}

/// The model directory used when `--model` is omitted: `$PEFT_RS_DEFAULT_MODEL`,
/// or SmolLM2-135M-Instruct as `scripts/setup.sh` converts it into `models/`.
pub fn default_model_dir() -> PathBuf {
    match std::env::var_os("PEFT_RS_DEFAULT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/SmolLM2-135M-Instruct"
        )),
    }
}

/// `--model` (a folder, or a Hub id resolved through the Hugging Face cache,
/// [`crate::hub`]) or, when absent, the default model, with a hint when it is missing.
pub fn resolve_model_dir(model: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(m) = model {
        return crate::hub::resolve(&m, crate::hub::RepoKind::Model);
    }
    let d = default_model_dir();
    if !d.join("config.json").exists() {
        bail!(
            "no --model given and the default model is not at {} (run ./scripts/setup.sh, or set PEFT_RS_DEFAULT_MODEL)",
            d.display()
        );
    }
    Ok(d)
}

/// The libtorch version, read from the installation that is loaded (the torch
/// wheel's `version.py`, or a libtorch archive's `build-version`), and its folder.
pub fn libtorch_version(maps: &str) -> (String, String) {
    let Some(lib) = libtorch_dir(maps) else {
        return ("unknown".into(), "unknown".into());
    };
    let lib = lib.as_path();
    let root = lib.parent().unwrap_or(lib);
    let version = std::fs::read_to_string(root.join("version.py"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(['\'', '"']).to_owned())
        })
        .or_else(|| {
            std::fs::read_to_string(root.join("build-version"))
                .ok()
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    (format!("PyTorch {version}"), lib.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_and_the_cpu_fallback_message() {
        let old = NvidiaSmi::parse("Tesla T4, 535.104.05, 7.5\n").unwrap();
        assert_eq!(old.driver, "535.104.05");
        assert_eq!(old.gpus, vec![("Tesla T4".to_owned(), "7.5".to_owned())]);
        let two =
            NvidiaSmi::parse("NVIDIA H200, 580.65.06, 9.0\nNVIDIA H200, 580.65.06, 9.0\n").unwrap();
        assert_eq!(two.gpus.len(), 2);
        assert_eq!(NvidiaSmi::parse("No devices were found\n"), None);
        assert_eq!(NvidiaSmi::parse(""), None);
        // This machine's libtorch has no GPU to open, so auto falls back to the CPU.
        if !Cuda::is_available() {
            let why = cpu_fallback_reason(Some(&old)).unwrap();
            assert!(
                why.contains("Tesla T4") && why.contains("535.104.05") && why.contains("setup.sh"),
                "{why}"
            );
            let why = cpu_fallback_reason(Some(&two)).unwrap();
            assert!(why.contains("recent enough"), "{why}");
            assert_eq!(
                cpu_fallback_reason(None),
                None,
                "no GPU, nothing to explain"
            );
        }
    }

    #[test]
    fn a_placement_names_itself_as_flags() {
        let p = Placement {
            device: Device::Cuda(1),
            kind: Kind::BFloat16,
        };
        assert_eq!(p.as_args(), (DeviceArg::Cuda(1), DtypeArg::Bf16));
        assert_eq!(p.describe(), "device cuda:1, dtype bf16");
        assert_eq!(p.recorded(false), (DeviceArg::Cuda(1), DtypeArg::Bf16));
        assert_eq!(p.recorded(true), (DeviceArg::CudaAny, DtypeArg::Bf16));
        let cpu = Placement {
            device: Device::Cpu,
            kind: Kind::Float,
        };
        assert_eq!(cpu.recorded(true), (DeviceArg::Cpu, DtypeArg::Fp32));
        // auto: bf16 weights on a GPU.
        assert_eq!(DtypeArg::Auto.resolve(Device::Cuda(3)), Kind::BFloat16);
        // auto on the CPU: what the CPU's probe says, either way.
        assert_eq!(
            DtypeArg::Auto.resolve_with(Device::Cpu, || Kind::Float),
            Kind::Float
        );
        assert_eq!(
            DtypeArg::Auto.resolve_with(Device::Cpu, || Kind::BFloat16),
            Kind::BFloat16
        );
        assert_eq!(
            DtypeArg::Auto.resolve_with(Device::Cuda(0), || unreachable!("not asked on CUDA")),
            Kind::BFloat16
        );
        assert_eq!(
            DtypeArg::Fp32.resolve_with(Device::Cpu, || Kind::BFloat16),
            Kind::Float
        );
        let auto = Placement::resolve(DeviceArg::Cpu, DtypeArg::Auto).unwrap();
        assert_eq!(auto.kind, crate::cpu::dtype().kind);
    }

    #[test]
    fn the_device_proof_runs_and_passes_on_the_cpu() {
        prove_device(Device::Cpu).unwrap();
    }

    #[test]
    fn each_process_of_a_machine_takes_its_own_gpu() {
        let rank = |local_rank, world| {
            Some(LocalRank {
                local_rank,
                local_world_size: world,
            })
        };
        // torchrun --nproc-per-node 8 on a machine with 8 GPUs: rank 3 on cuda:3.
        for asked in [DeviceArg::Auto, DeviceArg::CudaAny] {
            assert_eq!(place(asked, rank(3, Some(8)), 8).unwrap(), Device::Cuda(3));
            // A launcher that sets LOCAL_RANK only.
            assert_eq!(place(asked, rank(7, None), 8).unwrap(), Device::Cuda(7));
        }
        // A single process takes the first GPU, or the CPU without one.
        assert_eq!(place(DeviceArg::Auto, None, 8).unwrap(), Device::Cuda(0));
        assert_eq!(place(DeviceArg::Auto, None, 0).unwrap(), Device::Cpu);
        assert_eq!(
            place(DeviceArg::Auto, rank(5, Some(8)), 0).unwrap(),
            Device::Cpu
        );
        assert_eq!(
            place(DeviceArg::Cpu, rank(5, Some(8)), 8).unwrap(),
            Device::Cpu
        );
        assert_eq!(place(DeviceArg::Cuda(2), None, 8).unwrap(), Device::Cuda(2));
        // One process per machine (multi-node with one GPU each): cuda:N is fine.
        assert_eq!(
            place(DeviceArg::Cuda(1), rank(0, Some(1)), 2).unwrap(),
            Device::Cuda(1)
        );

        let err = |asked, local, gpus| place(asked, local, gpus).unwrap_err().to_string();
        // Nine processes on a machine with eight GPUs: both numbers named.
        let e = err(DeviceArg::Auto, rank(0, Some(9)), 8);
        assert!(
            e.contains("9 processes") && e.contains("8 visible GPUs"),
            "{e}"
        );
        let e = err(DeviceArg::CudaAny, rank(8, None), 8);
        assert!(e.contains("9 processes") && e.contains("8 visible"), "{e}");
        // cuda:N with several local processes would stack them on one GPU.
        let e = err(DeviceArg::Cuda(0), rank(1, Some(2)), 2);
        assert!(
            e.contains("--device cuda:0") && e.contains("--device cuda"),
            "{e}"
        );
        let e = err(DeviceArg::Cuda(4), None, 2);
        assert!(e.contains("only 2 CUDA devices"), "{e}");
        let e = err(DeviceArg::CudaAny, None, 0);
        assert!(e.contains("not usable"), "{e}");
        assert_eq!("cuda".parse::<DeviceArg>().unwrap(), DeviceArg::CudaAny);
        assert_eq!(DeviceArg::CudaAny.to_string(), "cuda");
    }
}
