//! The worker threads. Each owns one TUN queue, one packet socket of the
//! fanout group, its own sending sockets and its own packet buffers and
//! engine state (`engine::Worker`): nothing is shared per packet but the
//! SA atomics. A worker reads a batch from each side, runs the engine, and
//! writes the results; it re-reads the state snapshot once per batch.

use super::gso::{self, Gso};
use super::net::Sender;
use super::rxring::RxSocket;
use crate::buf::{HEADROOM, PacketBuf};
use crate::engine::{self, Counters, DropReason, Event, Verdict, Worker};
use crate::gro::{Csum, Gro};
use crate::packet;
use crate::state::State;
use arc_swap::ArcSwap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

/// Packets taken from one side before looking at the other.
pub const BATCH: usize = 64;

/// Counters of the I/O around the engine (per worker, published with the
/// engine's counters: no shared cache line is written per packet).
#[derive(Debug, Default, Clone)]
pub struct IoCounters {
    pub tun_rx: u64,
    pub tun_tx: u64,
    pub tun_tx_errors: u64,
    pub net_rx: u64,
    pub net_tx: u64,
    pub net_tx_errors: u64,
    /// Packets from the wire with bytes beyond their IP length (trimmed).
    pub net_rx_trimmed: u64,
    /// Packets the kernel dropped before tunsec could read them: its
    /// receive ring or socket queue was full.
    pub net_rx_dropped: u64,
}

impl IoCounters {
    pub fn add(&mut self, o: &IoCounters) {
        self.tun_rx += o.tun_rx;
        self.tun_tx += o.tun_tx;
        self.tun_tx_errors += o.tun_tx_errors;
        self.net_rx += o.net_rx;
        self.net_tx += o.net_tx;
        self.net_tx_errors += o.net_tx_errors;
        self.net_rx_trimmed += o.net_rx_trimmed;
        self.net_rx_dropped += o.net_rx_dropped;
    }
}

/// What the main thread and the workers share.
pub struct Shared {
    pub state: ArcSwap<State>,
    pub stop: AtomicBool,
    pub epoch: Instant,
    /// Engine and I/O counters, published by each worker twice a second.
    pub counters: Mutex<Vec<(Counters, IoCounters)>>,
    pub events: Mutex<Vec<Event>>,
}

impl Shared {
    pub fn new(state: State, workers: usize) -> Shared {
        Shared {
            state: ArcSwap::from_pointee(state),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
            counters: Mutex::new(vec![Default::default(); workers]),
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Each worker's counters, as last published.
    pub fn per_worker(&self) -> Vec<(Counters, IoCounters)> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Counters summed over the workers.
    pub fn totals(&self) -> (Counters, IoCounters) {
        let mut t = (Counters::default(), IoCounters::default());
        for (c, i) in self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.0.add(c);
            t.1.add(i);
        }
        t
    }
}

pub struct Io {
    pub tun: SyncDevice,
    /// Packet sockets for IPv4 and IPv6.
    pub packets: Vec<RxSocket>,
    pub sender: Sender,
    /// UDP segmentation offload for ESP in UDP (None: unavailable).
    pub gso: Option<Gso>,
}

pub fn dst_of(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).ok()?)),
        6 if pkt.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?)),
        _ => None,
    }
}

/// A raw IPv4 socket fills in an identification of zero (raw(7)); under
/// AH that would change a covered field after signing. Give such packets
/// an identification first (harmless: it matters only to fragments).
fn ensure_ipv4_id(buf: &mut PacketBuf, next_id: &mut u16) {
    let d = buf.data_mut();
    if d.len() >= 20 && d[0] >> 4 == 4 && d[4] == 0 && d[5] == 0 {
        *next_id = next_id.wrapping_add(1).max(1);
        d[4..6].copy_from_slice(&next_id.to_be_bytes());
        packet::fix_lengths(d);
    }
}

/// A packet buffer as the batch readers see it: the whole allocation,
/// written at [`HEADROOM`].
struct Slot(PacketBuf);

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        self.0.raw()
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        self.0.raw_mut()
    }
}

/// As the engine's batch functions take it.
impl AsMut<PacketBuf> for Slot {
    fn as_mut(&mut self) -> &mut PacketBuf {
        &mut self.0
    }
}

/// Packets that met `require` without an SA wait here, briefly, for the
/// keying daemon to answer the ACQUIRE; the rest are dropped. Buffers are
/// swapped in and out, never copied.
struct Hold {
    bufs: Vec<PacketBuf>,
    /// (since, generation seen) per held packet, parallel to `bufs[..n]`.
    meta: Vec<(Duration, u64)>,
    n: usize,
}

