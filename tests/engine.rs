//! The engine end to end through its public API: setkey text in, packets
//! through `outbound` on one host and `inbound` on its peer.

mod common;

use std::net::IpAddr;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, DropReason, Event, Verdict, Worker};
use tunsec::packet::{self, fix_lengths};
use tunsec::reassembly::fragment;
use tunsec::sad::Proto;
use tunsec::state::State;

const A4: &str = "172.17.207.12";
const B4: &str = "172.17.207.66";
const A6: &str = "2001:470:1f09:11ed::c";
const B6: &str = "2001:470:1f09:11ed::42";

fn seed_policies() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/netns/seed-linux-windows.conf"
    ))
    .unwrap()
}

fn peer_policies() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/netns/seed-windows-peer.conf"
    ))
    .unwrap()
}

const K16: &str = "0x0123456789abcdef0123456789abcdef";
const K20: &str = "0x0123456789abcdef0123456789abcdef01234567";

fn seed_sas(replay: u32) -> String {
    let mut s = String::new();
    for (src, dst, spi) in [
        (A4, B4, 0x1001),
        (B4, A4, 0x2001),
        (A6, B6, 0x1101),
        (B6, A6, 0x2101),
    ] {
        s += &format!(
            "add {src} {dst} esp {spi:#x} -r {replay} -E aes-cbc {K16} -A hmac-sha1 {K20};\n"
        );
        s += &format!(
            "add {src} {dst} ah {:#x} -r {replay} -A hmac-sha1 {K20};\n",
            spi + 0x10
        );
    }
    s
}

fn state(text: &str) -> State {
    match State::default().apply_text(text, "test.conf", Duration::ZERO) {
        Ok((s, _, _)) => s,
        Err(e) => panic!("{e}"),
    }
}

struct Pair {
    a: State,
    b: State,
    wa: Worker,
    wb: Worker,
    buf: PacketBuf,
}

impl Pair {
    fn seed(replay: u32) -> Pair {
        Pair {
            a: state(&(seed_policies() + &seed_sas(replay))),
            b: state(&(peer_policies() + &seed_sas(replay))),
            wa: Worker::new([1; 32]),
            wb: Worker::new([2; 32]),
            buf: PacketBuf::new(),
        }
    }

    fn out(&mut self, p: &[u8]) -> Result<Vec<u8>, DropReason> {
        assert!(self.buf.load(p));
        match engine::outbound(&self.a, &mut self.wa, &mut self.buf, Duration::ZERO) {
            Verdict::Forward => Ok(self.buf.data().to_vec()),
            Verdict::Pending => Err(DropReason::NoSa),
            Verdict::Held => panic!("outbound never holds a packet"),
            Verdict::Drop(r) => Err(r),
        }
    }

