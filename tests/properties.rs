//! Property tests: whatever the packet and bundle, what one host protects
//! its peer restores byte for byte; and no input makes the engine panic.

use proptest::prelude::*;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, DropReason, Verdict, Worker};
use tunsec::packet::fix_lengths;
use tunsec::state::State;

const A4: &str = "10.9.0.1";
const B4: &str = "10.9.0.2";
const A6: &str = "fd00:9::1";
const B6: &str = "fd00:9::2";

/// Algorithm parts of `add` lines for one bundle, innermost first.
const BUNDLES: &[&[(&str, &str)]] = &[
    &[(
        "esp",
        "-E aes-cbc 0x000102030405060708090a0b0c0d0e0f -A hmac-sha1 0x000102030405060708090a0b0c0d0e0f10111213",
    )],
    &[(
        "esp",
        "-E aes-cbc 0x000102030405060708090a0b0c0d0e0f1011121314151617 -A hmac-sha384 0x{48}",
    )],
    &[("esp", "-E aes-gcm-16 0x{36}")],
    &[("esp", "-f esn -E chacha20-poly1305 0x{36}")],
    &[("esp", "-E null -A hmac-sha256 0x{32}")],
    &[("ah", "-A hmac-sha512 0x{64}")],
    &[
        ("esp", "-E aes-cbc 0x{16} -A hmac-sha256 0x{32}"),
        ("ah", "-f esn -A hmac-sha256 0x{32}"),
    ],
    &[
        ("ipcomp", "-C deflate"),
        ("esp", "-E aes-gcm-16 0x{20}"),
        ("ah", "-A hmac-sha1 0x{20}"),
    ],
];

fn key(n: usize) -> String {
    (0..n)
        .map(|i| format!("{:02x}", (i * 7 + 3) as u8))
        .collect()
}

fn config(bundle: &[(&str, &str)]) -> String {
    let mut s = String::new();
    let mut rules = vec![];
    for (i, (proto, algs)) in bundle.iter().enumerate() {
        let mut algs = algs.to_string();
        for n in [16, 20, 32, 36, 48, 64] {
            algs = algs.replace(&format!("{{{n}}}"), &key(n));
        }
        for (src, dst) in [(A4, B4), (A6, B6)] {
            s += &format!("add {src} {dst} {proto} {:#x} -r 128 {algs};\n", 0x100 + i);
        }
        rules.push(format!("{proto}/transport//require"));
    }
    let rules = rules.join(" ");
    for (src, dst) in [(A4, B4), (A6, B6)] {
        s += &format!("spdadd {src} {dst} any -P out ipsec {rules};\n");
        s += &format!("spdadd {src} {dst} any -P in ipsec {rules};\n");
    }
    s
}

fn packet(v6: bool, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = if v6 {
        let mut h = vec![0x60, 0x01, 0x23, 0x45, 0, 0, proto, 64];
        h.extend_from_slice(&A6.parse::<std::net::Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&B6.parse::<std::net::Ipv6Addr>().unwrap().octets());
        h
    } else {
        let mut h = vec![0x45, 0x08, 0, 0, 0xbe, 0xef, 0x40, 0, 17, proto, 0, 0];
        h.extend_from_slice(&A4.parse::<std::net::Ipv4Addr>().unwrap().octets());
        h.extend_from_slice(&B4.parse::<std::net::Ipv4Addr>().unwrap().octets());
        h
    };
    p.extend_from_slice(payload);
    fix_lengths(&mut p);
    p
}

/// Bundles without an integrity check (ESP with `-A null`, IPComp alone):
/// a changed packet gets past the SA lookup and the ICV to the padding,
/// next-header and inflate checks.
const OPEN_BUNDLES: &[&[(&str, &str)]] = &[
    &[("esp", "-E aes-cbc 0x{16} -A null")],
    &[("ipcomp", "-C deflate")],
    &[
        ("ipcomp", "-C deflate"),
        ("esp", "-E aes-cbc 0x{32} -A null"),
    ],
];

/// Every bundle: the integrity-protected ones, then the open ones.
fn any_bundle(i: usize) -> &'static [(&'static str, &'static str)] {
    if i < BUNDLES.len() {
        BUNDLES[i]
    } else {
        OPEN_BUNDLES[i - BUNDLES.len()]
    }
}

const ALL_BUNDLES: usize = BUNDLES.len() + OPEN_BUNDLES.len();

