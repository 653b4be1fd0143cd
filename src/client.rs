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

    /// Receive one reply or event, reassembling a chunked reply.
    pub fn recv(&mut self) -> Result<Value> {
        let v = self.recv_one()?;
        let Some(k) = v.get("chunked").and_then(Value::as_u64) else {
            return Ok(v);
        };
        let mut text = Vec::new();
        for _ in 0..k {
            let n = self.recv_raw()?;
            text.extend_from_slice(&self.buf[..n]);
        }
        serde_json::from_slice(&text).context("the daemon sent a chunked reply that is not JSON")
    }

    /// One message's bytes into `self.buf`; returns its length.
    fn recv_raw(&mut self) -> Result<usize> {
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
        Ok(n as usize)
    }

    /// One message, as JSON.
    fn recv_one(&mut self) -> Result<Value> {
        let n = self.recv_raw()?;
        serde_json::from_slice(&self.buf[..n]).context("the daemon sent something that is not JSON")
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
    /// With -D: the ESP SAs, keys included (as -k), as lines of
    /// Wireshark's `esp_sa` file (Wireshark 4.0 names), to decrypt
    /// captures: redirect into ~/.config/wireshark/esp_sa.
    #[arg(long, requires = "dump", conflicts_with_all = ["policy", "json"])]
    pub wireshark: bool,
    /// Machine-readable output: the daemon's JSON replies (one per line).
    #[arg(long)]
    pub json: bool,
    /// The daemon's control socket (default: the one daemon of this
    /// network namespace that runs with its default path).
    #[arg(long)]
    pub control: Option<PathBuf>,
}

