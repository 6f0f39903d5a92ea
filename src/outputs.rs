//! The one policy for everything peft-rs writes (`train`, `merge`,
//! checkpoints, `plot`): never delete or replace what is not ours.
//!
//! * An output may not contain, or lie inside, one of the command's inputs.
//! * A directory is ours when it carries our marker file; an output
//!   directory that holds anything else is refused, not cleaned.
//! * One writer per output: an advisory lock (`flock`) held for the whole
//!   command makes a second process fail at once with a clear message, and is
//!   released by the kernel however the first one ends.
//! * Whole outputs are written under a temporary name and published by one
//!   rename; replacing an old output is an atomic exchange, and the old one
//!   is removed only afterwards.
//! * Temporary files of an earlier, killed run are removed by the next run
//!   that holds the lock (nobody else can be writing them).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The marker that says a directory was written by peft-rs, and by which command.
pub const MARKER: &str = ".peft-rs-output";
/// The lock file inside a train output directory.
pub const LOCK: &str = ".peft-rs.lock";

/// An exclusive lock on an output, held until dropped (or the process ends).
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    path: PathBuf,
    remove_on_drop: bool,
}

impl OutputLock {
    /// Takes the lock at `lock_path` for the output `what`, or fails at once
    /// naming the process that holds it.
    pub fn acquire(lock_path: &Path, what: &Path) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .with_context(|| format!("{}: cannot create the lock file", lock_path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "{}: another peft-rs process{} is writing this output; wait for it to finish, or choose another output",
                what.display(),
                match pid.trim() {
                    "" => String::new(),
                    p => format!(" (pid {p})"),
                }
            );
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self {
            _file: file,
            path: lock_path.to_path_buf(),
            remove_on_drop: false,
        })
    }

    /// Removes the lock file when the lock is released (for locks beside an
    /// output rather than inside it).
    pub fn remove_on_drop(mut self) -> Self {
        self.remove_on_drop = true;
        self
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `path` made absolute with `..` and symlinks resolved as far as it
/// exists; the part that does not exist yet is appended as written.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Refuses an output that is, contains or lies inside one of the inputs
/// (`(what, path)` pairs, e.g. `("base model", dir)`).
pub fn refuse_overlap(flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let out = resolve(output);
    for (what, input) in inputs {
        let inp = resolve(input);
        let relation = if out == inp {
            "is"
        } else if inp.starts_with(&out) {
            "contains"
        } else if out.starts_with(&inp) {
            "lies inside"
        } else {
            continue;
        };
        bail!(
            "{flag} {}: {relation} the {what} {}; writing there could destroy it — choose another {flag}",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// What our marker records.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Marker {
    written_by: String,
    command: String,
}

/// Whether `dir` carries our marker for `command`.
pub fn is_ours(dir: &Path, command: &str) -> bool {
    peft_adapters::fsio::read_regular_string(&dir.join(MARKER), 4096, "marker")
        .ok()
        .and_then(|t| serde_json::from_str::<Marker>(&t).ok())
        .is_some_and(|m| m.written_by == "peft-rs" && m.command == command)
}

/// Writes our marker for `command` into `dir`.
pub fn mark(dir: &Path, command: &str) -> Result<()> {
    let m = Marker {
        written_by: "peft-rs".into(),
        command: command.into(),
    };
    peft_adapters::fsio::write_atomic(&dir.join(MARKER), serde_json::to_string(&m)?.as_bytes())
}

/// The entries of `dir` other than our marker and lock.
fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != MARKER && name != LOCK {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

/// Makes `dir` a locked output directory of `command`: created if missing,
/// refused if it holds files that peft-rs did not write, marked as ours, and
/// cleared of temporary files that a killed run left behind.
pub fn claim_dir(flag: &str, dir: &Path, command: &str) -> Result<OutputLock> {
    if dir.exists() && !dir.is_dir() {
        bail!("{flag} {}: exists and is not a directory", dir.display());
    }
    // Checked before the lock file is created: nothing is added to a
    // directory that is not ours.
    let refuse_foreign = || -> Result<()> {
        if dir.exists() && !is_ours(dir, command) {
            let foreign = foreign_entries(dir)?;
            if !foreign.is_empty() {
                bail!(
                    "{flag} {}: holds files peft-rs did not write ({}{}); {command} writes into a new or empty directory — choose another {flag}",
                    dir.display(),
                    foreign.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    if foreign.len() > 3 { ", ..." } else { "" }
                );
            }
        }
        Ok(())
    };
    refuse_foreign()?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let lock = OutputLock::acquire(&dir.join(LOCK), dir)?;
    refuse_foreign()?;
    if !is_ours(dir, command) {
        mark(dir, command)?;
    }
    remove_temporaries(dir, "")?;
    Ok(lock)
}

/// Removes the temporary files and folders (`.NAME.tmp-PID...`) in `dir`
/// whose name starts with `.{prefix}`; call only while holding the lock.
pub fn remove_temporaries(dir: &Path, prefix: &str) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{prefix}")) && name.contains(".tmp-") {
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.with_context(|| format!("{}: cannot remove a stale temporary", p.display()))?;
        }
    }
    Ok(())
}

/// Publishes the finished directory `tmp` as `dest`: one rename, or, when
/// `dest` exists, an atomic exchange after which the old output (now at
/// `tmp`) is removed. At every instant `dest` is either the old output or
/// the new one.
pub fn publish_dir(tmp: &Path, dest: &Path) -> Result<()> {
    if !dest.exists() {
        return std::fs::rename(tmp, dest)
            .with_context(|| format!("{}: cannot rename into place", dest.display()));
    }
    exchange(tmp, dest).with_context(|| format!("{}: cannot replace", dest.display()))?;
    std::fs::remove_dir_all(tmp)
        .with_context(|| format!("{}: cannot remove the replaced output", tmp.display()))
}

fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 touches no Rust memory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `name` is a plain file name: no directory part, no `..`, not absolute.
pub fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none()
}
