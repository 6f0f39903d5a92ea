//! How much memory this process holds, as Linux counts it: the peak of its
//! resident set (`VmHWM`), and the resident set split into anonymous memory
//! (tensors, the heap) and file-backed pages (memory-mapped checkpoints and
//! libraries, which the kernel can drop and read again). A memory-mapped
//! safetensors file counts in the resident set once read; the split says
//! which is which.

use std::fmt;

/// Hands the pages jemalloc keeps for reuse (freed memory, kept about ten
/// seconds) back to the kernel. Called before the process exits: libtorch
/// then touches about 100 MiB of its (CUDA) libraries' pages, which would
/// otherwise come on top of what the run freed but jemalloc still kept, and
/// make the exit the process's peak.
pub fn release_freed_memory() {
    // jemalloc's MALLCTL_ARENAS_ALL: every arena.
    let name = c"arena.4096.purge";
    // SAFETY: a NUL-terminated control name that takes and returns nothing;
    // on an unknown name jemalloc returns an error code, which is ignored.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// One reading of `/proc/self/status`, in bytes (0 where not reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// `VmHWM`: the peak resident set since the process started.
    pub peak: u64,
    /// `RssAnon`: resident anonymous memory now.
    pub anon: u64,
    /// `RssFile`: resident file-backed pages now.
    pub file: u64,
}

impl MemoryUsage {
    /// Reads the fields from the text of a `/proc/PID/status` file.
    pub fn parse(status: &str) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        Self {
            peak: field("VmHWM"),
            anon: field("RssAnon"),
            file: field("RssFile"),
        }
    }

    /// This process, now (zeros where `/proc` cannot be read).
    pub fn now() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
    }
}

/// The largest anonymous and file-backed resident sets seen over a run,
/// sampled at chosen points (each step), beside the kernel's peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryWatch {
    /// The largest `RssAnon` sampled.
    pub max_anon: u64,
    /// The largest `RssFile` sampled.
    pub max_file: u64,
    /// `VmHWM` at the last sample.
    pub peak: u64,
}

impl MemoryWatch {
    /// Takes one reading into account.
    pub fn add(&mut self, u: MemoryUsage) {
        self.max_anon = self.max_anon.max(u.anon);
        self.max_file = self.max_file.max(u.file);
        self.peak = self.peak.max(u.peak);
    }

    /// Samples this process now.
    pub fn sample(&mut self) {
        self.add(MemoryUsage::now());
    }
}

fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

impl fmt::Display for MemoryWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peak resident {:.2} GB (largest sampled: {:.2} GB anonymous, {:.2} GB file-backed)",
            gb(self.peak),
            gb(self.max_anon),
            gb(self.max_file)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = "Name:\tpeft-rs\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1536 kB\n\
                      RssAnon:\t    1024 kB\nRssFile:\t     512 kB\nRssShmem:\t 0 kB\n";
        let u = MemoryUsage::parse(status);
        assert_eq!(
            u,
            MemoryUsage {
                peak: 2048 * 1024,
                anon: 1024 * 1024,
                file: 512 * 1024
            }
        );
        assert_eq!(MemoryUsage::parse(""), MemoryUsage::default());
    }

    #[test]
    fn a_watch_keeps_each_maximum_and_the_process_is_readable() {
        let mut w = MemoryWatch::default();
        w.add(MemoryUsage {
            peak: 10,
            anon: 7,
            file: 1,
        });
        w.add(MemoryUsage {
            peak: 12,
            anon: 5,
            file: 4,
        });
        assert_eq!((w.peak, w.max_anon, w.max_file), (12, 7, 4));
        let now = MemoryUsage::now();
        assert!(now.peak >= now.anon && now.anon > 0, "{now:?}");
    }
}
