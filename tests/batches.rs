//! Property tests of the batch functions and the workers' flow caches:
//! whatever the policies, SAs, flows, batch sizes and state changes in
//! between, a worker that keeps its caches from batch to batch decides
//! every packet as a fresh worker (empty caches) deciding it alone: the
//! same verdict, the same bytes, the same counters and events.

mod common;

use proptest::prelude::*;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, Event, Verdict, Worker};
use tunsec::state::State;

const PEERS: usize = 4;
/// The inbound SAs' replay window (packets).
const WINDOW: u32 = 8;
const KEY: &str = "0x000102030405060708090a0b0c0d0e0f10111213";

fn local(v6: bool) -> IpAddr {
    if v6 {
        "fd00:7::1".parse().unwrap()
    } else {
        "10.7.0.1".parse().unwrap()
    }
}

fn peer(v6: bool, i: usize) -> IpAddr {
    if v6 {
        format!("fd00:7:1::{}", i + 1).parse().unwrap()
    } else {
        format!("10.7.1.{}", i + 1).parse().unwrap()
    }
}

/// What one peer (of one family) gets.
#[derive(Debug, Clone)]
struct PeerConf {
    out_policy: u8,
    in_policy: u8,
    /// A more specific policy for UDP to or from port 7.
    port7: u8,
    /// Outbound ESP SAs (the newest may die after a few packets).
    out_sas: u8,
    out_hard_packets: u8,
    in_sas: u8,
    /// Lifetime limits on the newest inbound SA, as outbound.
    in_hard_packets: u8,
    /// Extended sequence numbers on the inbound SAs (and the peer's).
    esn: bool,
}

fn peer_conf() -> impl Strategy<Value = PeerConf> {
    (
        (0u8..6, 0u8..5, 0u8..3, 0u8..3, 0u8..6, 0u8..3),
        (prop::bool::weighted(0.3).prop_flat_map(|l| {
            if l {
                (4u8..40).boxed()
            } else {
                Just(0u8).boxed()
            }
        })),
        any::<bool>(),
    )
        .prop_map(
            |(
                (out_policy, in_policy, port7, out_sas, out_hard_packets, in_sas),
                in_hard_packets,
                esn,
            )| {
                PeerConf {
                    out_policy,
                    in_policy,
                    port7,
                    out_sas,
                    out_hard_packets,
                    in_sas,
                    in_hard_packets,
                    esn,
                }
            },
        )
}

/// Lifetime options for the newest of `sas` SAs (`k`), from `hard`.
fn limits(k: usize, sas: u8, hard: u8) -> String {
    if k + 1 == sas as usize && hard > 3 {
        format!(" -ps {} -ph {}", hard - 2, hard)
    } else if k + 1 == sas as usize && hard > 0 {
        format!(" -ph {hard}")
    } else {
        String::new()
    }
}

fn action(k: u8, in_: bool) -> Option<&'static str> {
    Some(match k {
        0 => return None,
        1 => "ipsec esp/transport//require",
        2 => "ipsec esp/transport//use",
        3 => "none",
        4 => "discard",
        // No AH SA is ever added: outbound raises an ACQUIRE, inbound
        // ESP is a mismatch.
        _ if in_ => "ipsec esp/transport//require",
        _ => "ipsec ah/transport//require",
    })
}

fn out_spi(i: usize, k: usize) -> u32 {
    0x1000 + (i as u32) * 16 + k as u32
}

fn in_spi(i: usize, k: usize) -> u32 {
    0x2000 + (i as u32) * 16 + k as u32
}

