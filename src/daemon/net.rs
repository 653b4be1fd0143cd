//! The network side of the daemon: raw sockets that send protected (and
//! bypassed) packets, and packet sockets that receive ESP, AH and IPComp.
//!
//! - Sending: `AF_INET`/`SOCK_RAW`/`IPPROTO_RAW` (header included) and the
//!   IPv6 equivalent with `IPV6_HDRINCL`, both carrying tunsec's firewall
//!   mark so that policy routing sends them out of the real interface,
//!   never back into the TUN device. With `IP_RECVERR`/`IPV6_RECVERR`, so
//!   that a packet the qdisc drops fails its send (`ENOBUFS`; without it
//!   the kernel reports success, net/ipv4/raw.c); what the kernel then
//!   queues on the socket's error queue is drained after failed sends.
//! - Receiving: `AF_PACKET`/`SOCK_DGRAM` sockets, one per worker, joined in
//!   a fanout group that hashes by flow and defragments IPv4 first. They
//!   see the whole IP packet, IPv6 extension headers included (an IPv6 raw
//!   socket hands over the payload only, and AH needs the header). A
//!   classic BPF filter passes only ESP, AH and IPComp, IPv6 fragments of
//!   them included: the worker reassembles those (`crate::reassembly`
//!   explains why the hash puts a datagram's fragments on one worker).
//! - Silencing: the kernel has no ESP/AH/IPComp handler here and would
//!   answer "protocol unreachable"; a raw socket bound to each protocol
//!   (with a drop-everything filter) tells it the protocol is taken.

use std::cell::Cell;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points to a live T of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the returned OwnedFd.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn attach_filter(fd: RawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

// classic BPF opcodes
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
const LD_W_IND: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_IND) as u16;
/// X = 4 * (packet[k] & 0xf): the IPv4 header length.
const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const SKF_AD_PROTOCOL: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PROTOCOL) as u32;

