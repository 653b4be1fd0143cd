//! The `tunsec` command.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tunsec::cli::{Cli, Cmd, Dir};
use tunsec::state::State;

/// The system allocator, but for the daemon's key-handling code, which
/// allocates in a locked, undumped arena (`tunsec::secret`).
#[global_allocator]
static ALLOC: tunsec::secret::Alloc = tunsec::secret::Alloc;

fn load(path: &PathBuf) -> Result<State> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (state, _, warnings) =
        State::default().apply_text(&text, &path.display().to_string(), Duration::ZERO)?;
    for w in warnings {
        eprintln!("{}:{}: warning: {}", path.display(), w.line, w.message);
    }
    Ok(state)
}

fn os_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(seed)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pcap {
            config,
            direction,
            input,
            output,
        } => {
            let state = load(&config)?;
            let dir = match direction {
                Dir::Out => tunsec::pcap::Direction::Out,
                Dir::In => tunsec::pcap::Direction::In,
            };
            let summary = tunsec::pcap::run(&state, dir, &input, &output, os_seed()?)?;
            if let Some(d) = &summary.damaged {
                eprintln!("{d}");
            }
            eprintln!("{}", summary.line());
            if let Some(l) = summary.fragments_line() {
                eprintln!("{l}");
            }
            let acquires = summary
                .events
                .iter()
                .filter(|e| matches!(e, tunsec::engine::Event::Acquire { .. }))
                .count();
            if acquires > 0 {
                eprintln!(
                    "{acquires} packets needed an SA that the configuration does not have (ACQUIRE)"
                );
            }
            Ok(())
        }
        Cmd::Check { config } => {
            let state = load(&config)?;
            println!("{} policies, {} SAs", state.spd.len(), state.sad.len());
            for p in state.spd.iter() {
                println!("spd: {p}");
            }
            for sa in state.sad.iter() {
                println!("{}", tunsec::state::describe_sa(sa, Duration::ZERO));
            }
            Ok(())
        }
        Cmd::Bench(args) => tunsec::bench::run(&args),
        Cmd::Run(args) => tunsec::daemon::run(&args),
        Cmd::Setkey(args) => tunsec::client::setkey(&args),
        Cmd::Stats(args) => tunsec::client::stats(&args),
        Cmd::Ike(args) => tunsec::ike::run(&args),
    }
}

/// The glibc tunable that puts malloc's arenas in transparent huge pages.
const HUGE_PAGES: &str = "glibc.malloc.hugetlb=1";
/// `TUNSEC_HUGEPAGES` once tunsec has started itself again with it (a
/// value of its own: a user's `TUNSEC_HUGEPAGES=1` must not pass for it).
const HUGE_PAGES_SET: &str = "set";

/// Start `run` and `bench` again with their heap in transparent huge pages
/// (glibc reads `GLIBC_TUNABLES` once, at start; same PID, arguments and
/// environment otherwise), unless it is set already, `TUNSEC_HUGEPAGES=0`,
/// or the kernel has none to give. With 10,000 peers every packet touches
/// its SA's lines on pages no TLB entry covers; with 2 MiB pages `tunsec
/// bench --peers 1,10000` took 5-12% less per packet (README, "Many
/// peers"). Returns only if it did not start again.
fn with_huge_pages() {
    use std::os::unix::process::CommandExt;
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if tunables.contains("glibc.malloc.hugetlb")
        || std::env::var("TUNSEC_HUGEPAGES").is_ok_and(|v| v == "0" || v == HUGE_PAGES_SET)
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
        HUGE_PAGES.to_string()
    } else {
        format!("{tunables}:{HUGE_PAGES}")
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
        .env("TUNSEC_HUGEPAGES", HUGE_PAGES_SET)
        .exec();
    eprintln!("tunsec: going on without huge pages: cannot start again: {e}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(&cli.cmd, Cmd::Run(a) if !a.dry_run) || matches!(&cli.cmd, Cmd::Bench(_)) {
        with_huge_pages();
    }
    // A one-shot command piped into `head` should end quietly, as Unix
    // tools do, not panic on a closed stdout (`run --dry-run` is one; the
    // daemon ignores SIGPIPE).
    // SAFETY: setting a signal disposition before any thread starts.
    if !matches!(&cli.cmd, Cmd::Run(a) if !a.dry_run) {
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunsec: {e:#}");
            ExitCode::FAILURE
        }
    }
}