/// The local host's setkey text.
fn config(peers: &[(bool, PeerConf)]) -> String {
    let mut s = String::new();
    for (n, (v6, c)) in peers.iter().enumerate() {
        let (l, p) = (local(*v6), peer(*v6, n));
        for k in 0..c.out_sas as usize {
            let hard = limits(k, c.out_sas, c.out_hard_packets);
            s += &format!(
                "add {l} {p} esp {:#x} -r 0{hard} -E aes-gcm-16 {KEY};\n",
                out_spi(n, k)
            );
        }
        let esn = if c.esn { " -f esn" } else { "" };
        for k in 0..c.in_sas as usize {
            let hard = limits(k, c.in_sas, c.in_hard_packets);
            s += &format!(
                "add {p} {l} esp {:#x} -r {WINDOW}{esn}{hard} -E aes-gcm-16 {KEY};\n",
                in_spi(n, k)
            );
        }
        if let Some(a) = action(c.out_policy, false) {
            s += &format!("spdadd {l} {p} any -P out {a};\n");
        }
        if let Some(a) = action(c.in_policy, true) {
            s += &format!("spdadd {p} {l} any -P in {a};\n");
        }
        match c.port7 {
            1 => {
                s += &format!("spdadd {l} {p}[7] udp -P out discard;\n");
                s += &format!("spdadd {p}[7] {l} udp -P in none;\n");
            }
            2 => {
                s += &format!("spdadd {l}[any] {p}[7] udp -P out none;\n");
                s += &format!("spdadd {p}[7] {l}[any] udp -P in discard;\n");
            }
            _ => {}
        }
    }
    // Subnets: fewer than hosts, so host pairs win where they exist.
    s += "spdadd 10.7.1.0/29 10.7.0.1 any -P in none;\n";
    s += "spdadd fd00:7::1 fd00:7:1::/112 tcp -P out discard;\n";
    s
}

/// The peers' setkey text: their outbound SAs are our inbound ones (plus
/// one SPI we do not know), sealing everything they send.
fn mirror(peers: &[(bool, PeerConf)]) -> String {
    let mut s = String::new();
    for (n, (v6, c)) in peers.iter().enumerate() {
        let (l, p) = (local(*v6), peer(*v6, n));
        // Oldest first: the newest SA seals (in_sas 0: an unknown SPI).
        for k in 0..(c.in_sas as usize).max(1) {
            let spi = if c.in_sas == 0 {
                0x3000 + n as u32
            } else {
                in_spi(n, k)
            };
            let esn = if c.esn { " -f esn" } else { "" };
            s += &format!("add {p} {l} esp {spi:#x} -r 0{esn} -E aes-gcm-16 {KEY};\n");
        }
        s += &format!("spdadd {p} {l} any -P out ipsec esp/transport//require;\n");
    }
    s
}

/// A packet from `src` to `dst`: UDP or TCP with small ports.
fn packet(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(32);
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&[0u8; 28]);
    common::ip_packet(src, dst, proto, &l4)
}

/// A packet to send: to (or from) peer `n`, its protocol and ports; a
/// `replay` repeats an earlier inbound packet.
#[derive(Debug, Clone)]
struct Pkt {
    peer: usize,
    tcp: bool,
    sport: u16,
    dport: u16,
    plain: bool,
    /// Inbound: 1 repeats the peer's last packet sealed, 2 one sealed
    /// `WINDOW + 1` before it (left of the window once the last is
    /// accepted; within it before the packets just ahead of it in a run
    /// are).
    replay: u8,
    /// Inbound: 1 breaks the packet's ICV; 2 sends a copy with a broken
    /// ICV before it (a forgery must not make the genuine one a replay).
    corrupt: u8,
    /// Outbound (else inbound), unless `again`.
    out: bool,
    /// The direction and peer of the packet before: runs of packets of one
    /// SA in a batch, which the engine accounts together.
    again: bool,
}

fn pkt() -> impl Strategy<Value = Pkt> {
    (
        0..2 * PEERS,
        any::<bool>(),
        6u16..9,
        6u16..9,
        prop::bool::weighted(0.1),
        prop::sample::select(vec![
            0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2,
        ]),
        prop::sample::select(vec![0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]),
        any::<bool>(),
        prop::bool::weighted(0.5),
    )
        .prop_map(
            |(peer, tcp, sport, dport, plain, replay, corrupt, out, again)| Pkt {
                peer,
                tcp,
                sport,
                dport,
                plain,
                replay,
                corrupt,
                out,
                again,
            },
        )
}