/// One instruction of a filter with symbolic jump targets.
enum Ins {
    Op(u16, u32),
    /// If A == k go to the first label, else to the second (`None`: the
    /// next instruction).
    Jeq(u32, Option<&'static str>, Option<&'static str>),
    Label(&'static str),
}

/// Resolve labels into classic BPF's forward jump offsets.
fn assemble(prog: &[Ins]) -> Vec<libc::sock_filter> {
    let mut at = std::collections::HashMap::new();
    let mut n = 0usize;
    for i in prog {
        match i {
            Ins::Label(l) => {
                at.insert(*l, n);
            }
            _ => n += 1,
        }
    }
    let mut out = Vec::with_capacity(n);
    for i in prog {
        let here = out.len();
        let off = |l: &Option<&str>| -> u8 {
            l.map_or(0, |l| {
                let to = at[l];
                assert!(to > here && to - here - 1 <= 255, "jump to {l}");
                (to - here - 1) as u8
            })
        };
        match i {
            Ins::Op(code, k) => out.push(stmt(*code, *k)),
            Ins::Jeq(k, t, f) => out.push(jump(JEQ, *k, off(t), off(f))),
            Ins::Label(_) => {}
        }
    }
    out
}

/// Pass IPv4 ESP/AH/IPComp, IPv6 packets whose first next header is one
/// of them or an extension header that may precede them, and ESP in UDP
/// (RFC 3948) to the NAT-T port: UDP to 4500 whose first four payload
/// bytes are not zero (IKE's non-ESP marker) and that is longer than a
/// NAT keepalive. IKE and keepalives go on to the IKE daemon untouched.
/// An IPv6 fragment passes when its fragment header names ESP, AH, IPComp
/// or destination options: that field names the fragmentable part's first
/// header in every fragment (RFC 8200 section 4.5), so later fragments
/// pass too, and the worker reassembles them (`crate::reassembly`; the
/// fanout's DEFRAG flag covers IPv4 only).
fn ipsec_filter() -> Vec<libc::sock_filter> {
    use Ins::*;
    const NAT_T: u32 = crate::udp_encap::NAT_T_PORT as u32;
    assemble(&[
        Op(LD_H_ABS, SKF_AD_PROTOCOL),
        Jeq(0x0800, None, Some("v6")),
        Op(LD_B_ABS, 9),
        Jeq(50, Some("pass"), None),
        Jeq(51, Some("pass"), None),
        Jeq(108, Some("pass"), None),
        Jeq(17, None, Some("drop")),
        Op(LDX_B_MSH, 0),
        Op(LD_H_IND, 2),
        Jeq(NAT_T, None, Some("drop")),
        Op(LD_W_IND, 8),
        Jeq(0, Some("drop"), Some("pass")),
        Label("v6"),
        Jeq(0x86dd, None, Some("drop")),
        Op(LD_B_ABS, 6),
        Jeq(50, Some("pass"), None),
        Jeq(51, Some("pass"), None),
        Jeq(108, Some("pass"), None),
        Jeq(0, Some("pass"), None),
        Jeq(60, Some("pass"), None),
        Jeq(43, Some("pass"), None),
        Jeq(44, Some("frag"), None),
        Jeq(17, None, Some("drop")),
        Op(LD_H_ABS, 40 + 2),
        Jeq(NAT_T, None, Some("drop")),
        Op(LD_W_ABS, 40 + 8),
        Jeq(0, Some("drop"), Some("pass")),
        Label("frag"),
        Op(LD_B_ABS, 40), // the fragment header's next header
        Jeq(50, Some("pass"), None),
        Jeq(51, Some("pass"), None),
        Jeq(108, Some("pass"), None),
        Jeq(60, Some("pass"), Some("drop")),
        Label("pass"),
        Op(RET, 0x40000),
        Label("drop"),
        Op(RET, 0),
    ])
}

/// A receiving packet socket for one ethertype (`libc::ETH_P_IP`,
/// `libc::ETH_P_IPV6`, or `libc::ETH_P_ALL` for [`Rx::Tap`]), member of
/// fanout group `group`.
///
/// An ETH_P_ALL socket is a tap that the kernel also hands every
/// *outgoing* frame: in a fanout group only the group's flag
/// PACKET_FANOUT_FLAG_IGNORE_OUTGOING (Linux 6.10) spares that (the
/// socket option PACKET_IGNORE_OUTGOING does not reach the group's hook);
/// without it the copies cost 7% of the CPU at full rate, so a kernel
/// without the flag refuses the tap here (EINVAL) and the caller falls
/// back to one socket per family.
///
/// `setup` runs before the socket is bound (where a receive ring goes:
/// [`super::rxring`]).
pub fn packet_socket(group: u16, ethertype: u16, setup: impl FnOnce(RawFd)) -> io::Result<OwnedFd> {
    let tap = ethertype == libc::ETH_P_ALL as u16;
    let proto = ethertype.to_be() as libc::c_int;
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
        proto,
    )?;
    let raw = fd.as_raw_fd();
    attach_filter(raw, &ipsec_filter())?;
    let rcvbuf: libc::c_int = 8 << 20;
    let _ = setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf)
        .or_else(|_| setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf));
    setup(raw);
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = 0;
    cvt(unsafe {
        libc::bind(
            raw,
            &sll as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    // Hash by flow, and reassemble IPv4 fragments before choosing a
    // member. IPv6 fragments hash alike (addresses, flow label, protocol
    // 44: see crate::reassembly) and the worker reassembles them.
    let flags = libc::PACKET_FANOUT_HASH
        | libc::PACKET_FANOUT_FLAG_DEFRAG
        | if tap {
            PACKET_FANOUT_FLAG_IGNORE_OUTGOING
        } else {
            0
        };
    let fanout: libc::c_int = (group as libc::c_int) | (flags << 16) as libc::c_int;
    setsockopt(raw, libc::SOL_PACKET, libc::PACKET_FANOUT, &fanout)?;
    Ok(fd)
}

/// The fanout flag that makes the group's tap skip outgoing frames.
const PACKET_FANOUT_FLAG_IGNORE_OUTGOING: libc::c_uint = 0x4000;

/// How the workers receive IPsec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rx {
    /// One ETH_P_ALL socket per worker: it sees each frame before
    /// ingress, where an nftables ingress chain on `links` drops the
    /// kernel's own copy before the IP layer
    /// ([`super::nftables::ingress_ruleset`]).
    Tap { links: Vec<String> },
    /// One socket per family (ETH_P_IP, ETH_P_IPV6): each frame reaches
    /// them beside the IP layer, which drops its copy at prerouting.
    PerFamily,
}

impl Rx {
    /// The tap where it is safe, unless `TUNSEC_RX=family` asks for the
    /// other (`TUNSEC_RX=tap` insists), with the reason when not.
    pub fn choose(tun: &str) -> (Rx, Option<String>) {
        let want = std::env::var("TUNSEC_RX").unwrap_or_default();
        if want == "family" {
            return (Rx::PerFamily, Some("TUNSEC_RX=family".into()));
        }
        match tap_links(std::path::Path::new("/sys/class/net"), tun) {
            Ok(links) => (Rx::Tap { links }, None),
            Err(why) if want == "tap" => {
                tracing::warn!("TUNSEC_RX=tap although {why}");
                let links = tap_links_unchecked(std::path::Path::new("/sys/class/net"), tun);
                (Rx::Tap { links }, None)
            }
            Err(why) => (Rx::PerFamily, Some(why)),
        }
    }
}

/// The links a tap's ingress chain covers: all but `lo` and tunsec's own
/// TUN device, as listed under `sys` (/sys/class/net). Refused when a
/// link is stacked (a bridge or bond port, a VLAN, macvlan or other upper
/// device): a tap sees such a frame once on the lower link and again on
/// the upper one, where the per-family sockets see it once.
pub fn tap_links(sys: &std::path::Path, tun: &str) -> Result<Vec<String>, String> {
    let links = tap_links_unchecked(sys, tun);
    for l in &links {
        let dir = sys.join(l);
        if dir.join("master").exists() {
            return Err(format!("link {l} has a master (bridge or bond port)"));
        }
        let stacked = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("lower_"))
            })
            .unwrap_or(false);
        if stacked {
            return Err(format!(
                "link {l} is stacked on another (VLAN, bridge, bond, macvlan)"
            ));
        }
    }
    if links.is_empty() {
        return Err("there is no link but lo and the TUN device".into());
    }
    Ok(links)
}

