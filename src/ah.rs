//! AH in transport mode (RFC 4302), in place on a [`PacketBuf`].
//!
//! The ICV covers the IP header with its mutable fields zeroed (IPv4: TOS,
//! flags, fragment offset, TTL, checksum and mutable options; IPv6: traffic
//! class, flow label, hop limit and options whose "may change en route" bit
//! is set), the AH header with a zero ICV, and the payload.
//!
//! Fields that are mutable but predictable are set, by the sender, to what
//! the receiver will see (RFC 4302 3.3.3.1): with an IPv4 loose or strict
//! source route the destination is the route's last address; an IPv6
//! routing header of type 0 or 2 that still has segments left is
//! rearranged as its hops will leave it (the destination becomes the last
//! address, the current destination takes the first unvisited slot,
//! Segments Left becomes 0). The receiver takes its header as it arrived.

use crate::buf::PacketBuf;
use crate::crypto::MAX_ICV;
use crate::packet::{
    PROTO_AH, PROTO_DSTOPTS, PROTO_FRAGMENT, PROTO_HOPOPTS, PROTO_ROUTING, be32, is_v6_ext, put32,
    set_next_header,
};
use crate::sad::Sa;

/// AH header before the ICV: next header, length, reserved, SPI, sequence.
pub const FIXED: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AhError {
    #[error("packet would exceed the maximum IP length")]
    TooBig,
    #[error("AH header malformed or of the wrong length")]
    Malformed,
    #[error("ICV check failed")]
    Icv,
}

/// AH header length for this SA: 12 + ICV, padded to 4 bytes (IPv4) or 8
/// bytes (IPv6).
pub fn header_len(sa: &Sa, v6: bool) -> usize {
    let n = FIXED + sa.mac.icv_len();
    if v6 {
        n.div_ceil(8) * 8
    } else {
        n.div_ceil(4) * 4
    }
}

/// IPv4 options whose content does not change in transit (RFC 4302 A.1):
/// EOL, NOP, Security, Extended Security, Commercial Security, Router
/// Alert, Sender Directed Multi-Destination Delivery. All others are zeroed.
fn v4_option_immutable(t: u8) -> bool {
    matches!(t, 0 | 1 | 130 | 133 | 134 | 148 | 149)
}

/// IPv4 Loose and Strict Source and Record Route.
const OPT_LSRR: u8 = 131;
const OPT_SSRR: u8 = 137;

/// Whose view of the header the ICV is computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The sender predicts what the receiver will see.
    Sender,
    /// The receiver takes the header as it arrived.
    Receiver,
}

/// Zero the mutable fields of the IP header (and extension headers) in
/// `h`, a copy of the packet up to the AH header; as the sender, also set
/// the mutable but predictable ones to their values on arrival.
pub fn zero_mutable(h: &mut [u8], view: View) -> Result<(), AhError> {
    if h[0] >> 4 == 4 {
        h[1] = 0; // TOS
        h[6] = 0; // flags, fragment offset
        h[7] = 0;
        h[8] = 0; // TTL
        h[10] = 0; // checksum
        h[11] = 0;
        let ihl = (h[0] & 0x0f) as usize * 4;
        let mut i = 20;
        while i < ihl {
            let t = h[i];
            if t == 0 {
                break; // end of options; the rest is padding
            }
            if t == 1 {
                i += 1;
                continue;
            }
            let l = *h.get(i + 1).ok_or(AhError::Malformed)? as usize;
            if l < 2 || i + l > ihl {
                return Err(AhError::Malformed);
            }
            if (t == OPT_LSRR || t == OPT_SSRR) && view == View::Sender && l >= 7 {
                // Type, length, pointer, then the route; its last address
                // is the final destination.
                h.copy_within(i + l - 4..i + l, 16);
            }
            if !v4_option_immutable(t) {
                h[i..i + l].fill(0);
            }
            i += l;
        }
    } else {
        h[0] &= 0xf0; // traffic class and flow label
        h[1] = 0;
        h[2] = 0;
        h[3] = 0;
        h[7] = 0; // hop limit
        let mut off = 40;
        let mut nh = h[6];
        while off < h.len() {
            if !is_v6_ext(nh) {
                return Err(AhError::Malformed);
            }
            let len = if nh == PROTO_FRAGMENT {
                8
            } else {
                (*h.get(off + 1).ok_or(AhError::Malformed)? as usize + 1) * 8
            };
            if off + len > h.len() {
                return Err(AhError::Malformed);
            }
            if nh == PROTO_ROUTING && view == View::Sender {
                predict_routing(h, off, len)?;
            }
            if nh == PROTO_HOPOPTS || nh == PROTO_DSTOPTS {
                let mut i = off + 2;
                while i < off + len {
                    let t = h[i];
                    if t == 0 {
                        i += 1; // Pad1
                        continue;
                    }
                    let l = *h.get(i + 1).ok_or(AhError::Malformed)? as usize;
                    if i + 2 + l > off + len {
                        return Err(AhError::Malformed);
                    }
                    if t & 0x20 != 0 {
                        h[i + 2..i + 2 + l].fill(0);
                    }
                    i += 2 + l;
                }
            }
            nh = h[off];
            off += len;
        }
    }
    Ok(())
}

