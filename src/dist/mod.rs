//! Data-parallel training over PyTorch's own c10d: a TCPStore rendezvous and a
//! Gloo (CPU) or NCCL (CUDA) process group, bound through the small C++ shim
//! next to this file (`c10d_shim.cpp`, compiled by `build.rs`).
//!
//! Launch as torchrun does: every process reads `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`
//! ([`DistEnv::from_env`]), or `peft-rs train --nproc N` starts N local
//! workers with those set ([`launch`]). [`group`] joins and runs the
//! collectives; [`reduce`] is the gradient all-reduce; [`agree`] holds what
//! the ranks must agree on.

pub mod agree;
pub mod fsdp;
pub mod group;
pub mod launch;
pub mod reduce;
pub mod vocab_parallel;
pub mod zero;

use anyhow::{bail, Context, Result};

pub use group::{capabilities, PendingGather, ProcessGroup};
pub use launch::launch_local;

use crate::device::LocalRank;

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

impl Backend {
    /// The backend for tensors on `device`: `auto` is NCCL on CUDA and Gloo
    /// on the CPU; NCCL cannot carry CPU tensors.
    pub fn resolve(self, device: tch::Device) -> Result<Backend> {
        match (self, device.is_cuda()) {
            (Backend::Auto, true) => Ok(Backend::Nccl),
            (Backend::Auto, false) => Ok(Backend::Gloo),
            (Backend::Nccl, false) => bail!(
                "--dist-backend nccl needs CUDA tensors; this rank trains on the CPU (use gloo)"
            ),
            (b, _) => Ok(b),
        }
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
    /// `LOCAL_WORLD_SIZE`: the processes on this machine, when set.
    pub local_world_size: Option<usize>,
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
        let master_addr = master_addr.trim().to_owned();
        if master_addr.is_empty() {
            bail!("environment variable MASTER_ADDR is empty: set it to rank 0's host name or address");
        }
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
            local_world_size: num("LOCAL_WORLD_SIZE")?,
            master_addr,
            master_port,
        }))
    }

    /// Where this process sits on its machine (which picks its GPU).
    pub fn local(&self) -> LocalRank {
        LocalRank {
            local_rank: self.local_rank,
            local_world_size: self.local_world_size,
        }
    }

    /// Checks that rank 0's address resolves, before any rendezvous: a typo
    /// is one line here, where c10d would retry until the timeout.
    pub fn check_master(&self) -> Result<()> {
        use std::net::ToSocketAddrs;
        if self.master_port == 0 {
            bail!("environment variable MASTER_PORT=0: give rank 0's port (1-65535)");
        }
        match (self.master_addr.as_str(), self.master_port).to_socket_addrs() {
            Ok(addrs) if addrs.len() > 0 => Ok(()),
            Ok(_) => bail!("MASTER_ADDR={}: resolves to no address", self.master_addr),
            Err(e) => bail!(
                "MASTER_ADDR={}: cannot resolve it ({e}); set it to rank 0's host name or address",
                self.master_addr
            ),
        }
    }
}

/// The rows of a global batch of `n` examples that `rank` of `world` takes:
/// contiguous, as even as possible, the first ranks one longer.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
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
    fn the_backend_follows_the_device() {
        use tch::Device;
        assert_eq!(
            Backend::Auto.resolve(Device::Cuda(2)).unwrap(),
            Backend::Nccl
        );
        assert_eq!(Backend::Auto.resolve(Device::Cpu).unwrap(), Backend::Gloo);
        assert_eq!(
            Backend::Gloo.resolve(Device::Cuda(0)).unwrap(),
            Backend::Gloo
        );
        let e = Backend::Nccl.resolve(Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("use gloo"), "{e}");
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