fn tap_links_unchecked(sys: &std::path::Path, tun: &str) -> Vec<String> {
    let mut links: Vec<String> = std::fs::read_dir(sys)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lo" && n != tun)
                .collect()
        })
        .unwrap_or_default();
    links.sort();
    links
}

/// Why an ESP-in-UDP SA that `next` has and `cur` does not cannot work
/// here, if so: the packet filter takes ESP in UDP to port 4500 only
/// (`ipsec_filter`), so this host's end of the encapsulation must be
/// 4500. That is the destination port of an SA to a local address; an SA
/// with 4500 at neither end cannot have it at this host's end either way.
/// (The peer's port may be anything a NAT chose.)
pub fn unreceivable(cur: &crate::sad::Sad, next: &crate::sad::Sad) -> Option<String> {
    use crate::udp_encap::NAT_T_PORT;
    let mut local = None;
    for sa in next.added_since(cur) {
        let c = &sa.config;
        let Some(e) = c.encap else { continue };
        if e.dport == NAT_T_PORT {
            continue;
        }
        let ours = e.sport != NAT_T_PORT
            || local
                .get_or_insert_with(|| local_addrs().unwrap_or_default())
                .contains(&c.dst);
        if ours {
            return Some(format!(
                "esp-udp SA {}[{}] -> {}[{}] spi {:#x}: tunsec receives ESP in UDP on port {NAT_T_PORT} only, \
                 and this host's end of it is not {NAT_T_PORT}",
                c.src, e.sport, c.dst, e.dport, c.spi
            ));
        }
    }
    None
}

