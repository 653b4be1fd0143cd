//! `tunsec bench`: the engine's throughput beside the raw primitives'.

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