    fn inb(&mut self, p: &[u8]) -> Result<Vec<u8>, DropReason> {
        assert!(self.buf.load(p));
        match engine::inbound(&self.b, &mut self.wb, &mut self.buf, Duration::ZERO) {
            Verdict::Forward => Ok(self.buf.data().to_vec()),
            Verdict::Pending => panic!("inbound never leaves a packet pending"),
            Verdict::Held => panic!("not a fragment"),
            Verdict::Drop(r) => Err(r),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An IPv4 or IPv6 packet with the given protocol and payload.
fn pkt(src: &str, dst: &str, proto: u8, payload: &[u8]) -> Vec<u8> {
    common::ip_packet(ip(src), ip(dst), proto, payload)
}

fn tcp(src: &str, dst: &str, data: &[u8]) -> Vec<u8> {
    let mut t = vec![
        0x9c, 0x40, 0, 22, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x20, 0, 0, 0, 0, 0,
    ];
    t.extend_from_slice(data);
    pkt(src, dst, 6, &t)
}

fn icmp_echo(src: &str, dst: &str) -> Vec<u8> {
    if ip(src).is_ipv4() {
        pkt(
            src,
            dst,
            1,
            &[8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'],
        )
    } else {
        pkt(
            src,
            dst,
            58,
            &[128, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'],
        )
    }
}

#[test]
fn seed_icmp_passes_in_the_clear_and_tcp_gets_ah_then_esp() {
    let mut p = Pair::seed(64);
    for (s, d) in [(A4, B4), (A6, B6)] {
        let echo = icmp_echo(s, d);
        assert_eq!(p.out(&echo).unwrap(), echo, "ICMP is bypassed outbound");
        assert_eq!(
            p.inb(&echo).unwrap(),
            echo,
            "and accepted inbound in the clear"
        );

        let orig = tcp(s, d, b"TUNSEC-MARKER hello over IPsec");
        let wire = p.out(&orig).unwrap();
        let info = packet::parse(&wire).unwrap();
        assert_eq!(info.next_hdr, packet::PROTO_AH, "AH outermost");
        let ah_len = (wire[info.insert_at + 1] as usize + 2) * 4;
        assert_eq!(wire[info.insert_at], packet::PROTO_ESP, "then ESP");
        assert!(
            !wire.windows(13).any(|w| w == b"TUNSEC-MARKER"),
            "payload encrypted"
        );
        let esp_at = info.insert_at + ah_len;
        let spi = u32::from_be_bytes(wire[esp_at..esp_at + 4].try_into().unwrap());
        assert!(spi == 0x1001 || spi == 0x1101);
        assert_eq!(
            p.inb(&wire).unwrap(),
            orig,
            "peer restores the packet byte for byte"
        );
    }
}

#[test]
fn inbound_refuses_what_the_policy_does_not_allow() {
    let mut p = Pair::seed(64);
    let orig = tcp(A4, B4, b"secret");
    // plaintext where ESP+AH is required
    assert_eq!(p.inb(&orig), Err(DropReason::PlaintextRefused));
    // ESP only where ESP+AH is required: strip AH by building with an ESP-only host
    let esp_only = state(
        &(seed_sas(64) + &format!("spdadd {A4} {B4} any -P out ipsec esp/transport//require;\n")),
    );
    let mut w = Worker::new([3; 32]);
    assert!(p.buf.load(&orig));
    assert_eq!(
        engine::outbound(&esp_only, &mut w, &mut p.buf, Duration::ZERO),
        Verdict::Forward
    );
    let wire = p.buf.data().to_vec();
    assert_eq!(p.inb(&wire), Err(DropReason::PolicyMismatch));
    assert_eq!(p.wb.counters.drop_count(DropReason::PlaintextRefused), 1);
    assert_eq!(p.wb.counters.drop_count(DropReason::PolicyMismatch), 1);
}

#[test]
fn tampering_replay_and_unknown_spi_are_dropped_and_counted() {
    let mut p = Pair::seed(32);
    let orig = tcp(A4, B4, &[0x5a; 300]);
    let wires: Vec<Vec<u8>> = (0..40).map(|_| p.out(&orig).unwrap()).collect();

    // Every byte after the mutable IPv4 fields is covered by AH or ESP.
    let mut bad = wires[0].clone();
    let n = bad.len();
    bad[n - 1] ^= 1; // ESP ICV (inside AH's coverage)
    assert_eq!(p.inb(&bad), Err(DropReason::IcvFailure));
    let mut bad = wires[0].clone();
    bad[4] ^= 1; // IPv4 identification: immutable
    fix_lengths(&mut bad);
    assert_eq!(p.inb(&bad), Err(DropReason::IcvFailure));
    // Mutable fields may change in transit.
    let mut ok = wires[0].clone();
    ok[1] = 0x10; // TOS
    ok[8] = 3; // TTL
    fix_lengths(&mut ok);
    assert_eq!(p.inb(&ok).unwrap()[20..], orig[20..]);
    // replay of the same packet
    assert_eq!(p.inb(&wires[0]), Err(DropReason::Replay));
    // jump ahead, then something left of the 32-packet window
    assert!(p.inb(&wires[39]).is_ok());
    assert_eq!(p.inb(&wires[5]), Err(DropReason::ReplayOld));
    assert!(p.inb(&wires[20]).is_ok(), "inside the window and unseen");
    // unknown SPI
    let mut bad = wires[30].clone();
    bad[24..28].copy_from_slice(&0xdeadu32.to_be_bytes());
    assert_eq!(p.inb(&bad), Err(DropReason::UnknownSpi));
    let c = &p.wb.counters;
    assert_eq!(c.drop_count(DropReason::IcvFailure), 2);
    assert_eq!(c.drop_count(DropReason::Replay), 1);
    assert_eq!(c.drop_count(DropReason::ReplayOld), 1);
    assert_eq!(c.drop_count(DropReason::UnknownSpi), 1);
    let sa = p.b.sad.lookup_inbound(ip(B4), Proto::Ah, 0x1011).unwrap();
    assert_eq!(
        sa.counters
            .icv_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // truncated packets of every length never panic, and are dropped
    for cut in 0..wires[31].len() {
        let mut t = wires[31][..cut].to_vec();
        if t.len() >= 20 {
            fix_lengths(&mut t);
        }
        assert!(p.inb(&t).is_err(), "cut at {cut}");
    }
    assert!(
        p.inb(&wires[31]).is_ok(),
        "truncations did not move the window"
    );
}

#[test]
fn missing_sa_raises_acquire_and_use_skips() {
    let text = format!(
        "spdadd {A4} {B4} tcp -P out ipsec esp/transport//require;\n\
         spdadd {A4} {B4} udp -P out ipsec ipcomp/transport//use esp/transport//use ah/transport//unique:9;\n\
         add {A4} {B4} ah 0x300 -u 8 -A hmac-sha1 {K20};\n\
         add {A4} {B4} ah 0x301 -u 9 -A hmac-sha1 {K20};\n\
         add {A4} {B4} ah 0x302 -u 8 -A hmac-sha1 {K20};\n"
    );
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let held = tcp(A4, B4, b"x");
    buf.load(&held);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Pending
    );
    // Nothing counted and the packet untouched: the shell may hold it and
    // try again, or give up, which counts the drop.
    assert_eq!(buf.data(), held);
    assert_eq!(w.counters.total_drops(), 0);
    assert_eq!(w.give_up(), Verdict::Drop(DropReason::NoSa));
    assert_eq!(w.counters.drop_count(DropReason::NoSa), 1);
    assert!(matches!(
        w.events[0],
        Event::Acquire {
            proto: Proto::Esp,
            reqid: None,
            ..
        }
    ));
    // udp: ipcomp and esp are `use` and absent, AH must be the reqid-9 SA
    buf.load(&pkt(A4, B4, 17, &[0, 1, 0, 2, 0, 9, 0, 0, 1]));
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let d = buf.data();
    assert_eq!(d[9], packet::PROTO_AH);
    assert_eq!(&d[24..28], &0x301u32.to_be_bytes());
    assert_eq!(d[20], 17, "AH carries UDP directly");
}

#[test]
fn lifetimes_expire_soft_then_hard() {
    let text = format!(
        "add {A4} {B4} esp 0x500 -bs 1000 -bh 2000 -ls 30 -E aes-cbc {K16} -A hmac-sha1 {K20};\n\
         spdadd {A4} {B4} any -P out ipsec esp/transport//require;\n"
    );
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let p = tcp(A4, B4, &[0; 460]); // 500 bytes
    let mut verdicts = vec![];
    for _ in 0..5 {
        buf.load(&p);
        verdicts.push(engine::outbound(&a, &mut w, &mut buf, Duration::ZERO));
    }
    assert_eq!(verdicts[..3], [Verdict::Forward; 3]);
    // The packet that crosses the hard limit is dropped; after it the SA is
    // gone from the outbound lookup, so the next packet asks for a new one.
    assert_eq!(
        verdicts[3..],
        [Verdict::Drop(DropReason::SaExpired), Verdict::Pending]
    );
    assert_eq!(w.events.len(), 3, "{:?}", w.events);
    assert!(matches!(w.events[0], Event::SoftExpire(id) if id.spi == 0x500));
    assert!(matches!(w.events[1], Event::HardExpire(id) if id.spi == 0x500));
    assert!(matches!(
        w.events[2],
        Event::Acquire {
            proto: Proto::Esp,
            ..
        }
    ));

    // time: soft after 30 s, without traffic too
    let text =
        format!("add {A4} {B4} esp 0x501 -ls 30 -lh 60 -E aes-cbc {K16} -A hmac-sha1 {K20};\n");
    let a = state(&text);
    let sa = a.sad.lookup_inbound(ip(B4), Proto::Esp, 0x501).unwrap();
    assert_eq!(
        sa.expiry(Duration::from_secs(29)).0,
        tunsec::sad::Expiry::Alive
    );
    assert_eq!(
        sa.expiry(Duration::from_secs(30)).0,
        tunsec::sad::Expiry::Soft
    );
    assert_eq!(
        sa.expiry(Duration::from_secs(60)).0,
        tunsec::sad::Expiry::Hard
    );
}

#[test]
fn sequence_exhaustion_expires_the_sa_and_esn_crosses_2_pow_32() {
    let text = |flags: &str| {
        format!(
            "add {A4} {B4} esp 0x600 -r 64 {flags} -E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213;\n\
             spdadd {A4} {B4} any -P out ipsec esp/transport//require;\n\
             spdadd {A4} {B4} any -P in ipsec esp/transport//require;\n"
        )
    };
    let a = state(&text(""));
    let sa = a.sad.lookup_inbound(ip(B4), Proto::Esp, 0x600).unwrap();
    sa.set_last_seq(u32::MAX as u64 - 1);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let p = tcp(A4, B4, b"last");
    buf.load(&p);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    buf.load(&p);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::SeqExhausted)
    );
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, Event::HardExpire(id) if id.spi == 0x600))
    );