/// Rearrange the IPv6 routing header at `h[off..off + len]` (and the
/// destination address) as the receiver will see it, for the types whose
/// hops swap the destination with the next address: 0 (RFC 2460, now
/// deprecated) and 2 (Mobile IPv6, RFC 6275). Other types are left as
/// they are.
fn predict_routing(h: &mut [u8], off: usize, len: usize) -> Result<(), AhError> {
    let (rtype, left) = (h[off + 2], h[off + 3] as usize);
    if left == 0 || !(rtype == 0 || rtype == 2) {
        return Ok(());
    }
    let n = (len - 8) / 16;
    if left > n {
        return Err(AhError::Malformed);
    }
    let addr = |k: usize| off + 8 + 16 * k;
    let mut last = [0u8; 16];
    last.copy_from_slice(&h[addr(n - 1)..addr(n)]);
    // Unvisited slots n-left..n-1: each moves one along (the last one
    // becomes the destination) and the current destination takes the first.
    h.copy_within(addr(n - left)..addr(n - 1), addr(n - left + 1));
    h.copy_within(24..40, addr(n - left));
    h[24..40].copy_from_slice(&last);
    h[off + 3] = 0;
    Ok(())
}

fn compute_icv(
    buf: &PacketBuf,
    at: usize,
    sa: &Sa,
    seq_hi: u32,
    view: View,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<(), AhError> {
    scratch.clear();
    scratch.extend_from_slice(&buf.data()[..at]);
    zero_mutable(scratch, view)?;
    let hi = seq_hi.to_be_bytes();
    let esn: &[u8] = if sa.esn() { &hi } else { &[] };
    sa.mac.compute(&[scratch, &buf.data()[at..], esn], out);
    Ok(())
}

/// Insert an AH header at `at` (whose protocol byte is at `nh_pos`) and
/// sign the packet with `sa` and sequence number `seq`. `scratch` holds a
/// copy of the IP header while the ICV is computed (reused, no allocation
/// once warm).
pub fn seal(
    buf: &mut PacketBuf,
    at: usize,
    nh_pos: usize,
    sa: &Sa,
    seq: u64,
    scratch: &mut Vec<u8>,
) -> Result<(), AhError> {
    let v6 = buf.data()[0] >> 4 == 6;
    let ah_len = header_len(sa, v6);
    let max = if v6 { 65535 + 40 } else { 65535 };
    if buf.len() + ah_len > max {
        return Err(AhError::TooBig);
    }
    let next = buf.data()[nh_pos];
    if !buf.insert_gap(at, ah_len) {
        return Err(AhError::TooBig);
    }
    let d = buf.data_mut();
    d[at] = next;
    d[at + 1] = (ah_len / 4 - 2) as u8;
    d[at + 2] = 0;
    d[at + 3] = 0;
    put32(d, at + 4, sa.spi());
    put32(d, at + 8, seq as u32);
    d[at + FIXED..at + ah_len].fill(0);
    set_next_header(d, nh_pos, PROTO_AH);
    let icv = sa.mac.icv_len();
    let mut out = [0u8; MAX_ICV];
    compute_icv(
        buf,
        at,
        sa,
        (seq >> 32) as u32,
        View::Sender,
        scratch,
        &mut out[..icv],
    )?;
    buf.data_mut()[at + FIXED..at + FIXED + icv].copy_from_slice(&out[..icv]);
    Ok(())
}

/// SPI and low sequence number of the AH header at `at`.
#[inline]
pub fn peek(pkt: &[u8], at: usize) -> Option<(u32, u32)> {
    if pkt.len() < at + FIXED {
        return None;
    }
    Some((be32(pkt, at + 4), be32(pkt, at + 8)))
}

/// Verify and remove the AH header at `at`.
pub fn open(
    buf: &mut PacketBuf,
    at: usize,
    nh_pos: usize,
    sa: &Sa,
    seq_hi: u32,
    scratch: &mut Vec<u8>,
) -> Result<(), AhError> {
    let v6 = buf.data()[0] >> 4 == 6;
    let want_len = header_len(sa, v6);
    let d = buf.data();
    if d.len() < at + FIXED {
        return Err(AhError::Malformed);
    }
    let ah_len = (d[at + 1] as usize + 2) * 4;
    if ah_len != want_len || at + ah_len > d.len() {
        return Err(AhError::Malformed);
    }
    let icv = sa.mac.icv_len();
    let mut got = [0u8; MAX_ICV];
    got[..icv].copy_from_slice(&d[at + FIXED..at + FIXED + icv]);
    buf.data_mut()[at + FIXED..at + FIXED + icv].fill(0);
    let mut want = [0u8; MAX_ICV];
    compute_icv(
        buf,
        at,
        sa,
        seq_hi,
        View::Receiver,
        scratch,
        &mut want[..icv],
    )?;
    if !crate::crypto::ct_eq(&want[..icv], &got[..icv]) {
        // Put the ICV back so that the packet is left as received.
        buf.data_mut()[at + FIXED..at + FIXED + icv].copy_from_slice(&got[..icv]);
        return Err(AhError::Icv);
    }
    let next = buf.data()[at];
    buf.remove_gap(at, ah_len);
    set_next_header(buf.data_mut(), nh_pos, next);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AuthAlg, EncAlg};
    use crate::packet::{PROTO_UDP, checksum, fix_lengths, parse};
    use crate::sad::{Lifetime, Proto, SaConfig};
    use hmac::{Hmac, Mac};
    use sha2::Sha256;
    use std::time::Duration;
    use zeroize::Zeroizing;

    const KEY: [u8; 32] = [0x5a; 32];

    fn sa() -> Sa {
        let cfg = SaConfig {
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            proto: Proto::Ah,
            spi: 0x2001,
            reqid: 0,
            replay: 0,
            esn: false,
            enc: EncAlg::Null,
            enc_key: Zeroizing::new(vec![]),
            auth: AuthAlg::HmacSha256,
            auth_key: Zeroizing::new(KEY.to_vec()),
            raw_cpi: false,
            encap: None,
            lifetime: Lifetime::default(),
            selector: None,
        };
        Sa::new(cfg, Duration::ZERO, 1).unwrap()
    }

    const R1: [u8; 4] = [198, 51, 100, 1];
    const R2: [u8; 4] = [198, 51, 100, 2];
    const A: [u8; 4] = [192, 0, 2, 1];
    const B: [u8; 4] = [192, 0, 2, 2];

    /// A → R1 with a loose source route R2, B (pointer at R2), UDP.
    fn v4_lsrr() -> Vec<u8> {
        let mut p = vec![0x48, 0x28, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_UDP, 0, 0];
        p.extend_from_slice(&A);
        p.extend_from_slice(&R1);
        p.extend_from_slice(&[OPT_LSRR, 11, 4]);
        p.extend_from_slice(&R2);
        p.extend_from_slice(&B);
        p.push(0); // end of options
        p.extend_from_slice(&[0x1f, 0x40, 0, 7, 0, 12, 0, 0, b'h', b'i', b'!', b'!']);
        fix_lengths(&mut p);
        p
    }

    /// What LSRR does at each hop (RFC 791 3.1): the next address becomes
    /// the destination and the hop records its own address in its place.
    fn lsrr_hop(p: &mut [u8], own: [u8; 4]) {
        let ptr = p[22] as usize;
        let slot = 20 + ptr - 1;
        let next: [u8; 4] = p[slot..slot + 4].try_into().unwrap();
        p[slot..slot + 4].copy_from_slice(&own);
        p[16..20].copy_from_slice(&next);
        p[22] += 4;
        p[8] -= 1;
        p[10] = 0;
        p[11] = 0;
        let c = checksum(&p[..32]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }

    fn sealed(plain: &[u8], sa: &Sa) -> PacketBuf {
        let info = parse(plain).unwrap();
        let mut buf = PacketBuf::new();
        buf.load(plain);
        let mut scratch = Vec::new();
        seal(
            &mut buf,
            info.insert_at,
            info.next_hdr_pos,
            sa,
            1,
            &mut scratch,
        )
        .unwrap();
        buf
    }

    fn open_copy(pkt: &[u8], sa: &Sa) -> Result<Vec<u8>, AhError> {
        let info = parse(pkt).unwrap();
        let mut buf = PacketBuf::new();
        buf.load(pkt);
        open(
            &mut buf,
            info.insert_at,
            info.next_hdr_pos,
            sa,
            0,
            &mut Vec::new(),
        )?;
        Ok(buf.data().to_vec())
    }

    #[test]
    fn v4_source_route_icv_uses_the_final_destination() {
        let sa = sa();
        let plain = v4_lsrr();
        let wire = sealed(&plain, &sa);
        let w = wire.data();
        let at = 32;
        assert_eq!(w[9], PROTO_AH);
        assert_eq!(&w[16..20], &R1, "the header still goes to the first hop");

        // The ICV, computed here by hand: TOS, flags, TTL and checksum
        // zeroed, the whole LSRR option zeroed, the destination B.
        let mut h = w[..at + 12 + 16].to_vec();
        h[1] = 0;
        h[6] = 0;
        h[8] = 0;
        h[10] = 0;
        h[11] = 0;
        h[16..20].copy_from_slice(&B);
        h[20..31].fill(0);
        h[at + 12..].fill(0);
        let mut m = Hmac::<Sha256>::new_from_slice(&KEY).unwrap();
        m.update(&h);
        m.update(&w[at + 12 + 16..]);
        assert_eq!(&m.finalize().into_bytes()[..16], &w[at + 12..at + 28]);

        // After both hops, B verifies it and gets the routed packet back.
        let mut routed = w.to_vec();
        lsrr_hop(&mut routed, [203, 0, 113, 1]);
        lsrr_hop(&mut routed, [203, 0, 113, 2]);
        assert_eq!(&routed[16..20], &B);
        let got = open_copy(&routed, &sa).unwrap();
        assert_eq!(
            &got[20..],
            &{
                let mut p = plain.clone();
                lsrr_hop(&mut p, [203, 0, 113, 1]);
                lsrr_hop(&mut p, [203, 0, 113, 2]);
                p
            }[20..]
        );
        // As sent (not yet routed), the destination differs: no match.
        assert_eq!(open_copy(w, &sa), Err(AhError::Icv));
    }

    fn v6_addr(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        a[15] = last;
        a
    }

    /// src ::1 → dst ::10 with a routing header of `rtype` listing `addrs`
    /// and `left` segments left, then UDP.
    fn v6_routed(rtype: u8, addrs: &[[u8; 16]], left: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, PROTO_ROUTING, 64];
        p.extend_from_slice(&v6_addr(1));
        p.extend_from_slice(&v6_addr(0x10));
        p.extend_from_slice(&[PROTO_UDP, 2 * addrs.len() as u8, rtype, left, 0, 0, 0, 0]);
        for a in addrs {
            p.extend_from_slice(a);
        }
        p.extend_from_slice(&[0x1f, 0x40, 0, 7, 0, 12, 0, 0, b'h', b'i', b'!', b'!']);
        fix_lengths(&mut p);
        p
    }

    /// A type 0 or 2 hop (RFC 2460 4.4): swap the destination with the
    /// next address.
    fn rh_hop(p: &mut [u8]) {
        let n = p[41] as usize / 2;
        let left = p[43] as usize;
        let i = n - left;
        let slot = 48 + 16 * i;
        let next: [u8; 16] = p[slot..slot + 16].try_into().unwrap();
        let dst: [u8; 16] = p[24..40].try_into().unwrap();
        p[slot..slot + 16].copy_from_slice(&dst);
        p[24..40].copy_from_slice(&next);
        p[43] -= 1;
        p[7] -= 1;
    }

    #[test]
    fn v6_routing_header_is_rearranged_as_the_receiver_will_see_it() {
        let sa = sa();
        for (rtype, addrs, left, hops) in [
            (0u8, vec![v6_addr(0x11), v6_addr(0x12), v6_addr(2)], 3u8, 3),
            (0, vec![v6_addr(0x11), v6_addr(0x12), v6_addr(2)], 2, 2),
            (2, vec![v6_addr(2)], 1, 1),
        ] {
            let plain = v6_routed(rtype, &addrs, left);
            let wire = sealed(&plain, &sa);
            let w = wire.data();
            assert_eq!(w[40], PROTO_AH, "AH goes after the routing header");
            assert_eq!(
                &w[..48 + 16 * addrs.len()],
                &{
                    let mut h = plain[..48 + 16 * addrs.len()].to_vec();
                    h[4..6].copy_from_slice(&(w.len() as u16 - 40).to_be_bytes());
                    h[40] = PROTO_AH;
                    h
                }[..],
                "the routing header is sent as it was"
            );
            let mut routed = w.to_vec();
            for _ in 0..hops {
                rh_hop(&mut routed);
            }
            assert_eq!(&routed[24..40], &v6_addr(2));

            // The ICV, computed here by hand (RFC 4302 3.3.3.1 and
            // appendix A): over the headers as they arrive at B (the
            // routing header walked to its end by rh_hop, no segments
            // left, B the destination), with traffic class, flow label and
            // hop limit zeroed and the ICV field (16 bytes, then 4 of
            // IPv6 padding) zeroed.
            let at = 48 + 16 * addrs.len();
            assert_eq!(w[at + 1], 6, "AH length: 12 + 16 + 4 padding = 8 words - 2");
            let mut h = routed[..at + 32].to_vec();
            assert_eq!(h[43], 0, "no segments left on arrival");
            h[0] = 0x60;
            h[1..4].fill(0);
            h[7] = 0;
            h[at + 12..].fill(0);
            let mut m = Hmac::<Sha256>::new_from_slice(&KEY).unwrap();
            m.update(&h);
            m.update(&routed[at + 32..]);
            assert_eq!(
                &m.finalize().into_bytes()[..16],
                &w[at + 12..at + 28],
                "type {rtype}, {left} left: the ICV is not the one over the arriving headers"
            );

            let got = open_copy(&routed, &sa).unwrap_or_else(|e| panic!("type {rtype}: {e}"));
            assert_eq!(got.len(), plain.len());
            assert_eq!(
                open_copy(w, &sa),
                Err(AhError::Icv),
                "type {rtype} unrouted"
            );
        }
        // More segments left than addresses: refused, not guessed.
        let mut bad = v6_routed(0, &[v6_addr(2)], 1);
        bad[43] = 2;
        let info = parse(&bad).unwrap();
        let mut buf = PacketBuf::new();
        buf.load(&bad);
        assert_eq!(
            seal(
                &mut buf,
                info.insert_at,
                info.next_hdr_pos,
                &sa,
                1,
                &mut Vec::new()
            ),
            Err(AhError::Malformed)
        );
    }
}
