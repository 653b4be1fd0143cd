//! The `tunsec` command.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tunsec::state::State;

#[derive(Parser)]
#[command(
    name = "tunsec",
    version,
    about = "A userspace IPsec (ESP/AH/IPComp transport mode) data plane speaking setkey(8)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dir {
    Out,
    In,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the engine to a capture file, offline: no TUN, no privileges.
    Pcap {
        /// setkey(8) file of the host doing the processing.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// `out`: protect plaintext per the outbound SPD; `in`: verify,
        /// decrypt and check the inbound SPD.
        #[arg(long, short = 'd', value_enum)]
        direction: Dir,
        /// Input pcap (linktype RAW or Ethernet).
        input: PathBuf,
        /// Output pcap (linktype RAW, bare IP packets).
        output: PathBuf,
    },
    /// Parse a setkey(8) file and print the policies and SAs it defines.
    Check { config: PathBuf },
    /// Measure the engine against the raw crypto primitives (like `openssl speed`).
    Bench(tunsec::bench::Args),
    /// Run the data plane: TUN device, raw sockets, routes and nftables.
    Run(tunsec::daemon::Args),
    /// Talk to a running daemon like setkey(8): -f FILE, -c, -D, -DP, -F, -FP, -x.
    Setkey(tunsec::client::SetkeyArgs),
    /// Counters of a running daemon: traffic, drops by reason, per-SA rates.
    Stats(tunsec::client::StatsArgs),
    /// Run an IKE daemon (charon, pluto) or `ip xfrm` against a tunsec
    /// serving --xfrm: its XFRM netlink reaches tunsec, nothing else changes.
    Ike(tunsec::ike::Args),
}

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
            eprintln!("{}", summary.line());
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
    // A one-shot command piped into `head` should end quietly, as Unix
    // tools do, not panic on a closed stdout.
    // SAFETY: setting a signal disposition before any thread starts.
    if !matches!(cli.cmd, Cmd::Run(_)) {
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