    // With ESN the same SA goes on past 2^32, and the peer follows.
    let a = state(&text("-f esn"));
    let b = state(&text("-f esn"));
    a.sad
        .lookup_inbound(ip(B4), Proto::Esp, 0x600)
        .unwrap()
        .set_last_seq(u32::MAX as u64 - 2);
    let bsa = b.sad.lookup_inbound(ip(B4), Proto::Esp, 0x600).unwrap();
    bsa.replay_accept(u32::MAX as u64 - 10).unwrap();
    let mut wb = Worker::new([0; 32]);
    for i in 0..5 {
        buf.load(&p);
        assert_eq!(
            engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
            Verdict::Forward,
            "out {i}"
        );
        assert_eq!(
            engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO),
            Verdict::Forward,
            "in {i}"
        );
        assert_eq!(buf.data(), &p[..]);
    }
    assert_eq!(bsa.replay.lock().unwrap().top(), (1u64 << 32) + 2);
}

#[test]
fn ipcomp_compresses_only_when_it_pays() {
    let text = format!(
        "add {A4} {B4} ipcomp 0x4000 -C deflate;\n\
         add {A4} {B4} esp 0x700 -r 64 -E aes-cbc {K16} -A hmac-sha256 0x{k};\n\
         spdadd {A4} {B4} any -P out ipsec ipcomp/transport//use esp/transport//require;\n\
         spdadd {A4} {B4} any -P in ipsec ipcomp/transport//use esp/transport//require;\n",
        k = "ab".repeat(32)
    );
    let a = state(&text);
    let b = state(&text);
    let mut wa = Worker::new([0; 32]);
    let mut wb = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let text_payload: Vec<u8> = b"all work and no play makes jack a dull boy. "
        .iter()
        .cycle()
        .take(1200)
        .cloned()
        .collect();
    let mut noise = vec![0u8; 1200];
    let mut x = 1u32;
    for b in noise.iter_mut() {
        x = x.wrapping_mul(1664525).wrapping_add(1013904223);
        *b = (x >> 24) as u8;
    }
    for (payload, compressed) in [
        (&text_payload[..], true),
        (&noise[..], false),
        (&text_payload[..40], false),
    ] {
        let p = tcp(A4, B4, payload);
        buf.load(&p);
        assert_eq!(
            engine::outbound(&a, &mut wa, &mut buf, Duration::ZERO),
            Verdict::Forward
        );
        if compressed {
            assert!(buf.len() < p.len() / 2, "{} -> {}", p.len(), buf.len());
        } else {
            assert!(buf.len() > p.len());
        }
        assert_eq!(
            engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO),
            Verdict::Forward
        );
        assert_eq!(buf.data(), &p[..]);
    }
}

