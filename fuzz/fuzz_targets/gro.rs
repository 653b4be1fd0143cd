//! The TUN device's receive offload (`tunsec::gro`) against any packets:
//! what comes out of decapsulation is the peer's to choose.
//!
//! The input is a run of records: two bytes of length, a byte whose low
//! bit says `Csum::Trusted`, then the packet. After each 64 packets, and
//! at the end, the frames are taken and checked: every packet pushed is
//! in exactly one frame, no frame is over 64 KiB, lengths in the IP
//! headers match, and a frame the kernel would complete (`NEEDS_CSUM`)
//! whose packets were all checked gets a checksum that verifies.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tunsec::gro::{Csum, Gro, VNET_HDR_LEN};
use tunsec::packet::{self, put16};
use tunsec::udp_encap::l4_checksum;

fn check(g: &mut Gro, pushed: usize, all_checked: bool) {
    let mut seen = 0;
    for (frame, n) in g.frames() {
        seen += n;
        assert!(n >= 1);
        assert!(frame.len() >= VNET_HDR_LEN && frame.len() <= VNET_HDR_LEN + 65535);
        let (hdr, pkt) = frame.split_at(VNET_HDR_LEN);
        if hdr[0] & 1 == 0 {
            assert_eq!(
                hdr, [0; VNET_HDR_LEN],
                "a frame without NEEDS_CSUM is as it came"
            );
            assert_eq!(n, 1);
            continue;
        }
        // NEEDS_CSUM: TCP or UDP right after the IP header, whole.
        assert_eq!(packet::ip_len(pkt), Some(pkt.len()));
        let start = u16::from_le_bytes([hdr[6], hdr[7]]) as usize;
        let off = u16::from_le_bytes([hdr[8], hdr[9]]) as usize;
        assert!(start + off + 2 <= pkt.len());
        if all_checked {
            // What the kernel does: sum from csum_start, the field seeded.
            let mut p = pkt.to_vec();
            let c = packet::checksum(&p[start..]);
            put16(&mut p, start + off, c);
            let proto = if p[0] >> 4 == 6 { p[6] } else { p[9] };
            assert_eq!(
                l4_checksum(&p, start, proto),
                0,
                "the completed checksum verifies"
            );
        }
    }
    assert_eq!(seen, pushed, "every packet in one frame");
    assert!(g.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let mut g = Gro::new(data.first().is_some_and(|b| b & 1 == 1));
    let mut rest = data.get(1..).unwrap_or_default();
    let (mut pushed, mut all_checked) = (0, true);
    while rest.len() >= 3 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 3);
        let trusted = rest[2] & 1 == 1;
        let pkt = &rest[3..3 + len];
        rest = &rest[3 + len..];
        g.push(pkt, if trusted { Csum::Trusted } else { Csum::Check });
        pushed += 1;
        all_checked &= !trusted;
        if pushed == 64 {
            check(&mut g, pushed, all_checked);
            (pushed, all_checked) = (0, true);
        }
    }
    check(&mut g, pushed, all_checked);
});
