//! `tunsec run`: the daemon. A thin shell around the engine: it creates
//! the TUN device, the sockets and the plumbing, runs one worker per core,
//! keeps time (lifetimes), reports events, and undoes everything at exit.

pub mod control;
pub mod gso;
pub mod journal;
pub mod lock;
pub mod net;
pub mod nfnl;
pub mod nftables;
pub mod notify;
pub mod plumbing;
pub mod privilege;
pub mod reload;
pub mod rtnl;
pub mod rxring;
pub mod seccomp;
pub mod tun;
pub mod workers;
pub mod xfrm;

use crate::engine::{DropReason, Event, SaId};
use crate::sad::Expiry;
use crate::state::State;
use anyhow::{Context, Result, bail};
use plumbing::Instance;
use rxring::RxSocket;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};
use workers::Shared;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// setkey(8) file: policies and (optionally) SAs. Without one, tunsec
    /// starts empty, to be keyed at run time (--control, --xfrm).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Name of the TUN device to create.
    #[arg(long, default_value = "tunsec0")]
    pub tun: String,
    /// Worker threads (default: the number of CPUs).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Control socket path (one per instance). Default:
    /// /run/tunsec/TUN.sock in the initial network namespace,
    /// /run/tunsec/net-INODE-TUN.sock in any other.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve the Linux XFRM netlink API on this Unix socket (root only),
    /// for IKE daemons started with `tunsec ike --xfrm PATH -- DAEMON`.
    #[arg(long)]
    pub xfrm: Option<PathBuf>,
    /// Print every change to interfaces, routes, rules and nftables, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Open the TUN device without IFF_VNET_HDR offloads: one packet per
    /// read and write (for comparison and for kernels without TUN offload).
    #[arg(long)]
    pub no_offload: bool,
}

/// `tunsec run --help`'s closing text (and the man page's).
pub const SIGNALS_HELP: &str = "\
Signals:
  SIGTERM, SIGINT  stop: routes, rules, nftables and the fail-closed
                   blackholes are removed; the TUN device goes with the process.
  SIGHUP           reload --config as one atomic batch. Afterwards the SAs and
                   policies the file names are what a fresh start with it would
                   give; those it names unchanged keep running untouched
                   (sequence numbers, replay windows, counters, lifetimes);
                   those the previous file named and this one does not are
                   removed; what was keyed at run time (control socket, XFRM)
                   and is not named by the file stays. A file that does not
                   parse or apply is logged as FILE:LINE: message, and nothing
                   changes.
  SIGUSR1          log the counters.

Under systemd (NOTIFY_SOCKET set, Type=notify) it sends READY=1 once the TUN
device, sockets, routes, rules, nftables, workers and control (and XFRM)
sockets are all in place, RELOADING=1 and READY=1 around a reload (with a
STATUS= line saying what changed or why nothing did), and STOPPING=1 at a
stop. The unit tunsec@.service (packaging/ in the source) runs one instance
per /etc/tunsec/NAME.conf.";

/// Bytes tunsec may add to a packet: AH with a 256-bit ICV padded for
/// IPv6 (48), ESP header, IV, padding, trailer and ICV (8 + 16 + 15 + 2 +
/// 32), IPComp (4), rounded up.
pub const MAX_OVERHEAD: u16 = 128;

fn log_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if journal::stdout_is_journal() {
        // The journal stamps each line itself and takes its priority from
        // a `<N>` prefix (sd-daemon(3)): `journalctl -p err` finds errors.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .event_format(journal::format())
            .try_init();
        return;
    }
    // Colours only on a terminal.
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .try_init();
}

/// Peers per address family whose path MTU is looked up at start.
const PATH_MTU_PROBES: usize = 64;

