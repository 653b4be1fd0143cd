//! UDP segmentation offload for ESP in UDP (RFC 3948).
//!
//! The TUN device hands tunsec a TCP super-packet of up to 64 KiB, split
//! into segments of one size; sealed, they become ESP-in-UDP datagrams of
//! one size between the same two ports. Sent one by one, each pays the
//! kernel's whole per-packet path on both hosts. Sent as one UDP GSO
//! super-packet (a `virtio_net_hdr` of type `GSO_UDP_L4` on a packet
//! socket), the path is paid once per run, and the kernel (or the NIC)
//! cuts it into the datagrams at the last moment; over a veth pair it even
//! reaches the peer whole, where [`split`] cuts it again for the engine.
//!
//! A packet socket needs the link-layer header: the route the kernel would
//! take for tunsec's marked packets (`RTM_GETROUTE` with the mark), the
//! next hop's neighbour entry and the device's address, over rtnetlink,
//! kept for a second. Anything else (no neighbour yet, not Ethernet, a
//! send error) goes by the raw socket as before.
//!
//! Building the header and reading the kernel's answers is pure; the
//! sockets are at the end.

use crate::packet::be16;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `struct virtio_net_hdr` (little-endian, as the kernel reads it from a
/// packet socket on this host).
pub const VNET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
const PACKET_VNET_HDR: libc::c_int = 15;
const ETH_LEN: usize = 14;

/// Where to send frames for one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2 {
    pub ifindex: u32,
    /// Destination MAC, source MAC; the ethertype goes on per packet.
    pub macs: [u8; 12],
}

