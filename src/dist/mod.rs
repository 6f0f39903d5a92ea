//! Data-parallel training over PyTorch's own c10d: a TCPStore rendezvous and a
//! Gloo (CPU) or NCCL (CUDA) process group, bound through the small C++ shim
//! next to this file (`c10d_shim.cpp`, compiled by `build.rs`).
//!
//! Launch as torchrun does: every process reads `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` ([`DistEnv::from_env`]), or
//! `peft-rs train --nproc N` starts N local workers with those set.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Tensor;

/// The communication backend (`--dist-backend`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Gloo on the CPU when training on the CPU, NCCL on CUDA.
    #[default]
    Auto,
    /// Gloo (CPU tensors).
    Gloo,
    /// NCCL (CUDA tensors).
    Nccl,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Gloo => "gloo",
            Self::Nccl => "nccl",
        })
    }
}

/// Where this process sits in a multi-process run, as torchrun describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process among all.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process on its machine (picks the GPU).
    pub local_rank: usize,
    /// `MASTER_ADDR`: where rank 0 hosts the TCPStore.
    pub master_addr: String,
    /// `MASTER_PORT`: the TCPStore's port.
    pub master_port: u16,
}

impl DistEnv {
    /// Reads torchrun's variables; `None` when `WORLD_SIZE` is unset or 1
    /// (a single process needs no process group).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any source of variables (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            get(k)
                .map(|v| {
                    v.trim().parse::<usize>().with_context(|| {
                        format!("environment variable {k}={v:?}: expected a non-negative integer")
                    })
                })
                .transpose()
        };
        let Some(world_size) = num("WORLD_SIZE")? else {
            return Ok(None);
        };
        if world_size <= 1 {
            return Ok(None);
        }
        let Some(rank) = num("RANK")? else {
            bail!("environment variable RANK is not set although WORLD_SIZE={world_size}; launch with torchrun or `peft-rs train --nproc N`");
        };
        if rank >= world_size {
            bail!("environment variable RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".to_owned());
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse::<u16>().with_context(|| {
                format!("environment variable MASTER_PORT={p:?}: expected a port number")
            })?,
            None => bail!(
                "environment variable MASTER_PORT is not set although WORLD_SIZE={world_size}"
            ),
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank: num("LOCAL_RANK")?.unwrap_or(rank),
            master_addr,
            master_port,
        }))
    }
}

