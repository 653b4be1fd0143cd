//! The worker threads. Each owns one TUN queue, one packet socket of the
//! fanout group, its own sending sockets and its own packet buffers and
//! engine state (`engine::Worker`): nothing is shared per packet but the
//! SA atomics. A worker reads a batch from each side, runs the engine, and
//! writes the results; it re-reads the state snapshot once per batch.

use super::net::{self, Sender};
use crate::buf::PacketBuf;
use crate::engine::{self, Counters, Event, Verdict, Worker};
use crate::packet;
use crate::state::State;
use arc_swap::ArcSwap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tun_rs::SyncDevice;

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
    pub packets: OwnedFd,
    pub sender: Sender,
}

fn dst_of(pkt: &[u8]) -> Option<IpAddr> {
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

pub fn run(id: usize, shared: Arc<Shared>, io: Io, seed: [u8; 32]) {
    let mut w = Worker::new(seed);
    let mut ioc = IoCounters::default();
    let mut buf = PacketBuf::new();
    let mut ip_id: u16 = (seed[0] as u16) << 8 | seed[1] as u16;
    let mut last_publish = Instant::now();
    let tun_fd = io.tun.as_raw_fd();
    let pkt_fd = io.packets.as_raw_fd();
    while !shared.stop.load(Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: tun_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pkt_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            tracing::error!("worker {id}: poll: {}", io::Error::last_os_error());
            break;
        }
        let state = shared.state.load();
        let now = shared.now();
        if fds[0].revents & libc::POLLIN != 0 {
            for _ in 0..BATCH {
                let n = match io.tun.recv(buf.load_area()) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("worker {id}: TUN read: {e}");
                        break;
                    }
                };
                buf.set_loaded(n);
                ioc.tun_rx += 1;
                ensure_ipv4_id(&mut buf, &mut ip_id);
                if engine::outbound(&state, &mut w, &mut buf, now) == Verdict::Forward {
                    let Some(dst) = dst_of(buf.data()) else {
                        continue;
                    };
                    match io.sender.send(buf.data(), dst) {
                        Ok(()) => ioc.net_tx += 1,
                        Err(_) => ioc.net_tx_errors += 1,
                    };
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            for _ in 0..BATCH {
                let n = match net::recv_host(pkt_fd, buf.load_area()) {
                    Ok(Some(n)) => n,
                    Ok(None) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("worker {id}: packet socket: {e}");
                        break;
                    }
                };
                buf.set_loaded(n);
                ioc.net_rx += 1;
                if let Some(len) = packet::ip_len(buf.data())
                    && len < buf.len()
                {
                    buf.truncate(len);
                    ioc.net_rx_trimmed += 1;
                }
                if engine::inbound(&state, &mut w, &mut buf, now) == Verdict::Forward {
                    match io.tun.send(buf.data()) {
                        Ok(_) => ioc.tun_tx += 1,
                        Err(_) => ioc.tun_tx_errors += 1,
                    };
                }
            }
        }
        if !w.events.is_empty() {
            shared
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut w.events);
        }
        if last_publish.elapsed() >= Duration::from_millis(500) {
            shared.counters.lock().unwrap_or_else(|e| e.into_inner())[id] =
                (w.counters.clone(), ioc.clone());
            last_publish = Instant::now();
        }
    }
    shared.counters.lock().unwrap_or_else(|e| e.into_inner())[id] = (w.counters.clone(), ioc);
}