#[test]
fn ipcomp_pauses_on_incompressible_data_and_resumes_on_text() {
    // RFC 3173 section 2.1: after ADAPT_FAILS payloads that do not shrink,
    // the next ADAPT_MIN_SKIP go without a try (then twice as many), and
    // every packet still opens on the peer; the first shrinking payload
    // after a pause ends the backoff.
    use tunsec::ipcomp::{ADAPT_FAILS, ADAPT_MIN_SKIP};
    let text = format!(
        "add {A4} {B4} ipcomp 0x4000 -C deflate;\n\
         spdadd {A4} {B4} any -P out ipsec ipcomp/transport//use;\n\
         spdadd {A4} {B4} any -P in ipsec ipcomp/transport//use;\n"
    );
    let (a, b) = (state(&text), state(&text));
    let (mut wa, mut wb) = (Worker::new([0; 32]), Worker::new([0; 32]));
    let mut buf = PacketBuf::new();
    let mut x = 7u32;
    let mut noise = || -> Vec<u8> {
        (0..1200)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 24) as u8
            })
            .collect()
    };
    let words: Vec<u8> = b"all work and no play makes jack a dull boy. "
        .iter()
        .cycle()
        .take(1200)
        .cloned()
        .collect();
    let deflate_runs = |w: &Worker| w.compression_tries();
    let mut send = |payload: &[u8], wa: &mut Worker| -> bool {
        let p = tcp(A4, B4, payload);
        buf.load(&p);
        assert_eq!(
            engine::outbound(&a, wa, &mut buf, Duration::ZERO),
            Verdict::Forward
        );
        let compressed = buf.data()[9] == 108;
        assert_eq!(
            engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO),
            Verdict::Forward
        );
        assert_eq!(buf.data(), &p[..]);
        compressed
    };
    for _ in 0..ADAPT_FAILS {
        assert!(!send(&noise(), &mut wa));
    }
    let runs = deflate_runs(&wa);
    // The pause: text too goes uncompressed, and DEFLATE does not run.
    for _ in 0..ADAPT_MIN_SKIP {
        assert!(!send(&words, &mut wa));
    }
    assert_eq!(deflate_runs(&wa), runs);
    // Tries again: text shrinks, and the backoff starts over.
    assert!(send(&words, &mut wa));
    for _ in 0..ADAPT_FAILS {
        assert!(!send(&noise(), &mut wa));
    }
    let runs = deflate_runs(&wa);
    for _ in 0..ADAPT_MIN_SKIP {
        send(&noise(), &mut wa);
    }
    assert_eq!(
        deflate_runs(&wa),
        runs,
        "a second pause after a success is again the shortest"
    );
    // Still incompressible: the next pause is twice as long.
    for _ in 0..ADAPT_FAILS {
        send(&noise(), &mut wa);
    }
    let runs = deflate_runs(&wa);
    for _ in 0..2 * ADAPT_MIN_SKIP {
        send(&noise(), &mut wa);
    }
    assert_eq!(deflate_runs(&wa), runs);
    send(&noise(), &mut wa);
    assert_eq!(deflate_runs(&wa), runs + 1);
}