#[cfg(peft_rs_c10d)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_long, c_void};
    extern "C" {
        pub fn peft_c10d_new(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            backend: c_int,
            timeout_ms: c_long,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn peft_c10d_all_reduce_sum(
            group: *mut c_void,
            tensor: *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn peft_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn peft_c10d_has_nccl() -> c_int;
        pub fn peft_c10d_free(group: *mut c_void);
        pub fn peft_c10d_free_message(message: *mut c_char);
    }
}

/// A c10d process group with its TCPStore.
pub struct ProcessGroup {
    #[cfg(peft_rs_c10d)]
    ptr: *mut std::os::raw::c_void,
    rank: usize,
    world_size: usize,
}

// c10d's process groups are used from one thread at a time here.
unsafe impl Send for ProcessGroup {}

#[cfg(peft_rs_c10d)]
fn take_message(err: *mut std::os::raw::c_char) -> String {
    if err.is_null() {
        return "unknown c10d error".into();
    }
    // SAFETY: the shim returns a strdup'ed NUL-terminated string, freed here once.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::peft_c10d_free_message(err) };
    s.lines().next().unwrap_or("").to_owned()
}

impl ProcessGroup {
    /// Joins the run described by `env` (rank 0 hosts the TCPStore), waiting at
    /// most `timeout` for the others here and in every later collective.
    pub fn join(env: &DistEnv, backend: Backend, timeout: Duration) -> Result<Self> {
        #[cfg(peft_rs_c10d)]
        {
            let host = std::ffi::CString::new(env.master_addr.clone())?;
            let mut err = std::ptr::null_mut();
            let code = match backend {
                Backend::Nccl => 1,
                _ => 0,
            };
            // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
            let ptr = unsafe {
                ffi::peft_c10d_new(
                    host.as_ptr(),
                    env.master_port as _,
                    env.rank as _,
                    env.world_size as _,
                    code,
                    timeout.as_millis() as _,
                    &mut err,
                )
            };
            if ptr.is_null() {
                bail!(
                    "rank {}: could not join the {backend} process group at {}:{} (world size {}): {}",
                    env.rank,
                    env.master_addr,
                    env.master_port,
                    env.world_size,
                    take_message(err)
                );
            }
            Ok(Self {
                ptr,
                rank: env.rank,
                world_size: env.world_size,
            })
        }
        #[cfg(not(peft_rs_c10d))]
        {
            let _ = (backend, timeout);
            bail!(
                "rank {}: this peft-rs was built without c10d (Gloo's headers were missing at build time); run ./scripts/setup.sh and rebuild",
                env.rank
            )
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Sums `t` over all ranks, in place (every rank gets the total).
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        #[cfg(peft_rs_c10d)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: `t` is a live tensor (tch's C_tensor is an at::Tensor*).
            let rc = unsafe {
                ffi::peft_c10d_all_reduce_sum(self.ptr, t.as_mut_ptr() as *mut _, &mut err)
            };
            if rc != 0 {
                bail!(
                    "rank {}: all-reduce failed (another rank died or hung past --dist-timeout?): {}",
                    self.rank,
                    take_message(err)
                );
            }
            Ok(())
        }
        #[cfg(not(peft_rs_c10d))]
        {
            let _ = t;
            unreachable!("no process group exists without c10d")
        }
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(peft_rs_c10d)]
        {
            let mut err = std::ptr::null_mut();
            // SAFETY: the group is live.
            if unsafe { ffi::peft_c10d_barrier(self.ptr, &mut err) } != 0 {
                bail!("rank {}: barrier failed: {}", self.rank, take_message(err));
            }
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        #[cfg(peft_rs_c10d)]
        // SAFETY: created by peft_c10d_new and freed once.
        unsafe {
            ffi::peft_c10d_free(self.ptr)
        };
    }
}

/// Whether this build can run multi-process training, and with NCCL.
pub fn capabilities() -> (bool, bool) {
    #[cfg(peft_rs_c10d)]
    {
        // SAFETY: a constant query.
        (true, unsafe { ffi::peft_c10d_has_nccl() } != 0)
    }
    #[cfg(not(peft_rs_c10d))]
    {
        (false, false)
    }
}

/// The rows of a global batch of `n` examples that `rank` of `world` takes:
/// contiguous, as even as possible, the first ranks one longer.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// `peft-rs train --nproc N`: runs this same command line as N local workers
/// with torchrun's variables set (rendezvous on a free port of 127.0.0.1), and
/// waits for them. When one fails, the others are stopped and the error names
/// the rank; the exit status is the failed worker's.
pub fn launch_local(nproc: usize) -> Result<()> {
    use std::process::{Command, Stdio};
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe =
        std::env::current_exe().context("cannot find the peft-rs executable to start workers")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    eprintln!("starting {nproc} workers (data-parallel, rendezvous at 127.0.0.1:{port})");
    let mut children = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            // Only rank 0 speaks on stdout; every rank's errors reach stderr.
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("cannot start worker {rank}"))?;
        children.push(child);
    }
    let mut running: Vec<Option<std::process::Child>> = children.into_iter().map(Some).collect();
    loop {
        let mut alive = 0;
        for rank in 0..running.len() {
            let Some(child) = running[rank].as_mut() else {
                continue;
            };
            match child.try_wait()? {
                None => alive += 1,
                Some(status) if status.success() => running[rank] = None,
                Some(status) => {
                    for other in running.iter_mut().flatten() {
                        let _ = other.kill();
                        let _ = other.wait();
                    }
                    bail!(
                        "worker rank {rank} of {nproc} failed ({status}); the other workers were stopped \
                         (the last complete checkpoint, if any, is intact: rerun with --resume)"
                    );
                }
            }
        }
        if alive == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchrun_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(DistEnv::from_lookup(vars(&[])).unwrap(), None);
        assert_eq!(
            DistEnv::from_lookup(vars(&[("WORLD_SIZE", "1")])).unwrap(),
            None
        );
        let env = DistEnv::from_lookup(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (env.rank, env.world_size, env.local_rank, env.master_port),
            (2, 4, 0, 29500)
        );
        let err =
            DistEnv::from_lookup(vars(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])).unwrap_err();
        assert!(err.to_string().contains("RANK"), "{err}");
        let err = DistEnv::from_lookup(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("RANK=2"), "{err}");
        let err = DistEnv::from_lookup(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(err.to_string().contains("WORLD_SIZE"), "{err}");
    }

    #[test]
    fn shards_cover_the_batch_once() {
        for n in 0..12 {
            for world in 1..5 {
                let all: Vec<usize> = (0..world).flat_map(|r| shard(n, r, world)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n}, world {world}");
            }
        }
        assert_eq!(shard(4, 1, 2), 2..4);
        assert_eq!(shard(5, 0, 2), 0..3);
    }
}
