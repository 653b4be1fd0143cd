//! The `tunsec` command line, as data: the binary parses it, and
//! `examples/gen-man.rs` turns the same definition into man pages and
//! shell completions (so they cannot drift from `--help`).

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tunsec",
    version,
    about = "A userspace IPsec (ESP/AH/IPComp transport mode) data plane speaking setkey(8)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Dir {
    Out,
    In,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Apply the engine to a capture file, offline: no TUN, no privileges.
    Pcap {
        /// setkey(8) file of the host doing the processing.
        #[arg(long, short = 'c')]
        config: PathBuf,
        /// `out`: protect plaintext per the outbound SPD; `in`: verify,
        /// decrypt and check the inbound SPD.
        #[arg(long, short = 'd', value_enum)]
        direction: Dir,
        #[arg(help = format!(
            "Input capture, pcap or pcapng; link type {}",
            crate::pcap::LINK_TYPES
        ))]
        input: PathBuf,
        /// Output pcap (linktype RAW, bare IP packets).
        output: PathBuf,
    },
    /// Parse a setkey(8) file and print the policies and SAs it defines.
    Check { config: PathBuf },
    /// Measure the engine against the raw crypto primitives (like `openssl speed`).
    Bench(crate::bench::Args),
    /// Run the data plane: TUN device, raw sockets, routes and nftables.
    #[command(after_long_help = crate::daemon::SIGNALS_HELP)]
    Run(crate::daemon::Args),
    /// Talk to a running daemon like setkey(8): -f FILE, -c, -D, -DP, -F, -FP, -x.
    Setkey(crate::client::SetkeyArgs),
    /// Counters of a running daemon: traffic, drops by reason, per-SA rates.
    Stats(crate::client::StatsArgs),
    /// Run an IKE daemon (charon, pluto) or `ip xfrm` against a tunsec
    /// serving --xfrm: its XFRM netlink reaches tunsec, nothing else changes.
    Ike(crate::ike::Args),
}

/// The command as clap sees it (for man pages and completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_definition_is_consistent() {
        super::command().debug_assert();
    }

    #[test]
    fn pcap_help_names_every_link_type_it_reads() {
        let mut cmd = super::command();
        let pcap = cmd.find_subcommand_mut("pcap").unwrap();
        let help = pcap.render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(help.contains(crate::pcap::LINK_TYPES), "{help}");
    }
}