/// A change to a sealed packet, past its IP header (the IPsec headers,
/// the ciphertext, the ICV, the compressed data).
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte (at an index taken modulo the length past the header).
    Xor(usize, u8),
    /// Cut the packet to this many bytes past the header.
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Set the byte at this offset into the first IPsec header (for AH:
    /// 1 is the payload length, 0 the next header).
    Header(usize, u8),
    /// Change one of the last 40 bytes (ESP padding, pad length, next
    /// header, ICV; the end of the compressed data).
    Tail(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Xor(i, x)),
        1 => (0usize..64).prop_map(Mutation::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        2 => (0usize..12, any::<u8>()).prop_map(|(i, x)| Mutation::Header(i, x)),
        2 => (0usize..40, 1u8..=255).prop_map(|(i, x)| Mutation::Tail(i, x)),
    ]
}

fn mutate(wire: &mut Vec<u8>, hdr: usize, m: &Mutation) {
    let body = wire.len() - hdr;
    match m {
        Mutation::Xor(i, x) if body > 0 => wire[hdr + i % body] ^= x,
        Mutation::Truncate(n) => wire.truncate(hdr + n.min(&body)),
        Mutation::Extend(b) => wire.extend_from_slice(b),
        Mutation::Header(i, x) if *i < body => wire[hdr + i] = *x,
        Mutation::Tail(i, x) if *i < body => {
            let k = wire.len() - 1 - i;
            wire[k] ^= x
        }
        _ => {}
    }
}

/// Seal `p` at A, change it, hand it to B: B must not panic, and what it
/// forwards is an IP packet. The verdict, for the coverage test.
fn seal_mutate_open(
    a: &State,
    b: &State,
    wa: &mut Worker,
    wb: &mut Worker,
    p: &[u8],
    ms: &[Mutation],
    fix: bool,
) -> Option<Verdict> {
    let mut buf = PacketBuf::new();
    buf.load(p);
    if engine::outbound(a, wa, &mut buf, Duration::ZERO) != Verdict::Forward {
        return None;
    }
    let hdr = if p[0] >> 4 == 6 { 40 } else { 20 };
    let mut wire = buf.data().to_vec();
    for m in ms {
        mutate(&mut wire, hdr, m);
    }
    if fix {
        // Lengths that agree with the packet: the change reaches the
        // transforms instead of the IP parser.
        fix_lengths(&mut wire);
    }
    buf.load(&wire);
    let v = engine::inbound(b, wb, &mut buf, Duration::ZERO);
    if v == Verdict::Forward {
        assert!(
            tunsec::packet::parse(buf.data()).is_ok(),
            "forwarded something that is not an IP packet"
        );
    }
    Some(v)
}

