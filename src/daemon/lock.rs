//! Instance locks: a second tunsec with the same TUN name (in the same
//! network namespace) or the same control path refuses to start. The
//! kernel drops a flock when its holder dies, so a crash leaves nothing
//! that blocks the next start.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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

/// Is this the machine's initial network namespace (that of pid 1)?
fn initial_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/1/ns/net").is_ok_and(|m| m.ino() == netns_id())
}

/// The control socket `tunsec run --tun TUN` makes when `--control` is not
/// given: `/run/tunsec/TUN.sock` in the initial network namespace, and
/// `/run/tunsec/net-INODE-TUN.sock` in any other, so that daemons in two
/// namespaces (which share `/run`) never collide.
pub fn default_control(tun: &str) -> PathBuf {
    let name = if initial_netns() {
        format!("{tun}.sock")
    } else {
        format!("net-{}-{tun}.sock", netns_id())
    };
    Path::new(LOCK_DIR).join(name)
}

/// The default control sockets of this network namespace's daemons (what
/// `tunsec setkey` and `tunsec stats` use without `--control`).
pub fn default_controls_here() -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let prefix = format!("net-{}-", netns_id());
    let initial = initial_netns();
    let mut v: Vec<PathBuf> = std::fs::read_dir(LOCK_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if initial {
                !n.starts_with("net-") && n.ends_with(".sock")
            } else {
                n.starts_with(&prefix) && n.ends_with(".sock")
            }
        })
        .collect();
    v.sort();
    v
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
    // The pid over the old content, then the length: a reader never sees
    // an empty file.
    let pid = format!("{}\n", std::process::id());
    f.write_all(pid.as_bytes())?;
    f.set_len(pid.len() as u64)?;
    Ok(Lock { _file: f })
}