/// This host's addresses (getifaddrs), in this network namespace.
pub fn local_addrs() -> io::Result<std::collections::HashSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    cvt(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = std::collections::HashSet::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs made; ifa_addr may be null,
        // and its family says which sockaddr it is.
        unsafe {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match (*a).sa_family as libc::c_int {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.insert(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Raw sockets that claim ESP, AH and IPComp for IPv4 and IPv6 so that the
/// kernel does not answer them with ICMP "protocol unreachable". They
/// never deliver anything: their filter drops every packet.
pub fn protocol_claims() -> io::Result<Vec<OwnedFd>> {
    let mut v = Vec::new();
    for domain in [libc::AF_INET, libc::AF_INET6] {
        for proto in [50, 51, 108] {
            let fd = socket(domain, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto)?;
            attach_filter(fd.as_raw_fd(), &[stmt(RET, 0)])?;
            v.push(fd);
        }
    }
    Ok(v)
}

/// Sockets that send whole IP packets, marked with `mark`.
pub struct Sender {
    v4: OwnedFd,
    v6: OwnedFd,
    /// What the error queues held since it was last said ([v4, v6]).
    errq: [Cell<ErrqLog>; 2],
}

const IPV6_HDRINCL: libc::c_int = 36;

/// Error queue entries taken per socket after a batch with failed sends.
/// The kernel bounds the queue itself (it is charged to the receive
/// buffer), and an entry is only queued by a send that fails: this many
/// keeps it empty.
const ERRQ_DRAIN: usize = 64;
/// The error queue is said in the log at most this often.
const ERRQ_SAY_EVERY: Duration = Duration::from_secs(10);

/// One entry of a socket's error queue (`MSG_ERRQUEUE`): what the kernel
/// reported about a packet it could not send (`ip_local_error`, e.g.
/// `EMSGSIZE` beyond the device's MTU) or about an ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedError {
    pub errno: i32,
    /// `SO_EE_ORIGIN_LOCAL`, `_ICMP` or `_ICMP6`.
    pub origin: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The MTU for `EMSGSIZE`.
    pub info: u32,
    /// The packet's destination.
    pub dst: Option<IpAddr>,
}

impl std::fmt::Display for QueuedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(d) = self.dst {
            write!(f, " to {d}")?;
        }
        match self.origin {
            libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6 => write!(
                f,
                ", ICMP{} type {} code {}",
                if self.origin == libc::SO_EE_ORIGIN_ICMP6 {
                    "v6"
                } else {
                    ""
                },
                self.icmp_type,
                self.icmp_code
            )?,
            _ => {}
        }
        if self.errno == libc::EMSGSIZE && self.info != 0 {
            write!(f, ", mtu {}", self.info)?;
        }
        Ok(())
    }
}

/// Take up to `max` entries from the error queue of `fd` without
/// blocking, handing each to `each`. Returns how many were taken.
pub fn drain_errqueue(fd: RawFd, max: usize, mut each: impl FnMut(QueuedError)) -> usize {
    let mut n = 0;
    while n < max {
        // The packet that caused the error (its start; truncation is fine).
        let mut data = [0u8; 64];
        // Control messages: a sock_extended_err and its offender address.
        let mut control = [0u64; 64];
        // SAFETY: zeroed sockaddr_storage/msghdr are valid; every pointer
        // set below refers to a local that outlives the call.
        let mut name: libc::sockaddr_storage = unsafe { zeroed() };
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = size_of::<[u64; 64]>();
        // SAFETY: msg describes valid buffers (above).
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if r < 0 {
            // EAGAIN: the queue is empty; anything else: nothing to take.
            break;
        }
        n += 1;
        let mut e = QueuedError {
            errno: 0,
            origin: 0,
            icmp_type: 0,
            icmp_code: 0,
            info: 0,
            dst: sockaddr_ip(&name, msg.msg_namelen),
        };
        // SAFETY: the CMSG_* macros walk the control buffer the kernel
        // filled within msg_controllen; the payload is read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
                if (level == libc::SOL_IP && ty == libc::IP_RECVERR)
                    || (level == libc::SOL_IPV6 && ty == libc::IPV6_RECVERR)
                {
                    let ee: libc::sock_extended_err =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const _);
                    e.errno = ee.ee_errno as i32;
                    e.origin = ee.ee_origin;
                    e.icmp_type = ee.ee_type;
                    e.icmp_code = ee.ee_code;
                    e.info = ee.ee_info;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        each(e);
    }
    n
}

/// The address of a `sockaddr_in` or `sockaddr_in6`.
fn sockaddr_ip(sa: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<IpAddr> {
    match sa.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in, within len.
            let sin = unsafe { &*(sa as *const _ as *const libc::sockaddr_in) };
            Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            Some(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
        }
        _ => None,
    }
}

/// Error queue entries not yet said, and when it was last said.
#[derive(Clone, Copy, Default)]
struct ErrqLog {
    unsaid: u64,
    last: Option<QueuedError>,
    said: Option<Instant>,
}

impl Sender {
    pub fn new(mark: u32) -> io::Result<Sender> {
        let v4 = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
        let v6 = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
        let one: libc::c_int = 1;
        setsockopt(v6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_HDRINCL, &one)?;
        // A qdisc drop (NET_XMIT_DROP) becomes ENOBUFS from sendmsg only
        // with these; without them a raw socket reports the packet sent.
        setsockopt(v4.as_raw_fd(), libc::IPPROTO_IP, libc::IP_RECVERR, &one)?;
        setsockopt(v6.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_RECVERR, &one)?;
        let sndbuf: libc::c_int = 8 << 20;
        for fd in [&v4, &v6] {
            setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, &mark)?;
            let _ = setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                &sndbuf,
            );
        }
        Ok(Sender {
            v4,
            v6,
            errq: Default::default(),
        })
    }

    /// Empty the error queue of one family's socket (after a failed send:
    /// only a failed send queues anything there) and say what it held, at
    /// most every [`ERRQ_SAY_EVERY`].
    fn drain_errors(&self, v4: bool) {
        let (fd, slot) = if v4 {
            (&self.v4, &self.errq[0])
        } else {
            (&self.v6, &self.errq[1])
        };
        let mut log = slot.get();
        let n = drain_errqueue(fd.as_raw_fd(), ERRQ_DRAIN, |e| log.last = Some(e));
        if n == 0 {
            return;
        }
        log.unsaid += n as u64;
        if log.said.is_none_or(|t| t.elapsed() >= ERRQ_SAY_EVERY) {
            let last = log.last.map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(
                "raw IPv{} socket: {} error{} reported by the kernel (last: {last}); \
                 the packets are counted as failed sends; said at most every {} s",
                if v4 { 4 } else { 6 },
                log.unsaid,
                if log.unsaid == 1 { "" } else { "s" },
                ERRQ_SAY_EVERY.as_secs()
            );
            log.unsaid = 0;
            log.said = Some(Instant::now());
        }
        slot.set(log);
    }

    /// Send one IP packet to its destination address.
    pub fn send(&self, pkt: &[u8], dst: IpAddr) -> io::Result<()> {
        let addr = socket2::SockAddr::from(SocketAddr::new(dst, 0));
        let fd = if dst.is_ipv4() { &self.v4 } else { &self.v6 };
        // SAFETY: buffer and address are valid for the call.
        let r = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                libc::MSG_DONTWAIT,
                addr.as_ptr(),
                addr.len(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.drain_errors(dst.is_ipv4());
            Err(e)
        } else {
            Ok(())
        }
    }
}

