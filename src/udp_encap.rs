//! UDP encapsulation of ESP (RFC 3948): ESP carried in UDP, as NAT
//! traversal needs and as IKE daemons negotiate it (`XFRMA_ENCAP`).
//!
//! - Outbound, after ESP: an 8-byte UDP header goes between the IP header
//!   (and the extension headers ESP followed) and the ESP header. IPv4
//!   sends a zero checksum (RFC 3948 section 2.1); IPv6 computes it (RFC
//!   8200 section 8.1 forbids zero).
//! - Inbound, before ESP: a UDP datagram to the SA's port whose first four
//!   bytes are not the non-ESP marker (zero, IKE's) and that is longer than
//!   a NAT keepalive (one byte, 0xff) is ESP; its UDP header is removed.
//!   The received checksum is not checked: ESP's ICV covers everything it
//!   would (RFC 3948 section 3.2: it may be ignored).
//! - Transport mode after decapsulation (RFC 3948 section 3.1.2): a NAT
//!   between the peers changed the addresses that the peer's TCP or UDP
//!   checksum covers, and IKEv2 does not tell the original ones (NAT-OA).
//!   tunsec recomputes the inner checksum, the option the RFC gives when
//!   the original addresses are unknown; ESP's ICV has already vouched for
//!   the bytes. (Linux marks such packets `CHECKSUM_UNNECESSARY` instead.)
//!
//! Pure functions over [`PacketBuf`]s; no I/O.

use crate::buf::PacketBuf;
use crate::packet::{self, IpInfo, PROTO_ESP, PROTO_TCP, PROTO_UDP, be16, put16};

/// The port IKE and ESP-in-UDP use (RFC 3948, RFC 7296 section 2.23).
pub const NAT_T_PORT: u16 = 4500;
/// Length of the UDP header.
pub const UDP_LEN: usize = 8;
/// `UDP_ENCAP_ESPINUDP` in Linux's `xfrm_encap_tmpl.encap_type`.
pub const ENCAP_ESPINUDP: u16 = 2;

/// An SA's UDP encapsulation: the ports of its source and destination
/// (for an inbound SA the peer's port and this host's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encap {
    pub sport: u16,
    pub dport: u16,
}

impl Default for Encap {
    fn default() -> Self {
        Encap {
            sport: NAT_T_PORT,
            dport: NAT_T_PORT,
        }
    }
}

/// Put a UDP header in front of the ESP header at `at` (whose protocol
/// byte is at `nh_pos`). False if the packet would grow too big.
#[must_use]
pub fn encapsulate(buf: &mut PacketBuf, at: usize, nh_pos: usize, e: Encap) -> bool {
    let v6 = buf.data()[0] >> 4 == 6;
    let max = if v6 { 65535 + 40 } else { 65535 };
    if buf.len() + UDP_LEN > max || !buf.insert_gap(at, UDP_LEN) {
        return false;
    }
    let d = buf.data_mut();
    let ulen = d.len() - at;
    if ulen > 65535 {
        return false;
    }
    put16(d, at, e.sport);
    put16(d, at + 2, e.dport);
    put16(d, at + 4, ulen as u16);
    put16(d, at + 6, 0);
    packet::set_next_header(d, nh_pos, PROTO_UDP);
    if v6 {
        let c = l4_checksum(d, at, PROTO_UDP);
        // A computed zero is sent as all ones (RFC 768).
        put16(d, at + 6, if c == 0 { 0xffff } else { c });
    }
    true
}

/// If `buf` (parsed as `info`) is an ESP-in-UDP datagram, the SPI and
/// ports it carries: a UDP header right where a transport header goes,
/// and a payload that is neither IKE (non-ESP marker) nor a keepalive.
pub fn peek(pkt: &[u8], info: &IpInfo) -> Option<(u32, Encap)> {
    if info.next_hdr != PROTO_UDP || info.fragment {
        return None;
    }
    let at = info.insert_at;
    let udp = pkt.get(at..at + UDP_LEN + 8)?;
    let spi = packet::be32(udp, UDP_LEN);
    (spi != 0).then(|| {
        (
            spi,
            Encap {
                sport: be16(udp, 0),
                dport: be16(udp, 2),
            },
        )
    })
}

/// Remove the UDP header [`peek`] found, leaving the ESP header at
/// `info.insert_at`.
pub fn decapsulate(buf: &mut PacketBuf, info: &IpInfo) {
    buf.remove_gap(info.insert_at, UDP_LEN);
    packet::set_next_header(buf.data_mut(), info.next_hdr_pos, PROTO_ESP);
}

/// Recompute the checksum of the TCP or UDP header at `info.upper_off`
/// after transport-mode decapsulation (see the module's comment). IPv4
/// UDP with a zero checksum ("none") stays zero. Other protocols, and
/// fragments, are left alone.
pub fn fix_inner_checksum(pkt: &mut [u8], info: &IpInfo) {
    if info.fragment {
        return;
    }
    let at = info.upper_off;
    let (pos, proto) = match info.upper_proto {
        PROTO_TCP if pkt.len() >= at + 20 => (at + 16, PROTO_TCP),
        PROTO_UDP if pkt.len() >= at + UDP_LEN => (at + 6, PROTO_UDP),
        _ => return,
    };
    if proto == PROTO_UDP && !info.v6 && be16(pkt, pos) == 0 {
        return;
    }
    put16(pkt, pos, 0);
    let c = l4_checksum(pkt, at, proto);
    put16(
        pkt,
        pos,
        if proto == PROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        },
    );
}