/// A state change between batches: setkey statements for peer `n`.
fn change(peers: &[(bool, PeerConf)], n: usize, kind: u8, serial: usize) -> String {
    let (v6, _) = peers[n];
    let (l, p) = (local(v6), peer(v6, n));
    match kind {
        0 => format!(
            "add {l} {p} esp {:#x} -r 0 -E aes-gcm-16 {KEY};",
            0x5000 + serial
        ),
        1 => format!("deleteall {l} {p} esp;"),
        2 => format!("spdupdate {l} {p} any -P out ipsec esp/transport//require;"),
        3 => format!("spdupdate {l} {p} any -P out none;"),
        4 => format!("spdupdate {p} {l} any -P in ipsec esp/transport//use;"),
        _ => format!("spdupdate {p} {l} any -P in discard;"),
    }
}

/// Run one packet alone with a fresh worker: the reference.
fn alone(
    state: &State,
    out: bool,
    pkt: &[u8],
    now: Duration,
    events: &mut [usize; 3],
) -> (Verdict, Vec<u8>, Vec<u64>) {
    let mut w = Worker::new([3; 32]);
    let mut buf = PacketBuf::new();
    buf.load(pkt);
    let v = if out {
        engine::outbound(state, &mut w, &mut buf, now)
    } else {
        engine::inbound(state, &mut w, &mut buf, now)
    };
    for (k, n) in kinds(&w.events).iter().enumerate() {
        events[k] += n;
    }
    let c = &w.counters;
    let mut counts = vec![c.out_packets, c.in_packets, c.bypassed];
    counts.extend_from_slice(&c.drops);
    (v, buf.data().to_vec(), counts)
}

/// How many ACQUIREs, soft EXPIREs and hard EXPIREs.
fn kinds(events: &[Event]) -> [usize; 3] {
    let mut k = [0; 3];
    for e in events {
        match e {
            Event::Acquire { .. } => k[0] += 1,
            Event::SoftExpire(_) => k[1] += 1,
            Event::HardExpire(_) => k[2] += 1,
        }
    }
    k
}