/// Most packets moved by one batched system call.
pub const MAX_BATCH: usize = 64;

impl Sender {
    /// Send a batch of IP packets with one `sendmmsg` per address family.
    /// Returns (sent, failed).
    pub fn send_batch(&self, pkts: &[&[u8]]) -> (usize, usize) {
        let mut sent = 0;
        let mut failed = 0;
        for v4 in [true, false] {
            // SAFETY: zeroed mmsghdr/sockaddr_storage/iovec are valid; every
            // pointer set below refers to data that outlives the call.
            let mut addrs: [libc::sockaddr_storage; MAX_BATCH] = unsafe { zeroed() };
            let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
            let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
            let mut n = 0;
            for p in pkts
                .iter()
                .filter(|p| p.first().is_some_and(|b| (b >> 4 == 4) == v4))
            {
                let Some(dst) = super::workers::dst_of(p) else {
                    failed += 1;
                    continue;
                };
                let sa = socket2::SockAddr::from(SocketAddr::new(dst, 0));
                // SAFETY: sockaddr_storage is large enough for any SockAddr.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sa.as_ptr() as *const u8,
                        &mut addrs[n] as *mut _ as *mut u8,
                        sa.len() as usize,
                    );
                }
                iovs[n] = libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                };
                msgs[n].msg_hdr.msg_name = &mut addrs[n] as *mut _ as *mut libc::c_void;
                msgs[n].msg_hdr.msg_namelen = sa.len();
                msgs[n].msg_hdr.msg_iov = &mut iovs[n];
                msgs[n].msg_hdr.msg_iovlen = 1;
                n += 1;
                if n == MAX_BATCH {
                    break;
                }
            }
            let fd = if v4 { &self.v4 } else { &self.v6 };
            let failed_before = failed;
            let mut off = 0;
            while off < n {
                // SAFETY: msgs[off..n] are initialised above.
                let r = unsafe {
                    libc::sendmmsg(
                        fd.as_raw_fd(),
                        msgs[off..].as_mut_ptr(),
                        (n - off) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    // The first message failed: count it and go on with the rest.
                    failed += 1;
                    off += 1;
                } else {
                    sent += r as usize;
                    off += r as usize;
                }
            }
            if failed > failed_before {
                self.drain_errors(v4);
            }
        }
        (sent, failed)
    }
}

