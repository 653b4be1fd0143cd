//! Receive offload for the TUN device: decapsulated TCP segments (or UDP
//! datagrams) of one flow, in order, coalesced into one super-packet with
//! a virtio-net header (`IFF_VNET_HDR`), so the kernel's IP and transport
//! input run once per 64 KB instead of once per packet, as Linux's own
//! GRO does for a NIC.
//!
//! Pure code over byte buffers: the daemon's workers push what the engine
//! let through and write each [`Gro::frames`] entry to the TUN device with
//! one `write(2)`. Buffers are kept between batches; after the first
//! batches nothing is allocated (the tun-rs coalescer it replaces copied
//! every packet into a new `Vec`).
//!
//! Coalescing follows Linux's `tcp_gro_receive`, `udp_gro_receive` and
//! `inet_gro_receive`: same addresses and ports; the same IP fields (TOS
//! or traffic class and flow label, TTL or hop limit, the DF bit); TCP:
//! the next sequence number, the same acknowledgement, header and
//! options, only ACK, with PSH allowed on the last segment; every packet
//! but the last of the same size; no IP options, fragments or IPv6
//! extension headers. Anything else goes alone, unchanged. UDP super-packets
//! (`GSO_UDP_L4`) need a kernel with TUN USO (6.2), as the tun-rs
//! coalescer did: the caller says whether to make them.
//!
//! Checksums: a coalesced super-packet leaves with `NEEDS_CSUM` (the kernel
//! treats it as verified, like a NIC's `CHECKSUM_PARTIAL`), so each packet
//! must have been verified first, as the kernel would have: for
//! [`Csum::Check`] packets this module does it, and one that fails goes
//! alone, unchanged, for the kernel to verify and drop. [`Csum::Trusted`]
//! packets are TCP whose checksum field was left stale on purpose: ESP in
//! UDP in transport mode, where a NAT may have changed the addresses the
//! peer's checksum covered (RFC 3948 section 3.1.2) and ESP's ICV has
//! vouched for the bytes; Linux marks those `CHECKSUM_UNNECESSARY`. They
//! leave with `NEEDS_CSUM` and the pseudo-header sum in the checksum field
//! even when alone, so nothing computes a checksum over their payload.

use crate::packet::{PROTO_TCP, PROTO_UDP, be16, be32, checksum, put16};
use crate::udp_encap::{l4_checksum, pseudo_checksum};

/// `struct virtio_net_hdr` (no `num_buffers`): what precedes each frame.
pub const VNET_HDR_LEN: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// An IP packet's largest length (IPv4 total length; IPv6 payload length
/// plus the fixed header is kept under it too).
const MAX_LEN: usize = 65535;
/// How many open super-packets a new packet is compared with (newest
/// first): a batch interleaves few flows.
const SEARCH: usize = 8;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// What the kernel should do about a packet's TCP or UDP checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Csum {
    /// The checksum field is what the sender computed: verify it before
    /// coalescing (the kernel would).
    Check,
    /// The checksum field is stale and must not be verified: the packet's
    /// integrity is already established (see the module's comment). The
    /// packet must be TCP directly after its IP header.
    Trusted,
}

/// One frame being built: a virtio-net header, then the packet.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Into `Gro::bufs`.
    buf: usize,
    v6: bool,
    /// PROTO_TCP or PROTO_UDP (0: a packet that goes alone).
    proto: u8,
    iph: usize,
    /// The TCP or UDP header's length.
    l4h: usize,
    /// Payload bytes of the first packet: every other but the last has as
    /// many.
    gso_size: usize,
    segments: usize,
    next_seq: u32,
    /// A PSH or a short packet ended it; or it is not one we coalesce.
    closed: bool,
    /// Give it `NEEDS_CSUM` even when alone.
    partial: bool,
}

/// TUN receive offload for one worker: push packets, take the frames.
#[derive(Debug, Default)]
pub struct Gro {
    bufs: Vec<Vec<u8>>,
    items: Vec<Item>,
    udp: bool,
    coalesced: u64,
}

