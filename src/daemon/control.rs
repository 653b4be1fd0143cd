//! The control socket: a Unix `SOCK_SEQPACKET` socket (mode 0600, root
//! only, peers checked with SO_PEERCRED) through which an IKE daemon or
//! `tunsec setkey` changes SAs and policies, reads counters and listens
//! for events. The protocol itself (requests, JSON replies) is
//! `crate::control`; docs/control-protocol.md describes it.
//!
//! A slow or dead client never stalls the data plane: workers never touch
//! this module, replies are sent with a timeout, and events are sent
//! without blocking (a monitor that does not keep up loses events, and is
//! dropped after many).

#![warn(clippy::undocumented_unsafe_blocks)]

use super::plumbing::Plumbing;
use super::workers::Shared;
use crate::control::{self, Request};
use crate::engine::Event;
use crate::state::State;
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest request accepted (a setkey batch).
pub const MAX_REQUEST: usize = 1 << 20;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 32;
/// Consecutive failed requests after which a client is disconnected.
pub const MAX_ERRORS: u32 = 20;

/// Something told of every state change and event besides the JSON
/// monitors (the XFRM front end). Called with the writers' lock held for
/// changes: it must not block.
pub trait Listener: Send + Sync {
    fn changed(&self, old: &State, new: &State);
    fn event(&self, state: &State, e: &Event);
}

pub struct Control {
    pub shared: Arc<Shared>,
    /// Serialises changes: state and plumbing move together.
    pub plumbing: Mutex<Plumbing>,
    monitors: Mutex<Vec<Monitor>>,
    clients: Arc<AtomicUsize>,
    /// Told of every change and event (the XFRM front end's listeners).
    listeners: Mutex<Vec<Arc<dyn Listener>>>,
    /// ACQUIREs sent and not yet answered. Every committed state resolves
    /// them at once, as the kernel's `xfrm_state_add` replaces its larval
    /// state: an SA that comes and goes between two looks of the main
    /// loop still answered the ACQUIRE, and the next packet raises a new one.
    pub acquires: Mutex<crate::acquire::Pending>,
    /// The last `plaintext_refused` count and when it was read: it costs
    /// a dump of the table's counters under the writers' lock (a few
    /// milliseconds at 10,000 peers), and 32 clients asking for stats at
    /// once must not make 32 of them.
    refused_cache: Mutex<Option<(Instant, u64)>>,
}

/// A reply: JSON built as a `Value`, or a listing's text serialized
/// directly ([`Control::listing`]).
enum Reply {
    Json(Value),
    Text(String),
}

struct Monitor {
    fd: OwnedFd,
    lost: u64,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A `sockaddr_un` for `path`, or None if the path does not fit.
fn unix_addr(path: &Path) -> Option<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Some(addr)
}

/// Create the listening socket at `path`, replacing a stale one (the caller
/// holds the instance lock for this path, so no live instance owns it).
///
/// The socket is never reachable by others with a mode wider than 0600,
/// and the process's umask is not touched (it is process-wide: changing it
/// would change the mode of files other threads create meanwhile). The
/// socket is bound inside a fresh directory of mode 0700 beside `path`,
/// which nobody else can traverse, made 0600 there, and then renamed to
/// `path`: a rename keeps the inode, so the bound socket answers at its
/// new name.
pub fn listen(path: &Path) -> Result<OwnedFd> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tag = [0u8; 6];
    getrandom::fill(&mut tag).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let private = dir.join(format!(
        ".tunsec-{}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    // mode 0700 (the umask can only narrow it); an existing entry of that
    // name, whoever made it, is an error, never reused.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("cannot create {}", private.display()))?;
    let tmp = private.join("s");
    let r = bind_private(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    let fd = r?;
    // Whatever the umask, the socket is 0600 before anyone can reach it.
    debug_assert_eq!(
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok(),
        Some(0o600)
    );
    Ok(fd)
}

/// Bind and listen at `tmp` (in a private directory), chmod 0600, and move
/// the socket to `path`.
fn bind_private(tmp: &Path, path: &Path) -> Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let Some(addr) = unix_addr(tmp) else {
        anyhow::bail!(
            "control path {} is too long for a Unix socket (it is bound as {} first)",
            path.display(),
            tmp.display()
        );
    };
    // SAFETY: socket() takes no pointers; the result is checked by cvt.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length is its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_un>() as u32,
        )
    })
    .with_context(|| format!("cannot bind control socket {}", tmp.display()))?;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", tmp.display()))?;
    // SAFETY: listen() on our own socket takes no pointers.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    let _ = std::fs::remove_file(path);
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot move the control socket to {}", path.display()))?;
    Ok(fd)
}

