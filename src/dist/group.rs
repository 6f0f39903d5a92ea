//! A c10d process group with its TCPStore, through the C++ shim next to this
//! file. Joining is bounded by `--dist-timeout` and interrupted by a signal;
//! every collective first records where this rank is in the store, so that a
//! rank that hangs or dies is named by the ranks that waited for it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tch::Tensor;

use super::{Backend, DistEnv};

#[cfg(peft_rs_c10d)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_long, c_uchar, c_void};
    extern "C" {
        pub fn peft_c10d_new(
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            backend: c_int,
            timeout_ms: c_long,
            device: c_int,
            nccl: *mut c_void,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn peft_c10d_all_reduce_sum(
            group: *mut c_void,
            tensor: *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn peft_c10d_all_gather_parts_start(
            group: *mut c_void,
            outputs: *mut *mut c_void,
            inputs: *mut *mut c_void,
            count: c_int,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn peft_c10d_work_wait(work: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn peft_c10d_barrier(group: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn peft_c10d_store_set(
            group: *mut c_void,
            key: *const c_char,
            data: *const c_uchar,
            len: c_long,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn peft_c10d_store_get(
            group: *mut c_void,
            key: *const c_char,
            timeout_ms: c_long,
            out: *mut *mut c_uchar,
            len: *mut c_long,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn peft_c10d_set_log_level(level: c_int);
        pub fn peft_c10d_free(group: *mut c_void);
        pub fn peft_c10d_free_message(message: *mut c_void);
        pub fn peft_c10d_set_grad(tensor: *mut c_void, grad: *mut c_void);
    }
}

/// Makes `grad` the `.grad` of `t`, or leaves `t` without one (`None`),
/// which frees the gradient's memory where zeroing it would keep it.
pub fn set_grad(t: &Tensor, grad: Option<&Tensor>) {
    #[cfg(peft_rs_c10d)]
    {
        let mut t = t.shallow_clone();
        let mut g = grad.map(Tensor::shallow_clone);
        let g = g
            .as_mut()
            .map_or(std::ptr::null_mut(), |g| g.as_mut_ptr() as *mut _);
        // SAFETY: both are live tensors (tch's C_tensor is an at::Tensor*);
        // `t`'s clone shares its TensorImpl, whose gradient slot is set.
        unsafe { ffi::peft_c10d_set_grad(t.as_mut_ptr() as *mut _, g) }
    }
    #[cfg(not(peft_rs_c10d))]
    {
        let _ = (t, grad);
        unreachable!("gradients are only handed over between ranks, with c10d")
    }
}

/// A c10d process group with its TCPStore.
pub struct ProcessGroup {
    #[cfg(peft_rs_c10d)]
    ptr: *mut std::os::raw::c_void,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// What this rank last announced it was waiting for (see [`ProcessGroup::at`]).
    at: std::sync::Mutex<String>,
}

// c10d's process groups are used from one thread at a time here (the
// trainer's, which also runs the model's FSDP gathers); Gloo's own worker
// threads only touch the tensors of a started collective.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

#[cfg(peft_rs_c10d)]
fn take_message(err: *mut std::os::raw::c_char) -> String {
    if err.is_null() {
        return "unknown c10d error".into();
    }
    // SAFETY: the shim returns a strdup'ed NUL-terminated string, freed here once.
    let s = unsafe { std::ffi::CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::peft_c10d_free_message(err.cast()) };
    // c10d's messages carry a C++ backtrace after the first line.
    s.lines().next().unwrap_or("").to_owned()
}

/// The seconds a rank waits for another's entry in the store when it
/// explains a failed collective.
const DIAGNOSE_WAIT: Duration = Duration::from_secs(2);

impl ProcessGroup {
    /// Joins the run described by `env` (rank 0 hosts the TCPStore). The
    /// rendezvous runs on a helper thread, so that it ends after `timeout`
    /// (c10d's own can hang on a master that accepts and never answers) or
    /// at the first SIGINT/SIGTERM/SIGHUP, as an error either way; `timeout`
    /// also bounds every later collective. `cuda_device` is this rank's GPU
    /// for NCCL, made current and bound before the group exists.
    pub fn join(
        env: &DistEnv,
        backend: Backend,
        timeout: Duration,
        cuda_device: Option<usize>,
    ) -> Result<Self> {
        #[cfg(peft_rs_c10d)]
        {
            quiet_c10d();
            let host = std::ffi::CString::new(env.master_addr.clone())?;
            let (rank, world, port) = (env.rank, env.world_size, env.master_port);
            let (code, nccl) = match backend {
                Backend::Nccl => (1, crate::cuda_library::nccl_backend()?),
                _ => (0, 0),
            };
            let device = cuda_device.unwrap_or(0) as i32;
            let millis = timeout.as_millis().min(i64::MAX as u128) as i64;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut err = std::ptr::null_mut();
                // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
                let ptr = unsafe {
                    ffi::peft_c10d_new(
                        host.as_ptr(),
                        port as _,
                        rank as _,
                        world as _,
                        code,
                        millis as _,
                        device,
                        nccl as *mut std::os::raw::c_void,
                        &mut err,
                    )
                };
                let result = if ptr.is_null() {
                    Err(take_message(err))
                } else {
                    Ok(ptr as usize)
                };
                let _ = tx.send(result);
            });
            let where_ = format!(
                "rank {rank}: could not join the {backend} process group at {}:{port} (world size {world})",
                env.master_addr
            );
            let start = Instant::now();
            let ptr = loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(Ok(ptr)) => break ptr as *mut std::os::raw::c_void,
                    Ok(Err(message)) => bail!("{where_}: {message}"),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        bail!("{where_}: the rendezvous thread ended without an answer")
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
                if let Some(sig) = crate::signals::pending() {
                    return Err(crate::signals::interrupted(sig, |name| {
                        format!("rank {rank}: stopped by {name} while joining the process group; nothing to save")
                    }));
                }
                if start.elapsed() > timeout {
                    bail!(
                        "{where_}: no answer within --dist-timeout {} s ({})",
                        timeout.as_secs(),
                        if rank == 0 {
                            "not every rank arrived".to_owned()
                        } else {
                            format!(
                                "is rank 0 running, and listening at {}:{port}?",
                                env.master_addr
                            )
                        }
                    );
                }
            };
            Ok(Self {
                ptr,
                rank,
                world_size: world,
                timeout,
                at: Default::default(),
            })
        }
        #[cfg(not(peft_rs_c10d))]
        {
            let _ = (backend, timeout, cuda_device);
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

    /// How long a collective waits for the other ranks (`--dist-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Announces in the store what this rank waits for next (`what`, e.g.
    /// "the all-reduce of step 4"): when a collective fails, the others read
    /// it to name the rank that never arrived.
    pub fn at(&self, what: &str) -> Result<()> {
        if *self.last_at() != what {
            self.store_set(&format!("peft-rs/at/{}", self.rank), what.as_bytes())?;
            *self.last_at() = what.to_owned();
        }
        Ok(())
    }

    fn last_at(&self) -> std::sync::MutexGuard<'_, String> {
        self.at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts gathering every rank's `parts` (1-D contiguous tensors, the
    /// same sizes and dtypes on each rank) in one collective: for each part
    /// a `[world · len]` tensor with rank r's at `r·len..`, written in place
    /// (no staging copy). The collective runs on c10d's threads until
    /// [`PendingGather::wait`]; every rank must start the same gathers
    /// in the same order.
    pub fn all_gather_parts_start(&self, parts: &[Tensor]) -> Result<PendingGather> {
        let world = self.world_size as i64;
        let outs: Vec<Tensor> = parts
            .iter()
            .map(|p| Tensor::empty([world * p.numel() as i64], (p.kind(), p.device())))
            .collect();
        #[cfg(peft_rs_c10d)]
        {
            let mut inputs: Vec<Tensor> = parts.iter().map(Tensor::shallow_clone).collect();
            let mut outputs: Vec<Tensor> = outs.iter().map(Tensor::shallow_clone).collect();
            let mut out_ptrs: Vec<*mut std::os::raw::c_void> = outputs
                .iter_mut()
                .map(|t| t.as_mut_ptr() as *mut _)
                .collect();
            let mut in_ptrs: Vec<*mut std::os::raw::c_void> = inputs
                .iter_mut()
                .map(|t| t.as_mut_ptr() as *mut _)
                .collect();
            let mut err = std::ptr::null_mut();
            // SAFETY: live tensors (at::Tensor*), `count` of each; `PendingGather`
            // keeps them alive until the work is waited for.
            let work = unsafe {
                ffi::peft_c10d_all_gather_parts_start(
                    self.ptr,
                    out_ptrs.as_mut_ptr(),
                    in_ptrs.as_mut_ptr(),
                    parts.len() as _,
                    &mut err,
                )
            };
            if work.is_null() {
                let message = take_message(err);
                bail!("{}", self.explain_failure("all-gather", &message));
            }
            Ok(PendingGather {
                work,
                parts: Some(outs),
                _inputs: inputs,
            })
        }
        #[cfg(not(peft_rs_c10d))]
        {
            let _ = outs;
            unreachable!("no process group exists without c10d")
        }
    }

    /// Every rank's `local` (a contiguous 1-D tensor of the same size on
    /// each rank) as a `[world, len]` tensor, rank r's in row r.
    pub fn all_gather(&self, local: &Tensor) -> Result<Tensor> {
        let len = local.numel() as i64;
        let mut parts = self
            .all_gather_parts_start(std::slice::from_ref(local))?
            .wait(self)?;
        Ok(parts.remove(0).view([self.world_size as i64, len]))
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
                let message = take_message(err);
                bail!("{}", self.explain_failure("all-reduce", &message));
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
                let message = take_message(err);
                bail!("{}", self.explain_failure("barrier", &message));
            }
        }
        Ok(())
    }

    /// Stores `value` under `key`, for every rank to read.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        #[cfg(peft_rs_c10d)]
        {
            let k = std::ffi::CString::new(key)?;
            let mut err = std::ptr::null_mut();
            // SAFETY: valid key, buffer and length.
            let rc = unsafe {
                ffi::peft_c10d_store_set(
                    self.ptr,
                    k.as_ptr(),
                    value.as_ptr(),
                    value.len() as _,
                    &mut err,
                )
            };
            if rc != 0 {
                bail!(
                    "rank {}: the rendezvous store (hosted by rank 0) failed: {}",
                    self.rank,
                    take_message(err)
                );
            }
        }
        #[cfg(not(peft_rs_c10d))]
        let _ = (key, value);
        Ok(())
    }

    /// Reads `key`, waiting at most `wait` for some rank to store it.
    pub fn store_get(&self, key: &str, wait: Duration) -> Result<Vec<u8>> {
        #[cfg(peft_rs_c10d)]
        {
            let k = std::ffi::CString::new(key)?;
            let (mut out, mut len, mut err) = (std::ptr::null_mut(), 0, std::ptr::null_mut());
            // SAFETY: valid key and out-pointers; `out` is malloc'ed by the shim.
            let rc = unsafe {
                ffi::peft_c10d_store_get(
                    self.ptr,
                    k.as_ptr(),
                    wait.as_millis().min(i64::MAX as u128) as _,
                    &mut out,
                    &mut len,
                    &mut err,
                )
            };
            if rc != 0 {
                bail!("{key}: {}", take_message(err));
            }
            // SAFETY: the shim copied `len` bytes into `out`; freed once here.
            let bytes = unsafe { std::slice::from_raw_parts(out, len as usize) }.to_vec();
            unsafe { ffi::peft_c10d_free_message(out.cast()) };
            Ok(bytes)
        }
        #[cfg(not(peft_rs_c10d))]
        {
            let _ = (key, wait);
            unreachable!("no process group exists without c10d")
        }
    }

    /// The message of a failed collective: which ranks never arrived, read
    /// from what each announced in the store (see [`ProcessGroup::at`]), and
    /// the c10d error in one line.
    fn explain_failure(&self, what: &str, c10d: &str) -> String {
        // A rank that announced this same collective may still have hung
        // before taking part in it (stopped between the announcement and the
        // send). The ranks that merely waited fail too, within about the
        // same timeout, and say so here: the one that stays silent is named.
        let at = self.last_at().clone();
        let _ = self.store_set(&format!("peft-rs/failed/{}", self.rank), at.as_bytes());
        let mut behind = Vec::new();
        let mut silent_store = false;
        for r in (0..self.world_size).filter(|&r| r != self.rank) {
            match self.store_get(&format!("peft-rs/at/{r}"), DIAGNOSE_WAIT) {
                Ok(v) => {
                    let theirs = String::from_utf8_lossy(&v).into_owned();
                    if theirs != at {
                        behind.push(format!("rank {r} (last at {theirs})"));
                    } else if self
                        .store_get(&format!("peft-rs/failed/{r}"), DIAGNOSE_WAIT)
                        .is_err()
                    {
                        behind.push(format!("rank {r} (last at {theirs}, silent since)"));
                    }
                }
                Err(_) if r == 0 => {
                    silent_store = true;
                    break;
                }
                Err(_) => behind.push(format!("rank {r} (never reported)")),
            }
        }
        let who = if silent_store {
            "rank 0 does not answer (it hosts the rendezvous store): it hung, was stopped or died"
                .to_owned()
        } else if behind.is_empty() {
            "another rank died or hung".to_owned()
        } else {
            format!(
                "{} did not arrive within --dist-timeout {} s: hung, stopped or dead",
                behind.join(", "),
                self.timeout.as_secs()
            )
        };
        format!(
            "rank {}: {what} at {} failed: {who} (c10d: {c10d}); the last complete checkpoint, if any, is intact",
            self.rank,
            if at.is_empty() { "the start" } else { &at },
        )
    }
}

/// An all-gather under way (see [`ProcessGroup::all_gather_parts_start`]).
pub struct PendingGather {
    #[cfg(peft_rs_c10d)]
    work: *mut std::os::raw::c_void,
    parts: Option<Vec<Tensor>>,
    _inputs: Vec<Tensor>,
}

impl PendingGather {
    /// Waits for the gather: each part's `[world · len]` tensor.
    pub fn wait(mut self, group: &ProcessGroup) -> Result<Vec<Tensor>> {
        if let Err(message) = self.finish() {
            bail!("{}", group.explain_failure("all-gather", &message));
        }
        Ok(self.parts.take().expect("a gather of parts"))
    }

    /// Waits for the work; the c10d message on failure.
    fn finish(&mut self) -> std::result::Result<(), String> {
        #[cfg(peft_rs_c10d)]
        {
            if self.work.is_null() {
                return Ok(());
            }
            let mut err = std::ptr::null_mut();
            // SAFETY: the work came from peft_c10d_all_gather_parts_start; waited for and freed once.
            let rc = unsafe { ffi::peft_c10d_work_wait(self.work, &mut err) };
            self.work = std::ptr::null_mut();
            if rc != 0 {
                return Err(take_message(err));
            }
        }
        Ok(())
    }
}

impl Drop for PendingGather {
    fn drop(&mut self) {
        // c10d's threads write into the outputs until the work ends.
        let _ = self.finish();
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

/// Silences c10d's own log (each rendezvous retry prints a warning with a
/// C++ backtrace; peft-rs reports what failed in one line), unless the user
/// asked for it with PyTorch's `TORCH_CPP_LOG_LEVEL`.
#[cfg(peft_rs_c10d)]
fn quiet_c10d() {
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        // SAFETY: sets an int flag of c10's.
        unsafe { ffi::peft_c10d_set_log_level(3) };
    }
}

/// Whether this build can run multi-process training, and with NCCL.
pub fn capabilities() -> (bool, bool) {
    #[cfg(peft_rs_c10d)]
    {
        (true, crate::cuda_library::nccl_built())
    }
    #[cfg(not(peft_rs_c10d))]
    {
        (false, false)
    }
}