impl Gro {
    /// `udp`: make UDP super-packets too (the TUN device takes USO).
    pub fn new(udp: bool) -> Gro {
        Gro {
            udp,
            ..Gro::default()
        }
    }

    /// Frames waiting to be written.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Packets merged into an earlier one since this `Gro` was made.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Add a packet (an IP packet as it goes to the TUN device).
    pub fn push(&mut self, pkt: &[u8], csum: Csum) {
        let seg = match Segment::parse(pkt).filter(|s| s.proto == PROTO_TCP || self.udp) {
            Some(s) => s,
            None => {
                // Trusted is only ever claimed for TCP right after the IP
                // header; parse refused it for flags or options, so it goes
                // alone, still without a payload checksum.
                let partial = csum == Csum::Trusted && l4_at(pkt) == Some(PROTO_TCP);
                self.start(pkt, None, partial);
                return;
            }
        };
        let verified = match csum {
            Csum::Trusted => seg.proto == PROTO_TCP,
            Csum::Check => seg.checksum_ok(pkt),
        };
        if !verified {
            self.start(pkt, None, false);
            return;
        }
        let first = self.items.len().saturating_sub(SEARCH);
        for k in (first..self.items.len()).rev() {
            let it = self.items[k];
            if it.closed || !self.same_flow(&it, pkt, &seg) {
                continue;
            }
            if (seg.proto == PROTO_TCP && seg.seq != it.next_seq)
                || seg.payload > it.gso_size
                || self.bufs[it.buf].len() - VNET_HDR_LEN + seg.payload > MAX_LEN
            {
                // Out of order or no room: this flow's frame is done.
                self.items[k].closed = true;
                break;
            }
            let body = &pkt[seg.iph + seg.l4h..];
            self.bufs[it.buf].extend_from_slice(body);
            let item = &mut self.items[k];
            item.segments += 1;
            item.next_seq = seg.seq.wrapping_add(seg.payload as u32);
            item.closed = seg.psh || seg.payload < it.gso_size;
            item.partial = true;
            if seg.psh {
                // The super-packet ends with the PSH it carried.
                let b = &mut self.bufs[it.buf];
                b[VNET_HDR_LEN + it.iph + 13] |= TCP_PSH;
            }
            self.coalesced += 1;
            return;
        }
        self.start(pkt, Some(&seg), csum == Csum::Trusted);
    }

    fn same_flow(&self, it: &Item, pkt: &[u8], seg: &Segment) -> bool {
        let head = &self.bufs[it.buf][VNET_HDR_LEN..];
        if it.v6 != seg.v6 || it.proto != seg.proto || it.iph != seg.iph || it.l4h != seg.l4h {
            return false;
        }
        let (addrs, fields) = if seg.v6 {
            // Version, traffic class, flow label; next header, hop limit.
            (8..40, [0..4, 6..8].as_slice())
        } else {
            // TOS; flags and fragment offset (DF); TTL, protocol.
            (12..20, [1..2, 6..8, 8..10].as_slice())
        };
        if head[addrs.clone()] != pkt[addrs]
            || fields.iter().any(|r| head[r.clone()] != pkt[r.clone()])
        {
            return false;
        }
        let (h, p) = (&head[it.iph..], &pkt[seg.iph..]);
        if seg.proto == PROTO_UDP {
            return h[0..4] == p[0..4];
        }
        // Ports; acknowledgement; options (the sequence number, flags and
        // window aside).
        h[0..4] == p[0..4] && h[8..12] == p[8..12] && h[20..it.l4h] == p[20..seg.l4h]
    }

