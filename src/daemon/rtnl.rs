//! Routes and policy-routing rules over rtnetlink, from within tunsec: a
//! change is one request and its ack (tens of microseconds), not an `ip`
//! process (a millisecond or more, per route, per policy change). The
//! message layouts come from `netlink-packet-route`; [`request`] builds
//! the bytes (pure), [`Rtnl`] sends them and reads the ack.

use crate::spd::Prefix;
use anyhow::{Result, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One route or rule, as `ip` would name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// `ip route replace DST dev DEV table T [src S]`, or with `dev` None,
    /// `ip route replace blackhole DST table T metric M`.
    Route {
        dst: Prefix,
        dev: Option<String>,
        table: u32,
        src: Option<IpAddr>,
        metric: Option<u32>,
    },
    /// `ip -4|-6 rule add not fwmark MARK table T priority P`.
    Rule {
        v6: bool,
        mark: u32,
        table: u32,
        priority: u32,
    },
}

impl Change {
    /// The `ip` command this stands for (`--dry-run`, logs, errors).
    pub fn describe(&self, add: bool) -> String {
        match self {
            Change::Route {
                dst,
                dev,
                table,
                src,
                metric,
            } => {
                let fam = if dst.addr.is_ipv4() { "-4" } else { "-6" };
                let verb = if add { "replace" } else { "del" };
                let mut s = match dev {
                    Some(d) => format!("ip {fam} route {verb} {dst} dev {d} table {table}"),
                    None => format!("ip {fam} route {verb} blackhole {dst} table {table}"),
                };
                if let Some(m) = metric {
                    s.push_str(&format!(" metric {m}"));
                }
                if let (true, Some(src)) = (add, src) {
                    s.push_str(&format!(" src {src}"));
                }
                s
            }
            Change::Rule {
                v6,
                mark,
                table,
                priority,
            } => format!(
                "ip {} rule {} not fwmark {mark:#x} table {table} priority {priority}",
                if *v6 { "-6" } else { "-4" },
                if add { "add" } else { "del" }
            ),
        }
    }
}