/// How many packets wait, and for how long.
pub const HOLD_PACKETS: usize = 8;
pub const HOLD_TIME: Duration = Duration::from_secs(1);

impl Hold {
    fn new() -> Hold {
        Hold {
            bufs: (0..HOLD_PACKETS).map(|_| PacketBuf::new()).collect(),
            meta: vec![(Duration::ZERO, 0); HOLD_PACKETS],
            n: 0,
        }
    }

    /// Keep a packet the engine left pending in `buf` (which gets an empty
    /// buffer in exchange) if there is room; otherwise it is dropped.
    fn keep(&mut self, buf: &mut PacketBuf, w: &mut Worker, generation: u64, now: Duration) {
        if self.n == HOLD_PACKETS {
            w.give_up();
            return;
        }
        std::mem::swap(&mut self.bufs[self.n], buf);
        self.meta[self.n] = (now, generation);
        self.n += 1;
    }

    /// Retry held packets when the state changed; drop those that waited
    /// too long. Returns the packets to send (indices into `bufs`).
    fn retry(
        &mut self,
        state: &State,
        w: &mut Worker,
        now: Duration,
        sender: &Sender,
        ioc: &mut IoCounters,
    ) {
        let mut i = 0;
        while i < self.n {
            let (since, seen) = self.meta[i];
            let mut done = false;
            if seen != state.generation {
                self.meta[i].1 = state.generation;
                match engine::outbound(state, w, &mut self.bufs[i], now) {
                    Verdict::Forward => {
                        let (sent, failed) = sender.send_batch(&[self.bufs[i].data()]);
                        ioc.net_tx += sent as u64;
                        ioc.net_tx_errors += failed as u64;
                        done = true;
                    }
                    Verdict::Pending if now.saturating_sub(since) < HOLD_TIME => {}
                    Verdict::Pending => {
                        w.give_up();
                        done = true;
                    }
                    // (Held is inbound only.)
                    Verdict::Drop(_) | Verdict::Held => done = true,
                }
            } else if now.saturating_sub(since) >= HOLD_TIME {
                w.give_up();
                done = true;
            }
            if done {
                self.n -= 1;
                self.bufs.swap(i, self.n);
                self.meta.swap(i, self.n);
            } else {
                i += 1;
            }
        }
    }
}

/// Say once per process why outbound fragments are dropped: the kernel
/// fragments a datagram larger than the TUN MTU before tunsec sees it, and
/// transport-mode IPsec protects whole datagrams only (RFC 4301 section 7
/// keeps fragments to tunnel mode). Silent, this looks like random loss.
fn warn_fragment_once(io: &Io, pkt: &[u8]) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let who = crate::packet::parse(pkt)
        .map(|i| format!(" ({} -> {})", i.src(pkt), i.dst(pkt)))
        .unwrap_or_default();
    let mtu = io
        .tun
        .mtu()
        .map(|m| format!(" of {m} bytes"))
        .unwrap_or_default();
    tracing::warn!(
        "dropping outbound IP fragments{who}: the kernel split a datagram larger than the TUN MTU{mtu} \
         before tunsec saw it, and transport-mode IPsec protects whole datagrams only; \
         send smaller datagrams (counted as `fragment`; this is said once)"
    );
}

/// Rounds of batches taken from one side before turning to the other.
const ROUNDS: usize = 8;

/// Where a received packet is: a receive slot, or the datagram last cut
/// from a UDP GSO super-packet.
#[derive(Clone, Copy)]
enum At {
    Slot(usize),
    Segment,
}

struct Loop {
    id: usize,
    w: Worker,
    ioc: IoCounters,
    slots: Vec<Slot>,
    sizes: [usize; BATCH],
    /// TUN offload: the raw read (virtio header + up to 64 KiB), and the
    /// coalescing of writes.
    offload: bool,
    original: Vec<u8>,
    gro: Gro,
    ip_id: u16,
    hold: Hold,
    /// A buffer for the datagrams of a received UDP GSO super-packet.
    segment: PacketBuf,
}

