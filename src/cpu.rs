//! Whether bf16 pays on this CPU.
//!
//! libtorch runs bf16 matmuls through oneDNN, which uses the CPU's native
//! bf16 instructions where they exist (AVX512-BF16 and AMX on x86, the BF16
//! extension on Arm): there a bf16 matmul runs about 4× faster than an fp32
//! one. Elsewhere bf16 is emulated and far slower than fp32. So
//! `--dtype auto` asks the CPU (its flags, and oneDNN's ISA cap) and measures
//! once to catch an emulated bf16; the choice does not depend on the load.

use std::sync::OnceLock;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

/// The CPU feature flags that mean native bf16 dot products, by the names
/// Linux prints in `/proc/cpuinfo`.
pub const BF16_FLAGS: [&str; 3] = ["avx512_bf16", "amx_bf16", "bf16"];

/// This CPU's feature flags (x86's `flags`, Arm's `Features`), empty where
/// `/proc/cpuinfo` cannot be read.
pub fn flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    flags_in(&info)
}

/// The feature flags of the first processor described in `cpuinfo`.
pub fn flags_in(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key.trim(), "flags" | "Features").then_some(value)
        })
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The native bf16 flags among `flags`.
pub fn bf16_flags(flags: &[String]) -> Vec<&str> {
    flags
        .iter()
        .map(String::as_str)
        .filter(|f| BF16_FLAGS.contains(f))
        .collect()
}

/// Measured matmul throughput of this process's CPU threads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulRates {
    /// fp32, in GFLOP/s.
    pub fp32: f64,
    /// bf16 (fp32 accumulation), in GFLOP/s.
    pub bf16: f64,
}

/// The shape of the probe, `m × k` times `k × n`: a LoRA projection's
/// shape in small, a fraction of a millisecond in native bf16 and well
/// under a second emulated in scalar code.
const PROBE: (i64, i64, i64) = (128, 512, 512);

/// How long one timed sample lasts at least: many scheduler ticks, so a
/// preemption is a small part of it.
const SAMPLE_SECONDS: f64 = 0.02;

/// Timed samples per dtype, alternating fp32 and bf16 so that a change in
/// the machine's load falls on both.
const ROUNDS: usize = 4;

/// One dtype's matmul, repeated enough times to last [`SAMPLE_SECONDS`].
struct Probe {
    a: Tensor,
    b: Tensor,
    reps: u32,
}

impl Probe {
    fn new(kind: Kind) -> Self {
        let (m, k, n) = PROBE;
        let a = Tensor::randn([m, k], (kind, Device::Cpu));
        let b = Tensor::randn([k, n], (kind, Device::Cpu));
        let _jit = a.matmul(&b);
        let t = Instant::now();
        let _ = a.matmul(&b);
        let once = t.elapsed().as_secs_f64().max(1e-7);
        let reps = (SAMPLE_SECONDS / once).ceil().clamp(1.0, 10_000.0) as u32;
        Self { a, b, reps }
    }

    /// Seconds per matmul in one sample.
    fn sample(&self) -> f64 {
        let t = Instant::now();
        for _ in 0..self.reps {
            let _ = self.a.matmul(&self.b);
        }
        t.elapsed().as_secs_f64() / f64::from(self.reps)
    }
}

/// Times fp32 and bf16 matmuls of the probe's shape on one thread, best of
/// a few alternating samples. One thread, because two busy threads on a
/// loaded machine wait on each other at every barrier and the faster dtype
/// (more barriers per second) loses most; best of, because load only ever
/// slows a sample down.
pub fn measure_matmul_rates() -> MatmulRates {
    let _no_grad = tch::no_grad_guard();
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let (m, k, n) = PROBE;
    let flop = 2.0 * (m * k * n) as f64;
    let probes = [Probe::new(Kind::Float), Probe::new(Kind::BFloat16)];
    let mut best = [f64::INFINITY; 2];
    for _ in 0..ROUNDS {
        for (b, p) in best.iter_mut().zip(&probes) {
            *b = b.min(p.sample());
        }
    }
    tch::set_num_threads(threads);
    let rate = |seconds: f64| flop / seconds.max(1e-9) / 1e9;
    MatmulRates {
        fp32: rate(best[0]),
        bf16: rate(best[1]),
    }
}

