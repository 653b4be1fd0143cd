//! A seccomp allow-list for the worker threads: the threads that parse
//! what arrives from the network (and from the TUN device) may make only
//! the system calls their loop makes; anything else fails with `EPERM`
//! (not a kill: a call missing from the list turns into a counted error,
//! never a dead daemon).
//!
//! The filter is installed by each worker on itself (seccomp filters
//! belong to a thread), after the daemon dropped its privileges and set
//! no-new-privs (`privilege::restrict`). The control and XFRM threads,
//! which run `nft` and read local requests only, are not filtered: a
//! filter is inherited across `execve`, and `nft` makes calls of its own.
//! `TUNSEC_SECCOMP=0` leaves the workers unfiltered (to compare).

use anyhow::{Context, Result};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// What a worker's loop calls: polling and batched socket I/O, TUN reads
/// and writes, the rtnetlink lookups of `gso`, the allocator and the key
/// arena, locks, time, logging, the packet sockets' drop counts, and
/// leaving the thread.
const WORKER_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_recvmmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_getsockopt,
    libc::SYS_sendmsg,
    // The TUN MTU for a log line (an ioctl on a short-lived socket).
    libc::SYS_socket,
    libc::SYS_ioctl,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // A call interrupted by a signal or a debugger (gcore) resumes by this.
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The worker filter for this machine's architecture.
pub fn worker_filter() -> Result<BpfProgram> {
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .context("seccomp: unsupported architecture")?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        WORKER_SYSCALLS.iter().map(|s| (*s, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .context("seccomp: building the worker filter")?;
    filter
        .try_into()
        .context("seccomp: compiling the worker filter")
}

/// Whether workers filter themselves (`TUNSEC_SECCOMP=0`: no).
pub fn enabled() -> bool {
    std::env::var("TUNSEC_SECCOMP").map_or(true, |v| v != "0")
}

/// Install `prog` on the calling thread.
pub fn apply(prog: &BpfProgram) -> Result<()> {
    seccompiler::apply_filter(prog).context("seccomp: installing the worker filter")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filtered thread keeps its own calls and loses the rest: opening a
    /// file (what an exploit would do first) fails with EPERM.
    #[test]
    fn a_filtered_thread_cannot_open_files_or_run_programs() {
        let prog = worker_filter().unwrap();
        std::thread::spawn(move || {
            apply(&prog).unwrap();
            // Allowed: time, memory.
            let v = vec![1u8; 1 << 20];
            assert_eq!(v.len(), 1 << 20);
            let _ = std::time::Instant::now();
            // Refused.
            let r = std::fs::File::open("/etc/hostname");
            assert_eq!(
                r.map_err(|e| e.raw_os_error()).err(),
                Some(Some(libc::EPERM))
            );
            // SAFETY: fork is refused by the filter; nothing runs twice.
            let pid = unsafe { libc::fork() };
            assert_eq!(pid, -1);
        })
        .join()
        .unwrap();
        // Other threads are not filtered.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
