//! How much memory this process holds, as Linux counts it: the peak of its
//! resident set (`VmHWM`), and the resident set split into anonymous memory
//! (tensors, the heap) and file-backed pages (memory-mapped checkpoints and
//! libraries, which the kernel can drop and read again). A memory-mapped
//! safetensors file counts in the resident set once read; the split says
//! which is which.

use std::fmt;

/// Hands the pages jemalloc keeps for reuse (freed memory, kept about ten
/// seconds) back to the kernel. Called before the process exits: libtorch
/// then touches pages of its libraries (about 100 MiB of its CUDA
/// libraries', where [`crate::cuda_library`] loaded them), which would
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

/// While alive, jemalloc keeps the pages of freed memory for reuse instead
/// of handing them back to the kernel about ten seconds after the free;
/// dropped, it hands them all back and restores that delay. A training step
/// of a model with a billion parameters or more takes longer than those ten
/// seconds and frees gigabytes within it, so the next step faulted every
/// page in again and the kernel zeroed it: 1.1 million page faults and 2.4 s
/// of system time in a 12 s step of a Llama-3.2-1B shape, none with the
/// pages kept. The price is fragmentation that is no longer returned: 2-3%
/// more peak memory at 512 tokens, 18% at 2048; and where batch shapes vary
/// from step to step, pages of shapes no longer asked for pile up (SmolLM2
/// at batch 4, lengths grouped: 1.84 GB anonymous after 16 steps against
/// 1.12 GB with jemalloc's ten seconds). So [`KeepFreedPages::after_step`]
/// hands the kept pages back when a step ends with more than
/// [`KEPT_GROWTH`] above the first step's anonymous memory. (A finite delay
/// instead, ten steps' time, was measured 12% slower on the 1B shape: each
/// change of the delay restarts jemalloc's decay, which hands every kept
/// page back, and pages went back steadily after that.) A `dirty_decay_ms`
/// in `MALLOC_CONF` is the user's choice and is left alone.
pub struct KeepFreedPages {
    restore: Option<Decays>,
    /// The anonymous memory at the end of the first step.
    first_step: Option<u64>,
}

/// How much the anonymous memory at a step's end may grow past the first
/// step's (a share of it) before [`KeepFreedPages`] hands its pages back.
pub const KEPT_GROWTH: f64 = 0.25;

/// Whether `anon` bytes at a step's end are more than [`KEPT_GROWTH`] above
/// the `first` step's.
pub fn grown_past_kept(anon: u64, first: u64) -> bool {
    anon as f64 > first as f64 * (1.0 + KEPT_GROWTH)
}

/// jemalloc's decay delays as they were: the default for arenas made later
/// and each existing arena's own (the huge arena, for buffers of 8 MiB or
/// more, purges at once: 0, not the default's ten seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decays {
    default: isize,
    arenas: Vec<(u32, isize)>,
}

impl KeepFreedPages {
    /// Keeps freed pages until this guard is dropped.
    pub fn new() -> Self {
        let chosen = std::env::var("MALLOC_CONF").is_ok_and(|c| c.contains("dirty_decay_ms"));
        let restore = (!chosen).then(read_decays).flatten().inspect(|d| {
            write_control(c"arenas.dirty_decay_ms", -1isize);
            for &(i, _) in &d.arenas {
                write_control(&arena_decay(i), -1isize);
            }
        });
        Self {
            restore,
            first_step: None,
        }
    }

    /// Called at the end of each step: hands the kept pages back when the
    /// anonymous memory grew past [`grown_past_kept`]'s bound since the
    /// first step. Returns whether it did.
    pub fn after_step(&mut self) -> bool {
        self.restore.is_some() && self.after_step_at(MemoryUsage::now().anon)
    }

    fn after_step_at(&mut self, anon: u64) -> bool {
        match self.first_step {
            None => {
                self.first_step = Some(anon);
                false
            }
            Some(first) if grown_past_kept(anon, first) => {
                release_freed_memory();
                true
            }
            Some(_) => false,
        }
    }
}

