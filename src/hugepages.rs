//! The heap in transparent huge pages: glibc's `glibc.malloc.hugetlb=1`
//! tunable, which glibc reads only at start, so the process starts itself
//! again to set it. Process setup for `tunsec run` and `tunsec bench`; no
//! packet code.

/// The glibc tunable that puts malloc's arenas in transparent huge pages.
pub const TUNABLE: &str = "glibc.malloc.hugetlb=1";
/// `TUNSEC_HUGEPAGES` once tunsec has started itself again with it (a
/// value of its own: a user's `TUNSEC_HUGEPAGES=1` must not pass for it).
pub const SET: &str = "set";

/// Start `run` and `bench` again with their heap in transparent huge pages
/// (glibc reads `GLIBC_TUNABLES` once, at start; same PID, arguments and
/// environment otherwise), unless it is set already, `TUNSEC_HUGEPAGES=0`,
/// or the kernel has none to give. With 10,000 peers every packet touches
/// its SA's lines on pages no TLB entry covers; with 2 MiB pages `tunsec
/// bench --peers 1,10000` took 5-12% less per packet (README, "Many
/// peers"). Returns only if it did not start again.
pub fn start_again_with() {
    use std::os::unix::process::CommandExt;
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if tunables.contains("glibc.malloc.hugetlb")
        || std::env::var("TUNSEC_HUGEPAGES").is_ok_and(|v| v == "0" || v == SET)
    {
        return;
    }
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[always]") && !thp.contains("[madvise]") {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let tunables = if tunables.is_empty() {
        TUNABLE.to_string()
    } else {
        format!("{tunables}:{TUNABLE}")
    };
    // The binary's own path, not /proc/self/exe: the process's name
    // (`comm`, what ps, pgrep and systemd show) comes from it.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tunsec: going on without huge pages: cannot find this program: {e}");
            return;
        }
    };
    let e = std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        // Says so to the daemon's log: glibc may rewrite GLIBC_TUNABLES
        // in place as it reads it (Debian 12's shows the first tunable).
        .env("TUNSEC_HUGEPAGES", SET)
        .exec();
    eprintln!("tunsec: going on without huge pages: cannot start again: {e}");
}

/// Whether this process started itself again with the tunable, or was
/// given it (what the daemon's log says).
pub fn in_use() -> bool {
    std::env::var("TUNSEC_HUGEPAGES").is_ok_and(|v| v == SET)
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(TUNABLE))
}