/// The virtio header and Ethernet header of a UDP GSO super-packet whose
/// IP header is `ip` (`ip_len` bytes, UDP header after it), cut into
/// datagrams of `seg` payload bytes.
pub fn gso_headers(l2: &L2, v6: bool, ip_len: usize, seg: usize) -> [u8; VNET_HDR_LEN + ETH_LEN] {
    let mut h = [0u8; VNET_HDR_LEN + ETH_LEN];
    h[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    h[1] = VIRTIO_NET_HDR_GSO_UDP_L4;
    let l4 = (ETH_LEN + ip_len) as u16;
    h[2..4].copy_from_slice(&(l4 + 8).to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&(seg as u16).to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&l4.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset
    h[VNET_HDR_LEN..VNET_HDR_LEN + 12].copy_from_slice(&l2.macs);
    let et: u16 = if v6 { 0x86dd } else { 0x0800 };
    h[VNET_HDR_LEN + 12..].copy_from_slice(&et.to_be_bytes());
    h
}

/// The UDP checksum field of a `CHECKSUM_PARTIAL` super-packet: the folded
/// pseudo-header sum of the packet's two addresses (`addrs`, as they stand
/// in its IP header), not complemented (the kernel finishes it per
/// datagram).
pub fn partial_udp_checksum(addrs: &[u8], udp_len: usize) -> u16 {
    !crate::udp_encap::pseudo_checksum(addrs, crate::packet::PROTO_UDP, udp_len)
}

/// The length of the run of packets from `pkts[0]` that one UDP GSO
/// super-packet can carry: ESP in UDP (a port is the NAT-T port) between
/// the same addresses and ports, IPv4 without options or IPv6 without
/// extension headers, all of one size but the last, which may be shorter.
pub fn run_len(pkts: &[&[u8]]) -> usize {
    let p = pkts[0];
    let ip = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 28 && p[0] == 0x45 && p[9] == crate::packet::PROTO_UDP => 20,
        Some(6) if p.len() >= 48 && p[6] == crate::packet::PROTO_UDP => 40,
        _ => return 1,
    };
    let (sport, dport) = (crate::packet::be16(p, ip), crate::packet::be16(p, ip + 2));
    let nat_t = crate::udp_encap::NAT_T_PORT;
    if sport != nat_t && dport != nat_t {
        return 1;
    }
    // Addresses, then ports: the same for every packet of the run.
    let (addrs, hdr) = if ip == 20 { (12..24, 28) } else { (8..44, 48) };
    let same = |q: &[u8]| q.len() >= hdr && q[0] == p[0] && q[addrs.clone()] == p[addrs.clone()];
    let seg = p.len() - hdr;
    let mut total = p.len();
    let mut n = 1;
    for q in &pkts[1..] {
        if !same(q) || q.len() > p.len() || total + q.len() - hdr > 65535 {
            break;
        }
        total += q.len() - hdr;
        n += 1;
        if q.len() - hdr < seg {
            break;
        }
    }
    n
}

/// The IP and UDP header of the super-packet for `run` (see [`run_len`]):
/// the first datagram's, with the IP length of the whole and a UDP length
/// that names one datagram, not the whole (the kernel cuts by `gso_size`
/// and sets each length anyway, and a peer that gets the super-packet
/// whole, over a veth, reads the datagram size from it: [`split`]); the
/// UDP checksum is the partial one the kernel completes. Returns the
/// header buffer, its length and the datagram size.
pub fn super_header(run: &[&[u8]]) -> ([u8; 48], usize, usize) {
    use crate::packet::{checksum, put16};
    let p = run[0];
    let v6 = p[0] >> 4 == 6;
    let ip = if v6 { 40 } else { 20 };
    let hdr = ip + 8;
    let total: usize = hdr + run.iter().map(|q| q.len() - hdr).sum::<usize>();
    let mut h = [0u8; 48];
    h[..hdr].copy_from_slice(&p[..hdr]);
    if v6 {
        put16(&mut h, 4, (total - 40) as u16);
    } else {
        put16(&mut h, 2, total as u16);
        put16(&mut h, 10, 0);
        let c = checksum(&h[..20]);
        put16(&mut h, 10, c);
    }
    let seg = p.len() - hdr;
    put16(&mut h, ip + 4, (8 + seg) as u16);
    let addrs = if v6 { &p[8..40] } else { &p[12..20] };
    put16(&mut h, ip + 6, partial_udp_checksum(addrs, 8 + seg));
    (h, hdr, seg)
}

/// A received UDP GSO super-packet: ESP in UDP (a port is the NAT-T port)
/// whose IP payload is longer than its UDP length, which names the size of
/// each datagram (see `workers::send_gso`). The datagrams it stands for
/// come out of [`Segments::next_into`]. `None` for any other packet.
pub fn split(pkt: &[u8]) -> Option<Segments> {
    let ip_len = match pkt.first()? >> 4 {
        4 if pkt.len() >= 28 && pkt[9] == 17 => (pkt[0] & 0xf) as usize * 4,
        6 if pkt.len() >= 48 && pkt[6] == 17 => 40,
        _ => return None,
    };
    let udp = pkt.get(ip_len..ip_len + 8)?;
    let nat_t = crate::udp_encap::NAT_T_PORT;
    let (sport, dport) = (be16(udp, 0), be16(udp, 2));
    let ulen = be16(udp, 4) as usize;
    let hdr = ip_len + 8;
    if (sport != nat_t && dport != nat_t) || ulen <= 8 || pkt.len() <= ip_len + ulen {
        return None;
    }
    Some(Segments {
        hdr,
        seg: ulen - 8,
        at: hdr,
    })
}

/// The datagrams of a super-packet (see [`split`]).
pub struct Segments {
    hdr: usize,
    seg: usize,
    at: usize,
}

impl Segments {
    /// Write the next datagram of `pkt` (the super-packet given to
    /// [`split`]) into `out`; false when none is left.
    pub fn next_into(&mut self, pkt: &[u8], out: &mut crate::buf::PacketBuf) -> bool {
        if self.at >= pkt.len() {
            return false;
        }
        let end = (self.at + self.seg).min(pkt.len());
        let area = out.load_area();
        let n = self.hdr + end - self.at;
        if area.len() < n {
            self.at = pkt.len();
            return false;
        }
        area[..self.hdr].copy_from_slice(&pkt[..self.hdr]);
        area[self.hdr..n].copy_from_slice(&pkt[self.at..end]);
        self.at = end;
        out.set_loaded(n);
        let d = out.data_mut();
        let udp = self.hdr - 8;
        crate::packet::put16(d, udp + 4, (n - udp) as u16);
        crate::packet::put16(d, udp + 6, 0);
        crate::packet::fix_lengths(d);
        true
    }
}

// ---------------------------------------------------------------------------
// rtnetlink: route, neighbour and link lookups (bytes in, bytes out)

fn request(msg: RouteNetlinkMessage, seq: u32) -> Vec<u8> {
    let mut h = NetlinkHeader::default();
    h.flags = NLM_F_REQUEST;
    h.sequence_number = seq;
    let mut nl = NetlinkMessage::new(h, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

fn family(a: IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// `ip route get DST mark MARK`.
pub fn route_get(dst: IpAddr, mark: u32, seq: u32) -> Vec<u8> {
    let mut m = RouteMessage::default();
    m.header.address_family = family(dst);
    m.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    m.attributes.push(RouteAttribute::Destination(match dst {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }));
    m.attributes.push(RouteAttribute::Mark(mark));
    request(RouteNetlinkMessage::GetRoute(m), seq)
}

/// `ip neigh get ADDR dev IFINDEX`.
pub fn neigh_get(ifindex: u32, addr: IpAddr, seq: u32) -> Vec<u8> {
    let mut m = NeighbourMessage::default();
    m.header.family = family(addr);
    m.header.ifindex = ifindex;
    m.attributes
        .push(NeighbourAttribute::Destination(match addr {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    request(RouteNetlinkMessage::GetNeighbour(m), seq)
}

/// `ip link show IFINDEX`.
pub fn link_get(ifindex: u32, seq: u32) -> Vec<u8> {
    let mut m = LinkMessage::default();
    m.header.index = ifindex;
    request(RouteNetlinkMessage::GetLink(m), seq)
}

/// What a lookup answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The output device and the gateway, if any.
    Route(u32, Option<IpAddr>),
    /// A usable link-layer address.
    Neighbour([u8; 6]),
    /// An Ethernet device's address.
    Link([u8; 6]),
    /// Nothing usable: an error, no link-layer address, not Ethernet.
    Nothing,
}

/// Read the kernel's answer to request `seq` (`None`: not for it).
pub fn parse(reply: &[u8], seq: u32) -> Option<Answer> {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(reply).ok()?;
    if msg.header.sequence_number != seq {
        return None;
    }
    let mac = |b: &[u8]| <[u8; 6]>::try_from(b).ok();
    Some(match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
            let mut oif = None;
            let mut gw = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gw = Some(IpAddr::V6(*a)),
                    _ => {}
                }
            }
            match oif {
                Some(i) => Answer::Route(i, gw),
                None => Answer::Nothing,
            }
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
            let usable = matches!(
                n.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            );
            n.attributes
                .iter()
                .find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) if usable => mac(b),
                    _ => None,
                })
                .map_or(Answer::Nothing, Answer::Neighbour)
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
            if l.header.link_layer_type != LinkLayerType::Ether {
                return Some(Answer::Nothing);
            }
            l.attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(b) => mac(b),
                    _ => None,
                })
                .map_or(Answer::Nothing, Answer::Link)
        }
        _ => Answer::Nothing,
    })
}