pub fn peer_uid(fd: RawFd) -> Option<u32> {
    // SAFETY: ucred is plain old data; all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are valid output space.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

fn send_msg(fd: RawFd, v: &Value, flags: libc::c_int) -> io::Result<()> {
    send_bytes(fd, v.to_string().as_bytes(), flags)
}

/// A reply, in pieces when it is large: the kernel allocates a Unix
/// datagram in one piece, which fails for a few MiB (a dump of 20,000 SAs
/// is 11 MiB), so a reply over [`control::CHUNK`] goes as
/// `{"ok": true, "chunked": K}` and then K messages that are consecutive
/// pieces of its JSON text.
fn send_reply(fd: RawFd, v: &Value) -> io::Result<()> {
    send_text(fd, &v.to_string())
}

/// A reply's JSON text, in pieces when it is large (see [`send_reply`]).
fn send_text(fd: RawFd, text: &str) -> io::Result<()> {
    if text.len() <= control::CHUNK {
        return send_bytes(fd, text.as_bytes(), 0);
    }
    let pieces: Vec<&[u8]> = text.as_bytes().chunks(control::CHUNK).collect();
    send_msg(fd, &json!({"ok": true, "chunked": pieces.len()}), 0)?;
    for p in pieces {
        send_bytes(fd, p, 0)?;
    }
    Ok(())
}

/// Send one message (a datagram on these sockets), never raising SIGPIPE.
pub fn send_bytes(fd: RawFd, msg: &[u8], flags: libc::c_int) -> io::Result<()> {
    // SAFETY: the buffer is valid for the call.
    let r = unsafe {
        libc::send(
            fd,
            msg.as_ptr() as *const libc::c_void,
            msg.len(),
            flags | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Wait for the next datagram on `fd` and read it into `buf`, until
/// `stop`. Returns its true length (more than `buf.len()` when it did not
/// fit), or None once the peer closed, the socket broke or `stop` is set.
pub fn recv_datagram(
    fd: RawFd,
    buf: &mut [u8],
    stop: &std::sync::atomic::AtomicBool,
) -> Option<usize> {
    // An IKE daemon keys a CHILD_SA with a run of requests, each sent when
    // the answer to the one before has come: looking for the next one
    // for a moment before sleeping saves this thread a wake-up per request
    // (in a VM an idle vCPU's wake-up costs tens of microseconds).
    let spin_until = std::time::Instant::now() + SPIN;
    loop {
        // SAFETY: the buffer is valid for the call.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            return Some(n as usize);
        }
        if n == 0 {
            return None;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
        if std::time::Instant::now() >= spin_until {
            break;
        }
        std::hint::spin_loop();
    }
    while !stop.load(Relaxed) {
        if !poll_in(fd, 200) {
            continue;
        }
        // SAFETY: the buffer is valid for the call.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        return (n > 0).then_some(n as usize);
    }
    None
}

/// How long [`recv_datagram`] looks for a request before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

pub fn poll_in(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

impl Control {
    pub fn new(shared: Arc<Shared>, plumbing: Plumbing) -> Control {
        Control {
            shared,
            plumbing: Mutex::new(plumbing),
            monitors: Mutex::new(Vec::new()),
            clients: Arc::new(AtomicUsize::new(0)),
            listeners: Mutex::new(Vec::new()),
            acquires: Mutex::new(crate::acquire::Pending::default()),
            refused_cache: Mutex::new(None),
        }
    }

    /// Accept clients until the daemon stops.
    pub fn serve(self: Arc<Self>, listener: OwnedFd, path: PathBuf) {
        let me = self.clone();
        accept_loop(
            &self.shared.stop,
            &listener,
            &self.clients,
            "control",
            |fd, why| {
                let _ = send_msg(fd, &control::error(why), 0);
            },
            move |client| {
                let me = me.clone();
                move || me.client(client)
            },
        );
        let _ = std::fs::remove_file(&path);
    }

    fn client(&self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        // Outside the (locked) key arena: 1 MiB per client would pin 64 MiB
        // at 32 clients. What a request leaves in it is wiped below.
        let mut buf = crate::secret::outside(|| vec![0u8; MAX_REQUEST + 1]);
        let mut errors = 0u32;
        while let Some(n) = recv_datagram(raw, &mut buf, &self.shared.stop) {
            let reply = if n > MAX_REQUEST {
                Reply::Json(control::error(&format!(
                    "request larger than {MAX_REQUEST} bytes"
                )))
            } else {
                match std::str::from_utf8(&buf[..n]) {
                    Err(_) => Reply::Json(control::error("request is not UTF-8 text")),
                    Ok(text) => match control::parse_request(text) {
                        Err(e) => Reply::Json(control::error(&e)),
                        Ok(Request::Monitor) => Reply::Json({
                            // SAFETY: dup of our own fd; the copy is owned.
                            let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
                            if dup >= 0 {
                                let m = Monitor {
                                    // SAFETY: dup is a new descriptor that
                                    // nothing else owns.
                                    fd: unsafe { OwnedFd::from_raw_fd(dup) },
                                    lost: 0,
                                };
                                self.monitors
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push(m);
                                control::ok(&[
                                    "monitoring: events follow, one message each".to_string()
                                ])
                            } else {
                                control::error("cannot register for events")
                            }
                        }),
                        Ok(r @ (Request::Stats | Request::Dump { .. })) => {
                            Reply::Text(self.listing(r))
                        }
                        Ok(r) => Reply::Json(self.handle(r)),
                    },
                }
            };
            // The request may have carried keys.
            zeroize::Zeroize::zeroize(&mut buf[..n.min(MAX_REQUEST + 1)]);
            let mut closing = false;
            let sent = match reply {
                Reply::Json(mut reply) => {
                    if reply["ok"] == json!(false) {
                        errors += 1;
                    } else {
                        errors = 0;
                    }
                    closing = errors >= MAX_ERRORS;
                    if closing {
                        // One reply per request: the last one says why it is
                        // the last.
                        let e = reply["error"].as_str().unwrap_or("").to_string();
                        reply["error"] =
                            json!(format!("{e}; too many failed requests: disconnecting"));
                    }
                    send_reply(raw, &reply)
                }
                Reply::Text(text) => {
                    errors = 0;
                    send_text(raw, &text)
                }
            };
            if sent.is_err() {
                return;
            }
            if closing {
                tracing::warn!("control: disconnected a client after {errors} failed requests");
                return;
            }
        }
    }

    /// Handle one request (not Monitor, `dump` or `stats`).
    pub fn handle(&self, r: Request) -> Value {
        match r {
            Request::Setkey(text) => self.apply(&text),
            // Serialized as text by the connection ([`Control::listing`]),
            // never built as a `Value`.
            Request::Dump { .. } | Request::Stats => {
                control::error("listings are answered by the connection")
            }
            Request::SpdDump => {
                let state = self.shared.state.load();
                let ps: Vec<Value> = state.spd.iter().map(|p| control::policy_json(p)).collect();
                json!({"ok": true, "policies": ps})
            }
            Request::Monitor => control::error("monitor is handled by the connection"),
        }
    }

    /// The reply to `dump` or `stats` (anything else: an error) as JSON
    /// text, serialized without a `Value` per SA: at 10,000 peers the
    /// 20,000 SAs' maps were most of the reply's time. The fields are in
    /// the order of their names, as a `Value` gives them.
    fn listing(&self, r: Request) -> String {
        #[derive(serde::Serialize)]
        struct Dump {
            larval: Vec<Value>,
            ok: bool,
            sas: Vec<control::SaJson>,
        }
        #[derive(serde::Serialize)]
        struct Stats {
            counters: Value,
            io: Value,
            ok: bool,
            plaintext_refused: u64,
            sas: Vec<control::SaJson>,
            uptime_secs: f64,
            workers: Vec<Value>,
        }
        let now = self.shared.now();
        let state = self.shared.state.load();
        let text = match r {
            Request::Dump { proto, keys } => {
                let sas = state
                    .sad
                    .iter()
                    .filter(|sa| proto.is_none_or(|p| sa.config.proto == p))
                    .map(|sa| control::SaJson::of(sa, now, keys))
                    .collect();
                let larval = state
                    .sad
                    .larval()
                    .filter(|l| l.4 > now)
                    .map(|(src, dst, proto, spi, exp)| {
                        json!({"src": src.to_string(), "dst": dst.to_string(), "proto": proto.name(), "spi": spi,
                               "state": "larval", "expires_in_secs": exp.saturating_sub(now).as_secs()})
                    })
                    .collect();
                serde_json::to_string(&Dump {
                    larval,
                    ok: true,
                    sas,
                })
            }
            Request::Stats => {
                let (c, io) = self.shared.totals();
                serde_json::to_string(&Stats {
                    counters: control::counters_json(&c),
                    io: json!({
                        "tun_rx": io.tun_rx, "tun_tx": io.tun_tx, "tun_tx_errors": io.tun_tx_errors,
                        "net_rx": io.net_rx, "net_tx": io.net_tx, "net_tx_errors": io.net_tx_errors,
                        "net_rx_trimmed": io.net_rx_trimmed, "net_rx_dropped": io.net_rx_dropped,
                    }),
                    ok: true,
                    plaintext_refused: self.plaintext_refused(),
                    sas: state
                        .sad
                        .iter()
                        .map(|sa| control::SaJson::of(sa, now, false))
                        .collect(),
                    uptime_secs: now.as_secs_f64(),
                    workers: self.shared.per_worker().iter().enumerate().map(|(i, (c, io))| json!({
                        "worker": i,
                        "out_packets": c.out_packets, "in_packets": c.in_packets,
                        "dropped": c.total_drops(),
                        "tun_rx": io.tun_rx, "tun_tx": io.tun_tx, "net_rx": io.net_rx, "net_tx": io.net_tx,
                    })).collect(),
                })
            }
            _ => return control::error("not a listing").to_string(),
        };
        text.unwrap_or_else(|e| control::error(&format!("listing: {e}")).to_string())
    }

    /// Packets the nftables table dropped (plaintext that had to be
    /// protected), read from its counters at most once a second.
    fn plaintext_refused(&self) -> u64 {
        // Held while the kernel lists them: concurrent requests wait and
        // share its answer.
        let mut cache = self.refused_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, n)) = *cache
            && at.elapsed() < Duration::from_secs(1)
        {
            return n;
        }
        // Under the writers' lock, so that no counter goes (and is added
        // to what went) while the table is read: a few milliseconds at
        // 10,000 peers, over netlink.
        let n = self
            .plumbing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused();
        *cache = Some((Instant::now(), n));
        n
    }

    /// Apply setkey text atomically: state and plumbing change together or
    /// not at all.
    fn apply(&self, text: &str) -> Value {
        let mut plumbing = self.plumbing.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.shared.now();
        let cur = self.shared.state.load_full();
        let (next, applied, warnings) = match cur.apply_text(text, "control", now) {
            Ok(x) => x,
            Err(e) => return control::error(&e.to_string()),
        };
        // Reads (get, dump) leave the state as it is: nothing to commit.
        if next.generation != cur.generation
            && let Err(e) = self.commit(&mut plumbing, &cur, next)
        {
            return control::error(&e);
        }
        let mut v = control::ok(&applied.output);
        v["spis"] = json!(applied.spis);
        v["warnings"] = json!(
            warnings
                .iter()
                .map(|w| format!("control:{}: {}", w.line, w.message))
                .collect::<Vec<_>>()
        );
        v
    }

    /// Make `next` (derived from `cur` while holding `plumbing`, the
    /// writers' lock) the running state: routes and nftables follow the
    /// SPD first, and if they cannot, nothing changes. Listeners hear of
    /// the change.
    pub fn commit(
        &self,
        plumbing: &mut Plumbing,
        cur: &Arc<State>,
        next: State,
    ) -> Result<(), String> {
        if let Some(e) = super::net::unreceivable(&cur.sad, &next.sad) {
            return Err(e);
        }
        let spd_changed = cur.spd.version() != next.spd.version();
        if spd_changed && let Err(e) = plumbing.update(cur, &next) {
            return Err(format!("policies not applied: {e:#}"));
        }
        let next = Arc::new(next);
        self.shared.state.store(next.clone());
        {
            let mut acquires = self.acquires.lock().unwrap_or_else(|e| e.into_inner());
            if !acquires.is_empty() {
                acquires.resolve(&next);
            }
        }
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            l.changed(cur, &next);
        }
        Ok(())
    }

    /// Forget the listeners (at exit: they hold the control back).
    pub fn clear_listeners(&self) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Add a listener for changes and events.
    pub fn listen(&self, l: Arc<dyn Listener>) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l);
    }

    /// Send an event to every monitor without blocking.
    pub fn broadcast(&self, e: &Event) {
        let state = self.shared.state.load();
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            l.event(&state, e);
        }
        let v = control::event_json(e);
        let mut ms = self.monitors.lock().unwrap_or_else(|e| e.into_inner());
        ms.retain_mut(
            |m| match send_msg(m.fd.as_raw_fd(), &v, libc::MSG_DONTWAIT) {
                Ok(()) => true,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    m.lost += 1;
                    m.lost < 10_000
                }
                Err(_) => false,
            },
        );
    }
}