/// The one's-complement sum of a TCP/UDP pseudo-header (the packet's two
/// addresses, `addrs`, as they stand in its IP header; the protocol; the
/// length), folded and complemented like a finished checksum.
pub fn pseudo_checksum(addrs: &[u8], proto: u8, len: usize) -> u16 {
    let mut sum: u64 = proto as u64 + len as u64;
    for w in addrs.chunks_exact(4) {
        sum += u32::from_be_bytes([w[0], w[1], w[2], w[3]]) as u64;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP checksum of the segment at `at` to the end of `pkt`, with
/// the pseudo-header of the packet's addresses, its checksum field as it is:
/// 0 for a segment whose checksum is right, the value to store in a zeroed
/// field otherwise.
pub fn l4_checksum(pkt: &[u8], at: usize, proto: u8) -> u16 {
    let addrs = if pkt[0] >> 4 == 6 {
        &pkt[8..40]
    } else {
        &pkt[12..20]
    };
    // Both sums are complemented: undo that, add, fold, complement.
    let mut sum = (!pseudo_checksum(addrs, proto, pkt.len() - at)) as u64
        + (!packet::checksum(&pkt[at..])) as u64;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(payload: &[u8], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[8] = 64;
        p[9] = PROTO_UDP;
        p[12..16].copy_from_slice(&[192, 0, 2, 1]);
        p[16..20].copy_from_slice(&[192, 0, 2, 2]);
        put16(&mut p, 20, 4500);
        put16(&mut p, 22, dport);
        put16(&mut p, 24, (8 + payload.len()) as u16);
        p.extend_from_slice(payload);
        packet::fix_lengths(&mut p);
        p
    }

    #[test]
    fn ike_and_keepalives_are_not_esp() {
        let ike = udp4(&[0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], 4500);
        let info = packet::parse(&ike).unwrap();
        assert_eq!(peek(&ike, &info), None);
        let keepalive = udp4(&[0xff], 4500);
        let info = packet::parse(&keepalive).unwrap();
        assert_eq!(peek(&keepalive, &info), None);
        let esp = udp4(&[0, 0, 1, 0, 0, 0, 0, 1, 9, 9], 4500);
        let info = packet::parse(&esp).unwrap();
        assert_eq!(
            peek(&esp, &info),
            Some((
                0x100,
                Encap {
                    sport: 4500,
                    dport: 4500
                }
            ))
        );
    }

    #[test]
    fn encapsulate_then_decapsulate_is_identity() {
        for v6 in [false, true] {
            let mut p = if v6 {
                let mut p = vec![0u8; 40];
                p[0] = 0x60;
                p[6] = PROTO_ESP;
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
                p
            } else {
                let mut p = udp4(&[], 1);
                p.truncate(20);
                p[9] = PROTO_ESP;
                p
            };
            p.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 7, 1, 2, 3, 4, 5]);
            packet::fix_lengths(&mut p);
            let mut buf = PacketBuf::new();
            assert!(buf.load(&p));
            let info = packet::parse(buf.data()).unwrap();
            let e = Encap {
                sport: 1234,
                dport: 4500,
            };
            assert!(encapsulate(&mut buf, info.insert_at, info.next_hdr_pos, e));
            let d = buf.data();
            let at = info.insert_at;
            assert_eq!(d.len(), p.len() + 8);
            assert_eq!((be16(d, at), be16(d, at + 2)), (1234, 4500));
            assert_eq!(be16(d, at + 4) as usize, d.len() - at);
            if v6 {
                // The checksum verifies: summing with it gives zero.
                assert_eq!(l4_checksum(d, at, PROTO_UDP), 0);
                assert_eq!(be16(d, 4) as usize, d.len() - 40);
            } else {
                assert_eq!(be16(d, at + 6), 0);
                assert_eq!(packet::checksum(&d[..20]), 0);
            }
            let info = packet::parse(buf.data()).unwrap();
            assert_eq!(peek(buf.data(), &info).unwrap(), (0x200, e));
            decapsulate(&mut buf, &info);
            assert_eq!(buf.data(), &p[..]);
        }
    }

    #[test]
    fn inner_checksums_are_recomputed_for_the_received_addresses() {
        // A UDP datagram whose checksum was computed for another source
        // address (the peer's, before a NAT).
        let mut p = udp4(b"hello", 53);
        put16(&mut p, 26, 0x1234);
        let info = packet::parse(&p).unwrap();
        fix_inner_checksum(&mut p, &info);
        assert_eq!(l4_checksum(&p, 20, PROTO_UDP), 0);
        // Zero means "no checksum" for IPv4 UDP and stays so.
        put16(&mut p, 26, 0);
        fix_inner_checksum(&mut p, &info);
        assert_eq!(be16(&p, 26), 0);
    }
}