// ---------------------------------------------------------------------------
// Sockets

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// How long a looked-up header is trusted, and a failed lookup remembered.
const FRESH: Duration = Duration::from_secs(1);

/// One worker's sending side for UDP GSO: a packet socket, an rtnetlink
/// socket for lookups and what they found.
pub struct Gso {
    packet: OwnedFd,
    rtnl: OwnedFd,
    seq: Cell<u32>,
    mark: u32,
    cache: RefCell<HashMap<IpAddr, (Option<L2>, Instant)>>,
    /// Set after a send the kernel refused: GSO is off for this worker.
    pub broken: Cell<bool>,
}

impl Gso {
    pub fn new(mark: u32) -> io::Result<Gso> {
        // SAFETY: plain socket calls; the descriptors are owned below.
        let packet =
            cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
        let packet = unsafe { OwnedFd::from_raw_fd(packet) };
        let one: libc::c_int = 1;
        // SAFETY: an int option on our own socket.
        cvt(unsafe {
            libc::setsockopt(
                packet.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                &one as *const _ as *const libc::c_void,
                4,
            )
        })?;
        // Lookups never hold a worker longer than this.
        let rtnl = super::rtnl::netlink_socket(libc::NETLINK_ROUTE, Duration::from_millis(200))?;
        Ok(Gso {
            packet,
            rtnl,
            seq: Cell::new(0),
            mark,
            cache: RefCell::new(HashMap::new()),
            broken: Cell::new(false),
        })
    }