#[test]
fn ipcomp_rejects_corrupt_data_and_bombs() {
    let text = format!(
        "add {A4} {B4} ipcomp 0x4000 -C deflate;\n\
         spdadd {A4} {B4} any -P in ipsec ipcomp/transport//use;\n"
    );
    let b = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    // 200 KB of zeros deflated: far beyond any IP packet
    let mut c = flate2::Compress::new(flate2::Compression::best(), false);
    let mut bomb = Vec::with_capacity(4096);
    c.compress_vec(
        &vec![0u8; 200_000],
        &mut bomb,
        flate2::FlushCompress::Finish,
    )
    .unwrap();
    let mut ipc = vec![6, 0, 0, 2];
    ipc.extend_from_slice(&bomb);
    buf.load(&pkt(A4, B4, 108, &ipc));
    assert_eq!(
        engine::inbound(&b, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::TooBig)
    );
    buf.load(&pkt(A4, B4, 108, &[6, 0, 0, 2, 0xff, 0xfe, 0x00, 0x13]));
    assert_eq!(
        engine::inbound(&b, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::Decompress)
    );
    buf.load(&pkt(A4, B4, 108, &[6, 0, 0, 3, 0x03, 0x00]));
    assert_eq!(
        engine::inbound(&b, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::UnknownSpi)
    );
}

