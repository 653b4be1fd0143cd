//! The XFRM netlink socket (`tunsec run --xfrm PATH`): a root-only Unix
//! `SOCK_SEQPACKET` socket where each datagram is what a process would
//! have sent to, or received from, a `NETLINK_XFRM` socket. The preload
//! shim (`tunsec ike`) connects IKE daemons to it. This module only moves
//! bytes: `crate::xfrm` decides what they mean.
//!
//! Each connection is one netlink socket: it has a port id and the
//! multicast groups it listens to (told by the shim's [`SHIM_BIND`]
//! message), its requests are answered in order, and events and change
//! notifications reach it without blocking anyone (a listener that does
//! not read loses them, as a netlink socket overruns).

use super::control::{self, Control, Listener};
use crate::engine::Event;
use crate::state::State;
use crate::xfrm as x;
use crate::xfrm::convert::Clock;
use crate::xfrm::netlink::{self, SHIM_BIND, errno};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The largest datagram read: netlink requests are small, but a client
/// may try anything.
const MAX_DATAGRAM: usize = 1 << 16;

struct Conn {
    fd: OwnedFd,
    groups: Arc<AtomicU32>,
    lost: AtomicU64,
}

pub struct Server {
    ctl: Arc<Control>,
    conns: Mutex<Vec<Conn>>,
    clients: Arc<AtomicUsize>,
    acquire_seq: AtomicU32,
}

fn clock(ctl: &Control) -> Clock {
    Clock {
        now: ctl.shared.now(),
        wall: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

impl Server {
    pub fn new(ctl: Arc<Control>) -> Arc<Server> {
        let s = Arc::new(Server {
            ctl: ctl.clone(),
            conns: Mutex::new(Vec::new()),
            clients: Arc::new(AtomicUsize::new(0)),
            acquire_seq: AtomicU32::new(0),
        });
        ctl.listen(s.clone());
        s
    }

    /// Accept connections until the daemon stops.
    pub fn serve(self: Arc<Self>, listener: OwnedFd, path: PathBuf) {
        let me = self.clone();
        control::accept_loop(
            &self.ctl.shared.stop,
            &listener,
            &self.clients,
            "xfrm",
            |_, _| {},
            move |fd| {
                let me = me.clone();
                move || me.client(fd)
            },
        );
        let _ = std::fs::remove_file(&path);
    }

    fn client(&self, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        // A netlink socket holds about 200 KiB; replies go out in 4 KiB
        // datagrams the client reads as they come. 1 MiB (not the control
        // socket's 16 MiB for JSON dumps) bounds what a listener that
        // stopped reading pins before its events are dropped.
        let snd: libc::c_int = 1 << 20;
        // SAFETY: setting a buffer size on our own descriptor.
        unsafe {
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &snd as *const _ as *const libc::c_void,
                4,
            );
        }
        let groups = Arc::new(AtomicU32::new(0));
        // SAFETY: dup of our own descriptor, owned by the listener entry.
        let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return;
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Conn {
                // SAFETY: dup is a new descriptor nothing else owns.
                fd: unsafe { OwnedFd::from_raw_fd(dup) },
                groups: groups.clone(),
                lost: AtomicU64::new(0),
            });
        let mut pid = 0u32;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Some(n) = control::recv_datagram(raw, &mut buf, &self.ctl.shared.stop) {
            if n > buf.len() {
                tracing::warn!(
                    "xfrm: a {n}-byte datagram is over {MAX_DATAGRAM} bytes: closing the connection"
                );
                break;
            }
            let mut replies = Vec::new();
            for m in netlink::split(&buf[..n]) {
                let (header, payload, bytes) = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // Answer what can be answered: the first header.
                        tracing::warn!("xfrm: malformed datagram: {e}");
                        if n >= netlink::NLMSG_HDRLEN {
                            let header = &buf[..netlink::NLMSG_HDRLEN];
                            replies.push(netlink::error(header, errno::EINVAL, pid));
                        }
                        break;
                    }
                };
                if header.ty == SHIM_BIND {
                    if let Some((p, g)) = netlink::shim_bind(payload) {
                        pid = p;
                        groups.store(g, Relaxed);
                    }
                    continue;
                }
                let req = x::Request {
                    header,
                    payload,
                    bytes,
                    pid,
                };
                replies.extend(self.request(&req));
            }
            let mut broken = false;
            for d in netlink::pack(replies, netlink::DATAGRAM) {
                if let Err(e) = control::send_bytes(raw, &d, 0) {
                    tracing::warn!("xfrm: cannot answer a client ({e}): closing the connection");
                    broken = true;
                    break;
                }
            }
            if broken {
                break;
            }
        }
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(&c.groups, &groups));
    }

    /// One request, under the writers' lock: the reply messages.
    fn request(&self, req: &x::Request) -> Vec<Vec<u8>> {
        let mut plumbing = self.ctl.plumbing.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.ctl.shared.state.load_full();
        let clock = clock(&self.ctl);
        let (msgs, refused) = x::respond(&cur, req, clock, |next| {
            self.ctl.commit(&mut plumbing, &cur, next)
        });
        if let Some(r) = refused {
            tracing::warn!(
                "xfrm: refused message type {:#x} (errno {}): {}",
                req.header.ty,
                r.errno,
                r.why
            );
        }
        msgs
    }

    /// Send to every connection listening to `group`, without blocking.
    fn multicast(&self, group: u32, msg: &[u8]) {
        let bit = x::group_bit(group);
        for c in self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if c.groups.load(Relaxed) & bit == 0 {
                continue;
            }
            if control::send_bytes(c.fd.as_raw_fd(), msg, libc::MSG_DONTWAIT).is_err() {
                let lost = c.lost.fetch_add(1, Relaxed);
                if lost == 0 {
                    tracing::warn!("xfrm: a listener is not reading: events to it are lost");
                }
            }
        }
    }

    fn listening(&self, mask: u32) -> bool {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.groups.load(Relaxed) & mask != 0)
    }
}

impl Listener for Server {
    fn changed(&self, old: &State, new: &State) {
        use crate::xfrm::consts::{XFRMNLGRP_POLICY, XFRMNLGRP_SA};
        if !self.listening(x::group_bit(XFRMNLGRP_SA) | x::group_bit(XFRMNLGRP_POLICY)) {
            return;
        }
        for (g, m) in x::notifications(old, new, clock(&self.ctl)) {
            self.multicast(g, &m);
        }
    }

    fn event(&self, state: &State, e: &Event) {
        let seq = self.acquire_seq.fetch_add(1, Relaxed).wrapping_add(1);
        if let Some((g, m)) = x::event(state, e, seq, clock(&self.ctl)) {
            self.multicast(g, &m);
        }
    }
}