fn family(v6: bool) -> AddressFamily {
    if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn address(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

/// The request for `change` (`add` or delete), `ifindex` the device's
/// index for a route through a device.
pub fn request(change: &Change, add: bool, ifindex: Option<u32>, seq: u32) -> Vec<u8> {
    let mut flags = NLM_F_REQUEST | NLM_F_ACK;
    let msg = match change {
        Change::Route {
            dst,
            dev,
            table,
            src,
            metric,
        } => {
            let mut m = RouteMessage::default();
            m.header.address_family = family(dst.addr.is_ipv6());
            m.header.destination_prefix_length = dst.len;
            m.header.table = RouteHeader::RT_TABLE_UNSPEC;
            m.header.protocol = RouteProtocol::Boot;
            m.header.scope = if dev.is_some() {
                RouteScope::Link
            } else {
                RouteScope::Universe
            };
            m.header.kind = if dev.is_some() {
                RouteType::Unicast
            } else {
                RouteType::BlackHole
            };
            m.attributes
                .push(RouteAttribute::Destination(address(dst.addr)));
            m.attributes.push(RouteAttribute::Table(*table));
            if let Some(i) = ifindex {
                m.attributes.push(RouteAttribute::Oif(i));
            }
            if let Some(p) = metric {
                m.attributes.push(RouteAttribute::Priority(*p));
            }
            if add {
                if let Some(s) = src {
                    m.attributes.push(RouteAttribute::PrefSource(address(*s)));
                }
                flags |= NLM_F_CREATE | NLM_F_REPLACE;
                RouteNetlinkMessage::NewRoute(m)
            } else {
                RouteNetlinkMessage::DelRoute(m)
            }
        }
        Change::Rule {
            v6,
            mark,
            table,
            priority,
        } => {
            let mut m = RuleMessage::default();
            m.header.family = family(*v6);
            m.header.action = RuleAction::ToTable;
            m.header.flags = RuleFlags::Invert;
            m.attributes.push(RuleAttribute::FwMark(*mark));
            m.attributes.push(RuleAttribute::FwMask(u32::MAX));
            m.attributes.push(RuleAttribute::Table(*table));
            m.attributes.push(RuleAttribute::Priority(*priority));
            if add {
                flags |= NLM_F_CREATE;
                RouteNetlinkMessage::NewRule(m)
            } else {
                RouteNetlinkMessage::DelRule(m)
            }
        }
    };
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// The errno of an ack (0 for success), if `reply` is one for `seq`.
pub fn ack_errno(reply: &[u8], seq: u32) -> Option<i32> {
    if reply.len() < 20 {
        return None;
    }
    let ty = u16::from_ne_bytes([reply[4], reply[5]]);
    let rseq = u32::from_ne_bytes(reply[8..12].try_into().unwrap());
    (ty == 2 && rseq == seq).then(|| -i32::from_ne_bytes(reply[16..20].try_into().unwrap()))
}

/// A NETLINK_ROUTE socket for changes.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    /// The last device looked up and its index: `if_nametoindex` is a
    /// socket, an ioctl and a close, for every route (15% of a policy
    /// change's time). A route the kernel refuses with ENODEV looks the
    /// name up again.
    dev: Option<(String, u32)>,
}

/// A netlink socket of `protocol` whose receives give up after `timeout`
/// (never hang on the kernel): what the daemon's rtnetlink and
/// nf_tables clients share.
pub fn netlink_socket(protocol: libc::c_int, timeout: std::time::Duration) -> io::Result<OwnedFd> {
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a receive timeout on our own socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    Ok(fd)
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let fd = netlink_socket(libc::NETLINK_ROUTE, std::time::Duration::from_secs(5))?;
        Ok(Rtnl {
            fd,
            seq: 1,
            dev: None,
        })
    }

    /// The index of the device `change` routes through, if any.
    fn ifindex(&mut self, change: &Change, add: bool) -> Result<Option<u32>> {
        let Change::Route { dev: Some(d), .. } = change else {
            return Ok(None);
        };
        if let Some((name, i)) = &self.dev
            && name == d
        {
            return Ok(Some(*i));
        }
        let name = std::ffi::CString::new(d.as_str())?;
        // SAFETY: a NUL-terminated name.
        let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if i == 0 {
            self.dev = None;
            bail!("`{}` failed: no device {d}", change.describe(add));
        }
        self.dev = Some((d.clone(), i));
        Ok(Some(i))
    }

    /// Make `change` (or undo it); an error names the `ip` command it
    /// stands for and the kernel's reason.
    pub fn apply(&mut self, change: &Change, add: bool) -> Result<()> {
        self.apply_all(&[change], add)
            .pop()
            .expect("one result per change")
    }

    /// Make (or undo) `changes` in one send: the kernel takes them in
    /// order, each on its own (one refused does not stop the next), and
    /// acknowledges each. One result per change, in order.
    pub fn apply_all(&mut self, changes: &[&Change], add: bool) -> Vec<Result<()>> {
        self.apply_all_once(changes, add, true)
    }

    fn apply_all_once(&mut self, changes: &[&Change], add: bool, retry: bool) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = changes.iter().map(|_| None).collect();
        let mut req = Vec::new();
        // (index in `changes`, sequence number) of each request sent.
        let mut sent = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            match self.ifindex(c, add) {
                Ok(ifindex) => {
                    self.seq = self.seq.wrapping_add(1);
                    req.extend(request(c, add, ifindex, self.seq));
                    sent.push((i, self.seq));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !sent.is_empty() {
            self.exchange(&req, &sent, changes, add, &mut results);
        }
        let mut out = Vec::with_capacity(changes.len());
        for (i, r) in results.into_iter().enumerate() {
            out.push(match r.expect("every change answered") {
                // The device went and came back under another index:
                // once more, with the name looked up again.
                Err(e)
                    if retry
                        && e.downcast_ref::<Enodev>().is_some()
                        && matches!(changes[i], Change::Route { dev: Some(_), .. }) =>
                {
                    self.dev = None;
                    self.apply_all_once(&[changes[i]], add, false)
                        .pop()
                        .expect("one result per change")
                }
                r => r.map_err(|e| match e.downcast::<Enodev>() {
                    Ok(Enodev(msg)) => anyhow::anyhow!(msg),
                    Err(e) => e,
                }),
            });
        }
        out
    }

    /// Send `req` (the messages `sent`) and read an ack for each into
    /// `results`.
    fn exchange(
        &mut self,
        req: &[u8],
        sent: &[(usize, u32)],
        changes: &[&Change],
        add: bool,
        results: &mut [Option<Result<()>>],
    ) {
        // SAFETY: the buffer is valid for the call; the kernel is the
        // default destination of an unconnected netlink socket.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                req.as_ptr() as *const libc::c_void,
                req.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            for &(i, _) in sent {
                results[i] = Some(Err(anyhow::anyhow!(
                    "`{}` failed: {e}",
                    changes[i].describe(add)
                )));
            }
            return;
        }
        let mut waiting = sent.len();
        let mut buf = [0u8; 8192];
        while waiting > 0 {
            // SAFETY: the buffer is valid for the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                for &(i, _) in sent {
                    results[i].get_or_insert_with(|| {
                        Err(anyhow::anyhow!(
                            "`{}`: no answer from the kernel: {e}",
                            changes[i].describe(add)
                        ))
                    });
                }
                return;
            }
            let mut off = 0;
            let reply = &buf[..n as usize];
            while off + 16 <= reply.len() {
                let len = u32::from_ne_bytes(reply[off..off + 4].try_into().unwrap()) as usize;
                if len < 16 || off + len > reply.len() {
                    break;
                }
                let msg = &reply[off..off + len];
                // Not ours (an older reply) unless its sequence is one sent.
                for &(i, seq) in sent {
                    let Some(errno) = ack_errno(msg, seq) else {
                        continue;
                    };
                    if results[i].is_some() {
                        continue;
                    }
                    results[i] = Some(match errno {
                        0 => Ok(()),
                        e => {
                            let msg = format!(
                                "`{}` failed: {}",
                                changes[i].describe(add),
                                io::Error::from_raw_os_error(e)
                            );
                            if e == libc::ENODEV {
                                Err(Enodev(msg).into())
                            } else {
                                Err(anyhow::anyhow!(msg))
                            }
                        }
                    });
                    waiting -= 1;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// The kernel knew no device of the index sent (perhaps a stale one).
#[derive(Debug)]
struct Enodev(String);

impl std::fmt::Display for Enodev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Enodev {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_what_ip_would_send() {
        let r = Change::Route {
            dst: Prefix::new("10.77.0.2".parse().unwrap(), 32).unwrap(),
            dev: Some("tsec0".into()),
            table: 0x7453_1234,
            src: Some("10.77.0.1".parse().unwrap()),
            metric: None,
        };
        assert_eq!(
            r.describe(true),
            "ip -4 route replace 10.77.0.2/32 dev tsec0 table 1951601204 src 10.77.0.1"
        );
        let b = request(&r, true, Some(7), 9);
        // nlmsghdr: RTM_NEWROUTE (24), REQUEST|ACK|CREATE|REPLACE, seq 9
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 24);
        assert_eq!(u16::from_ne_bytes([b[6], b[7]]), 0x1 | 0x4 | 0x400 | 0x100);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        // rtmsg: AF_INET, /32, table unspec (RTA_TABLE carries it), link scope, unicast
        assert_eq!(&b[16..24], &[2, 32, 0, 0, 0, 3, 253, 1]);
        let table = 0x7453_1234u32.to_ne_bytes();
        assert!(b.windows(4).any(|w| w == table), "RTA_TABLE");
        let bh = Change::Route {
            dst: Prefix::new("fd77::2".parse().unwrap(), 128).unwrap(),
            dev: None,
            table: 5,
            src: None,
            metric: Some(4096),
        };
        assert_eq!(
            bh.describe(false),
            "ip -6 route del blackhole fd77::2/128 table 5 metric 4096"
        );
        let b = request(&bh, false, None, 3);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 25, "RTM_DELROUTE");
        assert_eq!(b[16 + 7], 6, "RTN_BLACKHOLE");
        let rule = Change::Rule {
            v6: false,
            mark: 0x7453_0001,
            table: 0x7453_0001,
            priority: 1234,
        };
        let b = request(&rule, true, None, 4);
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 32, "RTM_NEWRULE");
        // fib_rule_hdr: AF_INET, action FR_ACT_TO_TBL (1), flags FIB_RULE_INVERT
        assert_eq!(b[16], 2);
        assert_eq!(b[16 + 7], 1);
        assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 2);
    }

    #[test]
    fn acks_are_matched_by_sequence() {
        let mut ack = vec![0u8; 36];
        ack[4..6].copy_from_slice(&2u16.to_ne_bytes());
        ack[8..12].copy_from_slice(&5u32.to_ne_bytes());
        ack[16..20].copy_from_slice(&(-17i32).to_ne_bytes());
        assert_eq!(ack_errno(&ack, 5), Some(17));
        assert_eq!(ack_errno(&ack, 6), None);
        assert_eq!(ack_errno(&ack[..10], 5), None);
    }
}