fn counts(w: &Worker) -> Vec<u64> {
    let c = &w.counters;
    let mut v = vec![c.out_packets, c.in_packets, c.bypassed];
    v.extend_from_slice(&c.drops);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    #[test]
    fn batches_decide_as_single_packets_on_fresh_workers(
        confs in prop::collection::vec((any::<bool>(), peer_conf()), 2 * PEERS),
        pkts in prop::collection::vec(pkt(), 1..300),
        sizes in prop::collection::vec(1usize..80, 1..12),
        changes in prop::collection::vec((0..2 * PEERS, 0u8..6), 0..6),
        runs in any::<bool>(),
    ) {
        let text = config(&confs);
        // Two states from the same text: their SAs count sequence numbers
        // apart, and see the same packets in the same order.
        let (mut a, _, _) = State::default().apply_text(&text, "a", Duration::ZERO).unwrap();
        let (mut b, _, _) = State::default().apply_text(&text, "b", Duration::ZERO).unwrap();
        let (m, _, _) = State::default().apply_text(&mirror(&confs), "m", Duration::ZERO).unwrap();
        // The packets, in both directions; inbound ones sealed by the peers.
        let mut mw = Worker::new([5; 32]);
        let mut list: Vec<(bool, Vec<u8>)> = Vec::new();
        // Each peer's packets sealed so far.
        let mut sealed: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 2 * PEERS];
        let mut prev: Option<(bool, usize)> = None;
        for p in &pkts {
            let (out, n) = match prev {
                Some(x) if p.again => x,
                _ => (p.out, p.peer),
            };
            prev = Some((out, n));
            let (v6, _) = confs[n];
            let (l, r) = (local(v6), peer(v6, n));
            let proto = if p.tcp { 6 } else { 17 };
            if out {
                list.push((true, packet(l, r, proto, p.sport, p.dport)));
                continue;
            }
            let back = match p.replay {
                1 => 1,
                2 => WINDOW as usize + 2,
                _ => 0,
            };
            if back > 0 && sealed[n].len() >= back {
                // A broken replay is a replay all the same (checked first).
                let mut again = sealed[n][sealed[n].len() - back].clone();
                if p.corrupt == 1 {
                    *again.last_mut().unwrap() ^= 1;
                }
                list.push((false, again));
                continue;
            }
            let plain = packet(r, l, proto, p.sport, p.dport);
            if p.plain {
                list.push((false, plain));
                continue;
            }
            let mut buf = PacketBuf::new();
            buf.load(&plain);
            if engine::outbound(&m, &mut mw, &mut buf, Duration::ZERO) == Verdict::Forward {
                let genuine = buf.data().to_vec();
                let mut broken = genuine.clone();
                *broken.last_mut().unwrap() ^= 1;
                match p.corrupt {
                    1 => list.push((false, broken)),
                    2 => {
                        list.push((false, broken));
                        list.push((false, genuine.clone()));
                    }
                    _ => list.push((false, genuine.clone())),
                }
                sealed[n].push(genuine);
            }
        }
        let mut w = Worker::new([9; 32]);
        // Packets of one SA in a batch accounted together or one by one.
        w.account_runs = runs;
        let mut ref_events = [0; 3];
        let mut ref_counts = vec![0u64; counts(&w).len()];
        let mut at = 0;
        let mut serial = 0;
        for (round, size) in sizes.iter().cycle().enumerate() {
            if at == list.len() {
                break;
            }
            if let Some((n, kind)) = changes.get(round % 7) && round % 3 == 1 {
                serial += 1;
                let t = change(&confs, *n, *kind, serial);
                a = a.apply_text(&t, "c", Duration::ZERO).unwrap().0;
                b = b.apply_text(&t, "c", Duration::ZERO).unwrap().0;
            }
            // A run of one direction, as a worker's receive call gives.
            let out = list[at].0;
            let mut end = at;
            while end < list.len() && end - at < *size && list[end].0 == out {
                end += 1;
            }
            let mut bufs: Vec<PacketBuf> = list[at..end]
                .iter()
                .map(|(_, p)| {
                    let mut b = PacketBuf::new();
                    b.load(p);
                    b
                })
                .collect();
            let mut v = vec![Verdict::Forward; bufs.len()];
            // Time goes on (use times are touched once a second per flow).
            let now = Duration::from_millis(300 * round as u64);
            if out {
                engine::outbound_batch(&b, &mut w, &mut bufs, now, &mut v);
            } else {
                engine::inbound_batch(&b, &mut w, &mut bufs, now, &mut v);
            }
            for (j, (_, p)) in list[at..end].iter().enumerate() {
                let (rv, rbytes, rc) = alone(&a, out, p, now, &mut ref_events);
                prop_assert_eq!(v[j], rv, "packet {} ({}bound)", at + j, if out { "out" } else { "in" });
                if rv == Verdict::Forward {
                    prop_assert_eq!(bufs[j].data(), &rbytes[..], "packet {}", at + j);
                }
                for (x, y) in ref_counts.iter_mut().zip(rc) {
                    *x += y;
                }
            }
            at = end;
        }
        prop_assert_eq!(counts(&w), ref_counts);
        // The same use times and counters on every policy and SA.
        let uses = |s: &State| -> Vec<_> { s.spd.iter().map(|p| (p.id, p.used.get())).collect() };
        prop_assert_eq!(uses(&b), uses(&a));
        let sas = |s: &State| -> Vec<_> {
            s.sad
                .iter()
                .map(|sa| {
                    let c = &sa.counters;
                    (sa.config.spi, c.packets.load(Relaxed), c.bytes.load(Relaxed), sa.used.get())
                })
                .collect()
        };
        prop_assert_eq!(sas(&b), sas(&a));
        prop_assert_eq!(kinds(&w.events), ref_events);
    }
}
