//! SIGINT, SIGTERM and SIGHUP during long work: the first asks the work to
//! stop at the next safe point (training saves a checkpoint first), the
//! second ends the process at once. SIGXFSZ is ignored, so that a write past
//! `ulimit -f` fails with an error naming the file instead of killing the
//! process silently.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

static FIRST: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if COUNT.fetch_add(1, Ordering::SeqCst) > 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    FIRST.store(sig, Ordering::SeqCst);
    let msg =
        b"\npeft-rs: stopping at the next safe point (send the signal again to quit at once)\n";
    // SAFETY: write(2) on stderr is async-signal-safe; the buffer is static.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Makes a write past `ulimit -f` an error (EFBIG) instead of a silent
/// death by SIGXFSZ; every command calls it.
pub fn ignore_file_size_limit() {
    // SAFETY: setting a signal's disposition to ignore.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Installs the handlers for long work that can stop safely (train, merge).
pub fn install() {
    on_stop_signals(on_signal);
}

/// Makes `handler` the handler of SIGINT, SIGTERM and SIGHUP. It must only
/// touch atomics and call async-signal-safe functions.
pub fn on_stop_signals(handler: extern "C" fn(libc::c_int)) {
    // SAFETY: sigaction with a handler that only does what the caller promises.
    unsafe {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The first signal received, if any.
pub fn pending() -> Option<i32> {
    match FIRST.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `SIGINT` for 2, and so on.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        _ => "a signal",
    }
}

/// The [`Interrupted`] error for `signal`, whose message is `what` said of
/// the signal's name (`|name| format!("stopped by {name} ...")`).
pub fn interrupted(signal: i32, what: impl FnOnce(&str) -> String) -> anyhow::Error {
    Interrupted {
        signal,
        message: what(name(signal)),
    }
    .into()
}

/// The work stopped because a signal arrived; the process should exit with
/// `128 + signal`.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal.
    pub signal: i32,
    /// What was saved and how to continue.
    pub message: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Interrupted {}