/// The MTU of the interface the kernel would use to reach `dst` now.
fn path_mtu(dst: std::net::IpAddr) -> Option<u16> {
    let out = std::process::Command::new("ip")
        .args(["route", "get", &dst.to_string()])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let dev = text
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)?
        .to_string();
    std::fs::read_to_string(format!("/sys/class/net/{dev}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn os_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    Ok(seed)
}

/// Run a command given as words (e.g. `ip link set …`).
fn run_cmd(words: &[&str]) -> Result<()> {
    let argv: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    plumbing::run(&argv, None)
}

/// SIGINT/SIGTERM, SIGUSR1 and SIGHUP, as flags. Registered first thing,
/// so that a signal arriving while the daemon sets up (or right after it
/// says it is up) stops it in order instead of killing it with its
/// plumbing in place. A SIGHUP during setup is kept for the main loop,
/// which then reloads: the file may have changed after it was read.
struct Signals {
    term: Arc<AtomicBool>,
    usr1: Arc<AtomicBool>,
    hup: Arc<AtomicBool>,
}

impl Signals {
    fn register() -> Result<Signals> {
        let term = Arc::new(AtomicBool::new(false));
        let usr1 = Arc::new(AtomicBool::new(false));
        let hup = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, term.clone())?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGUSR1, usr1.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGHUP, hup.clone())?;
        Ok(Signals { term, usr1, hup })
    }
}

/// The `--config` file and what it named, for reloads on SIGHUP.
struct Config {
    path: Option<PathBuf>,
    owned: reload::Owned,
}

impl Config {
    /// Re-read the file and apply it as one batch (`reload`'s rules),
    /// under the writers' lock; on any error nothing changes.
    fn reload(&mut self, ctl: &control::Control) -> std::result::Result<String, String> {
        let Some(path) = &self.path else {
            return Err("started without --config: nothing to reload".into());
        };
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {file}: {e}"))?;
        let new = reload::FileState::parse(&text, &file).map_err(|e| e.to_string())?;
        let mut plumbing = ctl.plumbing.lock().unwrap_or_else(|e| e.into_inner());
        let cur = ctl.shared.state.load_full();
        let (statements, summary) = reload::plan(&cur, &self.owned, &new);
        if !statements.is_empty() {
            let (next, _) = cur
                .apply(&statements, &file, ctl.shared.now())
                .map_err(|e| e.to_string())?;
            ctl.commit(&mut plumbing, &cur, next)
                .map_err(|e| format!("{file}: {e}"))?;
        }
        drop(plumbing);
        for w in &new.warnings {
            tracing::warn!("{file}:{}: {}", w.line, w.message);
        }
        self.owned = reload::Owned::of(&new.state);
        Ok(format!("reloaded {file}: {summary}"))
    }
}

pub fn run(args: &Args) -> Result<()> {
    // Key memory: a locked, undumped arena for AWS-LC and for the code
    // that handles keys (crate::secret).
    crate::secret::init();
    log_init();
    let signals = Signals::register()?;
    let notifier = notify::Notifier::from_env().context("cannot use NOTIFY_SOCKET")?;
    // A stop sent to the process group (Ctrl-C, systemd) can kill an `ip`
    // or `nft` child while the daemon sets up; say why it failed.
    run_with(args, &signals, &notifier).map_err(|e| {
        if signals.term.load(Relaxed) {
            e.context("stopped by a signal while setting up")
        } else {
            e
        }
    })
}