#[test]
fn ah_over_ipv4_options_and_ipv6_extension_headers() {
    let text = format!(
        "add {A4} {B4} ah 0x800 -r 64 -A hmac-sha256 0x{k};\n\
         add {A6} {B6} ah 0x801 -r 64 -A hmac-sha256 0x{k};\n\
         spdadd {A4} {B4} any -P out ipsec ah/transport//require;\n\
         spdadd {A6} {B6} any -P out ipsec ah/transport//require;\n\
         spdadd {A4} {B4} any -P in ipsec ah/transport//require;\n\
         spdadd {A6} {B6} any -P in ipsec ah/transport//require;\n",
        k = "cd".repeat(32)
    );
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();

    // IPv4 with Router Alert (immutable) and a Timestamp option (mutable).
    let mut p = vec![0x48, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(
        &ip(A4)
            .to_string()
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets(),
    );
    p.extend_from_slice(
        &ip(B4)
            .to_string()
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets(),
    );
    p.extend_from_slice(&[148, 4, 0, 0, 68, 8, 5, 0, 0, 0, 0, 0]);
    p.extend_from_slice(&[0x12, 0x34, 0, 53, 0, 12, 0, 0, 1, 2, 3, 4]);
    fix_lengths(&mut p);
    buf.load(&p);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let mut wire = buf.data().to_vec();
    assert_eq!(wire[9], packet::PROTO_AH);
    assert_eq!(&wire[20..32], &p[20..32], "options stay in the IP header");
    // a router fills in the timestamp and decrements TTL: still valid
    wire[28..32].copy_from_slice(&[1, 2, 3, 4]);
    wire[26] = 9;
    wire[8] = 60;
    fix_lengths(&mut wire);
    // but the router alert value is immutable
    let mut bad = wire.clone();
    bad[23] = 1;
    fix_lengths(&mut bad);
    buf.load(&bad);
    assert_eq!(
        engine::inbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::IcvFailure)
    );
    buf.load(&wire);
    assert_eq!(
        engine::inbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    assert_eq!(&buf.data()[32..], &p[32..]);

    // IPv6: hop-by-hop (router alert, an option that may change en route,
    // padding), then destination options, then UDP.
    let hbh = [60u8, 1, 5, 2, 0, 0, 0x3e, 2, 0xaa, 0xbb, 1, 4, 0, 0, 0, 0];
    let dst = [17u8, 0, 0x1e, 2, 0xaa, 0xbb, 1, 0];
    let udp = [0x12, 0x34, 0, 53, 0, 12, 0, 0, 9, 8, 7, 6];
    let p6 = pkt(A6, B6, 0, &[&hbh[..], &dst[..], &udp[..]].concat());
    buf.load(&p6);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let mut wire = buf.data().to_vec();
    assert_eq!(wire[40], packet::PROTO_AH, "hop-by-hop now points at AH");
    assert_eq!(wire[56], 60, "AH carries the destination options");
    let ah_len = (wire[57] as usize + 2) * 4;
    assert_eq!(ah_len, 32, "12 + 16-byte ICV, padded to 8 bytes for IPv6");
    // Destination options after AH are payload: a change there is caught.
    let mut bad = wire.clone();
    bad[56 + ah_len + 4] ^= 1;
    buf.load(&bad);
    assert_eq!(
        engine::inbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::IcvFailure)
    );
    // The mutable hop-by-hop option changes in transit, and so do the
    // traffic class, flow label and hop limit.
    wire[48] = 0x11;
    wire[1] = 0x77;
    wire[3] = 0x77;
    wire[7] = 1;
    buf.load(&wire);
    assert_eq!(
        engine::inbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let back = buf.data();
    assert_eq!(back.len(), p6.len());
    assert_eq!(&back[56..], &p6[56..]);
    assert_eq!(&back[8..48], &p6[8..48]);
}

#[test]
fn ipv6_routing_header_selects_on_the_final_destination() {
    // As Linux does: a packet to a first hop R with a type 0 routing
    // header ending at B is protected by the A -> B policy and SA, and the
    // A -> R policy does not apply to it.
    const R6: &str = "2001:db8:77::1";
    let text = format!(
        "add {A6} {B6} ah 0x900 -r 64 -A hmac-sha256 0x{k};\n\
         spdadd {A6} {B6} any -P out ipsec ah/transport//require;\n\
         spdadd {A6} {R6} any -P out discard;\n",
        k = "ab".repeat(32)
    );
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let mut rh = vec![17u8, 2, 0, 1, 0, 0, 0, 0];
    rh.extend_from_slice(
        &ip(B6)
            .to_string()
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    rh.extend_from_slice(&[0x12, 0x34, 0, 53, 0, 8, 0, 0]);
    let p = pkt(A6, R6, packet::PROTO_ROUTING, &rh);
    buf.load(&p);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let d = buf.data();
    assert_eq!(&d[24..40], &p[24..40], "still sent to the first hop");
    assert_eq!(d[40], packet::PROTO_AH, "AH after the routing header");
    assert_eq!(&d[40 + 24 + 4..40 + 24 + 8], &0x900u32.to_be_bytes());
    // Without a routing header, the same destination hits the discard.
    buf.load(&pkt(A6, R6, 17, &rh[24..]));
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::PolicyDiscard)
    );
}

#[test]
fn a_fragment_without_an_sa_is_dropped_as_a_fragment_not_held() {
    // It could not be protected once the SA exists either, so it is not
    // left pending; the ACQUIRE is raised all the same.
    let text = format!("spdadd {A4} {B4} any -P out ipsec esp/transport//require;\n");
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let mut p = pkt(
        A4,
        B4,
        17,
        &[0x12, 0x34, 0, 53, 0, 16, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
    );
    p[6] = 0x20; // more fragments
    fix_lengths(&mut p);
    buf.load(&p);
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Drop(DropReason::Fragment)
    );
    assert!(matches!(w.events[..], [Event::Acquire { .. }]));
}

/// The same packet without DF (IPv4), so that its sender, or a router,
/// may fragment it. (DF is not covered by AH or ESP.)
fn may_fragment(mut p: Vec<u8>) -> Vec<u8> {
    if p[0] >> 4 == 4 {
        p[6] &= !0x40;
        fix_lengths(&mut p);
    }
    p
}

#[test]
fn fragmented_ah_and_esp_are_reassembled_then_opened_in_any_order() {
    for (src, dst) in [(A4, B4), (A6, B6)] {
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut p = Pair::seed(64);
            let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
            let plain = may_fragment(tcp(src, dst, &data));
            let sealed = p.out(&plain).unwrap();
            let frags = fragment(&sealed, 1448, 0xabcd).unwrap();
            assert_eq!(frags.len(), 3);
            for (k, &i) in order.iter().enumerate() {
                assert!(p.buf.load(&frags[i]));
                let v = engine::inbound(&p.b, &mut p.wb, &mut p.buf, Duration::from_secs(k as u64));
                if k < 2 {
                    assert_eq!(v, Verdict::Held, "{src} fragment {i}");
                } else {
                    assert_eq!(v, Verdict::Forward, "{src} order {order:?}");
                    assert!(p.buf.data() == plain, "{src}: not the original TCP segment");
                }
            }
            let c = &p.wb.counters;
            assert_eq!((c.fragments, c.reassembled, c.in_packets), (3, 1, 1));
            assert_eq!(c.total_drops(), 0);
            assert_eq!(p.wb.reassembly.in_progress(), 0);
        }
    }
}