/// Accept clients on `listener` until `stop`: only the daemon's own user,
/// at most [`MAX_CLIENTS`] at once (counted in `clients`), each served by
/// a thread running what `serve` makes of it. `refuse` tells a refused
/// client why, in its protocol.
pub fn accept_loop<S, F>(
    stop: &std::sync::atomic::AtomicBool,
    listener: &OwnedFd,
    clients: &Arc<AtomicUsize>,
    name: &str,
    refuse: impl Fn(RawFd, &str),
    serve: S,
) where
    S: Fn(OwnedFd) -> F,
    F: FnOnce() + Send + 'static,
{
    let lfd = listener.as_raw_fd();
    while !stop.load(Relaxed) {
        if !poll_in(lfd, 200) {
            continue;
        }
        // SAFETY: accept on our listening socket; the result is owned below.
        let c = unsafe {
            libc::accept4(
                lfd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: c is a new descriptor that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(c) };
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if peer_uid(c) != Some(euid) {
            tracing::warn!("{name}: refused a connection from uid {:?}", peer_uid(c));
            refuse(
                c,
                &format!(
                    "permission denied: only the daemon's own user (root) may use the {name} socket"
                ),
            );
            continue;
        }
        if clients.load(Relaxed) >= MAX_CLIENTS {
            refuse(c, &format!("too many {name} clients"));
            continue;
        }
        let snd: libc::c_int = 16 << 20;
        // SAFETY: setting a buffer size on our fd (large dumps).
        unsafe {
            libc::setsockopt(
                c,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &snd as *const _ as *const libc::c_void,
                4,
            );
        }
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setting a send timeout on our fd.
        unsafe {
            libc::setsockopt(
                c,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            );
        }
        clients.fetch_add(1, Relaxed);
        let run = serve(client);
        let counter = clients.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("tunsec-{name}"))
            .spawn(move || {
                // Requests carry keys: their handling allocates in the
                // key arena (crate::secret).
                crate::secret::scope(run);
                counter.fetch_sub(1, Relaxed);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Relaxed);
        }
    }
}

