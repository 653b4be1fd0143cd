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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(&cli.cmd, Cmd::Run(a) if !a.dry_run) || matches!(&cli.cmd, Cmd::Bench(_)) {
        tunsec::hugepages::start_again_with();
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