#[test]
fn ah_over_ipv4_options_survives_fragmentation() {
    // Router Alert (copied into every fragment) and a Timestamp (only in
    // the first; later fragments carry NOPs in its place, as Linux
    // sends them): the datagram reassembled from the first fragment's
    // header is what AH signed.
    let text = format!(
        "add {A4} {B4} ah 0x900 -r 64 -A hmac-sha256 0x{k};\n\
         spdadd {A4} {B4} any -P out ipsec ah/transport//require;\n\
         spdadd {A4} {B4} any -P in ipsec ah/transport//require;\n",
        k = "ef".repeat(32)
    );
    let a = state(&text);
    let mut w = Worker::new([0; 32]);
    let mut buf = PacketBuf::new();
    let mut p = vec![0x48, 0, 0, 0, 0x0b, 0xad, 0, 0, 64, 17, 0, 0];
    for a in [A4, B4] {
        p.extend_from_slice(&a.parse::<std::net::Ipv4Addr>().unwrap().octets());
    }
    p.extend_from_slice(&[148, 4, 0, 0, 68, 8, 5, 0, 0, 0, 0, 0]);
    let mut udp = vec![0x12, 0x34, 0, 53, 0, 0, 0, 0];
    udp.extend((0..3000u32).map(|i| (i * 11) as u8));
    let ulen = udp.len() as u16;
    udp[4..6].copy_from_slice(&ulen.to_be_bytes());
    p.extend_from_slice(&udp);
    fix_lengths(&mut p);
    assert!(buf.load(&p));
    assert_eq!(
        engine::outbound(&a, &mut w, &mut buf, Duration::ZERO),
        Verdict::Forward
    );
    let sealed = buf.data().to_vec();
    let frags = fragment(&sealed, 1200, 0).unwrap();
    assert_eq!(frags.len(), 3);
    assert_eq!(&frags[1][24..32], &[1; 8], "the timestamp is not copied");
    assert_eq!(&frags[1][20..24], &[148, 4, 0, 0], "the router alert is");
    let mut wb = Worker::new([1; 32]);
    for (k, f) in frags.iter().rev().enumerate() {
        assert!(buf.load(f));
        let v = engine::inbound(&a, &mut wb, &mut buf, Duration::ZERO);
        if k < 2 {
            assert_eq!(v, Verdict::Held);
        } else {
            assert_eq!(v, Verdict::Forward);
            assert_eq!(buf.data(), &p[..]);
        }
    }
    assert_eq!(wb.counters.total_drops(), 0);
}

#[test]
fn overlapping_fragments_drop_the_datagram_and_its_stragglers() {
    for (src, dst) in [(A4, B4), (A6, B6)] {
        let mut p = Pair::seed(64);
        let sealed = p.out(&may_fragment(tcp(src, dst, &[9u8; 2000]))).unwrap();
        let frags = fragment(&sealed, 1000, 7).unwrap();
        // A fragment that overlaps the first one by 8 bytes.
        let mut evil = frags[1].clone();
        let at = if src == A4 { 6 } else { 42 };
        let fo = packet::be16(&evil, at);
        let back = if src == A4 { 1 } else { 8 };
        evil[at..at + 2].copy_from_slice(&(fo - back).to_be_bytes());
        fix_lengths(&mut evil);
        let t = Duration::ZERO;
        for (f, want) in [
            (&frags[0], Verdict::Held),
            (&evil, Verdict::Drop(DropReason::FragOverlap)),
            (&frags[1], Verdict::Drop(DropReason::FragOverlap)),
            (&frags[2], Verdict::Drop(DropReason::FragOverlap)),
        ] {
            assert!(p.buf.load(f));
            assert_eq!(
                engine::inbound(&p.b, &mut p.wb, &mut p.buf, t),
                want,
                "{src}"
            );
        }
        // the held first fragment, the overlapping one, the two after
        assert_eq!(p.wb.counters.drop_count(DropReason::FragOverlap), 4);
        assert_eq!(p.wb.counters.in_packets, 0);
    }
}

