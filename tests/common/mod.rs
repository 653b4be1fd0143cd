//! What the integration tests share.

use std::net::IpAddr;
use tunsec::packet::fix_lengths;

/// An IPv4 or IPv6 packet from `src` to `dst` with the given protocol and
/// payload, its lengths (and IPv4 checksum) filled in.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => panic!("mixed families"),
    };
    p.extend_from_slice(payload);
    fix_lengths(&mut p);
    p
}