    /// A new frame with `pkt` as it is (its header taken as the frame's).
    fn start(&mut self, pkt: &[u8], seg: Option<&Segment>, partial: bool) {
        let n = self.items.len();
        if self.bufs.len() == n {
            self.bufs.push(Vec::with_capacity(VNET_HDR_LEN + MAX_LEN));
        }
        let b = &mut self.bufs[n];
        b.clear();
        b.extend_from_slice(&[0; VNET_HDR_LEN]);
        b.extend_from_slice(pkt);
        let item = match seg {
            Some(s) => Item {
                buf: n,
                v6: s.v6,
                proto: s.proto,
                iph: s.iph,
                l4h: s.l4h,
                gso_size: s.payload,
                segments: 1,
                next_seq: s.seq.wrapping_add(s.payload as u32),
                closed: s.psh,
                partial,
            },
            None => {
                // Alone; `partial` only for TCP (see `push`).
                let (v6, iph, l4h) = match tcp_at(pkt) {
                    Some((iph, l4h)) => (pkt[0] >> 4 == 6, iph, l4h),
                    None => (false, 0, 0),
                };
                Item {
                    buf: n,
                    v6,
                    proto: if partial { PROTO_TCP } else { 0 },
                    iph,
                    l4h,
                    gso_size: 0,
                    segments: 1,
                    next_seq: 0,
                    closed: true,
                    partial,
                }
            }
        };
        self.items.push(item);
    }

    /// Finish the frames (headers, lengths, virtio-net headers) and hand
    /// them out in order, each ready for one `write(2)`, with the number of
    /// packets pushed into it; then empty.
    pub fn frames(&mut self) -> impl Iterator<Item = (&[u8], usize)> {
        for it in &self.items {
            let b = &mut self.bufs[it.buf];
            let len = b.len() - VNET_HDR_LEN;
            let mut hdr = [0u8; VNET_HDR_LEN];
            if it.partial {
                let pkt = &mut b[VNET_HDR_LEN..];
                let l4_len = len - it.iph;
                if it.segments > 1 {
                    if it.v6 {
                        put16(pkt, 4, l4_len as u16);
                    } else {
                        put16(pkt, 2, len as u16);
                        put16(pkt, 10, 0);
                        let c = checksum(&pkt[..it.iph]);
                        put16(pkt, 10, c);
                    }
                    if it.proto == PROTO_UDP {
                        put16(pkt, it.iph + 4, l4_len as u16);
                    }
                }
                // The pseudo-header's sum, not complemented: the rest of
                // the sum is the kernel's to add (CHECKSUM_PARTIAL).
                let addrs = if it.v6 { &pkt[8..40] } else { &pkt[12..20] };
                let seed = !pseudo_checksum(addrs, it.proto, l4_len);
                let field = if it.proto == PROTO_UDP { 6 } else { 16 };
                put16(pkt, it.iph + field, seed);
                hdr[0] = F_NEEDS_CSUM;
                hdr[6..8].copy_from_slice(&(it.iph as u16).to_le_bytes());
                hdr[8..10].copy_from_slice(&(field as u16).to_le_bytes());
                if it.segments > 1 {
                    hdr[1] = match (it.proto, it.v6) {
                        (PROTO_UDP, _) => GSO_UDP_L4,
                        (_, false) => GSO_TCPV4,
                        (_, true) => GSO_TCPV6,
                    };
                    hdr[2..4].copy_from_slice(&((it.iph + it.l4h) as u16).to_le_bytes());
                    hdr[4..6].copy_from_slice(&(it.gso_size as u16).to_le_bytes());
                } else {
                    hdr[1] = GSO_NONE;
                }
            }
            b[..VNET_HDR_LEN].copy_from_slice(&hdr);
        }
        self.items
            .drain(..)
            .map(|it| (self.bufs[it.buf].as_slice(), it.segments))
    }
}

/// A TCP segment or UDP datagram that may be coalesced.
struct Segment {
    v6: bool,
    proto: u8,
    iph: usize,
    l4h: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

impl Segment {
    fn parse(pkt: &[u8]) -> Option<Segment> {
        let proto = l4_at(pkt)?;
        let v6 = pkt[0] >> 4 == 6;
        let iph = if v6 { 40 } else { 20 };
        if !v6 && (pkt[0] & 0xf != 5 || be16(pkt, 6) & 0x3fff != 0) {
            // IP options, or a fragment.
            return None;
        }
        let (l4h, seq, psh) = if proto == PROTO_TCP {
            let (_, l4h) = tcp_at(pkt)?;
            let flags = pkt[iph + 13];
            if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
                return None;
            }
            (l4h, be32(pkt, iph + 4), flags & TCP_PSH != 0)
        } else {
            // The UDP length must be the packet's; IPv4's "no checksum"
            // cannot be verified.
            if pkt.len() < iph + 8
                || be16(pkt, iph + 4) as usize != pkt.len() - iph
                || (!v6 && be16(pkt, iph + 6) == 0)
            {
                return None;
            }
            (8, 0, false)
        };
        let payload = pkt.len() - iph - l4h;
        if payload == 0 {
            return None;
        }
        Some(Segment {
            v6,
            proto,
            iph,
            l4h,
            payload,
            seq,
            psh,
        })
    }