#[test]
fn a_lone_fragment_expires_and_is_counted() {
    for (src, dst, secs) in [(A4, B4, 30), (A6, B6, 60)] {
        let mut p = Pair::seed(64);
        let sealed = p.out(&may_fragment(tcp(src, dst, &[1u8; 2000]))).unwrap();
        let frags = fragment(&sealed, 1000, 9).unwrap();
        assert!(p.buf.load(&frags[0]));
        assert_eq!(
            engine::inbound(&p.b, &mut p.wb, &mut p.buf, Duration::ZERO),
            Verdict::Held
        );
        p.wb.expire_fragments(Duration::from_secs(secs - 1));
        assert_eq!(
            p.wb.reassembly.in_progress(),
            1,
            "{src}: kept until {secs} s"
        );
        p.wb.expire_fragments(Duration::from_secs(secs));
        assert_eq!(p.wb.reassembly.in_progress(), 0);
        assert_eq!(p.wb.counters.drop_count(DropReason::FragIncomplete), 1);
        assert_eq!(p.wb.reassembly.bytes(), 0);
    }
}

#[test]
fn plaintext_fragments_are_left_to_the_policy() {
    // Only fragments of IPsec packets are reassembled: a bypassed ICMP
    // fragment goes on as it is.
    let mut p = Pair::seed(64);
    let mut echo = icmp_echo(A4, B4);
    echo[6] = 0x20;
    fix_lengths(&mut echo);
    assert_eq!(p.inb(&echo), Ok(echo.clone()));
    assert_eq!(p.wb.counters.fragments, 0);
}

/// ESP in UDP in transport mode (RFC 3948 section 3.1.2): the inner TCP
/// checksum was computed by the peer for addresses a NAT may have
/// changed. By default the engine recomputes it; a shell whose writer
/// tells the kernel not to verify it (`defer_tcp_checksum`, the TUN
/// offload) gets it untouched and the buffer marked, as Linux marks such
/// packets CHECKSUM_UNNECESSARY. Plain ESP is never marked.
#[test]
fn esp_in_udp_transport_leaves_the_tcp_checksum_to_a_deferring_shell() {
    let key = "0x0123456789abcdef0123456789abcdef01234567";
    let sas = format!(
        "add {A4}[4500] {B4}[4500] esp-udp 0x5001 -E aes-gcm-16 {key};\n\
         add {B4} {A4} esp 0x5002 -E aes-gcm-16 {key};\n\
         add {A4} {B4} esp 0x5003 -E aes-gcm-16 {key};\n"
    );
    for encap in [true, false] {
        let spi = if encap { "0x5001" } else { "0x5003" };
        let a = state(&format!(
            "{sas}spdadd {A4} {B4} tcp -P out ipsec esp/transport//require;\n"
        ));
        // The SA the outbound policy picks: make the other one's SPI vanish.
        let other = if encap { "0x5003" } else { "0x5001" };
        let (a, _, _) = a
            .apply_text(
                &format!("delete {A4} {B4} esp {other};"),
                "t",
                Duration::ZERO,
            )
            .unwrap();
        let b = state(&format!(
            "{sas}spdadd {A4} {B4} tcp -P in ipsec esp/transport//require;\n"
        ));
        // A checksum computed for another source address: stale here.
        let mut orig = tcp(A4, B4, b"behind a NAT");
        orig[36..38].copy_from_slice(&[0x12, 0x34]);
        let mut buf = PacketBuf::new();
        let mut wa = Worker::new([1; 32]);
        assert!(buf.load(&orig));
        assert_eq!(
            engine::outbound(&a, &mut wa, &mut buf, Duration::ZERO),
            Verdict::Forward
        );
        let wire = buf.data().to_vec();
        assert_eq!(
            u32::from_be_bytes(wire[if encap { 28 } else { 20 }..][..4].try_into().unwrap()),
            u32::from_str_radix(&spi[2..], 16).unwrap()
        );
        for defer in [false, true] {
            let mut wb = Worker::new([2; 32]);
            wb.defer_tcp_checksum = defer;
            assert!(buf.load(&wire));
            assert_eq!(
                engine::inbound(&b, &mut wb, &mut buf, Duration::ZERO),
                Verdict::Forward,
                "encap {encap} defer {defer}"
            );
            let got = buf.data();
            assert_eq!(got[..36], orig[..36]);
            assert_eq!(got[38..], orig[38..]);
            let stale = encap && defer;
            assert_eq!(buf.csum_stale, stale, "encap {encap} defer {defer}");
            if stale || !encap {
                assert_eq!(got[36..38], [0x12, 0x34], "untouched");
            } else {
                // Recomputed: the TCP segment now sums to zero with its
                // pseudo-header.
                assert_eq!(
                    tunsec::udp_encap::l4_checksum(got, 20, 6),
                    0,
                    "a valid checksum"
                );
            }
            // A new packet in the buffer clears the mark.
            assert!(buf.load(&orig));
            assert!(!buf.csum_stale);
        }
    }
}