impl Default for KeepFreedPages {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for KeepFreedPages {
    fn drop(&mut self) {
        if let Some(d) = &self.restore {
            write_control(c"arenas.dirty_decay_ms", d.default);
            // Arenas made while the guard lived (a new thread's) took the
            // default then (-1); they get the default restored.
            for i in 0..arena_count() {
                let own = d
                    .arenas
                    .iter()
                    .find(|a| a.0 == i)
                    .map_or(d.default, |a| a.1);
                write_control(&arena_decay(i), own);
            }
            release_freed_memory();
        }
    }
}

/// The default delay and every existing arena's own; `None` when jemalloc
/// does not answer.
fn read_decays() -> Option<Decays> {
    let default = read_control(c"arenas.dirty_decay_ms")?;
    // An arena not made yet answers with an error and is left out.
    let arenas = (0..arena_count())
        .filter_map(|i| Some((i, read_control(&arena_decay(i))?)))
        .collect();
    Some(Decays { default, arenas })
}

fn arena_count() -> u32 {
    read_control::<u32>(c"arenas.narenas").unwrap_or(0)
}

/// The control `arena.<i>.dirty_decay_ms`.
fn arena_decay(i: u32) -> std::ffi::CString {
    std::ffi::CString::new(format!("arena.{i}.dirty_decay_ms")).expect("no NUL in the name")
}

/// A jemalloc control of type `T` (`ssize_t` is `isize`, `unsigned` `u32`).
fn read_control<T: Copy + Default>(name: &std::ffi::CStr) -> Option<T> {
    let mut v = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: the control is read into a buffer of its type's size; jemalloc
    // checks the size and returns an error code on a mismatch or unknown name.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            (&raw mut v).cast(),
            &raw mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(v)
}

/// Sets a jemalloc control of type `T`; an error code (unknown name, an
/// arena not made yet) changes nothing and is ignored.
fn write_control<T: Copy>(name: &std::ffi::CStr, mut v: T) {
    // SAFETY: the value is written from a buffer of its type's size.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut v).cast(),
            std::mem::size_of::<T>(),
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

    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u.ru_minflt
        }
    }

    /// Frees a 64 MiB buffer and allocates and writes another one, as
    /// libtorch does (uninitialised memory: a zeroed allocation is zeroed by
    /// handing its pages back), returning the page faults of the second.
    fn faults_of_a_second_buffer() -> i64 {
        let layout = std::alloc::Layout::from_size_align(64 << 20, 64).unwrap();
        let touch = |p: *mut u8| {
            for i in (0..layout.size()).step_by(4096) {
                // SAFETY: p is a live allocation of layout.size() bytes.
                unsafe { p.add(i).write_volatile(1) };
            }
        };
        // SAFETY: a non-zero layout; each buffer is freed with it once.
        unsafe {
            let first = std::alloc::alloc(layout);
            assert!(!first.is_null());
            touch(first);
            std::alloc::dealloc(first, layout);
            let before = thread_faults();
            let second = std::alloc::alloc(layout);
            assert!(!second.is_null());
            touch(second);
            let faults = thread_faults() - before;
            std::alloc::dealloc(second, layout);
            faults
        }
    }

    #[test]
    fn kept_pages_go_back_when_a_step_ends_a_quarter_above_the_first() {
        assert!(!grown_past_kept(1_250, 1_000));
        assert!(grown_past_kept(1_251, 1_000));
        let mut keep = KeepFreedPages {
            restore: None,
            first_step: None,
        };
        assert!(!keep.after_step_at(1_000), "the first step sets the bound");
        assert!(!keep.after_step_at(1_200));
        assert!(keep.after_step_at(1_300));
        assert!(
            !keep.after_step_at(1_100),
            "the bound stays the first step's"
        );
        assert!(keep.after_step_at(2_000));
    }

    #[test]
    fn freed_pages_are_reused_while_kept_and_handed_back_after() {
        if std::env::var("MALLOC_CONF").is_ok_and(|c| c.contains("dirty_decay_ms")) {
            return; // The user's setting wins; nothing to check.
        }
        // A buffer this large is purged as soon as it is freed by default:
        // each of its 16384 pages faults in again.
        let eager = faults_of_a_second_buffer();
        let before = read_decays().expect("jemalloc answers arenas.dirty_decay_ms");
        // jemalloc's huge arena (made for the first buffer of 8 MiB or more)
        // purges at once, the others after the default delay: each is given
        // back its own.
        assert!(
            before.arenas.iter().any(|a| a.1 != before.default),
            "{before:?}"
        );
        let keep = KeepFreedPages::new();
        let kept_decays = read_decays().unwrap();
        assert!(
            kept_decays.default == -1 && kept_decays.arenas.iter().all(|a| a.1 == -1),
            "{kept_decays:?}"
        );
        let kept = faults_of_a_second_buffer();
        drop(keep);
        let after = read_decays().unwrap();
        assert_eq!(after.default, before.default);
        for a in &before.arenas {
            assert!(after.arenas.contains(a), "{a:?} not restored: {after:?}");
        }
        assert!(eager > 10_000, "{eager} faults without keeping");
        assert!(
            kept < eager / 10,
            "{kept} faults with the pages kept, {eager} without"
        );
    }
}