fn run_with(args: &Args, signals: &Signals, notifier: &notify::Notifier) -> Result<()> {
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| lock::default_control(&args.tun));
    let seed = os_seed()?;
    let base = State::seeded(u64::from_le_bytes(seed[..8].try_into().unwrap()));
    let state = match &args.config {
        Some(path) => {
            // The text holds keys: in the key arena (so are the SAs).
            let text = crate::secret::within(|| std::fs::read_to_string(path))
                .with_context(|| format!("cannot read {}", path.display()))?;
            let file = path.display().to_string();
            let (state, _, warnings) = base.apply_text(&text, &file, Duration::ZERO)?;
            if let Some(e) = net::unreceivable(&base.sad, &state.sad) {
                bail!("{file}: {e}");
            }
            for w in &warnings {
                tracing::warn!("{file}:{}: {}", w.line, w.message);
            }
            state
        }
        None => base,
    };
    let mut config = Config {
        path: args.config.clone(),
        owned: reload::Owned::of(&state),
    };
    if args.tun.is_empty() || args.tun.len() > 15 || args.tun.contains(['/', ' ']) {
        bail!(
            "--tun {:?}: an interface name has 1 to 15 characters, without '/' or spaces",
            args.tun
        );
    }
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if workers == 0 || workers > 256 {
        bail!("--workers {workers}: give 1 to 256");
    }
    let inst = Instance::new(&args.tun);
    let peers = plumbing::routed_peers(&state);
    if peers.is_empty() && args.xfrm.is_none() {
        tracing::warn!(
            "no outbound ipsec policy names a peer: nothing will be routed into {}",
            inst.tun
        );
    }
    // The MTU is the outgoing interface's: asking for every peer ran an
    // `ip route get` per peer (10 s at 10,000 peers). The first 64 peers
    // of each family stand for the interfaces they share.
    let link_mtu = [false, true]
        .iter()
        .flat_map(|v6| {
            peers
                .iter()
                .filter(move |(d, _)| d.addr.is_ipv6() == *v6)
                .take(PATH_MTU_PROBES)
        })
        .filter_map(|(d, _)| path_mtu(d.addr))
        .min()
        .unwrap_or(1500);
    let mut mtu = link_mtu.saturating_sub(MAX_OVERHEAD);
    if peers.iter().any(|(d, _)| d.addr.is_ipv6()) && mtu < 1280 {
        tracing::warn!(
            "link MTU {link_mtu} leaves {mtu} for {}: raised to IPv6's minimum 1280",
            inst.tun
        );
        mtu = 1280;
    }
    let plan = plumbing::plan(&state, &inst);
    if args.dry_run {
        println!("# tunsec run --dry-run: the changes a run would make");
        println!(
            "ip tuntap add mode tun multi_queue name {} ({workers} queues, by tunsec itself)",
            inst.tun
        );
        println!("ip link set dev {} mtu {mtu} addrgenmode none", inst.tun);
        println!("sysctl -w net.ipv4.conf.{}.rp_filter=0", inst.tun);
        println!("ip link set dev {} up", inst.tun);
        print!("{}", plan.describe());
        println!(
            "# sockets: raw IPv4/IPv6 senders with SO_MARK {:#x}; AF_PACKET receivers (fanout, ESP/AH/IPComp filter)",
            inst.mark
        );
        println!(
            "# at exit: the same, undone in reverse order; the TUN device goes with the process"
        );
        return Ok(());
    }

    // One instance per TUN name per network namespace, and per control path.
    let _tun_lock = lock::take(
        &PathBuf::from(lock::LOCK_DIR).join(format!("{}-{}.lock", lock::netns_id(), inst.tun)),
        &format!("TUN device {}", inst.tun),
    )?;
    let mut control_lock = control_path.clone().into_os_string();
    control_lock.push(".lock");
    let _control_lock = lock::take(
        &PathBuf::from(control_lock),
        &format!("control path {}", control_path.display()),
    )?;

    let _xfrm_lock = match &args.xfrm {
        Some(p) => {
            let mut l = p.clone().into_os_string();
            l.push(".lock");
            Some(lock::take(
                &PathBuf::from(l),
                &format!("XFRM socket {}", p.display()),
            )?)
        }
        None => None,
    };
    let tun = tun::Tun::create(&inst.tun, workers, mtu, !args.no_offload)?;
    run_cmd(&["ip", "link", "set", "dev", &inst.tun, "addrgenmode", "none"])?;
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{}/rp_filter", inst.tun),
        "0",
    );
    run_cmd(&["ip", "link", "set", "dev", &inst.tun, "up"])?;

    let _claims = net::protocol_claims().context("cannot open raw sockets for ESP/AH/IPComp")?;
    let group = (Instance::hash(&inst.tun) ^ std::process::id()) as u16;
    let (mut rx, why) = net::Rx::choose(&inst.tun);
    let mut ios = Vec::new();
    // Receive rings if asked, with frames for the links' largest MTU (a
    // larger packet is read from the socket's queue: rxring).
    let frame = rxring::wanted().then(|| {
        rxring::frame_size(rxring::links_mtu(
            std::path::Path::new("/sys/class/net"),
            &inst.tun,
        ))
    });
    for q in tun.queues {
        if matches!(rx, net::Rx::Tap { .. }) && ios.is_empty() {
            // The first tap tells whether the kernel has the fanout flag.
            if let Err(e) = net::packet_socket(group, libc::ETH_P_ALL as u16, |_| {}) {
                tracing::info!(
                    "receiving with a socket per family: the kernel refused a tap that skips outgoing frames ({e})"
                );
                rx = net::Rx::PerFamily;
            }
        }
        let packets = match rx {
            net::Rx::Tap { .. } => vec![
                RxSocket::open(group, libc::ETH_P_ALL as u16, frame)
                    .context("cannot open the packet socket")?,
            ],
            net::Rx::PerFamily => vec![
                RxSocket::open(group, libc::ETH_P_IP as u16, frame)
                    .context("cannot open the IPv4 packet socket")?,
                RxSocket::open(group.wrapping_add(1), libc::ETH_P_IPV6 as u16, frame)
                    .context("cannot open the IPv6 packet socket")?,
            ],
        };
        ios.push(workers::Io {
            tun: q,
            packets,
            sender: net::Sender::new(inst.mark).context("cannot open raw sending sockets")?,
            gso: match gso::Gso::new(inst.mark) {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::warn!("ESP in UDP goes without segmentation offload: {e}");
                    None
                }
            },
        });
    }
    if crate::hugepages::in_use() {
        tracing::info!("heap in transparent huge pages (glibc.malloc.hugetlb=1)");
    }
    let rings = ios.iter().flat_map(|io| &io.packets).all(|p| p.has_ring());
    match frame {
        Some(f) if rings => tracing::info!("receive rings: frames of {f} bytes"),
        Some(_) => tracing::info!("receiving with recvmmsg where a ring was refused"),
        None => tracing::debug!("receiving with recvmmsg (TUNSEC_RXRING=1 for rings)"),
    }
    let mut plumbing = plumbing::Plumbing::start(&state, inst.clone())?;
    match &rx {
        net::Rx::Tap { .. } if !nftables::early_drop() => {
            tracing::info!("receiving by tap; TUNSEC_EARLY_DROP=0: the kernel's copy goes on")
        }
        net::Rx::Tap { links } => match plumbing.set_ingress(Some(links)) {
            Ok(()) => tracing::info!(
                "receiving by tap; received IPsec dropped at ingress on {}",
                links.join(", ")
            ),
            Err(e) => tracing::warn!(
                "receiving by tap; received IPsec dropped at prerouting (no ingress chain: {e:#})"
            ),
        },
        net::Rx::PerFamily => {
            plumbing.set_ingress(None)?;
            tracing::info!(
                "receiving with a socket per family ({})",
                why.as_deref().unwrap_or("the tap is not available")
            );
        }
    }

    let shared = Arc::new(Shared::new(state, workers));
    let listener = match control::listen(&control_path) {
        Ok(l) => l,
        Err(e) => {
            let mut plumbing = plumbing;
            plumbing.stop();
            return Err(e);
        }
    };
    let ctl = Arc::new(control::Control::new(shared.clone(), plumbing));
    let xfrm_listener = match &args.xfrm {
        Some(p) => match control::listen(p) {
            Ok(l) => Some(l),
            Err(e) => {
                ctl.plumbing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stop();
                let _ = std::fs::remove_file(&control_path);
                return Err(e.context("cannot serve XFRM"));
            }
        },
        None => None,
    };
    // Set up: keep only what the rest needs (before any thread starts).
    privilege::restrict()?;
    let ctl_thread = {
        let c = ctl.clone();
        let path = control_path.clone();
        std::thread::Builder::new()
            .name("tunsec-ctl".into())
            .spawn(move || c.serve(listener, path))?
    };
    let xfrm_thread = match (xfrm_listener, &args.xfrm) {
        (Some(l), Some(p)) => {
            let server = xfrm::Server::new(ctl.clone());
            let path = p.clone();
            tracing::info!("serving XFRM netlink on {}", p.display());
            Some(
                std::thread::Builder::new()
                    .name("tunsec-xfrm".into())
                    .spawn(move || server.serve(l, path))?,
            )
        }
        _ => None,
    };
    // Up means ready: every socket a client may use is bound, and (by the
    // time `serve` calls this) every worker runs.
    let ready = || {
        let (npol, nsa) = (shared.state.load().spd.len(), shared.state.load().sad.len());
        tracing::info!(
            "tunsec {} up: {npol} policies, {nsa} SAs, TUN {} (mtu {mtu}, {workers} queues), peers {}, control {}{}",
            env!("CARGO_PKG_VERSION"),
            inst.tun,
            listed(peers.iter().map(|(d, _)| d.to_string()), peers.len()),
            control_path.display(),
            args.xfrm
                .as_ref()
                .map(|p| format!(", xfrm {}", p.display()))
                .unwrap_or_default()
        );
        // Each policy and SA; when there are many (10,000 peers made
        // 40,000 lines), at debug level.
        let state = shared.state.load();
        if npol + nsa <= LISTED {
            for p in state.spd.iter() {
                tracing::info!("policy {}: {p}", p.id);
            }
            for sa in state.sad.iter() {
                tracing::info!("{}", sa_line(sa));
            }
        } else {
            tracing::info!(
                "the {npol} policies and {nsa} SAs are listed at debug level (RUST_LOG=debug)"
            );
            if tracing::enabled!(tracing::Level::DEBUG) {
                for p in state.spd.iter() {
                    tracing::debug!("policy {}: {p}", p.id);
                }
                for sa in state.sad.iter() {
                    tracing::debug!("{}", sa_line(sa));
                }
            }
        }
        notifier.tell(&[
            "READY=1",
            &format!("STATUS=up: {npol} policies, {nsa} SAs, TUN {}", inst.tun),
        ]);
    };

    let result = serve(&shared, &ctl, ios, signals, ready, &mut config, notifier);
    notifier.tell(&[
        "STOPPING=1",
        "STATUS=stopping: restoring routes, rules and nftables",
    ]);
    shared.stop.store(true, Relaxed);
    control::join(ctl_thread);
    if let Some(h) = xfrm_thread {
        control::join(h);
    }
    ctl.clear_listeners();
    let _ = std::fs::remove_file(&control_path);
    if let Some(p) = &args.xfrm {
        let _ = std::fs::remove_file(p);
    }
    // Client threads notice the stop within their poll interval.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Arc::strong_count(&ctl) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ctl.plumbing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop();
    let (c, io) = shared.totals();
    tracing::info!("final counters: {}", describe_counters(&c, &io));
    if result.is_ok() {
        tracing::info!("tunsec down: routes, rules and nftables restored");
    } else {
        tracing::error!("tunsec down after a fault: its plumbing stays in place (fail closed)");
    }
    result
}

