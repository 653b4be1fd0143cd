//! AH in transport mode (RFC 4302), in place on a [`PacketBuf`].
//!
//! The ICV covers the IP header with its mutable fields zeroed (IPv4: TOS,
//! flags, fragment offset, TTL, checksum and mutable options; IPv6: traffic
//! class, flow label, hop limit and options whose "may change en route" bit
//! is set), the AH header with a zero ICV, and the payload.

use crate::buf::PacketBuf;
use crate::crypto::MAX_ICV;
use crate::packet::{
    PROTO_AH, PROTO_DSTOPTS, PROTO_FRAGMENT, PROTO_HOPOPTS, be32, is_v6_ext, put32, set_next_header,
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

/// Zero the mutable fields of the IP header (and extension headers) in
/// `h`, a copy of the packet up to the AH header.
pub fn zero_mutable(h: &mut [u8]) -> Result<(), AhError> {
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

fn compute_icv(
    buf: &PacketBuf,
    at: usize,
    sa: &Sa,
    seq_hi: u32,
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<(), AhError> {
    scratch.clear();
    scratch.extend_from_slice(&buf.data()[..at]);
    zero_mutable(scratch)?;
    let hi = seq_hi.to_be_bytes();
    let esn: &[u8] = if sa.config.esn { &hi } else { &[] };
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
    put32(d, at + 4, sa.config.spi);
    put32(d, at + 8, seq as u32);
    d[at + FIXED..at + ah_len].fill(0);
    set_next_header(d, nh_pos, PROTO_AH);
    let icv = sa.mac.icv_len();
    let mut out = [0u8; MAX_ICV];
    compute_icv(buf, at, sa, (seq >> 32) as u32, scratch, &mut out[..icv])?;
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
    compute_icv(buf, at, sa, seq_hi, scratch, &mut want[..icv])?;
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
