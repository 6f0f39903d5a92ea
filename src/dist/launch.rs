//! `peft-rs train --nproc N`: this same command line run as N local workers
//! with torchrun's variables set, supervised until all have ended.
//!
//! The launcher owns its workers: SIGINT, SIGTERM or SIGHUP sent to it is
//! passed on to every worker (which then agree to stop after the same step,
//! rank 0 saving a checkpoint); a second one kills them. A worker dies with
//! the launcher (`PR_SET_PDEATHSIG`), so none trains on alone when the
//! launcher is killed outright.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Set in the environment of the launcher's workers, which run the same
/// command line (`--nproc` included) and must not launch again.
pub const WORKER_MARK: &str = "PEFT_RS_NPROC_WORKER";

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
static LAST: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember(sig: libc::c_int) {
    LAST.store(sig, Ordering::SeqCst);
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// How one worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal it did not handle ended it (a crash, the out-of-memory
    /// killer, `kill -9`).
    Signal(i32),
}

impl From<std::process::ExitStatus> for Exit {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(-1),
        }
    }
}

/// What a signal that ended a worker says about why, for its error line.
pub fn killed_by(sig: i32) -> String {
    match sig {
        libc::SIGKILL => {
            "killed by SIGKILL: the out-of-memory killer (lower --batch-size or --max-seq-len) or kill -9"
                .into()
        }
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGABRT => format!(
            "crashed with {} (signal {sig}): a bug in peft-rs or libtorch; please report it with the command line",
            crate::signals::name(sig)
        ),
        _ => format!("killed by signal {sig}"),
    }
}

/// How a finished set of workers ended, from their exit statuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker succeeded.
    Success,
    /// Every worker that did not succeed stopped on a signal (exit status
    /// 128 + SIGINT/SIGTERM/SIGHUP): an agreed stop with a checkpoint.
    Stopped(i32),
    /// A worker failed: its rank and status.
    Failed(usize, String),
}

/// What the exit statuses of workers say about the run, given as (rank,
/// exit) in the order the workers ended, without those the launcher stopped
/// itself. The first failure is the one to blame. A pure function of the
/// exits.
pub fn outcome(ended: &[(usize, Exit)]) -> Outcome {
    let stop_signal = |c: i32| {
        [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
            .into_iter()
            .find(|&s| c == 128 + s)
    };
    let mut stopped = None;
    for &(rank, code) in ended {
        match code {
            Exit::Code(0) => {}
            Exit::Code(c) if stop_signal(c).is_some() => stopped = stop_signal(c),
            Exit::Code(c) => {
                return Outcome::Failed(rank, format!("exit status {c}; its error is above"))
            }
            Exit::Signal(sig) => return Outcome::Failed(rank, killed_by(sig)),
        }
    }
    stopped.map_or(Outcome::Success, Outcome::Stopped)
}

/// Runs this command line as `nproc` local workers (rendezvous on a free
/// port of 127.0.0.1) and waits for them. When one fails, the others are
/// stopped and the error names the rank; when they stop on a signal, the
/// launcher exits as they do (128 + the signal).
pub fn launch_local(nproc: usize) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe =
        std::env::current_exe().context("cannot find the peft-rs executable to start workers")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    install_forwarding();
    eprintln!("starting {nproc} workers (data-parallel, rendezvous at 127.0.0.1:{port})");
    let mut workers: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(WORKER_MARK, "1")
            // Only rank 0 speaks on stdout; every rank's errors reach stderr.
            .stdout(if rank == 0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        die_with_parent(&mut cmd);
        match cmd.spawn() {
            Ok(child) => workers.push(Some(child)),
            Err(e) => {
                kill_all(&mut workers);
                return Err(e).with_context(|| format!("cannot start worker {rank}"));
            }
        }
    }
    let codes = supervise(&mut workers)?;
    match outcome(&codes) {
        Outcome::Success => Ok(()),
        Outcome::Stopped(sig) => Err(crate::signals::Interrupted {
            signal: sig,
            message: format!(
                "the {nproc} workers stopped on {} after the same step (see rank 0's message for the checkpoint)",
                crate::signals::name(sig)
            ),
        }
        .into()),
        Outcome::Failed(rank, why) => bail!(
            "worker rank {rank} of {nproc} failed ({why}); the other workers \
             were stopped (the last complete checkpoint, if any, is intact: rerun with --resume)"
        ),
    }
}

