//! The reassembler on its own, with small limits.
//!
//! Structure-aware: a datagram (IPv4 or IPv6 ESP) is cut at arbitrary
//! 8-byte boundaries, its fragments are delivered in an arbitrary order
//! with exact duplicates, interleaved with arbitrary other fragments
//! (other identifications: they may overlap, time out or be evicted).
//! The datagram must come out exactly once and unchanged unless it was
//! evicted; memory stays within the limits; nothing is left after a flush.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{Counters, DropReason};
use tunsec::packet;
use tunsec::reassembly::{self, Limits, Outcome, Reassembler};

#[derive(Arbitrary, Debug)]
enum Step {
    /// The next fragment of the datagram (or again one already sent).
    Next,
    Again(u8),
    /// Some other fragment: raw bytes after an IP header of the same
    /// addresses, with a fragment header or offset of its own.
    Other {
        id: u8,
        offset: u16,
        more: bool,
        data: Vec<u8>,
    },
    Wait(u16),
}

fn header(v6: bool) -> Vec<u8> {
    let mut h = if v6 {
        vec![0x60, 0, 0, 0, 0, 0, packet::PROTO_ESP, 64]
    } else {
        vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, packet::PROTO_ESP, 0, 0]
    };
    let n = if v6 { 16 } else { 4 };
    h.extend(std::iter::repeat_n(0xaa, n));
    h.extend(std::iter::repeat_n(0xbb, n));
    h
}

fn other(v6: bool, id: u8, offset: u16, more: bool, data: &[u8]) -> Vec<u8> {
    let mut f = header(v6);
    if v6 {
        f[6] = packet::PROTO_FRAGMENT;
        f.extend_from_slice(&[packet::PROTO_ESP, 0]);
        f.extend_from_slice(&((offset & 0xfff8) | more as u16).to_be_bytes());
        f.extend_from_slice(&(id as u32 + 1000).to_be_bytes());
    } else {
        f[4..6].copy_from_slice(&(id as u16 + 1000).to_be_bytes());
        let fo = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
        f[6..8].copy_from_slice(&fo.to_be_bytes());
    }
    f.extend_from_slice(data);
    packet::fix_lengths(&mut f);
    f
}

fn run(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let v6: bool = u.arbitrary()?;
    let len = u.int_in_range(1..=4000usize)?;
    let mut whole = header(v6);
    whole.extend((0..len).map(|i| (i * 31 + 7) as u8));
    packet::fix_lengths(&mut whole);
    let size = u.int_in_range(1..=200usize)? * 8;
    let frags = reassembly::fragment(&whole, size, 7).expect("a whole ESP packet without DF");
    let limits = Limits {
        max_datagrams: u.int_in_range(1..=4)?,
        max_bytes: u.int_in_range(0..=16384)?,
        max_fragments: u.int_in_range(1..=64)?,
        timeout_v4: Duration::from_secs(30),
        timeout_v6: Duration::from_secs(60),
    };
    let mut r = Reassembler::new(limits);
    let mut c = Counters::default();
    let mut buf = PacketBuf::new();
    let mut now = Duration::ZERO;
    let mut next = 0;
    // A single IPv4 "fragment" is no fragment at all.
    let mut done = usize::from(!v6 && frags.len() == 1);
    let mut interfered = false;
    let mut redelivered = false;
    let steps: Vec<Step> = u.arbitrary()?;
    for s in steps
        .iter()
        .chain(std::iter::repeat_n(&Step::Next, frags.len()))
    {
        let pkt = match s {
            Step::Next if next < frags.len() => {
                next += 1;
                frags[next - 1].clone()
            }
            Step::Next => continue,
            Step::Again(i) if next > 0 => {
                // After the datagram came out, a copy starts a new one
                // (and an atomic fragment comes out again).
                redelivered |= done > 0;
                frags[*i as usize % next].clone()
            }
            Step::Again(_) => continue,
            Step::Other {
                id,
                offset,
                more,
                data,
            } => {
                interfered = true;
                other(v6, *id, *offset, *more, data)
            }
            Step::Wait(ms) => {
                now += Duration::from_millis(*ms as u64);
                if now >= limits.timeout_v4 {
                    interfered = true;
                }
                continue;
            }
        };
        assert!(buf.load(&pkt));
        let info = packet::parse(&pkt).expect("well-formed fragments");
        if !(info.fragment && reassembly::wanted(&pkt, &info)) {
            continue;
        }
        let o = r.push(&mut buf, &info, now, &mut c);
        assert!(r.in_progress() <= limits.max_datagrams);
        assert!(
            r.bytes() <= limits.max_bytes,
            "{} > {}",
            r.bytes(),
            limits.max_bytes
        );
        if o == Outcome::Complete {
            if buf.data() == whole {
                done += 1;
            } else if !v6 {
                // IPv4 keeps the identification: ours must come out intact
                assert_ne!(&buf.data()[4..6], &whole[4..6], "reassembled wrong");
            }
        }
    }
    let lost = c.drop_count(DropReason::FragLimit) > 0
        || c.drop_count(DropReason::FragIncomplete) > 0
        || c.drop_count(DropReason::FragOverlap) > 0;
    if !interfered && !lost {
        if redelivered {
            assert!(done >= 1, "the datagram comes out: {c:?}");
        } else {
            assert_eq!(done, 1, "the datagram comes out once: {c:?}");
        }
    }
    assert!(done <= 1 || interfered || redelivered);
    r.flush(&mut c);
    assert_eq!((r.in_progress(), r.bytes()), (0, 0));
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(data);
});