/// Counters as one log line.
pub fn describe_counters(c: &crate::engine::Counters, io: &workers::IoCounters) -> String {
    let mut s = format!(
        "out {} packets {} bytes, in {} packets {} bytes, bypassed {}, tun rx {} tx {} (errors {}), net rx {} tx {} (errors {})",
        c.out_packets,
        c.out_bytes,
        c.in_packets,
        c.in_bytes,
        c.bypassed,
        io.tun_rx,
        io.tun_tx,
        io.tun_tx_errors,
        io.net_rx,
        io.net_tx,
        io.net_tx_errors
    );
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| c.drop_count(**r) > 0)
        .map(|r| format!("{} {}", r.name(), c.drop_count(*r)))
        .collect();
    s.push_str(&format!(", dropped {}", c.total_drops()));
    if !drops.is_empty() {
        s.push_str(&format!(" ({})", drops.join(", ")));
    }
    if io.net_rx_dropped > 0 {
        s.push_str(&format!(
            "; {} received packets dropped by the kernel (receive ring or queue full)",
            io.net_rx_dropped
        ));
    }
    s
}

/// At most this many policies and SAs are listed one by one at start
/// (at info level; beyond, at debug level).
const LISTED: usize = 64;
/// At most this many peers are named in the start line.
const PEERS_NAMED: usize = 8;