/// Wait for the control thread (bounded).
pub fn join(h: std::thread::JoinHandle<()>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !h.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if h.is_finished() {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn umask_now() -> String {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find(|l| l.starts_with("Umask:"))
            .unwrap_or("Umask: ?")
            .to_string()
    }

    #[test]
    fn the_socket_is_0600_in_place_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let fd = listen(&path).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ctl.sock"], "the private directory is gone");
        // The renamed socket is the bound one: a client reaches it.
        let _c = crate::client::Conn::connect(&path).unwrap();
        assert!(poll_in(fd.as_raw_fd(), 1000), "the connection arrives");
        // A second instance replaces a stale socket.
        drop(fd);
        let _fd = listen(&path).unwrap();
        let _c = crate::client::Conn::connect(&path).unwrap();
    }

    #[test]
    fn listening_never_changes_the_process_umask() {
        // The umask is process-wide: while one thread binds the socket,
        // another creating a file must get its usual mode. Watch it from
        // a second thread (Linux shows it in /proc/self/status).
        let before = umask_now();
        assert_ne!(before, "Umask: ?", "no Umask in /proc/self/status");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            let before = before.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Relaxed) {
                    let u = umask_now();
                    if u != before {
                        seen.push(u);
                    }
                }
                seen
            })
        };
        for _ in 0..300 {
            drop(listen(&path).unwrap());
        }
        stop.store(true, Relaxed);
        let seen = watcher.join().unwrap();
        assert!(seen.is_empty(), "umask {before} changed to {seen:?}");
    }
}
