//! Reading and writing files the way every peft-rs command must:
//!
//! * inputs are read only from regular files (or symlinks to them) and only
//!   up to a size that makes sense for what they are, so that `/dev/zero`, a
//!   FIFO or a 10 GB "config.json" ends in one clear line instead of a hang
//!   or an exhausted machine;
//! * outputs are written to a temporary file in the same directory, synced
//!   and renamed, so a crash never leaves half a file, and the temporary file
//!   is removed when writing fails (a full disk, a read-only file system).
//!
//! Every error names the file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Largest JSON settings file read (config.json, adapter_config.json, ...).
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// Largest tokenizer.json read (Gemma's is about 33 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 512 << 20;
/// Largest adapter weights file read into memory.
pub const MAX_ADAPTER_BYTES: u64 = 16 << 30;

/// Opens `path` for reading if it is a regular file (symlinks are followed);
/// `what` says what the file is for the error message.
pub fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        bail!(
            "{}: the {what} is {kind}; give a regular file",
            path.display()
        );
    }
    let f =
        File::open(path).with_context(|| format!("{}: cannot open the {what}", path.display()))?;
    Ok((f, meta.len()))
}

/// Reads a regular file of at most `max_bytes`.
pub fn read_regular(path: &Path, max_bytes: u64, what: &str) -> Result<Vec<u8>> {
    let (f, len) = open_regular(path, what)?;
    if len > max_bytes {
        bail!(
            "{}: the {what} is {len} bytes, more than the {max_bytes} such a file may have",
            path.display()
        );
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    f.take(max_bytes + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    if buf.len() as u64 > max_bytes {
        bail!(
            "{}: the {what} grew past {max_bytes} bytes while it was read",
            path.display()
        );
    }
    Ok(buf)
}

/// Reads a regular UTF-8 text file of at most `max_bytes`.
pub fn read_regular_string(path: &Path, max_bytes: u64, what: &str) -> Result<String> {
    String::from_utf8(read_regular(path, max_bytes, what)?)
        .map_err(|e| anyhow::anyhow!("{}: the {what} is not UTF-8 text ({e})", path.display()))
}

/// The temporary name `write_atomic` uses for `path`: hidden, in the same
/// directory, tagged with the process id.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes bytes to `path` via a synced temporary file and a rename. On any
/// failure the temporary file is removed and the error names `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`], with the content written by `write`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    write_atomic_at(path, |tmp| {
        let mut f = File::create(tmp)?;
        write(&mut f)?;
        f.sync_all().map_err(Into::into)
    })
}

/// Like [`write_atomic`], with the temporary file written at the path
/// `write` is given (by a writer that opens files itself); it is synced
/// and renamed here.
pub fn write_atomic_at(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        write(&tmp)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: cannot write: {e:#}", path.display());
    }
    Ok(())
}