/// The first [`PEERS_NAMED`] of `n` names, and how many more.
fn listed(names: impl Iterator<Item = String>, n: usize) -> String {
    let mut s = names.take(PEERS_NAMED).collect::<Vec<_>>().join(", ");
    if n > PEERS_NAMED {
        s.push_str(&format!(" and {} more", n - PEERS_NAMED));
    }
    s
}

#[cfg(test)]
#[test]
fn the_start_line_names_a_few_peers_and_counts_the_rest() {
    let names = |n: usize| (0..n).map(|i| format!("10.0.0.{i}/32"));
    assert_eq!(listed(names(2), 2), "10.0.0.0/32, 10.0.0.1/32");
    assert_eq!(listed(names(0), 0), "");
    let s = listed(names(10_000), 10_000);
    assert!(
        s.starts_with("10.0.0.0/32, ") && s.ends_with("10.0.0.7/32 and 9992 more"),
        "{s}"
    );
}

/// An SA as the start-up log lists it (never its keys).
fn sa_line(sa: &crate::sad::Sa) -> String {
    let c = &sa.config;
    format!(
        "sa: {} {} -> {} spi {:#x} {}/{} replay {}",
        c.proto,
        c.src,
        c.dst,
        c.spi,
        c.enc.name(),
        c.auth.name(),
        c.replay
    )
}