/// Below this fraction of fp32's rate a bf16 matmul is emulated in scalar
/// code, not run by oneDNN's bf16 kernels (measured here: scalar emulation
/// at 1% of fp32, oneDNN's AVX-512 emulation at 95%, native at 4–7×). A
/// wide margin on purpose: the choice must not change with the load, or a
/// run could not resume and two ranks of one run could disagree.
pub const EMULATED_BELOW: f64 = 0.25;

/// What `--dtype auto` picks on the CPU, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuDtype {
    /// The frozen weights' dtype: bf16 or fp32.
    pub kind: Kind,
    /// One line: the flags and rates behind the choice.
    pub reason: String,
    /// The matmul rates measured for it (`None`: not measured).
    pub rates: Option<MatmulRates>,
}

/// Whether oneDNN may use bf16 instructions under `ONEDNN_MAX_CPU_ISA`
/// (`None`: not set, no cap). Its values name ISA levels; those from
/// AVX512_CORE_BF16 up (and ALL) include bf16.
pub fn isa_cap_allows_bf16(cap: Option<&str>) -> bool {
    let Some(cap) = cap else { return true };
    let cap = cap.trim().to_ascii_uppercase();
    cap.is_empty()
        || cap == "ALL"
        || ["BF16", "AMX", "FP16", "AVX10"]
            .iter()
            .any(|level| cap.contains(level))
}

/// The CPU's choice from its native bf16 flags, oneDNN's ISA cap and, where
/// measured, the matmul rates. bf16 where the CPU has native bf16, oneDNN
/// may use it and a measurement does not show it emulated. A pure
/// function, so that a test decides for machines of every kind.
pub fn choose(native: &[&str], isa_cap: Option<&str>, rates: Option<MatmulRates>) -> CpuDtype {
    let fp32 = |reason: String| CpuDtype {
        kind: Kind::Float,
        reason,
        rates,
    };
    if native.is_empty() {
        return fp32(
            "fp32: this CPU has no native bf16 (no avx512_bf16, amx_bf16 or bf16 flag)".into(),
        );
    }
    let has = native.join(", ");
    if !isa_cap_allows_bf16(isa_cap) {
        return fp32(format!(
            "fp32: this CPU has {has} but ONEDNN_MAX_CPU_ISA={} keeps libtorch from it",
            isa_cap.unwrap_or_default()
        ));
    }
    let Some(r) = rates else {
        return CpuDtype {
            kind: Kind::BFloat16,
            reason: format!("bf16: this CPU has {has}"),
            rates,
        };
    };
    let measured = format!(
        "one thread's bf16 matmul {:.0} GFLOP/s, fp32 {:.0} GFLOP/s ({:.1}×)",
        r.bf16,
        r.fp32,
        r.bf16 / r.fp32
    );
    if r.bf16 < EMULATED_BELOW * r.fp32 {
        fp32(format!(
            "fp32: this CPU has {has} but libtorch's {measured} runs it emulated"
        ))
    } else {
        CpuDtype {
            kind: Kind::BFloat16,
            reason: format!("bf16: this CPU has {has}; {measured}"),
            rates,
        }
    }
}

/// oneDNN's ISA cap from the environment (its current name, then its old one).
fn isa_cap() -> Option<String> {
    ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
}

