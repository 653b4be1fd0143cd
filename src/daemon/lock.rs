//! Instance locks: a second tunsec with the same TUN name (in the same
//! network namespace) or the same control path refuses to start. The
//! kernel drops a flock when its holder dies, so a crash leaves nothing
//! that blocks the next start.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

pub const LOCK_DIR: &str = "/run/tunsec";

/// Held for the life of the instance; the kernel releases it at exit.
pub struct Lock {
    _file: File,
}

/// The network namespace we run in, as the inode of /proc/self/ns/net.
pub fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

/// Take the lock at `path`, or say who holds it.
pub fn take(path: &Path, what: &str) -> Result<Lock> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    // SAFETY: plain flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        bail!(
            "{what} is in use by another tunsec instance (pid {}; lock {})",
            holder.trim(),
            path.display()
        );
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(Lock { _file: f })
}
