//! Inbound packets against a state with every transform.
//!
//! The first byte picks the mode. Even: the rest is one raw IP packet for
//! `engine::inbound` (seeds: packets from the repository's captures).
//! Odd: structure-aware. A plaintext packet is sealed by
//! `engine::outbound` with a valid SA of one scenario (ESP GCM, CBC+HMAC,
//! ChaCha20-Poly1305, NULL+HMAC, AH, IPComp, bundles, ESN), then mutated
//! (bits flipped, bytes set, truncated, extended, replayed, fragmented),
//! so that inputs get past the SPI lookup to the ICV check, padding, AH
//! lengths, inflate and reassembly. A sealed packet delivered unchanged
//! must come back as the plaintext.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, Verdict, Worker};
use tunsec::reassembly::fragment;
use tunsec::state::State;
use tunsec_fuzz::{addresses, plaintext, scenarios, state};

#[derive(Arbitrary, Debug)]
enum Mutation {
    Flip {
        at: u16,
        mask: u8,
    },
    Set {
        at: u16,
        value: u8,
    },
    Truncate {
        len: u16,
    },
    Extend {
        bytes: Vec<u8>,
    },
    /// Deliver the previous sealed packet again.
    Replay,
    /// Deliver it in fragments of `size` bytes, in an order drawn from
    /// `order`.
    Fragment {
        size: u16,
        order: u64,
    },
    Wait {
        millis: u32,
    },
}

fn deliver(
    state: &State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    pkt: &[u8],
    now: Duration,
) -> Verdict {
    if !buf.load(pkt) {
        return Verdict::Drop(engine::DropReason::TooBig);
    }
    engine::inbound(state, w, buf, now)
}

fn structured(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    let i = u.choose_index(scenarios().len())?;
    let st = state(Some(i));
    let mut wa = Worker::new([1; 32]);
    let mut wb = Worker::new([2; 32]);
    // As a worker sharing SAs: packets of one SA in a batch are a run.
    wb.account_runs = u.arbitrary()?;
    let mut buf = PacketBuf::new();
    let mut now = Duration::ZERO;
    let mut last: Option<Vec<u8>> = None;
    let mut all: Vec<Vec<u8>> = Vec::new();
    let rounds = u.int_in_range(1..=4)?;
    for _ in 0..rounds {
        let v6: bool = u.arbitrary()?;
        let (a, b) = addresses(i, v6);
        let plain = plaintext(&mut u, a, b, 3000)?;
        assert!(buf.load(&plain));
        if engine::outbound(&st, &mut wa, &mut buf, now) != Verdict::Forward {
            continue;
        }
        let sealed = buf.data().to_vec();
        all.push(sealed.clone());
        let mutations: Vec<Mutation> = u.arbitrary()?;
        if mutations.is_empty() {
            let v = deliver(&st, &mut wb, &mut buf, &sealed, now);
            assert_eq!(v, Verdict::Forward, "a sealed packet is opened");
            assert!(buf.data() == plain, "opened as it was sealed");
            last = Some(sealed);
            continue;
        }
        let mut pkt = sealed.clone();
        for m in mutations {
            match m {
                Mutation::Flip { at, mask } => {
                    if !pkt.is_empty() {
                        let n = pkt.len();
                        pkt[at as usize % n] ^= mask;
                    }
                }
                Mutation::Set { at, value } => {
                    if !pkt.is_empty() {
                        let n = pkt.len();
                        pkt[at as usize % n] = value;
                    }
                }
                Mutation::Truncate { len } => pkt.truncate(len as usize),
                Mutation::Extend { bytes } => pkt.extend_from_slice(&bytes),
                Mutation::Replay => {
                    if let Some(l) = &last {
                        deliver(&st, &mut wb, &mut buf, l, now);
                    }
                }
                Mutation::Fragment { size, order } => {
                    // (Mutations may have left it no whole IP packet, a
                    // fragment, or DF set: nothing to split then.)
                    if let Ok(mut frags) = fragment(&pkt, size as usize, order as u32) {
                        let n = frags.len();
                        if n > 1 {
                            frags.rotate_left(order as usize % n);
                            if order & (1 << 63) != 0 {
                                frags.swap(0, n - 1);
                            }
                        }
                        for f in &frags {
                            deliver(&st, &mut wb, &mut buf, f, now);
                        }
                    }
                }
                Mutation::Wait { millis } => now += Duration::from_millis(millis as u64),
            }
        }
        deliver(&st, &mut wb, &mut buf, &pkt, now);
        last = Some(sealed);
    }
    // Everything sealed again in one batch, each packet twice (the runs'
    // replay checks): no copy is opened twice.
    let mut bufs: Vec<PacketBuf> = Vec::new();
    for p in all.iter().flat_map(|p| [p, p]) {
        let mut b = PacketBuf::new();
        if b.load(p) {
            bufs.push(b);
        }
    }
    let mut v = vec![Verdict::Forward; bufs.len()];
    engine::inbound_batch(&st, &mut wb, &mut bufs, now, &mut v);
    // (IPComp alone has no sequence numbers.)
    let numbered = scenarios()[i].sas.iter().any(|(p, _)| *p != "ipcomp");
    for pair in v.chunks(2) {
        assert!(
            !numbered || pair != [Verdict::Forward, Verdict::Forward],
            "a packet opened twice in one batch"
        );
    }
    wb.expire_fragments(now + Duration::from_secs(61));
    assert_eq!(wb.reassembly.in_progress(), 0);
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 0 => {
            let mut w = Worker::new([3; 32]);
            let mut buf = PacketBuf::new();
            deliver(tunsec_fuzz::all(), &mut w, &mut buf, rest, Duration::ZERO);
        }
        Some((_, rest)) => {
            let _ = structured(rest);
        }
        None => {}
    }
});