impl Loop {
    /// TUN -> engine outbound -> raw sockets, in batches.
    fn outbound(&mut self, io: &Io, state: &State, now: Duration) {
        for _ in 0..ROUNDS {
            let n = if self.offload {
                match io.tun.recv_multiple(
                    &mut self.original,
                    &mut self.slots,
                    &mut self.sizes,
                    HEADROOM,
                ) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        tracing::warn!("worker {}: TUN read: {e}", self.id);
                        return;
                    }
                }
            } else {
                match io.tun.recv(self.slots[0].0.load_area()) {
                    Ok(n) => {
                        self.sizes[0] = n;
                        1
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        tracing::warn!("worker {}: TUN read: {e}", self.id);
                        return;
                    }
                }
            };
            for (i, slot) in self.slots.iter_mut().enumerate().take(n) {
                slot.0.set_loaded(self.sizes[i]);
                self.ioc.tun_rx += 1;
                ensure_ipv4_id(&mut slot.0, &mut self.ip_id);
            }
            let mut verdicts = [Verdict::Forward; BATCH];
            engine::outbound_batch(
                state,
                &mut self.w,
                &mut self.slots[..n],
                now,
                &mut verdicts[..n],
            );
            let mut keep = [false; BATCH];
            for (i, slot) in self.slots.iter_mut().enumerate().take(n) {
                let v = verdicts[i];
                keep[i] = v == Verdict::Forward;
                if v == Verdict::Drop(DropReason::Fragment) {
                    warn_fragment_once(io, slot.0.data());
                }
                if v == Verdict::Pending {
                    self.hold
                        .keep(&mut slot.0, &mut self.w, state.generation, now);
                }
            }
            let mut out: [&[u8]; BATCH] = [&[]; BATCH];
            let mut k = 0;
            for (i, slot) in self.slots.iter().enumerate().take(n) {
                if keep[i] {
                    out[k] = slot.0.data();
                    k += 1;
                }
            }
            send_out(io, &out[..k], &mut self.ioc);
        }
    }

    /// packet socket -> engine inbound -> TUN, in batches.
    fn inbound(&mut self, io: &Io, rx: &RxSocket, state: &State, now: Duration) {
        for _ in 0..ROUNDS {
            let n = match rx.recv_batch(&mut self.slots, HEADROOM, &mut self.sizes) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("worker {}: packet socket: {e}", self.id);
                    return;
                }
            };
            let mut k = 0;
            let mut i = 0;
            while i < n {
                if self.sizes[i] == 0 {
                    i += 1;
                    continue;
                }
                let buf = &mut self.slots[i].0;
                buf.set_loaded(self.sizes[i]);
                if let Some(mut segs) = gso::split(buf.data()) {
                    // ESP in UDP that crossed a veth whole: one datagram
                    // at a time, as they would have come from a NIC. (A
                    // batch of 32 through `inbound_batch` was tried: no
                    // difference in CPU per packet.)
                    while segs.next_into(self.slots[i].0.data(), &mut self.segment) {
                        self.received(At::Segment);
                        let v = engine::inbound(state, &mut self.w, &mut self.segment, now);
                        if v == Verdict::Forward {
                            self.queue_tun(io, &mut k, At::Segment);
                        }
                    }
                    i += 1;
                    continue;
                }
                // A run of single packets: one call of the engine.
                let start = i;
                loop {
                    self.received(At::Slot(i));
                    i += 1;
                    if i == n || self.sizes[i] == 0 {
                        break;
                    }
                    self.slots[i].0.set_loaded(self.sizes[i]);
                    if gso::split(self.slots[i].0.data()).is_some() {
                        break;
                    }
                }
                let mut verdicts = [Verdict::Forward; BATCH];
                engine::inbound_batch(
                    state,
                    &mut self.w,
                    &mut self.slots[start..i],
                    now,
                    &mut verdicts[start..i],
                );
                for (j, v) in verdicts.iter().enumerate().take(i).skip(start) {
                    if *v == Verdict::Forward {
                        self.queue_tun(io, &mut k, At::Slot(j));
                    }
                }
            }
            self.flush_tun(io, &mut k);
            if n < BATCH {
                return;
            }
        }
    }

    /// Count a received packet and trim bytes beyond its IP length.
    fn received(&mut self, at: At) {
        let buf = match at {
            At::Slot(i) => &mut self.slots[i].0,
            At::Segment => &mut self.segment,
        };
        self.ioc.net_rx += 1;
        if let Some(len) = packet::ip_len(buf.data())
            && len < buf.len()
        {
            buf.truncate(len);
            self.ioc.net_rx_trimmed += 1;
        }
    }

    /// Queue a packet the engine let through for the TUN device.
    fn queue_tun(&mut self, io: &Io, k: &mut usize, at: At) {
        let buf = match at {
            At::Slot(i) => &self.slots[i].0,
            At::Segment => &self.segment,
        };
        if self.offload {
            let csum = if buf.csum_stale {
                Csum::Trusted
            } else {
                Csum::Check
            };
            self.gro.push(buf.data(), csum);
            *k += 1;
            if self.gro.len() == BATCH {
                self.flush_tun(io, k);
            }
        } else {
            match io.tun.send(buf.data()) {
                Ok(_) => self.ioc.tun_tx += 1,
                Err(_) => self.ioc.tun_tx_errors += 1,
            }
        }
    }

    /// Write what [`Loop::queue_tun`] coalesced: one `write(2)` per frame
    /// (the TUN device has no batched write).
    fn flush_tun(&mut self, io: &Io, k: &mut usize) {
        if *k == 0 {
            return;
        }
        let fd = io.tun.as_raw_fd();
        for (frame, n) in self.gro.frames() {
            // SAFETY: `frame` is a live, initialized buffer of that length.
            let r = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
            if r == frame.len() as isize {
                self.ioc.tun_tx += n as u64;
            } else {
                self.ioc.tun_tx_errors += n as u64;
            }
        }
        *k = 0;
    }
}

