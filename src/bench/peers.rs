//! `tunsec bench --peers 1,100,1000,10000`: what the number of peers costs.
//! One host (10.0.0.1, fd00::1) with N peers, each with an `out` and an
//! `in` policy and ESP aes-gcm-16 SAs both ways, as a server keyed by an
//! IKE daemon for each client is. Per N it measures:
//! - loading the setkey text (parse and apply, 4 statements a peer);
//! - ns per packet outbound and inbound, 100-byte UDP, flows interleaved
//!   (packet k goes to, or comes from, peer k mod N), through the engine's
//!   batch functions as the workers call them (64 packets a call);
//! - µs to add, update and delete one SA, and to add and delete one
//!   policy, on the state with N peers (the engine's share: the daemon's
//!   routes and nftables come on top);
//! - memory: heap bytes of the state per peer, per SA and per policy
//!   (states of SAs alone and of policies alone), and the bytes of one
//!   worker's flow caches.

use crate::buf::PacketBuf;
use crate::engine::{self, Verdict, Worker};
use crate::sad::{Proto, Sa};
use crate::state::State;
use anyhow::{Result, bail};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The measuring thread's CPU time. Packets and changes are timed with
/// it, not the wall clock: on a machine shared with other work (two cores
/// here), time the thread spends descheduled would otherwise count as the
/// engine's (cache misses caused by the others still do).
pub fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

const KEY: &str = "0x00112233445566778899aabbccddeeff00112233";

/// The local host and peer `i` of a family.
pub fn addrs(v6: bool, i: usize) -> (IpAddr, IpAddr) {
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                1,
                0,
                0,
                0,
                0,
                (i >> 16) as u16,
                i as u16 + 1,
            )),
        )
    } else {
        let p = 0x0a80_0001u32 + i as u32;
        (
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::from(p)),
        )
    }
}

fn spi(i: usize, inbound: bool) -> u32 {
    0x1_0000 + 2 * i as u32 + inbound as u32
}

/// The setkey text of the local host (`mirror`: of the peers, so that
/// their outbound is our inbound), with replay windows of `replay`
/// packets. ICMP is bypassed first, as in the seed.
pub fn config(n: usize, v6: bool, mirror: bool, replay: u32) -> String {
    let mut s = String::with_capacity(n * 300);
    let icmp = if v6 { "icmp6" } else { "icmp" };
    let any = if v6 { "::/0" } else { "0.0.0.0/0" };
    for d in ["out", "in"] {
        writeln!(s, "spdadd {any} {any} {icmp} -P {d} priority 10 none;").unwrap();
    }
    for i in 0..n {
        let (l, p) = addrs(v6, i);
        let (me, peer) = if mirror { (p, l) } else { (l, p) };
        writeln!(
            s,
            "add {l} {p} esp {:#x} -r {replay} -E aes-gcm-16 {KEY};",
            spi(i, false)
        )
        .unwrap();
        writeln!(
            s,
            "add {p} {l} esp {:#x} -r {replay} -E aes-gcm-16 {KEY};",
            spi(i, true)
        )
        .unwrap();
        writeln!(
            s,
            "spdadd {me} {peer} any -P out ipsec esp/transport//require;"
        )
        .unwrap();
        writeln!(
            s,
            "spdadd {peer} {me} any -P in ipsec esp/transport//require;"
        )
        .unwrap();
    }
    s
}

/// A UDP packet of `size` bytes (at least 48) from `src` to `dst`.
pub fn udp(src: IpAddr, dst: IpAddr, size: usize) -> Vec<u8> {
    let size = size.max(48);
    let mut b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = vec![0u8; size];
            p[0] = 0x45;
            p[8] = 64;
            p[9] = 17;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&d.octets());
            p
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = vec![0u8; size];
            p[0] = 0x60;
            p[6] = 17;
            p[7] = 64;
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(&d.octets());
            p
        }
        _ => unreachable!(),
    };
    let l4 = if src.is_ipv4() { 20 } else { 40 };
    b[l4..l4 + 2].copy_from_slice(&4000u16.to_be_bytes());
    b[l4 + 2..l4 + 4].copy_from_slice(&5000u16.to_be_bytes());
    crate::packet::fix_lengths(&mut b);
    b
}

/// Bytes the allocator has handed out and not taken back (glibc's
/// count, chunk headers included). The resident set, measured before,
/// said nothing useful: memory freed by an earlier row was reused without
/// growing it (0 bytes a peer for IPv6), and one peer's row was one
/// page's worth of whatever.
#[cfg(target_env = "gnu")]
fn heap_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

#[cfg(not(target_env = "gnu"))]
fn heap_bytes() -> u64 {
    0
}