fn payload_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2000),
        // text-like, so that IPComp kicks in
        (0usize..3000).prop_map(|n| b"lorem ipsum dolor sit amet "
            .iter()
            .cycle()
            .take(n)
            .cloned()
            .collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn out_then_in_restores_the_packet(
        bundle in 0..BUNDLES.len(),
        v6 in any::<bool>(),
        proto in prop_oneof![Just(6u8), Just(17u8), Just(132u8), Just(47u8)],
        payloads in proptest::collection::vec(payload_strategy(), 1..6),
    ) {
        let text = config(BUNDLES[bundle]);
        let (a, _, _) = State::default().apply_text(&text, "a", Duration::ZERO).unwrap();
        let (b, _, _) = State::default().apply_text(&text, "b", Duration::ZERO).unwrap();
        let mut wa = Worker::new([5; 32]);
        let mut wb = Worker::new([6; 32]);
        let mut buf = PacketBuf::new();
        for payload in &payloads {
            let p = packet(v6, proto, payload);
            buf.load(&p);
            prop_assert_eq!(engine::outbound(&a, &mut wa, &mut buf, Duration::ZERO), Verdict::Forward);
            prop_assert!(buf.data() != &p[..]);
            let wire = buf.data().to_vec();
            prop_assert_eq!(engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO), Verdict::Forward);
            prop_assert_eq!(buf.data(), &p[..]);
            // the same packet again is a replay
            buf.load(&wire);
            prop_assert!(matches!(engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO), Verdict::Drop(_)));
        }
    }

    #[test]
    fn garbage_never_panics(
        bundle in 0..BUNDLES.len(),
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        v6 in any::<bool>(),
        proto in prop_oneof![Just(50u8), Just(51u8), Just(108u8), any::<u8>()],
    ) {
        let text = config(BUNDLES[bundle]);
        let (s, _, _) = State::default().apply_text(&text, "s", Duration::ZERO).unwrap();
        let mut w = Worker::new([7; 32]);
        let mut buf = PacketBuf::new();
        // raw bytes, and the same bytes behind a valid IP header
        for p in [bytes.clone(), packet(v6, proto, &bytes)] {
            buf.load(&p);
            let _ = engine::inbound(&s, &mut w, &mut buf, Duration::ZERO);
            buf.load(&p);
            let _ = engine::outbound(&s, &mut w, &mut buf, Duration::ZERO);
        }
    }

    #[test]
    fn changed_sealed_packets_never_panic(
        bundle in 0..ALL_BUNDLES,
        v6 in any::<bool>(),
        payloads in proptest::collection::vec(
            (payload_strategy(), proptest::collection::vec(mutation(), 1..4), any::<bool>()),
            1..6,
        ),
    ) {
        // Sealed with the receiver's own SAs (valid SPIs, sequence numbers
        // and, unless a mutation breaks them, lengths), then changed.
        let text = config(any_bundle(bundle));
        let (a, _, _) = State::default().apply_text(&text, "a", Duration::ZERO).unwrap();
        let (b, _, _) = State::default().apply_text(&text, "b", Duration::ZERO).unwrap();
        let mut wa = Worker::new([8; 32]);
        let mut wb = Worker::new([9; 32]);
        for (payload, ms, fix) in &payloads {
            let p = packet(v6, 17, payload);
            seal_mutate_open(&a, &b, &mut wa, &mut wb, &p, ms, *fix);
        }
    }

    #[test]
    fn flipping_any_bit_of_a_protected_packet_is_caught(
        bundle in 0..BUNDLES.len(),
        v6 in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..600),
        bit in any::<proptest::sample::Index>(),
    ) {
        let text = config(BUNDLES[bundle]);
        let (a, _, _) = State::default().apply_text(&text, "a", Duration::ZERO).unwrap();
        let (b, _, _) = State::default().apply_text(&text, "b", Duration::ZERO).unwrap();
        let mut wa = Worker::new([1; 32]);
        let mut wb = Worker::new([2; 32]);
        let mut buf = PacketBuf::new();
        let p = packet(v6, 17, &payload);
        buf.load(&p);
        prop_assert_eq!(engine::outbound(&a, &mut wa, &mut buf, Duration::ZERO), Verdict::Forward);
        let mut wire = buf.data().to_vec();
        // Flip a bit past the IP header (whose mutable fields AH ignores
        // and whose other fields are checked by AH only).
        let hdr = if v6 { 40 } else { 20 };
        let i = hdr + bit.index(wire.len() - hdr);
        wire[i] ^= 1 << (i % 8);
        buf.load(&wire);
        prop_assert!(matches!(engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO), Verdict::Drop(_)));
    }
}

/// The changed packets of `changed_sealed_packets_never_panic` get past
/// the SPI lookup: over a fixed set of changes, each check behind it
/// (ICV, padding, AH header length, inflate, replay window) drops some.
/// Random bytes, as `garbage_never_panics` feeds, reach almost none.
#[test]
fn changed_sealed_packets_reach_every_inbound_check() {
    // (outermost protocol, drop reason) -> packets
    let mut seen = std::collections::BTreeMap::<(&str, &str), usize>::new();
    let text_payload: Vec<u8> = b"lorem ipsum dolor sit amet "
        .iter()
        .cycle()
        .take(600)
        .cloned()
        .collect();
    for bundle in 0..ALL_BUNDLES {
        for v6 in [false, true] {
            let text = config(any_bundle(bundle));
            let (a, _, _) = State::default()
                .apply_text(&text, "a", Duration::ZERO)
                .unwrap();
            let (b, _, _) = State::default()
                .apply_text(&text, "b", Duration::ZERO)
                .unwrap();
            let mut wa = Worker::new([8; 32]);
            let mut wb = Worker::new([9; 32]);
            let p = packet(v6, 17, &text_payload);
            let mut changes: Vec<Vec<Mutation>> = Vec::new();
            for i in 0..40 {
                changes.push(vec![Mutation::Tail(i, 0x5a)]);
                changes.push(vec![Mutation::Xor(i * 7 + 3, 0x80)]);
            }
            for i in 0..12 {
                changes.push(vec![Mutation::Header(i, 0xff)]);
                changes.push(vec![Mutation::Header(i, 1)]);
            }
            for n in [0, 3, 8, 15, 30, 63] {
                changes.push(vec![Mutation::Truncate(n)]);
            }
            for ms in &changes {
                for fix in [true, false] {
                    if let Some(Verdict::Drop(r)) =
                        seal_mutate_open(&a, &b, &mut wa, &mut wb, &p, ms, fix)
                    {
                        let outer = any_bundle(bundle).last().unwrap().0;
                        *seen.entry((outer, r.name())).or_default() += 1;
                    }
                }
            }
        }
    }
    for (outer, r) in [
        ("esp", DropReason::IcvFailure),
        ("esp", DropReason::BadPadding),
        ("esp", DropReason::Malformed),
        ("esp", DropReason::ReplayOld),
        ("ah", DropReason::IcvFailure),
        ("ah", DropReason::Malformed), // the AH header length check
        ("ah", DropReason::ReplayOld),
        ("ipcomp", DropReason::Decompress),
    ] {
        assert!(
            seen.contains_key(&(outer, r.name())),
            "no {outer} packet reached {}: {seen:?}",
            r.name()
        );
    }
    // Most changes are caught by a check behind the SPI lookup, not by it.
    let total: usize = seen.values().sum();
    let unknown: usize = seen
        .iter()
        .filter(|((_, r), _)| *r == "unknown-spi")
        .map(|(_, n)| n)
        .sum();
    assert!(unknown * 4 < total, "{seen:?}");
}