/// Waits for every worker; forwards the first signal the launcher gets,
/// kills them all at the second, and stops the others when one fails.
/// Returns (rank, exit) of each worker that ended on its own, in the
/// order they ended.
fn supervise(workers: &mut [Option<Child>]) -> Result<Vec<(usize, Exit)>> {
    let mut ended = Vec::with_capacity(workers.len());
    let mut forwarded = 0;
    loop {
        let seen = SIGNALS.load(Ordering::SeqCst);
        if seen > forwarded {
            forwarded = seen;
            let sig = LAST.load(Ordering::SeqCst);
            if seen == 1 {
                eprintln!(
                    "\npeft-rs: {} passed on to the workers; they stop after the current step (send it again to quit at once)",
                    crate::signals::name(sig)
                );
                signal_all(workers, sig);
            } else {
                kill_all(workers);
                return Err(crate::signals::interrupted(sig, |name| {
                    format!("{name} again: the workers were killed")
                }));
            }
        }
        for (rank, slot) in workers.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else { continue };
            if let Some(status) = child.try_wait()? {
                ended.push((rank, status.into()));
                *slot = None;
            }
        }
        if matches!(outcome(&ended), Outcome::Failed(..)) {
            kill_all(workers);
        }
        if workers.iter().all(Option::is_none) {
            return Ok(ended);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal_all(workers: &[Option<Child>], sig: i32) {
    for child in workers.iter().flatten() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    }
}

fn kill_all(workers: &mut [Option<Child>]) {
    for slot in workers.iter_mut() {
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The launcher's own handlers only count signals: the supervision loop
/// passes them on.
fn install_forwarding() {
    crate::signals::on_stop_signals(remember);
}

/// Makes the worker receive SIGTERM when the launcher dies, however it dies
/// (the worker then stops after its step, as on any first SIGTERM).
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the call took effect.
            if libc::getppid() != parent {
                libc::_exit(143);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_tell_an_agreed_stop_from_a_failure() {
        use Exit::Code;
        assert_eq!(outcome(&[(0, Code(0)), (1, Code(0))]), Outcome::Success);
        assert_eq!(
            outcome(&[(1, Code(143)), (0, Code(143))]),
            Outcome::Stopped(15)
        );
        assert_eq!(
            outcome(&[(0, Code(130)), (1, Code(0))]),
            Outcome::Stopped(2)
        );
        // The first to fail is blamed, not a rank that ended later or was stopped.
        assert_eq!(
            outcome(&[(1, Code(1)), (0, Code(1))]),
            Outcome::Failed(1, "exit status 1; its error is above".into())
        );
        assert_eq!(outcome(&[]), Outcome::Success);
    }

    #[test]
    fn a_worker_ended_by_a_signal_is_named_with_the_signal_and_its_likely_cause() {
        use Exit::{Code, Signal};
        let why = |sig| match outcome(&[(0, Code(0)), (1, Signal(sig))]) {
            Outcome::Failed(1, why) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(libc::SIGSEGV).contains("crashed with SIGSEGV (signal 11)"));
        assert!(why(libc::SIGABRT).contains("SIGABRT"));
        assert!(why(libc::SIGKILL).contains("out-of-memory killer"));
        // SIGTERM that ends a worker before its handler is in place is no agreed stop.
        assert_eq!(why(libc::SIGTERM), "killed by signal 15");
        // What the launcher reads from a real process.
        let status = Command::new("sh")
            .args(["-c", "kill -SEGV $$"])
            .status()
            .unwrap();
        assert_eq!(Exit::from(status), Signal(libc::SIGSEGV));
        let status = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(Exit::from(status), Code(3));
    }
}