/// `--control`, or this network namespace's one daemon socket.
fn control_path(given: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    let found = crate::daemon::lock::default_controls_here();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no tunsec daemon of this network namespace runs with its default control socket ({}); give --control PATH",
            crate::daemon::lock::default_control("TUN").display()
        ),
        many => bail!(
            "several tunsec daemons run in this network namespace: give --control with one of {}",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
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
    let port = |k: &str| sa["encap"][k].as_u64().map(|p| format!("[{p}]"));
    let udp = sa["encap"].is_object();
    println!(
        "{}{} {}{}",
        g("src"),
        port("sport").unwrap_or_default(),
        g("dst"),
        port("dport").unwrap_or_default()
    );
    println!(
        "\t{} mode=transport spi={}({:#010x}) reqid={}",
        if udp {
            "esp-udp".to_string()
        } else {
            g("proto")
        },
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
    let mut conn = Conn::connect(&control_path(&a.control)?)?;
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
    if a.dump && a.wireshark {
        let v = conn.request("dump esp -k;")?;
        check(&v, "dump")?;
        let sas: Vec<Value> = v["sas"].as_array().cloned().unwrap_or_default();
        let (text, notes) = wireshark_esp_sa(&sas);
        print!("{text}");
        for n in notes {
            eprintln!("tunsec: {n}");
        }
        return Ok(());
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

/// Wireshark's name (`esp_sa` UAT, Wireshark 4.0) of an encryption
/// algorithm, if it has the algorithm.
fn wireshark_enc(name: &str) -> Option<&'static str> {
    Some(match name {
        "null" => "NULL",
        "aes-cbc" => "AES-CBC [RFC3602]",
        "aes-gcm-16" => "AES-GCM with 16 octet ICV [RFC4106]",
        _ => return None, // chacha20-poly1305: not in Wireshark 4.0
    })
}

fn wireshark_auth(name: &str) -> Option<&'static str> {
    Some(match name {
        "null" => "NULL",
        "hmac-sha1" => "HMAC-SHA-1-96 [RFC2404]",
        "hmac-sha256" => "HMAC-SHA-256-128 [RFC4868]",
        "hmac-sha384" => "HMAC-SHA-384-192 [RFC4868]",
        "hmac-sha512" => "HMAC-SHA-512-256 [RFC4868]",
        _ => return None,
    })
}

/// The ESP SAs of a `dump -k` reply as Wireshark `esp_sa` lines, one per
/// SA: protocol, source, destination, SPI, encryption, its key (AEADs:
/// key and salt), authentication, its key. Other SAs are skipped; the
/// notes say which and why.
pub fn wireshark_esp_sa(sas: &[Value]) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut notes = Vec::new();
    let q = |x: &str| format!("\"{}\"", x.replace('"', ""));
    let key = |sa: &Value, k: &str| {
        let h = sa[k].as_str().unwrap_or("");
        if h == "0x" {
            String::new()
        } else {
            h.to_string()
        }
    };
    for sa in sas {
        let g = |k: &str| sa[k].as_str().unwrap_or("");
        if g("proto") != "esp" {
            continue;
        }
        let spi = sa["spi"].as_u64().unwrap_or(0);
        let what = format!("esp SA {} -> {} spi {spi:#010x}", g("src"), g("dst"));
        if sa.get("enc_key").is_none() {
            notes.push(format!("{what}: the daemon sent no keys; left out"));
            continue;
        }
        let Some(enc) = wireshark_enc(g("enc")) else {
            notes.push(format!(
                "{what}: Wireshark 4.0 has no {}; left out",
                g("enc")
            ));
            continue;
        };
        let aead = matches!(g("enc"), "aes-gcm-16" | "chacha20-poly1305");
        let (auth, auth_key) = if aead {
            ("NULL", String::new())
        } else {
            match wireshark_auth(g("auth")) {
                Some(a) => (a, key(sa, "auth_key")),
                None => {
                    notes.push(format!(
                        "{what}: Wireshark 4.0 has no {}; left out",
                        g("auth")
                    ));
                    continue;
                }
            }
        };
        if sa["esn"] == Value::Bool(true) {
            notes.push(format!(
                "{what}: extended sequence numbers: Wireshark 4.0 decrypts but cannot check its ICV"
            ));
        }
        let fam = if g("src").contains(':') {
            "IPv6"
        } else {
            "IPv4"
        };
        let fields = [
            q(fam),
            q(g("src")),
            q(g("dst")),
            q(&format!("{spi:#010x}")),
            q(enc),
            q(&key(sa, "enc_key")),
            q(auth),
            q(&auth_key),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    (out, notes)
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// One JSON object (per refresh with --watch).
    #[arg(long)]
    pub json: bool,
    /// Refresh every SECS seconds, like top.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
    pub watch: Option<f64>,
    /// The counters in the Prometheus text exposition format (for a
    /// node_exporter textfile or a scrape wrapper).
    #[arg(long, conflicts_with_all = ["json", "watch"])]
    pub prometheus: bool,
    /// The daemon's control socket (default: the one daemon of this
    /// network namespace that runs with its default path).
    #[arg(long)]
    pub control: Option<PathBuf>,
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
        "io: tun rx {} tx {} (errors {})   net rx {} (dropped {}) tx {} (errors {})",
        io["tun_rx"],
        io["tun_tx"],
        io["tun_tx_errors"],
        io["net_rx"],
        io.get("net_rx_dropped").unwrap_or(&Value::from(0)),
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

/// A Prometheus label value: backslash, double quote and newline escaped.
fn prom_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The daemon's `stats;` reply in the Prometheus text exposition format
/// (version 0.0.4): HELP and TYPE once per family, then its samples.
/// Absent numbers read as 0, so a family always has its samples.
pub fn render_prometheus(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let n = |x: &Value| x.as_u64().unwrap_or(0);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        writeln!(s, "# HELP {name} {help}").unwrap();
        writeln!(s, "# TYPE {name} {kind}").unwrap();
        for (labels, value) in samples {
            if labels.is_empty() {
                writeln!(s, "{name} {value}").unwrap();
            } else {
                writeln!(s, "{name}{{{labels}}} {value}").unwrap();
            }
        }
    };
    let one = |x: u64| vec![(String::new(), x.to_string())];
    let c = &v["counters"];
    let io = &v["io"];
    family(
        "tunsec_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        &[(
            String::new(),
            format!("{}", v["uptime_secs"].as_f64().unwrap_or(0.0)),
        )],
    );
    let dirs = |key: &str| {
        ["out", "in"]
            .iter()
            .map(|d| {
                (
                    format!("direction=\"{d}\""),
                    n(&c[format!("{d}_{key}")]).to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    family(
        "tunsec_packets_total",
        "counter",
        "Packets protected (out) and accepted after verification (in).",
        &dirs("packets"),
    );
    family(
        "tunsec_bytes_total",
        "counter",
        "Bytes of the packets in tunsec_packets_total.",
        &dirs("bytes"),
    );
    family(
        "tunsec_bypassed_packets_total",
        "counter",
        "Packets passed in the clear by a none policy or no policy.",
        &one(n(&c["bypassed"])),
    );
    let drops: Vec<(String, String)> = c["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(r, x)| (format!("reason=\"{}\"", prom_label(r)), n(x).to_string()))
        .collect();
    family(
        "tunsec_drops_total",
        "counter",
        "Packets dropped by the engine, by reason.",
        &drops,
    );
    // Per worker: how the load spreads over the cores.
    let workers = v["workers"].as_array().cloned().unwrap_or_default();
    let per_worker = |key: &str, dir: Option<&str>| {
        workers
            .iter()
            .map(|w| {
                let id = n(&w["worker"]);
                let label = match dir {
                    Some(d) => format!("worker=\"{id}\",direction=\"{d}\""),
                    None => format!("worker=\"{id}\""),
                };
                (label, n(&w[key]).to_string())
            })
            .collect::<Vec<_>>()
    };
    if !workers.is_empty() {
        let mut pk = per_worker("out_packets", Some("out"));
        pk.extend(per_worker("in_packets", Some("in")));
        family(
            "tunsec_worker_packets_total",
            "counter",
            "Packets protected (out) and accepted (in), by worker.",
            &pk,
        );
        family(
            "tunsec_worker_drops_total",
            "counter",
            "Packets dropped by the engine, by worker.",
            &per_worker("dropped", None),
        );
    }
    family(
        "tunsec_nft_plaintext_refused_total",
        "counter",
        "Plaintext that had to be protected, dropped by tunsec's nftables table.",
        &one(n(&v["plaintext_refused"])),
    );
    let io_pair = |key: &str| {
        ["tun", "net"]
            .iter()
            .flat_map(|dev| {
                ["rx", "tx"].iter().filter_map(move |d| {
                    let k = if key.is_empty() {
                        format!("{dev}_{d}")
                    } else {
                        format!("{dev}_{d}_{key}")
                    };
                    io.get(&k).map(|x| {
                        (
                            format!("device=\"{dev}\",direction=\"{d}\""),
                            n(x).to_string(),
                        )
                    })
                })
            })
            .collect::<Vec<_>>()
    };
    family(
        "tunsec_io_packets_total",
        "counter",
        "Packets read (rx) and written (tx) on the TUN device and the network sockets.",
        &io_pair(""),
    );
    family(
        "tunsec_io_errors_total",
        "counter",
        "Failed writes to the TUN device and the network sockets.",
        &io_pair("errors"),
    );
    family(
        "tunsec_io_net_rx_trimmed_total",
        "counter",
        "Received packets whose link-layer padding was trimmed.",
        &one(n(&io["net_rx_trimmed"])),
    );
    family(
        "tunsec_io_net_rx_dropped_total",
        "counter",
        "Packets the kernel dropped before tunsec read them (receive ring or socket queue full).",
        &one(n(&io["net_rx_dropped"])),
    );
    let sas: Vec<&Value> = v["sas"].as_array().into_iter().flatten().collect();
    let per_sa = |key: &str| {
        sas.iter()
            .map(|sa| {
                (
                    format!(
                        "spi=\"{:#010x}\",proto=\"{}\",src=\"{}\",dst=\"{}\"",
                        n(&sa["spi"]),
                        prom_label(sa["proto"].as_str().unwrap_or("")),
                        prom_label(sa["src"].as_str().unwrap_or("")),
                        prom_label(sa["dst"].as_str().unwrap_or(""))
                    ),
                    n(&sa[key]).to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    for (name, key, help) in [
        (
            "tunsec_sa_packets_total",
            "packets",
            "Packets through the SA.",
        ),
        ("tunsec_sa_bytes_total", "bytes", "Bytes through the SA."),
        (
            "tunsec_sa_replay_drops_total",
            "replay_drops",
            "Packets the SA's replay window refused.",
        ),
        (
            "tunsec_sa_icv_failures_total",
            "icv_failures",
            "Packets of the SA whose ICV did not verify.",
        ),
    ] {
        family(name, "counter", help, &per_sa(key));
    }
    s
}

pub fn stats(a: &StatsArgs) -> Result<()> {
    let mut conn = Conn::connect(&control_path(&a.control)?)?;
    let mut prev: Option<Value> = None;
    loop {
        let v = conn.request("stats;")?;
        check(&v, "stats")?;
        if a.prometheus {
            print!("{}", render_prometheus(&v));
        } else if a.json {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Counters, DropReason};
    use std::collections::{BTreeMap, HashSet};

    /// A series: metric name and its labels, sorted.
    type Series = (String, BTreeMap<String, String>);

    /// A small parser for the Prometheus text format (0.0.4): checks that
    /// every sample belongs to a family declared by one HELP and one TYPE
    /// line before it, that a family's samples are contiguous, that names,
    /// labels and values are well formed, and that no series repeats.
    fn parse_prometheus(text: &str) -> BTreeMap<Series, f64> {
        fn name_ok(n: &str) -> bool {
            let mut c = n.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
        }
        let mut help = HashSet::new();
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut out = BTreeMap::new();
        assert!(text.ends_with('\n'), "the last line ends with a newline");
        for line in text.lines() {
            assert!(!line.is_empty(), "no empty lines");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').expect("HELP name text");
                assert!(name_ok(name) && !doc.is_empty(), "{line}");
                assert!(help.insert(name.to_string()), "second HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(help.contains(name), "TYPE before HELP for {name}");
                assert!(
                    ["counter", "gauge", "untyped", "summary", "histogram"].contains(&kind),
                    "{line}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name} without _total");
                }
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "second TYPE for {name}"
                );
                if let Some(c) = current.replace(name.to_string()) {
                    finished.insert(c);
                }
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            // name{labels} value
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            assert!(name_ok(name), "{line}");
            assert!(types.contains_key(name), "sample before TYPE: {line}");
            assert!(!finished.contains(name), "{name}'s samples are split");
            assert_eq!(current.as_deref(), Some(name), "{line}");
            let mut map = BTreeMap::new();
            let mut rest = labels;
            while !rest.is_empty() {
                let (k, r) = rest.split_once("=\"").expect("label=\"value\"");
                assert!(name_ok(k) && !k.contains(':'), "label name {k}");
                // the value runs to the first unescaped quote
                let mut val = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next().expect("unterminated label value") {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().expect("escape").1 {
                            'n' => val.push('\n'),
                            c @ ('\\' | '"') => val.push(c),
                            c => panic!("bad escape \\{c} in {line}"),
                        },
                        (_, c) => val.push(c),
                    }
                };
                assert!(map.insert(k.to_string(), val).is_none(), "label {k} twice");
                rest = &r[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
            assert!(
                out.insert((name.to_string(), map), value).is_none(),
                "series repeated: {line}"
            );
        }
        out
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn stats_fixture() -> Value {
        let mut c = Counters {
            out_packets: 120,
            out_bytes: 150_000,
            in_packets: 110,
            in_bytes: 140_000,
            bypassed: 3,
            ..Counters::default()
        };
        c.count_drop(DropReason::IcvFailure);
        c.count_drop(DropReason::Replay);
        c.count_drop(DropReason::Replay);
        let mut v = serde_json::json!({
            "ok": true,
            "uptime_secs": 12.5,
            "counters": crate::control::counters_json(&c),
            "io": {"tun_rx": 121, "tun_tx": 111, "tun_tx_errors": 0,
                   "net_rx": 114, "net_tx": 120, "net_tx_errors": 1, "net_rx_trimmed": 2,
                   "net_rx_dropped": 5},
            "plaintext_refused": 4,
            "workers": [
                {"worker": 0, "out_packets": 70, "in_packets": 60, "dropped": 2},
                {"worker": 1, "out_packets": 50, "in_packets": 50, "dropped": 1},
            ],
            "sas": [
                {"src": "10.77.0.1", "dst": "10.77.0.2", "proto": "esp", "spi": 4096,
                 "packets": 120, "bytes": 150000, "replay_drops": 0, "icv_failures": 0},
                {"src": "fd77::2", "dst": "fd77::1", "proto": "ah", "spi": 0xdeadbeef_u32,
                 "packets": 110, "bytes": 140000, "replay_drops": 2, "icv_failures": 1},
            ],
        });
        // A label value that needs escaping.
        v["sas"][1]["src"] = json_str("fd77::2\"\\\n");
        v
    }

    fn json_str(s: &str) -> Value {
        Value::String(s.to_string())
    }

    #[test]
    fn prometheus_output_parses_and_carries_every_counter() {
        let text = render_prometheus(&stats_fixture());
        let m = parse_prometheus(&text);
        let get = |name: &str, l: &[(&str, &str)]| {
            *m.get(&(name.to_string(), labels(l)))
                .unwrap_or_else(|| panic!("no {name}{l:?} in\n{text}"))
        };
        assert_eq!(get("tunsec_uptime_seconds", &[]), 12.5);
        assert_eq!(get("tunsec_packets_total", &[("direction", "out")]), 120.0);
        assert_eq!(get("tunsec_packets_total", &[("direction", "in")]), 110.0);
        assert_eq!(get("tunsec_bytes_total", &[("direction", "out")]), 150e3);
        assert_eq!(get("tunsec_bytes_total", &[("direction", "in")]), 140e3);
        assert_eq!(get("tunsec_bypassed_packets_total", &[]), 3.0);
        // Every drop reason the engine has, zero or not.
        for r in DropReason::ALL {
            let want = match r {
                DropReason::IcvFailure => 1.0,
                DropReason::Replay => 2.0,
                _ => 0.0,
            };
            assert_eq!(get("tunsec_drops_total", &[("reason", r.name())]), want);
        }
        assert_eq!(get("tunsec_nft_plaintext_refused_total", &[]), 4.0);
        let io = |dev, dir| [("device", dev), ("direction", dir)];
        assert_eq!(get("tunsec_io_packets_total", &io("tun", "rx")), 121.0);
        assert_eq!(get("tunsec_io_packets_total", &io("net", "tx")), 120.0);
        assert_eq!(get("tunsec_io_errors_total", &io("net", "tx")), 1.0);
        assert_eq!(get("tunsec_io_errors_total", &io("tun", "tx")), 0.0);
        assert_eq!(get("tunsec_io_net_rx_trimmed_total", &[]), 2.0);
        assert_eq!(get("tunsec_io_net_rx_dropped_total", &[]), 5.0);
        let esp = [
            ("spi", "0x00001000"),
            ("proto", "esp"),
            ("src", "10.77.0.1"),
            ("dst", "10.77.0.2"),
        ];
        assert_eq!(get("tunsec_sa_packets_total", &esp), 120.0);
        assert_eq!(get("tunsec_sa_bytes_total", &esp), 150e3);
        let ah = [
            ("spi", "0xdeadbeef"),
            ("proto", "ah"),
            ("src", "fd77::2\"\\\n"),
            ("dst", "fd77::1"),
        ];
        assert_eq!(get("tunsec_sa_replay_drops_total", &ah), 2.0);
        assert_eq!(get("tunsec_sa_icv_failures_total", &ah), 1.0);
        assert_eq!(get("tunsec_sa_packets_total", &ah), 110.0);
        let w = |id, dir| [("worker", id), ("direction", dir)];
        assert_eq!(get("tunsec_worker_packets_total", &w("1", "in")), 50.0);
        assert_eq!(get("tunsec_worker_drops_total", &[("worker", "0")]), 2.0);
        // Nothing else: 1 + 2 + 2 + 1 + one per drop reason + 4 + 2 (per
        // worker) + 1 + 4 + 2 + 1 + 1 + 2 * 4 series.
        let reasons = crate::engine::DropReason::ALL.len();
        assert_eq!(m.len(), 29 + reasons, "{text}");
    }

    #[test]
    fn prometheus_output_is_stable() {
        // The exact text of a few lines, as scrapers and alerts see it.
        let text = render_prometheus(&stats_fixture());
        for line in [
            "# TYPE tunsec_packets_total counter",
            "tunsec_packets_total{direction=\"out\"} 120",
            "tunsec_drops_total{reason=\"icv-failure\"} 1",
            "tunsec_sa_packets_total{spi=\"0x00001000\",proto=\"esp\",src=\"10.77.0.1\",dst=\"10.77.0.2\"} 120",
            "tunsec_sa_bytes_total{spi=\"0xdeadbeef\",proto=\"ah\",src=\"fd77::2\\\"\\\\\\n\",dst=\"fd77::1\"} 140000",
            "tunsec_uptime_seconds 12.5",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
    }

    #[test]
    fn wireshark_lines_are_esp_sa_uat_records() {
        let sas = serde_json::json!([
            {"src": "10.77.0.1", "dst": "10.77.0.2", "proto": "esp", "spi": 4096, "enc": "aes-gcm-16",
             "auth": "null", "esn": false, "enc_key": "0x000102030405060708090a0b0c0d0e0f10111213",
             "auth_key": "0x"},
            {"src": "fd77::2", "dst": "fd77::1", "proto": "esp", "spi": 0xdeadbeef_u32, "enc": "aes-cbc",
             "auth": "hmac-sha1", "esn": false, "enc_key": "0x00112233445566778899aabbccddeeff",
             "auth_key": "0x0102030405060708090a0b0c0d0e0f1011121314"},
            {"src": "10.77.0.1", "dst": "10.77.0.2", "proto": "esp", "spi": 4097, "enc": "null",
             "auth": "hmac-sha256", "esn": true, "enc_key": "0x", "auth_key": "0xaa"},
            {"src": "10.77.0.1", "dst": "10.77.0.2", "proto": "ah", "spi": 4098, "enc": "null",
             "auth": "hmac-sha1", "esn": false, "enc_key": "0x", "auth_key": "0xbb"},
            {"src": "10.77.0.1", "dst": "10.77.0.2", "proto": "esp", "spi": 4099,
             "enc": "chacha20-poly1305", "auth": "null", "esn": false, "enc_key": "0xcc", "auth_key": "0x"},
        ]);
        let (text, notes) = wireshark_esp_sa(sas.as_array().unwrap());
        assert_eq!(
            text,
            concat!(
                "\"IPv4\",\"10.77.0.1\",\"10.77.0.2\",\"0x00001000\",\"AES-GCM with 16 octet ICV [RFC4106]\",",
                "\"0x000102030405060708090a0b0c0d0e0f10111213\",\"NULL\",\"\"\n",
                "\"IPv6\",\"fd77::2\",\"fd77::1\",\"0xdeadbeef\",\"AES-CBC [RFC3602]\",",
                "\"0x00112233445566778899aabbccddeeff\",\"HMAC-SHA-1-96 [RFC2404]\",",
                "\"0x0102030405060708090a0b0c0d0e0f1011121314\"\n",
                "\"IPv4\",\"10.77.0.1\",\"10.77.0.2\",\"0x00001001\",\"NULL\",\"\",",
                "\"HMAC-SHA-256-128 [RFC4868]\",\"0xaa\"\n",
            )
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("0x00001001") && notes[0].contains("extended"));
        assert!(notes[1].contains("0x00001003") && notes[1].contains("chacha20-poly1305"));
    }

    #[test]
    fn the_parser_rejects_what_prometheus_rejects() {
        for bad in [
            "x_total 1\n",                                                  // no TYPE
            "# HELP x_total h\n# TYPE x_total counter\nx_total{a=\"1} 1\n", // unterminated
            "# HELP x h\n# TYPE x counter\nx 1\n", // counter without _total
            "# HELP x_total h\n# TYPE x_total counter\nx_total one\n",
            "# HELP x_total h\n# TYPE x_total counter\nx_total 1\nx_total 2\n",
        ] {
            assert!(
                std::panic::catch_unwind(|| parse_prometheus(bad)).is_err(),
                "accepted {bad:?}"
            );
        }
    }
}