mod spd_index {
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};
    use tunsec::spd::{Action, Dir, Flow, Prefix, Selector, Spd};

    /// Addresses from a small pool, so that selectors and flows meet.
    fn addr(i: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, i / 4, i % 4))
    }

    fn prefix() -> impl Strategy<Value = Prefix> {
        (
            0u8..16,
            prop_oneof![Just(32u8), Just(32), Just(30), Just(24), Just(0)],
        )
            .prop_map(|(a, l)| Prefix::new(addr(a), l).unwrap())
    }

    fn selector() -> impl Strategy<Value = Selector> {
        (
            prefix(),
            prefix(),
            prop::option::of(prop_oneof![Just(6u8), Just(17), Just(1)]),
            prop::option::of(0u16..3),
            prop::option::of(0u16..3),
        )
            .prop_map(|(src, dst, proto, sport, dport)| Selector {
                src,
                dst,
                proto,
                sport: proto.and(sport),
                dport: proto.and(dport),
            })
    }

    fn dir() -> impl Strategy<Value = Dir> {
        prop_oneof![Just(Dir::In), Just(Dir::Out), Just(Dir::Fwd)]
    }

    fn flow() -> impl Strategy<Value = Flow> {
        (
            0u8..16,
            0u8..16,
            prop_oneof![Just(6u8), Just(17), Just(1), Just(50)],
            0u16..3,
            0u16..3,
        )
            .prop_map(|(s, d, proto, a, b)| Flow {
                src: addr(s),
                dst: addr(d),
                proto,
                ports: (proto != 50).then_some((a, b)),
            })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(Dir, Selector, u32),
        Update(Dir, Selector, u32),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (dir(), selector(), 0u32..4).prop_map(|(d, s, p)| Op::Add(d, s, p)),
            1 => (dir(), selector(), 0u32..4).prop_map(|(d, s, p)| Op::Update(d, s, p)),
            1 => (0usize..64).prop_map(Op::Delete),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The indexed lookup decides as the ordered scan over the
        /// policies in evaluation order does, after any adds, updates and
        /// deletes, and an older snapshot keeps deciding as it did.
        #[test]
        fn indexed_lookup_is_the_ordered_scan(ops in prop::collection::vec(op(), 1..60),
                                              flows in prop::collection::vec((dir(), flow()), 1..40)) {
            let mut spd = Spd::default();
            let mut snapshots = Vec::new();
            for (n, o) in ops.iter().enumerate() {
                let act = if n % 3 == 0 { Action::Bypass } else { Action::Discard };
                match o {
                    Op::Add(d, s, p) => { let _ = spd.add(*d, *s, *p, act); }
                    Op::Update(d, s, p) => { spd.update(*d, *s, *p, act); }
                    Op::Delete(i) => {
                        let victim = spd.iter().nth(*i).map(|p| (p.dir, p.selector));
                        if let Some((d, s)) = victim {
                            spd.delete(d, &s).unwrap();
                        }
                    }
                }
                if n % 10 == 0 {
                    let decided: Vec<_> = flows.iter().map(|(d, f)| spd.lookup(*d, f).map(|p| p.id)).collect();
                    snapshots.push((spd.clone(), decided));
                }
            }
            for (d, f) in &flows {
                let scan = spd.iter().find(|p| p.dir == *d && p.selector.matches(f)).map(|p| p.id);
                prop_assert_eq!(spd.lookup(*d, f).map(|p| p.id), scan, "{:?} {:?}", d, f);
            }
            for (snap, decided) in snapshots {
                let now: Vec<_> = flows.iter().map(|(d, f)| snap.lookup(*d, f).map(|p| p.id)).collect();
                prop_assert_eq!(now, decided);
            }
        }
    }
}
