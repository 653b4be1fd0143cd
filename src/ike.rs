//! `tunsec ike --xfrm PATH -- COMMAND [ARGS...]`: run an IKE daemon (or
//! `ip xfrm`) so that its `NETLINK_XFRM` sockets reach a tunsec serving
//! `--xfrm PATH`, through the preload library `libtunsec_xfrm.so` (the
//! `shim` crate). Nothing else about the command changes.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The preload library's file name.
pub const LIBRARY: &str = "libtunsec_xfrm.so";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// tunsec's XFRM socket (`tunsec run --xfrm PATH`).
    #[arg(long)]
    pub xfrm: PathBuf,
    /// The preload library (default: beside this binary, then where a
    /// package installs it).
    #[arg(long)]
    pub library: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
}

/// Where the library is looked for, in order.
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        v.push(dir.join(LIBRARY));
    }
    for d in ["/usr/lib/tunsec", "/usr/local/lib/tunsec", "/usr/lib"] {
        v.push(Path::new(d).join(LIBRARY));
    }
    v
}

pub fn run(args: &Args) -> Result<()> {
    let lib = match &args.library {
        Some(l) => l.clone(),
        None => candidates()
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "cannot find {LIBRARY} (looked in {}); build it with `cargo build`, or give --library",
                    candidates()
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
    };
    let lib = std::fs::canonicalize(&lib)
        .with_context(|| format!("cannot read the preload library {}", lib.display()))?;
    let meta = std::fs::metadata(&args.xfrm).with_context(|| {
        format!(
            "no XFRM socket at {} (start `tunsec run --xfrm {}` first)",
            args.xfrm.display(),
            args.xfrm.display()
        )
    })?;
    if !meta.file_type().is_socket() {
        bail!("{} is not a socket", args.xfrm.display());
    }
    let xfrm = std::fs::canonicalize(&args.xfrm)?;
    let mut preload = lib.display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD")
        && !old.is_empty()
    {
        preload = format!("{preload}:{old}");
    }
    let err = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("LD_PRELOAD", preload)
        .env("TUNSEC_XFRM", &xfrm)
        .exec();
    Err(err).with_context(|| format!("cannot run {}", args.command[0]))
}