    fn checksum_ok(&self, pkt: &[u8]) -> bool {
        l4_checksum(pkt, self.iph, self.proto) == 0
    }
}

/// TCP or UDP right after the IP header of a whole packet (IPv4 total
/// length or IPv6 payload length matching it; no IPv6 extension headers).
fn l4_at(pkt: &[u8]) -> Option<u8> {
    let (iph, proto, total) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => ((pkt[0] & 0xf) as usize * 4, pkt[9], be16(pkt, 2) as usize),
        6 if pkt.len() >= 40 => (40, pkt[6], 40 + be16(pkt, 4) as usize),
        _ => return None,
    };
    (iph >= 20
        && total == pkt.len()
        && pkt.len() >= iph + 8
        && (proto == PROTO_TCP || proto == PROTO_UDP))
        .then_some(proto)
}

/// The IP and TCP header lengths of a whole, well-formed TCP packet whose
/// TCP header follows the IP header.
fn tcp_at(pkt: &[u8]) -> Option<(usize, usize)> {
    if l4_at(pkt)? != PROTO_TCP {
        return None;
    }
    let iph = if pkt[0] >> 4 == 6 {
        40
    } else {
        (pkt[0] & 0xf) as usize * 4
    };
    if pkt.len() < iph + 20 {
        return None;
    }
    let tcph = (pkt[iph + 12] >> 4) as usize * 4;
    if tcph < 20 || pkt.len() < iph + tcph {
        return None;
    }
    Some((iph, tcph))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::put32;

    /// Put a correct TCP or UDP checksum in `p` (transport header at
    /// `iph`, checksum field at `field` within it).
    fn fix_l4(p: &mut [u8], iph: usize, proto: u8, field: usize) {
        put16(p, iph + field, 0);
        let c = l4_checksum(p, iph, proto);
        put16(p, iph + field, c);
    }

    /// A TCP segment with a correct checksum: IPv4 192.0.2.1:4000 ->
    /// 192.0.2.2:5201 (or IPv6 2001:db8::1 -> ::2), timestamps option.
    fn seg(v6: bool, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let tcph = 32;
        let mut p = vec![0u8; iph + tcph + payload.len()];
        if v6 {
            p[0] = 0x60;
            put16(&mut p, 4, (tcph + payload.len()) as u16);
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(
                &"2001:db8::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
            p[24..40].copy_from_slice(
                &"2001:db8::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
            );
        } else {
            p[0] = 0x45;
            let len = p.len() as u16;
            put16(&mut p, 2, len);
            put16(&mut p, 4, seq as u16); // an identification that varies
            p[6] = 0x40; // DF
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[192, 0, 2, 1]);
            p[16..20].copy_from_slice(&[192, 0, 2, 2]);
            let c = checksum(&p[..20]);
            put16(&mut p, 10, c);
        }
        let t = iph;
        put16(&mut p, t, 4000);
        put16(&mut p, t + 2, 5201);
        put32(&mut p, t + 4, seq);
        put32(&mut p, t + 8, 777);
        p[t + 12] = ((tcph / 4) << 4) as u8;
        p[t + 13] = flags;
        put16(&mut p, t + 14, 512);
        // NOP, NOP, timestamps.
        p[t + 20..t + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        p[t + tcph..].copy_from_slice(payload);
        fix_l4(&mut p, t, PROTO_TCP, 16);
        p
    }

    fn hdr(f: &[u8]) -> (u8, u8, u16, u16, u16, u16) {
        let le = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
        (f[0], f[1], le(2), le(4), le(6), le(8))
    }

    /// What the kernel does with `NEEDS_CSUM` (`skb_checksum_help`): sum
    /// from `csum_start` to the end, the field holding the seed, and store
    /// the result; the packet then verifies like any other.
    fn complete(frame: &[u8]) -> Vec<u8> {
        let (flags, _, _, _, start, off) = hdr(frame);
        let mut p = frame[VNET_HDR_LEN..].to_vec();
        if flags & F_NEEDS_CSUM != 0 {
            let at = start as usize + off as usize;
            let c = checksum(&p[start as usize..]);
            put16(&mut p, at, c);
        }
        p
    }

    fn frames(g: &mut Gro) -> Vec<(Vec<u8>, usize)> {
        g.frames().map(|(f, n)| (f.to_vec(), n)).collect()
    }

    fn verifies(p: &[u8]) -> bool {
        let s = Segment::parse(p).or_else(|| {
            tcp_at(p).map(|(iph, l4h)| Segment {
                v6: p[0] >> 4 == 6,
                proto: PROTO_TCP,
                iph,
                l4h,
                payload: 0,
                seq: 0,
                psh: false,
            })
        });
        s.is_some_and(|s| s.checksum_ok(p))
    }

    #[test]
    fn in_order_segments_become_one_super_packet_both_families() {
        for v6 in [false, true] {
            let mut g = Gro::new(true);
            let a = seg(v6, 1000, TCP_ACK, &[1; 1000]);
            let b = seg(v6, 2000, TCP_ACK, &[2; 1000]);
            let c = seg(v6, 3000, TCP_ACK | TCP_PSH, &[3; 600]);
            for p in [&a, &b, &c] {
                g.push(p, Csum::Check);
            }
            let out = frames(&mut g);
            assert_eq!(out.len(), 1, "v6 {v6}");
            let (f, n) = &out[0];
            assert_eq!(*n, 3);
            let iph = if v6 { 40 } else { 20 };
            let (flags, gso, hdr_len, gso_size, start, off) = hdr(f);
            let want_gso = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            assert_eq!(
                (flags, gso, hdr_len, gso_size, start, off),
                (
                    F_NEEDS_CSUM,
                    want_gso,
                    iph as u16 + 32,
                    1000,
                    iph as u16,
                    16
                )
            );
            let p = complete(f);
            assert_eq!(p.len(), iph + 32 + 2600);
            assert_eq!(crate::packet::ip_len(&p), Some(p.len()));
            if !v6 {
                assert_eq!(checksum(&p[..20]), 0, "IPv4 header checksum");
            }
            assert!(verifies(&p), "completed TCP checksum, v6 {v6}");
            // The first segment's header with the last one's PSH, then the
            // payloads in order.
            assert_eq!(p[iph + 13], TCP_ACK | TCP_PSH);
            assert_eq!(p[iph + 4..iph + 8], 1000u32.to_be_bytes());
            let body = &p[iph + 32..];
            assert!(body[..1000].iter().all(|&x| x == 1));
            assert!(body[1000..2000].iter().all(|&x| x == 2));
            assert!(body[2000..].iter().all(|&x| x == 3));
            assert_eq!(g.coalesced(), 2);
            assert!(g.is_empty());
        }
    }

    #[test]
    fn a_bad_checksum_goes_alone_unchanged_for_the_kernel_to_drop() {
        let mut g = Gro::new(true);
        let a = seg(false, 1000, TCP_ACK, &[1; 100]);
        let mut b = seg(false, 1100, TCP_ACK, &[2; 100]);
        b[60] ^= 0xff;
        let c = seg(false, 1100, TCP_ACK, &[2; 100]);
        g.push(&a, Csum::Check);
        g.push(&b, Csum::Check);
        g.push(&c, Csum::Check);
        let out = frames(&mut g);
        // a and c coalesce; b stands between them, alone, as it came.
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1, 2);
        assert_eq!(&out[1].0[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&out[1].0[VNET_HDR_LEN..], &b[..]);
        // A lone good segment also goes as it came: the kernel verifies.
        g.push(&a, Csum::Check);
        let out = frames(&mut g);
        assert_eq!(out[0].0[VNET_HDR_LEN..], a[..]);
        assert_eq!(out[0].0[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    }

    #[test]
    fn trusted_segments_need_no_valid_checksum_and_leave_completable() {
        for v6 in [false, true] {
            let mut g = Gro::new(true);
            let iph = if v6 { 40 } else { 20 };
            // Stale checksums, as after a NAT: any value.
            let mut a = seg(v6, 1, TCP_ACK, &[5; 1400]);
            let mut b = seg(v6, 1401, TCP_ACK, &[6; 1400]);
            put16(&mut a, iph + 16, 0x1234);
            put16(&mut b, iph + 16, 0x4321);
            let mut lone = seg(v6, 9, TCP_ACK | 0x02, &[]); // a SYN+ACK
            put16(&mut lone, iph + 16, 0xbeef);
            g.push(&a, Csum::Trusted);
            g.push(&b, Csum::Trusted);
            g.push(&lone, Csum::Trusted);
            let out = frames(&mut g);
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].1, 2);
            assert!(verifies(&complete(&out[0].0)));
            let (flags, gso, ..) = hdr(&out[1].0);
            assert_eq!((flags, gso), (F_NEEDS_CSUM, GSO_NONE));
            assert!(verifies(&complete(&out[1].0)), "v6 {v6}");
        }
    }

    #[test]
    fn what_may_not_merge_does_not() {
        let base = || seg(false, 1000, TCP_ACK, &[1; 100]);
        let next = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = seg(false, 1100, TCP_ACK, &[2; 100]);
            f(&mut p);
            // Fix the checksums after the change.
            put16(&mut p, 10, 0);
            let c = checksum(&p[..20]);
            put16(&mut p, 10, c);
            fix_l4(&mut p, 20, PROTO_TCP, 16);
            p
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("sequence gap", next(&|p| put32(p, 24, 1101))),
            ("other ack", next(&|p| put32(p, 28, 778))),
            ("other TTL", next(&|p| p[8] = 63)),
            ("other TOS", next(&|p| p[1] = 4)),
            ("other port", next(&|p| put16(p, 20, 4001))),
            ("other address", next(&|p| p[15] = 9)),
            ("other options", next(&|p| p[51] = 10)),
            ("a FIN", next(&|p| p[33] = TCP_ACK | 1)),
            (
                "no payload",
                next(&|q| {
                    q.truncate(52);
                    put16(q, 2, 52);
                }),
            ),
        ];
        for (what, p) in cases {
            let mut g = Gro::new(true);
            g.push(&base(), Csum::Check);
            g.push(&p, Csum::Check);
            let out = frames(&mut g);
            assert_eq!(out.len(), 2, "{what}");
            assert_eq!(out[1].0[VNET_HDR_LEN..], p[..], "{what}: goes unchanged");
        }
        // A bigger segment after a smaller one, and anything after a PSH.
        let mut g = Gro::new(true);
        g.push(&seg(false, 0, TCP_ACK, &[0; 50]), Csum::Check);
        g.push(&seg(false, 50, TCP_ACK, &[0; 60]), Csum::Check);
        g.push(&seg(false, 110, TCP_ACK | TCP_PSH, &[0; 60]), Csum::Check);
        g.push(&seg(false, 170, TCP_ACK, &[0; 60]), Csum::Check);
        assert_eq!(
            frames(&mut g).iter().map(|f| f.1).collect::<Vec<_>>(),
            [1, 2, 1]
        );
    }

    #[test]
    fn flows_interleave_and_frames_stay_under_64k() {
        let mut g = Gro::new(true);
        let other = |seq: u32| {
            let mut p = seg(false, seq, TCP_ACK, &[7; 1000]);
            put16(&mut p, 22, 5202);
            fix_l4(&mut p, 20, PROTO_TCP, 16);
            p
        };
        for k in 0..3 {
            g.push(&seg(false, k * 1000, TCP_ACK, &[1; 1000]), Csum::Check);
            g.push(&other(k * 1000), Csum::Check);
        }
        assert_eq!(
            frames(&mut g).iter().map(|f| f.1).collect::<Vec<_>>(),
            [3, 3]
        );
        // 1,400-byte payloads: 46 fit under 65,535 with 52 bytes of headers.
        for k in 0..64u32 {
            g.push(&seg(false, k * 1400, TCP_ACK, &[1; 1400]), Csum::Check);
        }
        let out = frames(&mut g);
        assert_eq!(out.iter().map(|f| f.1).collect::<Vec<_>>(), [46, 18]);
        assert!(out.iter().all(|(f, _)| f.len() - VNET_HDR_LEN <= MAX_LEN));
        assert!(out.iter().all(|(f, _)| verifies(&complete(f))));
    }

    #[test]
    fn other_packets_go_alone_and_unchanged() {
        let mut g = Gro::new(true);
        let mut udp = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
        ];
        udp.extend_from_slice(&[0, 53, 0, 53, 0, 8, 0, 0]);
        let junk = [0x45u8, 1, 2];
        g.push(&udp, Csum::Check);
        g.push(&junk, Csum::Check);
        g.push(&udp, Csum::Trusted);
        let out = frames(&mut g);
        assert_eq!(out.len(), 3);
        for ((f, n), want) in out.iter().zip([&udp[..], &junk[..], &udp[..]]) {
            assert_eq!(*n, 1);
            assert_eq!(f[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
            assert_eq!(&f[VNET_HDR_LEN..], want);
        }
    }
    fn udp(v6: bool, payload: &[u8]) -> Vec<u8> {
        let iph = if v6 { 40 } else { 20 };
        let mut p = seg(v6, 0, TCP_ACK, &[]);
        p.truncate(iph);
        p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        let l4 = p.len() - iph;
        put16(&mut p, iph + 4, l4 as u16);
        if v6 {
            p[6] = PROTO_UDP;
            put16(&mut p, 4, l4 as u16);
        } else {
            p[9] = PROTO_UDP;
            let len = p.len() as u16;
            put16(&mut p, 2, len);
            put16(&mut p, 10, 0);
            let c = checksum(&p[..20]);
            put16(&mut p, 10, c);
        }
        fix_l4(&mut p, iph, PROTO_UDP, 6);
        p
    }

    #[test]
    fn udp_datagrams_of_one_size_become_one_uso_super_packet_when_the_device_takes_it() {
        for v6 in [false, true] {
            let iph = if v6 { 40 } else { 20 };
            let (a, b, c, d) = (
                udp(v6, &[1; 1300]),
                udp(v6, &[2; 1300]),
                udp(v6, &[3; 700]),
                udp(v6, &[4; 1300]),
            );
            let mut g = Gro::new(true);
            for p in [&a, &b, &c, &d] {
                g.push(p, Csum::Check);
            }
            let out = frames(&mut g);
            // The short one ends the first frame.
            assert_eq!(out.iter().map(|f| f.1).collect::<Vec<_>>(), [3, 1]);
            let (flags, gso, hdr_len, gso_size, start, off) = hdr(&out[0].0);
            assert_eq!(
                (flags, gso, hdr_len, gso_size, start, off),
                (
                    F_NEEDS_CSUM,
                    GSO_UDP_L4,
                    iph as u16 + 8,
                    1300,
                    iph as u16,
                    6
                )
            );
            let p = complete(&out[0].0);
            assert_eq!(be16(&p, iph + 4) as usize, p.len() - iph, "UDP length: all");
            assert_eq!(crate::packet::ip_len(&p), Some(p.len()));
            let s = Segment {
                v6,
                proto: PROTO_UDP,
                iph,
                l4h: 8,
                payload: 0,
                seq: 0,
                psh: false,
            };
            assert!(s.checksum_ok(&p), "v6 {v6}");
            assert_eq!(out[1].0[VNET_HDR_LEN..], d[..]);
            // Without USO on the device, each goes alone and unchanged.
            let mut g = Gro::new(false);
            g.push(&a, Csum::Check);
            g.push(&b, Csum::Check);
            let out = frames(&mut g);
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].0[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
            assert_eq!(out[1].0[VNET_HDR_LEN..], b[..]);
        }
    }
}
