//! Least privilege once the daemon is set up.
//!
//! Setup needs root's full power (creating the TUN device, raw and packet
//! sockets, `SO_MARK`, routes and nftables, `/proc/sys`, the lock and
//! socket files). What runs afterwards needs only two capabilities:
//! `CAP_NET_ADMIN` (routes, rules and nftables on a policy change or at
//! stop, through rtnetlink and the `nft` it runs) and `CAP_NET_RAW`
//! (kept for the raw and packet sockets, e.g. should one be reopened).
//! Everything else goes, from the effective, permitted and inheritable
//! sets and from the bounding set, and no-new-privs is set, so a program
//! the daemon runs (`nft`) gets at most those two however it is
//! installed; the two are also ambient, so `nft` has them even under
//! `SECBIT_NOROOT` (systemd's `SecureBits=noroot`). The process stays uid 0: its files (control socket, locks,
//! `/run/tunsec`) are root's and it removes them at stop as their owner,
//! without `CAP_DAC_OVERRIDE`. Root's exec rule would give a child the
//! whole bounding set; with the bounding set cut to the two, that is
//! exactly what `nft` needs.
//!
//! The process is also made non-dumpable: no core file unless the system
//! asks for set-uid dumps (`fs.suid_dumpable=2`, as systemd-coredump
//! does), and no `ptrace` or `/proc/PID/mem` by anyone without
//! `CAP_SYS_PTRACE`. Key material lives in `crate::secret`'s arena
//! either way, which no core dump (nor `gcore`) holds.
//!
//! Raw `capset` and `prctl` through libc: four system calls do not
//! justify a dependency, and what each does is in one place here.

use anyhow::{Context, Result, bail};
use std::io;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_NET_RAW: u32 = 13;
const CAP_SETPCAP: u32 = 8;
/// What the daemon keeps.
pub const KEPT: [u32; 2] = [CAP_NET_ADMIN, CAP_NET_RAW];

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> io::Result<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and the two data words it asks for.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data)
}

fn capset(data: &[CapData; 2]) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: a v3 header and two data words, read by the kernel.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn has(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

/// Whether `cap` is in this thread's bounding set.
fn in_bounding_set(cap: u32) -> bool {
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) == 1 }
}

fn prctl(op: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    prctl2(op, arg, 0)
}

fn prctl2(op: libc::c_int, arg: libc::c_ulong, arg2: libc::c_ulong) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(op, arg, arg2, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lift RLIMIT_MEMLOCK as far as allowed; say what it is now.
fn raise_memlock() -> String {
    let mut lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setting and reading a limit of our own process.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0
            && libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0
        {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
        }
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!(
            "{} KiB (no CAP_SYS_RESOURCE to lift it)",
            lim.rlim_cur >> 10
        )
    }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Drop to [`KEPT`], set no-new-privs, make the process non-dumpable, and
/// let the key arena stay locked as it grows. Capabilities belong to a
/// thread and are inherited by the threads it starts afterwards, so this
/// must run while the daemon has one thread (it refuses otherwise).
pub fn restrict() -> Result<()> {
    let n = threads();
    if n != 1 {
        bail!("cannot drop privileges: {n} threads already run (capabilities are per thread)");
    }
    // The arena is locked as it grows; without CAP_IPC_LOCK that counts
    // against RLIMIT_MEMLOCK. It holds key material and the text that
    // carried it, nothing an outsider can grow without the control socket.
    // Lifting the hard limit needs CAP_SYS_RESOURCE (a container may not
    // have it: then the soft limit goes up to the hard one, and what grows
    // beyond it is not locked, though still never dumped).
    let memlock = raise_memlock();
    let cur = capget().context("capget")?;
    let eff = cur[0].effective as u64 | (cur[1].effective as u64) << 32;
    let prm = cur[0].permitted as u64 | (cur[1].permitted as u64) << 32;
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    // What the bounding set holds beyond the two (nothing when systemd's
    // CapabilityBoundingSet= already cut it).
    let extra: Vec<u32> = (0..=last)
        .filter(|c| !KEPT.contains(c) && in_bounding_set(*c))
        .collect();
    if has(eff, CAP_SETPCAP) {
        for cap in &extra {
            prctl(libc::PR_CAPBSET_DROP, *cap as libc::c_ulong)
                .with_context(|| format!("cannot drop capability {cap} from the bounding set"))?;
        }
    } else if !extra.is_empty() {
        tracing::warn!(
            "no CAP_SETPCAP: {} capabilities beyond cap_net_admin and cap_net_raw stay in the bounding set \
             (no-new-privs still bounds what `nft` gets)",
            extra.len()
        );
    }
    // Ambient capabilities: whatever a parent set goes; the two kept are
    // raised below, so that the `nft` the daemon runs has them even when
    // root's exec rule is off (`SECBIT_NOROOT`, systemd's
    // `SecureBits=noroot`).
    let _ = prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    );
    let keep: u64 = KEPT.iter().fold(0, |m, c| m | 1 << c) & prm;
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    capset(&[
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ])
    .context("cannot drop capabilities (capset)")?;
    for cap in KEPT.iter().filter(|c| has(keep, **c)) {
        // Refused only under SECBIT_NO_CAP_AMBIENT_RAISE: then `nft` has
        // what root's exec rule gives it, the bounding set.
        let _ = prctl2(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            *cap as libc::c_ulong,
        );
    }
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).context("cannot set no-new-privs")?;
    prctl(libc::PR_SET_DUMPABLE, 0).context("cannot make the process non-dumpable")?;
    // Key bytes and schedules of the configuration's SAs passed through
    // this thread's stack while it parsed them.
    crate::secret::scope(|| ());
    let (reserved, used, misses, unlocked) = crate::secret::stats();
    tracing::info!(
        "privileges: capabilities {} only, no-new-privs, not dumpable; key memory {} KiB of a {} MiB arena{}{}, RLIMIT_MEMLOCK {memlock}",
        if keep == (1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW) {
            "cap_net_admin, cap_net_raw"
        } else {
            "a subset of cap_net_admin, cap_net_raw"
        },
        used >> 10,
        reserved >> 20,
        if unlocked {
            ", NOT locked (mlock failed)"
        } else {
            ", locked, not dumped"
        },
        if misses > 0 {
            format!(", {misses} allocations outside it")
        } else {
            String::new()
        }
    );
    Ok(())
}