/// Run the workers, call `ready` once they run, and keep time, events,
/// signals and reloads until a stop.
fn serve(
    shared: &Arc<Shared>,
    ctl: &control::Control,
    ios: Vec<workers::Io>,
    signals: &Signals,
    ready: impl FnOnce(),
    config: &mut Config,
    notifier: &notify::Notifier,
) -> Result<()> {
    let Signals { term, usr1, hup } = signals;
    // The daemon writes to sockets only; a closed pipe must not kill it.
    // SAFETY: setting a signal disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut handles = Vec::new();
    // The threads that parse the network's packets filter their own
    // system calls (an allow-list; see seccomp.rs).
    let filter = if seccomp::enabled() {
        Some(seccomp::worker_filter()?)
    } else {
        tracing::warn!("TUNSEC_SECCOMP=0: the workers run without a seccomp filter");
        None
    };
    let alone = ios.len() == 1;
    for (i, io) in ios.into_iter().enumerate() {
        let s = shared.clone();
        let seed = os_seed()?;
        let filter = filter.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("tunsec-w{i}"))
                .spawn(move || {
                    if let Some(f) = &filter
                        && let Err(e) = seccomp::apply(f)
                    {
                        tracing::error!("worker {i}: {e:#}; it runs without");
                    }
                    workers::run(i, s, io, seed, alone)
                })?,
        );
    }
    ready();
    let mut last_tick = Instant::now();
    while !term.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Relaxed) {
            notifier.tell(&["RELOADING=1", &notify::monotonic_usec()]);
            let status = match config.reload(ctl) {
                Ok(done) => {
                    tracing::info!("{done}");
                    done
                }
                Err(e) => {
                    tracing::error!("reload failed, nothing changed: {e}");
                    format!("reload failed, nothing changed: {e}")
                }
            };
            notifier.tell(&["READY=1", &format!("STATUS={}", status.replace('\n', " "))]);
        }
        if usr1.swap(false, Relaxed) {
            let (c, io) = shared.totals();
            tracing::info!("counters: {}", describe_counters(&c, &io));
        }
        let events: Vec<Event> =
            std::mem::take(&mut *shared.events.lock().unwrap_or_else(|e| e.into_inner()));
        for e in events {
            if report(e, ctl, shared) {
                ctl.broadcast(&e);
            }
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            for e in expire(shared, ctl) {
                report(e, ctl, shared);
                ctl.broadcast(&e);
            }
        }
        if handles.iter().any(|h| h.is_finished()) {
            // Fail closed, as after kill -9: a new tunsec run takes over.
            ctl.plumbing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .abandon();
            stop_workers(shared, ctl, handles);
            bail!(
                "a worker stopped unexpectedly (see its error above); the blackhole routes, rules and nftables table stay, so protected traffic cannot leave in the clear until a new `tunsec run` takes over"
            );
        }
    }
    tracing::info!("signal received, stopping");
    stop_workers(shared, ctl, handles);
    Ok(())
}