/// Receive up to `bufs.len()` packets addressed to this host with one
/// `recvmmsg`, each written at `offset` in its buffer; their lengths go to
/// `lens` (0 for packets to skip: not for this host, or truncated).
/// Returns how many slots were used.
pub fn recv_batch<B: AsMut<[u8]>>(
    fd: RawFd,
    bufs: &mut [B],
    offset: usize,
    lens: &mut [usize],
) -> io::Result<usize> {
    let k = bufs.len().min(lens.len()).min(MAX_BATCH);
    // SAFETY: as in send_batch; the iovecs point into `bufs`, which
    // outlive the call.
    let mut addrs: [libc::sockaddr_ll; MAX_BATCH] = unsafe { zeroed() };
    let mut iovs: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
    for i in 0..k {
        let area = &mut bufs[i].as_mut()[offset..];
        iovs[i] = libc::iovec {
            iov_base: area.as_mut_ptr() as *mut libc::c_void,
            iov_len: area.len(),
        };
        msgs[i].msg_hdr.msg_name = &mut addrs[i] as *mut _ as *mut libc::c_void;
        msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            k as u32,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = r as usize;
    for i in 0..r {
        let truncated = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        lens[i] = if addrs[i].sll_pkttype != libc::PACKET_HOST || truncated {
            0
        } else {
            msgs[i].msg_len as usize
        };
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error queue as a raw socket with IP_RECVERR gets it, made
    /// without privileges: a UDP socket with IP_RECVERR sending to a
    /// closed port on the loopback gets an ICMP port unreachable queued.
    #[test]
    fn error_queue_drains_and_says_what_it_held() {
        use std::net::UdpSocket;
        for (any, lo) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
            let Ok(s) = UdpSocket::bind(any) else {
                continue; // no IPv6 loopback here
            };
            let closed = UdpSocket::bind(any).unwrap().local_addr().unwrap();
            let fd = s.as_raw_fd();
            let one: libc::c_int = 1;
            if lo.contains(':') {
                setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, &one).unwrap();
            } else {
                setsockopt(fd, libc::IPPROTO_IP, libc::IP_RECVERR, &one).unwrap();
            }
            assert_eq!(drain_errqueue(fd, 8, |_| panic!("empty")), 0);
            // A queued ICMP error also fails the next send (sk_err), as
            // it would on a raw socket: count the sends that went.
            let mut went = 0;
            while went < 3 {
                if s.send_to(b"x", closed).is_ok() {
                    went += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut got = Vec::new();
            let n = drain_errqueue(fd, 2, |e| got.push(e));
            assert_eq!(n, 2, "bounded by max");
            drain_errqueue(fd, 8, |e| got.push(e));
            assert_eq!(got.len(), 3, "{got:?}");
            for e in &got {
                assert_eq!(e.errno, libc::ECONNREFUSED, "{e:?}");
                assert!(
                    matches!(e.origin, libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6),
                    "{e:?}"
                );
                assert_eq!(e.dst, Some(lo.parse().unwrap()), "{e:?}");
            }
            let said = got[0].to_string();
            assert!(said.contains("refused") && said.contains(lo), "{said}");
            assert_eq!(drain_errqueue(fd, 8, |_| panic!("drained")), 0);
        }
    }

    #[test]
    fn emsgsize_says_the_mtu() {
        let e = QueuedError {
            errno: libc::EMSGSIZE,
            origin: libc::SO_EE_ORIGIN_LOCAL,
            icmp_type: 0,
            icmp_code: 0,
            info: 1300,
            dst: Some("10.77.0.2".parse().unwrap()),
        };
        let s = e.to_string();
        assert!(s.starts_with("Message too long"), "{s}");
        assert!(s.ends_with(" to 10.77.0.2, mtu 1300"), "{s}");
    }

    #[test]
    fn tap_links_are_the_unstacked_links_but_lo_and_the_tun() {
        let dir = std::env::temp_dir().join(format!("tunsec-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for l in ["lo", "tsec0", "veth1", "eth0"] {
            std::fs::create_dir_all(dir.join(l)).unwrap();
        }
        assert_eq!(tap_links(&dir, "tsec0").unwrap(), ["eth0", "veth1"]);
        // A bridge port (master) and a bridge (lower_*) each refuse the tap.
        std::fs::create_dir_all(dir.join("br0/lower_eth0")).unwrap();
        let e = tap_links(&dir, "tsec0").unwrap_err();
        assert!(e.contains("br0 is stacked"), "{e}");
        std::fs::remove_dir_all(dir.join("br0")).unwrap();
        std::fs::write(dir.join("eth0/master"), "").unwrap();
        let e = tap_links(&dir, "tsec0").unwrap_err();
        assert!(e.contains("eth0 has a master"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = std::env::temp_dir().join(format!("tunsec-sys-empty-{}", std::process::id()));
        std::fs::create_dir_all(empty.join("lo")).unwrap();
        assert!(tap_links(&empty, "tsec0").is_err());
        std::fs::remove_dir_all(&empty).unwrap();
    }

    #[test]
    fn filter_jumps_stay_inside_the_program() {
        let p = ipsec_filter();
        for (i, ins) in p.iter().enumerate() {
            if ins.code == JEQ {
                assert!(i + 1 + (ins.jt as usize) < p.len(), "jt of {i}");
                assert!(i + 1 + (ins.jf as usize) < p.len(), "jf of {i}");
            }
        }
        assert_eq!(p.last().unwrap().code, RET);
        assert!(p.len() <= 4096, "BPF_MAXINSNS");
    }

    /// Run the classic BPF program the way the kernel would, on a packet
    /// with the given ethertype (a load beyond the packet drops it).
    fn run(prog: &[libc::sock_filter], ethertype: u16, pkt: &[u8]) -> u32 {
        let (mut a, mut x) = (0u32, 0u32);
        let mut pc = 0;
        let load = |at: usize, n: usize| -> Option<u32> {
            let b = pkt.get(at..at + n)?;
            Some(b.iter().fold(0u32, |v, b| (v << 8) | *b as u32))
        };
        loop {
            let ins = prog[pc];
            let k = ins.k as usize;
            let v = match ins.code {
                LD_H_ABS if ins.k == SKF_AD_PROTOCOL => Some(ethertype as u32),
                LD_B_ABS => load(k, 1),
                LD_H_ABS => load(k, 2),
                LD_W_ABS => load(k, 4),
                LD_H_IND => load(x as usize + k, 2),
                LD_W_IND => load(x as usize + k, 4),
                LDX_B_MSH => {
                    x = 4 * (load(k, 1).unwrap_or(0) & 0xf);
                    Some(a)
                }
                JEQ => {
                    pc += if a == ins.k {
                        ins.jt as usize
                    } else {
                        ins.jf as usize
                    };
                    Some(a)
                }
                RET => return ins.k,
                c => panic!("opcode {c}"),
            };
            match v {
                Some(v) => a = v,
                None => return 0,
            }
            pc += 1;
        }
    }

    #[test]
    fn filter_passes_ipsec_only() {
        let p = ipsec_filter();
        let mut v4 = vec![0x45u8; 20];
        for (proto, pass) in [
            (50u8, true),
            (51, true),
            (108, true),
            (6, false),
            (17, false),
            (1, false),
        ] {
            v4[9] = proto;
            assert_eq!(run(&p, 0x0800, &v4) != 0, pass, "IPv4 proto {proto}");
        }
        let mut v6 = vec![0x60u8; 40];
        for (nh, pass) in [
            (50u8, true),
            (51, true),
            (108, true),
            (0, true),
            (60, true),
            (43, true),
            (6, false),
            (58, false),
        ] {
            v6[6] = nh;
            assert_eq!(run(&p, 0x86dd, &v6) != 0, pass, "IPv6 next header {nh}");
        }
        // Fragments: by what the fragment header says follows it.
        v6.resize(48, 0);
        v6[6] = 44;
        for (nh, pass) in [
            (50u8, true),
            (51, true),
            (108, true),
            (60, true),
            (17, false),
            (6, false),
            (58, false),
            (44, false),
        ] {
            v6[40] = nh;
            assert_eq!(run(&p, 0x86dd, &v6) != 0, pass, "IPv6 fragment of {nh}");
        }
        assert_eq!(run(&p, 0x86dd, &v6[..40]), 0, "truncated fragment header");
        assert_eq!(run(&p, 0x0806, &v4), 0, "ARP");
    }

    #[test]
    fn filter_passes_esp_in_udp_but_not_ike_or_keepalives() {
        let p = ipsec_filter();
        for v6 in [false, true] {
            let (eth, hdr) = if v6 { (0x86dd, 40) } else { (0x0800, 24) };
            let mut pkt = vec![0u8; hdr];
            if v6 {
                pkt[0] = 0x60;
                pkt[6] = 17;
            } else {
                pkt[0] = 0x46; // with 4 bytes of options
                pkt[9] = 17;
            }
            let udp = |dport: u16, payload: &[u8]| {
                let mut q = pkt.clone();
                q.extend_from_slice(&[0x11, 0x94]);
                q.extend_from_slice(&dport.to_be_bytes());
                q.extend_from_slice(&[0, 0, 0, 0]);
                q.extend_from_slice(payload);
                q
            };
            let esp = [0, 0, 1, 0, 0, 0, 0, 1, 7, 7, 7, 7];
            let ike = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            assert_ne!(run(&p, eth, &udp(4500, &esp)), 0, "v6 {v6}: ESP in UDP");
            assert_eq!(run(&p, eth, &udp(4500, &ike)), 0, "v6 {v6}: IKE");
            assert_eq!(run(&p, eth, &udp(4500, &[0xff])), 0, "v6 {v6}: keepalive");
            assert_eq!(run(&p, eth, &udp(4501, &esp)), 0, "v6 {v6}: other port");
            assert_eq!(run(&p, eth, &udp(53, &esp)), 0, "v6 {v6}: DNS");
        }
    }
}