/// Send sealed packets, in order: runs of ESP in UDP as UDP GSO
/// super-packets, other packets as frames on the packet socket, both where
/// the link-layer path is known (no IP output path: route lookup,
/// netfilter, neighbour), the rest by the raw sockets.
fn send_out(io: &Io, pkts: &[&[u8]], ioc: &mut IoCounters) {
    let Some(g) = io.gso.as_ref().filter(|g| !g.broken.get()) else {
        let (sent, failed) = io.sender.send_batch(pkts);
        ioc.net_tx += sent as u64;
        ioc.net_tx_errors += failed as u64;
        return;
    };
    // Pending singles: by the raw socket, or framed for the packet socket.
    let mut raw: [&[u8]; BATCH] = [&[]; BATCH];
    let mut nraw = 0;
    let mut framed: [(&[u8], gso::L2); BATCH] = [(&[], gso::L2::default()); BATCH];
    let mut nframed = 0;
    let flush = |raw: &mut [&[u8]],
                 nraw: &mut usize,
                 framed: &[(&[u8], gso::L2)],
                 nframed: &mut usize,
                 ioc: &mut IoCounters| {
        if *nraw > 0 {
            let (sent, failed) = io.sender.send_batch(&raw[..*nraw]);
            ioc.net_tx += sent as u64;
            ioc.net_tx_errors += failed as u64;
            *nraw = 0;
        }
        if *nframed > 0 {
            let (sent, failed, done) = g.send_frames(&framed[..*nframed]);
            ioc.net_tx += sent as u64;
            ioc.net_tx_errors += failed as u64;
            // What the packet socket could not take (the device went)
            // goes by the raw socket.
            for (p, _) in &framed[done..*nframed] {
                let (sent, failed) = io.sender.send_batch(&[p]);
                ioc.net_tx += sent as u64;
                ioc.net_tx_errors += failed as u64;
            }
            *nframed = 0;
        }
    };
    let mut i = 0;
    while i < pkts.len() {
        let n = gso::run_len(&pkts[i..]);
        let l2 = dst_of(pkts[i]).and_then(|d| g.l2(d));
        match l2 {
            Some(l2) if n >= 2 => {
                flush(&mut raw, &mut nraw, &framed, &mut nframed, ioc);
                if io.send_gso(&l2, &pkts[i..i + n]) {
                    ioc.net_tx += n as u64;
                } else {
                    let (sent, failed) = io.sender.send_batch(&pkts[i..i + n]);
                    ioc.net_tx += sent as u64;
                    ioc.net_tx_errors += failed as u64;
                }
                i += n;
                continue;
            }
            Some(l2) if framed_tx() => {
                if nraw > 0 {
                    flush(&mut raw, &mut nraw, &framed, &mut nframed, ioc);
                }
                framed[nframed] = (pkts[i], l2);
                nframed += 1;
            }
            _ => {
                if nframed > 0 {
                    flush(&mut raw, &mut nraw, &framed, &mut nframed, ioc);
                }
                raw[nraw] = pkts[i];
                nraw += 1;
            }
        }
        i += 1;
    }
    flush(&mut raw, &mut nraw, &framed, &mut nframed, ioc);
}

/// Single packets go as frames on the packet socket (TUNSEC_TX=raw keeps
/// them on the raw sockets: for comparison).
fn framed_tx() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TUNSEC_TX").map_or(true, |v| v != "raw"))
}