/// Heap bytes a state made from `text` holds, per `per` items.
fn bytes_of(text: &str, per: usize) -> Result<f64> {
    let before = heap_bytes();
    let (state, _, _) = State::default().apply_text(text, "mem", Duration::ZERO)?;
    let after = heap_bytes();
    drop(state);
    Ok(after.saturating_sub(before) as f64 / per as f64)
}

/// ns per packet of `f` over the pool, `batch` packets a call (each
/// loaded into its buffer first, as a receive call fills them), median
/// of `rounds` passes.
fn per_packet(
    pool: &[Vec<u8>],
    rounds: usize,
    batch: usize,
    mut f: impl FnMut(usize, &mut [PacketBuf], &mut [Verdict]),
) -> f64 {
    let mut bufs: Vec<PacketBuf> = (0..batch).map(|_| PacketBuf::new()).collect();
    let mut verdicts = vec![Verdict::Forward; batch];
    let mut v = Vec::new();
    let passes = (200_000 / pool.len()).max(1);
    for _ in 0..rounds {
        let t = cpu_time();
        for _ in 0..passes {
            for (c, chunk) in pool.chunks(batch).enumerate() {
                for (b, p) in bufs.iter_mut().zip(chunk) {
                    b.load(p);
                }
                let n = chunk.len();
                f(c * batch, &mut bufs[..n], &mut verdicts[..n]);
            }
        }
        v.push((cpu_time() - t).as_nanos() as f64 / (passes * pool.len()) as f64);
    }
    median(v)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// µs per application of `text(k)` to `state`, median over `ops`.
fn op_us(state: &State, ops: usize, text: impl Fn(usize) -> String) -> Result<f64> {
    let mut v = Vec::new();
    for k in 0..ops {
        let p = crate::setkey::parse(&text(k), "op")?;
        let t = cpu_time();
        let r = state.apply(&p.statements, "op", Duration::ZERO);
        v.push((cpu_time() - t).as_secs_f64() * 1e6);
        if let Err(e) = r {
            bail!("{e}");
        }
    }
    Ok(median(v))
}

#[derive(Debug, serde::Serialize)]
pub struct PeersRow {
    pub family: &'static str,
    pub peers: usize,
    pub load_secs: f64,
    pub out_ns: f64,
    pub in_ns: f64,
    /// The AEAD alone with the same SAs (the floor of `out_ns`).
    pub seal_ns: f64,
    pub sa_add_us: f64,
    pub sa_update_us: f64,
    pub sa_delete_us: f64,
    pub policy_add_us: f64,
    pub policy_delete_us: f64,
    /// Heap bytes of the state per peer (two SAs, two policies).
    pub bytes_per_peer: f64,
    pub bytes_per_sa: f64,
    pub bytes_per_policy: f64,
    /// The worker's flow caches (both directions) after the run.
    pub flow_cache_bytes: usize,
}

pub fn measure(n: usize, v6: bool, rounds: usize, batch: usize) -> Result<PeersRow> {
    // -r 0: the inbound loop replays its pool of packets.
    let text = config(n, v6, false, 0);
    // Memory: the whole state, then its SAs alone and its policies alone
    // (the ICMP bypass policies go with the SAs' text, as a constant).
    let only = |keep: &str| -> String {
        text.lines()
            .filter(|l| l.starts_with(keep) || l.contains("icmp"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let bytes_per_peer = bytes_of(&text, n)?;
    let bytes_per_sa = bytes_of(&only("add "), 2 * n)?;
    let bytes_per_policy = bytes_of(&only("spdadd "), 2 * n)?;
    let t = Instant::now();
    let (state, _, _) = State::default().apply_text(&text, "peers", Duration::ZERO)?;
    let load_secs = t.elapsed().as_secs_f64();
    let (mirror, _, _) =
        State::default().apply_text(&config(n, v6, true, 0), "mirror", Duration::ZERO)?;
    let pool_len = n.max(256);
    let out_pool: Vec<Vec<u8>> = (0..pool_len)
        .map(|k| {
            let (l, p) = addrs(v6, k % n);
            udp(l, p, 100)
        })
        .collect();
    // What the peers send us: sealed by the mirror state.
    let mut w = Worker::new([7; 32]);
    let mut in_pool = Vec::with_capacity(pool_len);
    let mut buf = PacketBuf::new();
    for k in 0..pool_len {
        let (l, p) = addrs(v6, k % n);
        buf.load(&udp(p, l, 100));
        match engine::outbound(&mirror, &mut w, &mut buf, Duration::ZERO) {
            Verdict::Forward => in_pool.push(buf.data().to_vec()),
            v => bail!("the mirror did not seal a packet from {p}: {v:?}"),
        }
    }
    let mut w = Worker::new([8; 32]);
    let out_ns = per_packet(&out_pool, rounds, batch, |_, b, v| {
        engine::outbound_batch(&state, &mut w, b, Duration::ZERO, v);
        debug_assert!(v.iter().all(|v| matches!(v, Verdict::Forward)));
    });
    let in_ns = per_packet(&in_pool, rounds, batch, |_, b, v| {
        engine::inbound_batch(&state, &mut w, b, Duration::ZERO, v);
        debug_assert!(v.iter().all(|v| matches!(v, Verdict::Forward)));
    });
    if w.counters.total_drops() != 0 {
        bail!("packets were dropped: {:?}", w.counters);
    }
    // The floor: the AEAD alone, each packet sealed (in place, its UDP
    // part) with its peer's SA's context, the contexts' lines asked for a
    // batch ahead; no lookup, no ESP framing, no counters.
    let sas: Vec<Arc<Sa>> = (0..pool_len)
        .map(|k| {
            let (l, p) = addrs(v6, k % n);
            let f = crate::spd::Flow {
                src: l,
                dst: p,
                proto: 17,
                ports: Some((4000, 5000)),
            };
            state.sad.lookup_flow(&f, Proto::Esp, None).cloned()
        })
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow::anyhow!("an outbound SA is missing"))?;
    let seal_ns = per_packet(&out_pool, rounds, batch, |at, b, _| {
        let sas = &sas[at..at + b.len()];
        for sa in sas {
            let c = &sa.cipher;
            crate::prefetch::bytes(c as *const crate::crypto::Cipher, std::mem::size_of_val(c));
        }
        let off = if v6 { 40 } else { 20 };
        for (buf, sa) in b.iter_mut().zip(sas) {
            let tag = sa
                .cipher
                .aead_seal(&[1; 8], &[2; 8], &mut buf.data_mut()[off..]);
            std::hint::black_box(tag);
        }
    });
    let (l, _) = addrs(v6, 0);
    let fresh = |k: usize| addrs(v6, n + 1 + k).1;
    let ops = 50;
    let sa_add_us = op_us(&state, ops, |k| {
        format!("add {l} {} esp 0x9{k:07x} -E aes-gcm-16 {KEY};", fresh(k))
    })?;
    let (_, p0) = addrs(v6, n / 2);
    let sa_update_us = op_us(&state, ops, |_| {
        format!(
            "update {l} {p0} esp {:#x} -E aes-gcm-16 {KEY};",
            spi(n / 2, false)
        )
    })?;
    let sa_delete_us = op_us(&state, ops, |_| {
        format!("delete {l} {p0} esp {:#x};", spi(n / 2, false))
    })?;
    let policy_add_us = op_us(&state, ops, |k| {
        format!(
            "spdadd {l} {} any -P out ipsec esp/transport//require;",
            fresh(k)
        )
    })?;
    let policy_delete_us = op_us(&state, ops, |_| format!("spddelete {l} {p0} any -P out;"))?;
    Ok(PeersRow {
        family: if v6 { "ipv6" } else { "ipv4" },
        peers: n,
        load_secs,
        out_ns,
        in_ns,
        seal_ns,
        sa_add_us,
        sa_update_us,
        sa_delete_us,
        policy_add_us,
        policy_delete_us,
        bytes_per_peer,
        bytes_per_sa,
        bytes_per_policy,
        flow_cache_bytes: w.flow_cache_bytes(),
    })
}

pub fn run(peers: &[usize], json: bool, rounds: usize, batch: usize) -> Result<()> {
    let mut rows = Vec::new();
    if !json {
        println!(
            "{:<5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>7}",
            "",
            "peers",
            "load s",
            "out ns",
            "in ns",
            "seal ns",
            "SA add",
            "SA upd",
            "SA del",
            "pol add",
            "pol del",
            "B/peer",
            "B/SA",
            "B/pol",
            "flows"
        );
    }
    for v6 in [false, true] {
        for &n in peers {
            if n == 0 {
                bail!("--peers: give numbers of peers from 1");
            }
            let r = measure(n, v6, rounds, batch)?;
            if !json {
                println!(
                    "{:<5} {:>6} {:>8.3} {:>8.0} {:>8.0} {:>8.0} {:>7.1}µ {:>7.1}µ {:>7.1}µ {:>7.1}µ {:>7.1}µ {:>7.0} {:>6.0} {:>6.0} {:>6}K",
                    r.family,
                    r.peers,
                    r.load_secs,
                    r.out_ns,
                    r.in_ns,
                    r.seal_ns,
                    r.sa_add_us,
                    r.sa_update_us,
                    r.sa_delete_us,
                    r.policy_add_us,
                    r.policy_delete_us,
                    r.bytes_per_peer,
                    r.bytes_per_sa,
                    r.bytes_per_policy,
                    r.flow_cache_bytes >> 10
                );
            }
            rows.push(r);
        }
    }
    if json {
        println!("{}", serde_json::json!({ "peers": rows }));
    }
    Ok(())
}
