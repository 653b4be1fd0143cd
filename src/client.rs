//! The control socket's client side: `tunsec setkey` (with setkey(8)'s
//! habits) and `tunsec stats`.

#![warn(clippy::undocumented_unsafe_blocks)]

use crate::control;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONTROL: &str = "/run/tunsec/tunsec.sock";

/// A connection to a daemon's control socket.
pub struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(path: &Path) -> Result<Conn> {
        // SAFETY: socket() takes no pointers; the result is checked below.
        let fd =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("cannot create a socket: {}", io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { zeroed() };
        addr.sun_family = libc::AF_UNIX as u16;
        let bytes = path.as_os_str().as_encoded_bytes();
        if bytes.len() >= addr.sun_path.len() {
            bail!("control path {} is too long", path.display());
        }
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        // SAFETY: addr is a valid sockaddr_un (NUL-terminated: the path is
        // shorter than sun_path, which was zeroed) and the length is its size.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_un>() as u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            bail!(
                "cannot connect to {} ({e}): is `tunsec run` running with --control {}?",
                path.display(),
                path.display()
            );
        }
        let rcv: libc::c_int = 16 << 20;
        // SAFETY: the option value points to a c_int and the length is 4.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &rcv as *const _ as *const libc::c_void,
                4,
            );
        }
        Ok(Conn {
            fd,
            buf: vec![0u8; 64 << 20],
        })
    }

    /// Send one request message.
    pub fn send(&self, msg: &str) -> Result<()> {
        // SAFETY: msg's bytes are valid for msg.len() during the call.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            bail!("cannot send to the daemon: {}", io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receive one reply or event message.
    pub fn recv(&mut self) -> Result<Value> {
        // SAFETY: the buffer is valid and writable for buf.len() bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut libc::c_void,
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            bail!(
                "cannot read from the daemon: {}",
                io::Error::last_os_error()
            );
        }
        if n == 0 {
            bail!("the daemon closed the connection");
        }
        serde_json::from_slice(&self.buf[..n as usize])
            .context("the daemon sent something that is not JSON")
    }

    /// One request, one reply.
    pub fn request(&mut self, msg: &str) -> Result<Value> {
        self.send(msg)?;
        self.recv()
    }
}