impl Io {
    /// One super-packet for `run` (see [`gso::run_len`]); false if the kernel
    /// refused it (GSO is then off for this worker, said once).
    fn send_gso(&self, l2: &gso::L2, run: &[&[u8]]) -> bool {
        let Some(g) = self.gso.as_ref() else {
            return false;
        };
        let v6 = run[0][0] >> 4 == 6;
        let (h, hdr, seg) = gso::super_header(run);
        let vh = gso::gso_headers(l2, v6, hdr - 8, seg);
        let mut parts: [&[u8]; BATCH + 2] = [&[]; BATCH + 2];
        parts[0] = &vh;
        parts[1] = &h[..hdr];
        for (slot, q) in parts[2..].iter_mut().zip(run) {
            *slot = &q[hdr..];
        }
        match g.send(l2, v6, &parts[..2 + run.len()]) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                g.set_broken(&e);
                false
            }
        }
    }
}

/// Worker `id`'s loop; `alone` when it is the only worker (no SA is
/// shared with another CPU: see `Worker::account_runs`).
pub fn run(id: usize, shared: Arc<Shared>, io: Io, seed: [u8; 32], alone: bool) {
    let offload = io.tun.tcp_gso();
    let mut l = Loop {
        id,
        w: {
            let mut w = Worker::new(seed);
            // The TUN writes tell the kernel not to verify what ESP in UDP
            // vouched for (crate::gro).
            w.defer_tcp_checksum = offload;
            w.account_runs = !alone;
            w
        },
        ioc: IoCounters::default(),
        slots: (0..BATCH).map(|_| Slot(PacketBuf::new())).collect(),
        sizes: [0; BATCH],
        offload,
        original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
        gro: Gro::new(io.tun.udp_gso()),
        ip_id: (seed[0] as u16) << 8 | seed[1] as u16,
        hold: Hold::new(),
        segment: PacketBuf::new(),
    };
    let mut last_publish = Instant::now();
    let tun_fd = io.tun.as_raw_fd();
    let pkt_fds: Vec<_> = io.packets.iter().map(|p| p.fd()).collect();
    let nfds = 1 + pkt_fds.len();
    while !shared.stop.load(Relaxed) {
        let pollfd = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [pollfd(tun_fd), pollfd(-1), pollfd(-1)];
        for (i, fd) in pkt_fds.iter().enumerate() {
            fds[1 + i] = pollfd(*fd);
        }
        // SAFETY: fds is a valid array of at least nfds entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds as libc::nfds_t, 100) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::error!("worker {id}: poll: {}", io::Error::last_os_error());
            break;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            // The TUN device was deleted from outside: its queue reports an
            // error forever (poll would return at once, a busy loop).
            tracing::error!(
                "worker {id}: the TUN device is gone (deleted from outside?): stopping"
            );
            break;
        }
        let state = shared.state.load();
        let now = shared.now();
        if fds[0].revents & libc::POLLIN != 0 {
            l.outbound(&io, &state, now);
        }
        for (i, rx) in io.packets.iter().enumerate() {
            if fds[1 + i].revents & libc::POLLIN != 0 {
                l.inbound(&io, rx, &state, now);
            }
        }
        if l.hold.n > 0 {
            l.hold.retry(&state, &mut l.w, now, &io.sender, &mut l.ioc);
        }
        // Release what the flow caches still hold of older states (a
        // deleted SA's keys), a little each round, more when idle.
        l.w.sweep(&state, if r == 0 { 1024 } else { 16 });
        // Fragments whose datagram never completes are dropped in time.
        if l.w.reassembly.in_progress() > 0 {
            l.w.expire_fragments(now);
        }
        if !l.w.events.is_empty() {
            shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut l.w.events);
        }
        if last_publish.elapsed() >= Duration::from_millis(500) {
            l.ioc.net_rx_dropped += io.packets.iter().map(RxSocket::take_drops).sum::<u64>();
            shared.counters.lock().unwrap_or_else(|e| e.into_inner())[id] =
                (l.w.counters.clone(), l.ioc.clone());
            last_publish = Instant::now();
        }
    }
    // Packets still waiting for an SA are dropped with the worker.
    for _ in 0..l.hold.n {
        l.w.give_up();
    }
    l.ioc.net_rx_dropped += io.packets.iter().map(RxSocket::take_drops).sum::<u64>();
    shared.counters.lock().unwrap_or_else(|e| e.into_inner())[id] = (l.w.counters.clone(), l.ioc);
}