/// Undo the plumbing while the workers still hold the TUN device (its
/// routes go with it, and deleting them afterwards would fail), then stop
/// and join the workers.
fn stop_workers(
    shared: &Shared,
    ctl: &control::Control,
    handles: Vec<std::thread::JoinHandle<()>>,
) {
    ctl.plumbing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stop();
    shared.stop.store(true, Relaxed);
    for h in handles {
        let _ = h.join();
    }
}

/// Log an event and say whether to pass it on: an ACQUIRE goes out once
/// until an SA resolves it or it times out (`crate::acquire`).
fn report(e: Event, ctl: &control::Control, shared: &Shared) -> bool {
    match e {
        Event::Acquire {
            policy,
            src,
            dst,
            proto,
            reqid,
            ..
        } => {
            // The state is read under the lock that commits take after
            // publishing theirs: an SA that arrives meanwhile either is
            // seen here or resolves what this raises.
            let mut acquires = ctl.acquires.lock().unwrap_or_else(|e| e.into_inner());
            let due = acquires.raise(&e, shared.now(), &shared.state.load());
            if due {
                tracing::warn!(
                    "ACQUIRE policy {policy}: no usable {proto} SA {src} -> {dst}{}; packets wait up to 1 s for it, then are dropped",
                    reqid.map(|r| format!(" reqid {r}")).unwrap_or_default()
                );
            }
            due
        }
        Event::SoftExpire(id) => {
            tracing::info!(
                "EXPIRE soft {} {} -> {} spi {:#x}",
                id.proto,
                id.src,
                id.dst,
                id.spi
            );
            true
        }
        Event::HardExpire(id) => {
            tracing::warn!(
                "EXPIRE hard {} {} -> {} spi {:#x}",
                id.proto,
                id.src,
                id.dst,
                id.spi
            );
            true
        }
    }
}

/// Lifetimes while no traffic flows: evaluate every SA, return crossings,
/// and publish a state without the hard-expired ones (serialised with
/// control changes through the plumbing lock).
fn expire(shared: &Shared, ctl: &control::Control) -> Vec<Event> {
    // The scan reads every SA (20,000 at 10,000 peers: milliseconds) and
    // runs without the writers' lock, so that control requests do not
    // wait for it; the lock is taken only to replace the state.
    let now = shared.now();
    let state = shared.state.load_full();
    let mut events = Vec::new();
    let mut dead = false;
    for sa in state.sad.iter_unordered() {
        match sa.expiry(now) {
            (Expiry::Soft, true) => events.push((sa.serial, Event::SoftExpire(SaId::of(sa)))),
            (Expiry::Hard, first) => {
                if first {
                    events.push((sa.serial, Event::HardExpire(SaId::of(sa))));
                }
                dead = true;
            }
            _ => {}
        }
    }
    // Oldest SA first, as before.
    events.sort_by_key(|(serial, _)| *serial);
    let larval_expired = state.sad.larval().any(|l| l.4 <= now);
    if dead || larval_expired {
        let _writer = ctl.plumbing.lock().unwrap_or_else(|e| e.into_inner());
        // The state may have changed meanwhile: reap from the current one.
        let mut next = (*shared.state.load_full()).clone();
        let gone = next.sad.reap();
        next.sad.expire_larval(now);
        shared.state.store(Arc::new(next.renewed()));
        if !gone.is_empty() {
            tracing::info!("removed {} hard-expired SAs", gone.len());
        }
    }
    events.into_iter().map(|(_, e)| e).collect()
}