/// This machine's choice, probed once per process.
pub fn dtype() -> &'static CpuDtype {
    static CHOICE: OnceLock<CpuDtype> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let flags = flags();
        let native = bf16_flags(&flags);
        let cap = isa_cap();
        let probe = !native.is_empty() && isa_cap_allows_bf16(cap.as_deref());
        let rates = probe.then(measure_matmul_rates);
        choose(&native, cap.as_deref(), rates)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_are_read_from_x86_and_arm_cpuinfo() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16 sse\n\nprocessor\t: 1\nflags\t: fpu\n";
        assert_eq!(flags_in(x86), own(&["fpu", "avx2", "avx512_bf16", "sse"]));
        assert_eq!(bf16_flags(&flags_in(x86)), ["avx512_bf16"]);
        let arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n";
        assert_eq!(bf16_flags(&flags_in(arm)), ["bf16"]);
        assert!(bf16_flags(&flags_in("flags : fpu avx512f avx2\n")).is_empty());
        assert!(flags_in("").is_empty());
    }

    #[test]
    fn bf16_is_chosen_where_native_allowed_and_not_emulated() {
        let rates = |fp32: f64, bf16: f64| Some(MatmulRates { fp32, bf16 });
        let zen4 = choose(&["avx512_bf16"], None, rates(150.0, 600.0));
        assert_eq!(zen4.kind, Kind::BFloat16);
        assert!(
            zen4.reason.contains("avx512_bf16") && zen4.reason.contains("600"),
            "{}",
            zen4.reason
        );
        assert_eq!(
            choose(&["amx_bf16", "avx512_bf16"], None, rates(150.0, 600.0)).kind,
            Kind::BFloat16
        );
        // No flag: never measured, never bf16.
        let old = choose(&[], None, None);
        assert_eq!(old.kind, Kind::Float);
        assert!(old.reason.contains("no native bf16"), "{}", old.reason);
        // A flag but a libtorch that emulates it: the measurement vetoes.
        let emulated = choose(&["avx512_bf16"], None, rates(150.0, 3.0));
        assert_eq!(emulated.kind, Kind::Float);
        assert!(emulated.reason.contains("emulated"), "{}", emulated.reason);
        // A busy machine (both rates low, bf16 barely ahead or behind) does
        // not change the choice.
        assert_eq!(
            choose(&["avx512_bf16"], None, rates(57.0, 65.0)).kind,
            Kind::BFloat16
        );
        assert_eq!(
            choose(&["bf16"], None, rates(150.0, 100.0)).kind,
            Kind::BFloat16
        );
        assert_eq!(choose(&["bf16"], None, None).kind, Kind::BFloat16);
        // oneDNN capped below bf16: fp32, named.
        let capped = choose(&["avx512_bf16"], Some("AVX512_CORE"), rates(150.0, 600.0));
        assert_eq!(capped.kind, Kind::Float);
        assert!(
            capped.reason.contains("ONEDNN_MAX_CPU_ISA=AVX512_CORE"),
            "{}",
            capped.reason
        );
        for cap in ["avx512_core_bf16", "AVX512_CORE_AMX", "ALL", "AVX10_1_512"] {
            assert!(isa_cap_allows_bf16(Some(cap)), "{cap}");
        }
        for cap in ["AVX2", "AVX512_CORE_VNNI", "SSE41"] {
            assert!(!isa_cap_allows_bf16(Some(cap)), "{cap}");
        }
    }

    #[test]
    fn the_probe_measures_positive_rates_and_restores_the_thread_count() {
        let threads = tch::get_num_threads();
        let r = measure_matmul_rates();
        assert!(r.fp32 > 0.0 && r.fp32.is_finite(), "{r:?}");
        assert!(r.bf16 > 0.0 && r.bf16.is_finite(), "{r:?}");
        assert_eq!(tch::get_num_threads(), threads);
    }

    /// The choice on a machine whose every core is busy is the choice on
    /// an idle one (what broke a resume and a test before: a loaded
    /// machine slowed the bf16 samples most and flipped it to fp32).
    #[test]
    fn the_choice_holds_when_every_core_is_busy() {
        let native = ["avx512_bf16"];
        let idle = choose(&native, None, Some(measure_matmul_rates()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let spinners: Vec<_> = (0..2 * cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 1u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        let busy: Vec<_> = (0..3).map(|_| measure_matmul_rates()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        for r in busy {
            let loaded = choose(&native, None, Some(r));
            assert_eq!(
                loaded.kind, idle.kind,
                "idle: {}; busy: {}",
                idle.reason, loaded.reason
            );
        }
    }
}