#[derive(Debug, clap::Args)]
pub struct SetkeyArgs {
    /// Read statements from FILE (setkey -f).
    #[arg(short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Read statements from standard input (setkey -c).
    #[arg(short = 'c')]
    pub stdin: bool,
    /// Dump the SAD (with -P: the SPD).
    #[arg(short = 'D')]
    pub dump: bool,
    /// Flush the SAD (with -P: the SPD).
    #[arg(short = 'F')]
    pub flush: bool,
    /// With -D or -F: the SPD instead of the SAD.
    #[arg(short = 'P')]
    pub policy: bool,
    /// Print events as they happen (setkey -x).
    #[arg(short = 'x')]
    pub monitor: bool,
    /// With -D: show keys.
    #[arg(short = 'k')]
    pub keys: bool,
    /// Machine-readable output: the daemon's JSON replies (one per line).
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

fn check(v: &Value, file: &str) -> Result<()> {
    if v["ok"] == Value::Bool(true) {
        return Ok(());
    }
    let e = v["error"]
        .as_str()
        .unwrap_or("the daemon refused the request");
    // The daemon names statements "control:LINE"; name them after the file.
    let e = e
        .strip_prefix("control:")
        .map(|rest| format!("{file}:{rest}"))
        .unwrap_or_else(|| e.to_string());
    bail!("{e}")
}

fn print_sa_text(sa: &Value) {
    let g = |k: &str| sa[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| sa[k].as_u64().unwrap_or(0);
    println!("{} {}", g("src"), g("dst"));
    println!(
        "\t{} mode=transport spi={}({:#010x}) reqid={}",
        g("proto"),
        n("spi"),
        n("spi"),
        n("reqid")
    );
    if g("proto") == "esp" {
        println!(
            "\tE: {}{}",
            g("enc"),
            sa.get("enc_key")
                .and_then(Value::as_str)
                .map(|k| format!("  {k}"))
                .unwrap_or_default()
        );
    }
    if g("auth") != "null" && !g("auth").is_empty() {
        println!(
            "\tA: {}{}",
            g("auth"),
            sa.get("auth_key")
                .and_then(Value::as_str)
                .map(|k| format!("  {k}"))
                .unwrap_or_default()
        );
    }
    if g("state") == "larval" {
        println!("\tstate=larval expires in {}s", n("expires_in_secs"));
        return;
    }
    println!(
        "\tseq={:#010x} replay={} flags=esn:{} state={}",
        n("seq"),
        n("replay"),
        sa["esn"],
        g("state")
    );
    let lt = &sa["lifetime"];
    println!(
        "\tage: {}s  hard: {}(s) {}(bytes)  soft: {}(s) {}(bytes)",
        n("age_secs"),
        lt["hard_secs"],
        lt["hard_bytes"],
        lt["soft_secs"],
        lt["soft_bytes"]
    );
    println!(
        "\tcurrent: {}(bytes) {}(packets)  replay drops: {}  ICV failures: {}",
        n("bytes"),
        n("packets"),
        n("replay_drops"),
        n("icv_failures")
    );
}

pub fn setkey(a: &SetkeyArgs) -> Result<()> {
    let mut conn = Conn::connect(&a.control)?;
    let show = |v: &Value| {
        if a.json {
            println!("{v}");
        }
    };
    if a.monitor {
        let v = conn.request("monitor;")?;
        check(&v, "monitor")?;
        loop {
            let e = conn.recv()?;
            if a.json {
                println!("{e}");
            } else {
                println!("{}", control::event_line(&e));
            }
            io::stdout().flush()?;
        }
    }
    if a.dump {
        let req = if a.policy {
            "spddump;".to_string()
        } else if a.keys {
            "dump -k;".into()
        } else {
            "dump;".into()
        };
        let v = conn.request(&req)?;
        check(&v, "dump")?;
        if a.json {
            show(&v);
        } else if a.policy {
            for p in v["policies"].as_array().into_iter().flatten() {
                println!("{}", p["text"].as_str().unwrap_or(""));
            }
        } else {
            let mut any = false;
            for sa in v["sas"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(v["larval"].as_array().into_iter().flatten())
            {
                print_sa_text(sa);
                any = true;
            }
            if !any {
                println!("No SAD entries.");
            }
        }
        return Ok(());
    }
    let (text, name) = if a.flush {
        (
            (if a.policy { "spdflush;" } else { "flush;" }).to_string(),
            "flush".to_string(),
        )
    } else if let Some(f) = &a.file {
        (
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
            f.display().to_string(),
        )
    } else if a.stdin {
        let mut t = String::new();
        io::stdin().read_to_string(&mut t)?;
        (t, "-".to_string())
    } else {
        bail!("nothing to do: give -f FILE, -c, -D, -DP, -F, -FP or -x");
    };
    // Parse here first, so that errors name the file and its lines.
    let parsed = crate::setkey::parse(&text, &name)?;
    if parsed.statements.is_empty() {
        return Ok(());
    }
    let v = conn.request(&text)?;
    show(&v);
    check(&v, &name)?;
    if !a.json {
        for w in v["warnings"].as_array().into_iter().flatten() {
            let w = w.as_str().unwrap_or("");
            eprintln!(
                "warning: {}",
                w.strip_prefix("control:")
                    .map(|r| format!("{name}:{r}"))
                    .unwrap_or(w.to_string())
            );
        }
        for line in v["output"].as_array().into_iter().flatten() {
            println!("{}", line.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// One JSON object (per refresh with --watch).
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds, like top.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    pub watch: Option<f64>,
    #[arg(long, default_value = DEFAULT_CONTROL)]
    pub control: PathBuf,
}

fn rate(cur: &Value, prev: Option<&Value>, key: &str, secs: f64) -> f64 {
    match prev {
        Some(p) if secs > 0.0 => {
            (cur[key]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(p[key].as_u64().unwrap_or(0))) as f64
                / secs
        }
        _ => 0.0,
    }
}

fn render_stats(v: &Value, prev: Option<&Value>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let c = &v["counters"];
    let secs = match prev {
        Some(p) => {
            v["uptime_secs"].as_f64().unwrap_or(0.0) - p["uptime_secs"].as_f64().unwrap_or(0.0)
        }
        None => 0.0,
    };
    let pc = prev.map(|p| &p["counters"]);
    writeln!(
        s,
        "tunsec: up {:.0}s",
        v["uptime_secs"].as_f64().unwrap_or(0.0)
    )
    .unwrap();
    writeln!(
        s,
        "out: {} packets {} bytes ({:.0} pkt/s)   in: {} packets {} bytes ({:.0} pkt/s)   bypassed: {}",
        c["out_packets"], c["out_bytes"], rate(c, pc, "out_packets", secs), c["in_packets"], c["in_bytes"],
        rate(c, pc, "in_packets", secs), c["bypassed"]
    )
    .unwrap();
    let io = &v["io"];
    writeln!(
        s,
        "io: tun rx {} tx {} (errors {})   net rx {} tx {} (errors {})",
        io["tun_rx"],
        io["tun_tx"],
        io["tun_tx_errors"],
        io["net_rx"],
        io["net_tx"],
        io["net_tx_errors"]
    )
    .unwrap();
    let mut drops: Vec<String> = c["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let refused = v["plaintext_refused"].as_u64().unwrap_or(0);
    if refused > 0 {
        drops.push(format!("plaintext-refused-by-nftables {refused}"));
    }
    writeln!(
        s,
        "dropped: {}{}",
        c["dropped"],
        if drops.is_empty() {
            String::new()
        } else {
            format!(" ({})", drops.join(", "))
        }
    )
    .unwrap();
    writeln!(
        s,
        "{:<6} {:<39} {:<39} {:>10} {:>12} {:>10} {:>12} {:>6} {:>6}  state",
        "proto", "src", "dst", "spi", "packets", "pkt/s", "bytes", "replay", "icv"
    )
    .unwrap();
    let prev_sas: Vec<&Value> = prev
        .and_then(|p| p["sas"].as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    for sa in v["sas"].as_array().into_iter().flatten() {
        let before = prev_sas
            .iter()
            .find(|p| p["spi"] == sa["spi"] && p["dst"] == sa["dst"] && p["proto"] == sa["proto"])
            .copied();
        writeln!(
            s,
            "{:<6} {:<39} {:<39} {:>#10x} {:>12} {:>10.0} {:>12} {:>6} {:>6}  {}",
            sa["proto"].as_str().unwrap_or(""),
            sa["src"].as_str().unwrap_or(""),
            sa["dst"].as_str().unwrap_or(""),
            sa["spi"].as_u64().unwrap_or(0),
            sa["packets"].as_u64().unwrap_or(0),
            rate(sa, before, "packets", secs),
            sa["bytes"].as_u64().unwrap_or(0),
            sa["replay_drops"].as_u64().unwrap_or(0),
            sa["icv_failures"].as_u64().unwrap_or(0),
            sa["state"].as_str().unwrap_or("")
        )
        .unwrap();
    }
    s
}

pub fn stats(a: &StatsArgs) -> Result<()> {
    let mut conn = Conn::connect(&a.control)?;
    let mut prev: Option<Value> = None;
    loop {
        let v = conn.request("stats;")?;
        check(&v, "stats")?;
        if a.json {
            println!("{v}");
        } else {
            if a.watch.is_some() {
                print!("\x1b[H\x1b[2J");
            }
            print!("{}", render_stats(&v, prev.as_ref()));
        }
        io::stdout().flush()?;
        let Some(secs) = a.watch else { return Ok(()) };
        if !(0.05..=3600.0).contains(&secs) {
            bail!("--watch {secs}: give 0.05 to 3600 seconds");
        }
        prev = Some(v);
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}