    fn ask(&self, req: impl FnOnce(u32) -> Vec<u8>) -> Answer {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        let req = req(seq);
        // SAFETY: the buffer is valid for the call.
        if unsafe {
            libc::send(
                self.rtnl.as_raw_fd(),
                req.as_ptr() as *const _,
                req.len(),
                0,
            )
        } < 0
        {
            return Answer::Nothing;
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: the buffer is valid for the call.
            let n = unsafe {
                libc::recv(
                    self.rtnl.as_raw_fd(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                return Answer::Nothing;
            }
            if let Some(a) = parse(&buf[..n as usize], seq) {
                return a;
            }
        }
    }

    /// The link-layer path to `dst`, looked up at most once a second.
    pub fn l2(&self, dst: IpAddr) -> Option<L2> {
        if let Some((l2, t)) = self.cache.borrow().get(&dst)
            && t.elapsed() < FRESH
        {
            return *l2;
        }
        let mark = self.mark;
        let found = (|| {
            let Answer::Route(ifindex, gw) = self.ask(|s| route_get(dst, mark, s)) else {
                return None;
            };
            let hop = gw.unwrap_or(dst);
            let Answer::Neighbour(peer) = self.ask(|s| neigh_get(ifindex, hop, s)) else {
                return None;
            };
            let Answer::Link(me) = self.ask(|s| link_get(ifindex, s)) else {
                return None;
            };
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&peer);
            macs[6..].copy_from_slice(&me);
            Some(L2 { ifindex, macs })
        })();
        let mut cache = self.cache.borrow_mut();
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(dst, (found, Instant::now()));
        found
    }

    /// Send `parts` (virtio + Ethernet headers, IP + UDP headers, then the
    /// payloads) as one frame out of `l2`'s device.
    pub fn send(&self, l2: &L2, v6: bool, parts: &[&[u8]]) -> io::Result<()> {
        let mut iov: [libc::iovec; 1 + crate::daemon::workers::BATCH + 1] =
            // SAFETY: a zeroed iovec array is valid.
            unsafe { std::mem::zeroed() };
        let n = parts.len().min(iov.len());
        for (v, p) in iov.iter_mut().zip(parts) {
            *v = libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            };
        }
        // SAFETY: a zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = l2.ifindex as i32;
        sll.sll_protocol = (if v6 { 0x86ddu16 } else { 0x0800 }).to_be();
        // SAFETY: a zeroed msghdr is valid; its pointers refer to `sll` and
        // `iov`, which outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut sll as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n;
        // SAFETY: as above.
        let r = unsafe { libc::sendmsg(self.packet.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

impl Gso {
    /// Send single packets as Ethernet frames with one `sendmmsg`.
    /// Returns (sent, failed, done): a frame the kernel has no room for
    /// (a full queue) is counted as failed, as the raw socket counts it;
    /// at any other error (the device went away) the frames from `done`
    /// on are left to the caller.
    pub fn send_frames(&self, frames: &[(&[u8], L2)]) -> (usize, usize, usize) {
        const B: usize = crate::daemon::workers::BATCH;
        let n = frames.len().min(B);
        let mut heads = [[0u8; VNET_HDR_LEN + ETH_LEN]; B];
        // SAFETY: zeroed iovec, sockaddr_ll and mmsghdr arrays are valid;
        // every pointer set below refers to data that outlives the call.
        let mut iovs: [[libc::iovec; 2]; B] = unsafe { std::mem::zeroed() };
        let mut addrs: [libc::sockaddr_ll; B] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; B] = unsafe { std::mem::zeroed() };
        for (i, (p, l2)) in frames[..n].iter().enumerate() {
            let v6 = p.first().is_some_and(|b| b >> 4 == 6);
            let et: u16 = if v6 { 0x86dd } else { 0x0800 };
            heads[i][VNET_HDR_LEN..VNET_HDR_LEN + 12].copy_from_slice(&l2.macs);
            heads[i][VNET_HDR_LEN + 12..].copy_from_slice(&et.to_be_bytes());
            addrs[i].sll_family = libc::AF_PACKET as u16;
            addrs[i].sll_ifindex = l2.ifindex as i32;
            addrs[i].sll_protocol = et.to_be();
        }
        for i in 0..n {
            iovs[i] = [
                libc::iovec {
                    iov_base: heads[i].as_mut_ptr() as *mut libc::c_void,
                    iov_len: heads[i].len(),
                },
                libc::iovec {
                    iov_base: frames[i].0.as_ptr() as *mut libc::c_void,
                    iov_len: frames[i].0.len(),
                },
            ];
            msgs[i].msg_hdr.msg_name = &mut addrs[i] as *mut _ as *mut libc::c_void;
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msgs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
            msgs[i].msg_hdr.msg_iovlen = 2;
        }
        let (mut off, mut sent, mut failed) = (0, 0, 0);
        while off < n {
            // SAFETY: msgs[off..n] are initialised above.
            let r = unsafe {
                libc::sendmmsg(
                    self.packet.as_raw_fd(),
                    msgs[off..].as_mut_ptr(),
                    (n - off) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                off += r as usize;
                sent += r as usize;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EMSGSIZE) => {
                    failed += 1;
                    off += 1;
                }
                _ => break,
            }
        }
        (sent, failed, off)
    }

    /// Turn GSO off for this worker after the kernel refused a send.
    pub fn set_broken(&self, e: &io::Error) {
        if !self.broken.replace(true) {
            tracing::warn!(
                "ESP in UDP: the kernel refused a UDP GSO send ({e}); this worker sends datagram by datagram"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_ask_what_ip_would_ask_and_read_the_answers() {
        // A request parses back as what it says.
        let req = route_get("192.0.2.7".parse().unwrap(), 0x7453, 9);
        let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&req).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(r)) = m.payload else {
            panic!("{m:?}")
        };
        assert!(r.attributes.contains(&RouteAttribute::Mark(0x7453)));
        // An answer: a route by device 3 through a gateway.
        let mut ans = RouteMessage::default();
        ans.header.address_family = AddressFamily::Inet;
        ans.attributes.push(RouteAttribute::Oif(3));
        ans.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(
                "192.0.2.1".parse().unwrap(),
            )));
        let mut h = NetlinkHeader::default();
        h.sequence_number = 9;
        let mut nl =
            NetlinkMessage::new(h, NetlinkPayload::from(RouteNetlinkMessage::NewRoute(ans)));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert_eq!(parse(&buf, 8), None, "another request's answer");
        assert_eq!(
            parse(&buf, 9),
            Some(Answer::Route(3, Some("192.0.2.1".parse().unwrap())))
        );
        // A neighbour that failed resolution is not usable.
        let mut n = NeighbourMessage::default();
        n.header.state = NeighbourState::Failed;
        n.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        let mut nl = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewNeighbour(n.clone())),
        );
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert_eq!(parse(&buf, 0), Some(Answer::Nothing));
        n.header.state = NeighbourState::Stale;
        let mut nl = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::from(RouteNetlinkMessage::NewNeighbour(n)),
        );
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert_eq!(parse(&buf, 0), Some(Answer::Neighbour([2, 0, 0, 0, 0, 1])));
    }

    #[test]
    fn super_packets_split_into_the_datagrams_they_stand_for() {
        // IPv4 + UDP header (length for 5-byte datagrams) for 3 datagrams
        // of 5, 5 and 2 bytes.
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[20..26].copy_from_slice(&[0x11, 0x94, 0x11, 0x94, 0, 13]);
        p.extend_from_slice(b"aaaaabbbbbcc");
        crate::packet::fix_lengths(&mut p);
        let mut s = split(&p).unwrap();
        let mut out = crate::buf::PacketBuf::new();
        let mut got = vec![];
        while s.next_into(&p, &mut out) {
            let d = out.data();
            assert_eq!(crate::packet::checksum(&d[..20]), 0);
            assert_eq!(crate::packet::be16(d, 2) as usize, d.len());
            assert_eq!(crate::packet::be16(d, 24) as usize, d.len() - 20);
            got.push(d[28..].to_vec());
        }
        assert_eq!(got, [b"aaaaa".to_vec(), b"bbbbb".to_vec(), b"cc".to_vec()]);
        // A datagram whose UDP length covers it all is no super-packet,
        // nor is one to another port.
        crate::packet::put16(&mut p, 24, 20);
        assert!(split(&p).is_none());
        crate::packet::put16(&mut p, 24, 13);
        crate::packet::put16(&mut p, 22, 53);
        crate::packet::put16(&mut p, 20, 53);
        assert!(split(&p).is_none());
    }

    #[test]
    fn runs_of_equal_datagrams_become_one_super_packet_that_splits_back() {
        let udp = |len: usize, dport: u16| {
            let mut p = vec![0u8; 28];
            p[0] = 0x45;
            p[9] = 17;
            p[12..20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
            crate::packet::put16(&mut p, 20, 4500);
            crate::packet::put16(&mut p, 22, dport);
            crate::packet::put16(&mut p, 24, (8 + len) as u16);
            p.extend((0..len).map(|i| i as u8));
            crate::packet::fix_lengths(&mut p);
            p
        };
        let (a, b, c, d) = (
            udp(100, 4500),
            udp(100, 4500),
            udp(60, 4500),
            udp(100, 4500),
        );
        // Equal sizes, then a shorter last one: three; what follows is not
        // in the run.
        assert_eq!(run_len(&[&a, &b, &c, &d]), 3);
        // Another port, another size first, or not the NAT-T port: one.
        assert_eq!(run_len(&[&a, &udp(100, 4501)]), 1);
        assert_eq!(run_len(&[&c, &a]), 1);
        assert_eq!(run_len(&[&udp(100, 53)]), 1);
        let run = [&a[..], &b[..], &c[..]];
        let (h, hdr, seg) = super_header(&run);
        assert_eq!((hdr, seg), (28, 100));
        let mut whole = h[..hdr].to_vec();
        for q in run {
            whole.extend_from_slice(&q[hdr..]);
        }
        assert_eq!(crate::packet::be16(&whole, 2) as usize, whole.len());
        assert_eq!(crate::packet::checksum(&whole[..20]), 0);
        let mut s = split(&whole).unwrap();
        let mut out = crate::buf::PacketBuf::new();
        for q in run {
            assert!(s.next_into(&whole, &mut out));
            // The datagram as sealed, but for the UDP checksum (zeroed).
            let mut want = q.to_vec();
            crate::packet::put16(&mut want, 26, 0);
            assert_eq!(out.data(), &want[..]);
        }
        assert!(!s.next_into(&whole, &mut out));
    }
}
