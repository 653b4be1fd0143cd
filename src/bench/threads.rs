//! `tunsec bench --threads 1,2`: what workers protecting packets of one SA
//! at the same moment cost each other. Each thread is a worker of its own
//! (its own `Worker`, buffers and flow cache) calling the engine's batch
//! function with 64 packets of one flow a call, as a worker does with what
//! one read of the TUN device returns. With `shared` every thread's flow
//! uses the same SA (several TCP streams to one peer, spread over workers
//! by the kernel); otherwise each thread has a peer and an SA of its own,
//! the reference with nothing in common. The sequence number and the
//! lifetime counters of an SA are written by every packet that uses it:
//! shared between CPUs, each write waits for the line to come back from
//! the other CPU. Each is measured with packets accounted one at a time
//! and in runs (`Worker::account_runs`, what the daemon does when it has
//! several workers). Inbound the same, one SA shared or an SA each:
//! packets sealed beforehand by the peers, each thread opening its own
//! (its share of one SA's numbers, interleaved, when shared): a packet at
//! a time, every packet takes the SA's replay window lock twice at most
//! (checked before its ICV, accepted after); in runs, a run of them does.

use super::peers::{addrs, config, cpu_time, udp};
use crate::buf::PacketBuf;
use crate::engine::{self, Verdict, Worker};
use crate::state::State;
use anyhow::{Result, bail};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const BATCH: usize = 64;

/// Replay windows wide enough for the threads' interleaved numbers of
/// one SA: a thread running ahead of the other makes no packet too old.
const WINDOW: u32 = 65536;

/// `threads` workers started together, thread `t` calling `batch(t,
/// call, started, worker, buffers, verdicts)` for call 0, 1, ... until it
/// returns 0 (else the packets it handled, all to be forwarded). Returns
/// the CPU ns per packet of a thread (median of the threads) and the
/// packets per second of all of them together.
fn on_threads<F>(threads: usize, runs: bool, batch: F) -> Result<(f64, f64)>
where
    F: Fn(usize, usize, Instant, &mut Worker, &mut [PacketBuf], &mut [Verdict]) -> usize + Sync,
{
    let start = Barrier::new(threads);
    let results: Vec<Result<(u64, Duration, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, batch) = (&start, &batch);
                s.spawn(move || {
                    let mut w = Worker::new([t as u8 + 1; 32]);
                    w.account_runs = runs;
                    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
                    let mut verdicts = [Verdict::Forward; BATCH];
                    start.wait();
                    let t0 = Instant::now();
                    let c0 = cpu_time();
                    let mut n = 0u64;
                    for call in 0.. {
                        let k = batch(t, call, t0, &mut w, &mut bufs, &mut verdicts);
                        if k == 0 {
                            break;
                        }
                        n += k as u64;
                        if verdicts[..k].iter().any(|v| *v != Verdict::Forward) {
                            bail!("the engine dropped packets: {:?}", w.counters);
                        }
                    }
                    Ok((n, cpu_time() - c0, t0.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let mut per = Vec::new();
    let (mut total, mut wall) = (0u64, Duration::ZERO);
    for r in results {
        let (n, cpu, w) = r?;
        total += n;
        wall = wall.max(w);
        per.push(cpu.as_nanos() as f64 / n.max(1) as f64);
    }
    per.sort_by(f64::total_cmp);
    Ok((per[per.len() / 2], total as f64 / wall.as_secs_f64()))
}

/// One measurement: `threads` workers for `d`, on one SA or an SA each.
pub fn measure(
    threads: usize,
    shared: bool,
    runs: bool,
    size: usize,
    d: Duration,
) -> Result<(f64, f64)> {
    let peers = if shared { 1 } else { threads };
    let (state, _, _) = State::default().apply_text(
        &config(peers, false, false, WINDOW),
        "threads",
        Duration::ZERO,
    )?;
    let plains: Vec<Vec<u8>> = (0..threads)
        .map(|t| {
            let (l, p) = addrs(false, if shared { 0 } else { t });
            udp(l, p, size)
        })
        .collect();
    on_threads(threads, runs, |t, _, started, w, bufs, verdicts| {
        if started.elapsed() >= d {
            return 0;
        }
        for b in bufs.iter_mut() {
            b.load(&plains[t]);
        }
        engine::outbound_batch(&state, w, bufs, Duration::ZERO, verdicts);
        bufs.len()
    })
}

/// Inbound packets each thread opens: with one SA shared, all threads'
/// numbers together stay within its replay window ([`WINDOW`]).
const IN_PACKETS: usize = 30_000;

/// One inbound measurement: `threads` workers opening `IN_PACKETS`
/// packets each, of one SA or an SA each. Returns the CPU ns per packet
/// of a thread (median of the threads) and the packets per second of all
/// of them together.
pub fn measure_in(threads: usize, shared: bool, runs: bool, size: usize) -> Result<(f64, f64)> {
    let peers = if shared { 1 } else { threads };
    let (state, _, _) = State::default().apply_text(
        &config(peers, false, false, WINDOW),
        "threads",
        Duration::ZERO,
    )?;
    let (peer, _, _) = State::default().apply_text(
        &config(peers, false, true, WINDOW),
        "peers",
        Duration::ZERO,
    )?;
    let mut pw = Worker::new([99; 32]);
    let mut pools: Vec<Vec<Vec<u8>>> = vec![Vec::with_capacity(IN_PACKETS); threads];
    let mut buf = PacketBuf::new();
    for k in 0..IN_PACKETS * threads {
        let t = k % threads;
        let (l, p) = addrs(false, if shared { 0 } else { t });
        buf.load(&udp(p, l, size));
        if engine::outbound(&peer, &mut pw, &mut buf, Duration::ZERO) != Verdict::Forward {
            bail!("the peers did not seal a packet");
        }
        pools[t].push(buf.data().to_vec());
    }
    on_threads(threads, runs, |t, call, _, w, bufs, verdicts| {
        let pool = &pools[t];
        let from = (call * BATCH).min(pool.len());
        let chunk = &pool[from..(from + BATCH).min(pool.len())];
        for (b, p) in bufs.iter_mut().zip(chunk) {
            b.load(p);
        }
        let n = chunk.len();
        engine::inbound_batch(
            &state,
            w,
            &mut bufs[..n],
            Duration::ZERO,
            &mut verdicts[..n],
        );
        n
    })
}

/// `tunsec bench --threads`: a table (or JSON) of the cost per packet with
/// an SA each and with one SA shared, accounted a packet at a time and in
/// runs, for each thread count: `rounds` rounds of `d` each, the four
/// cases in turn, medians.
pub fn run(threads: &[usize], size: usize, d: Duration, rounds: usize, json: bool) -> Result<()> {
    // (name, one SA shared, runs, inbound)
    const CASES: [(&str, bool, bool, bool); 8] = [
        ("own SA", false, false, false),
        ("one SA", true, false, false),
        ("own SA, runs", false, true, false),
        ("one SA, runs", true, true, false),
        ("in, own SA", false, false, true),
        ("in, one SA", true, false, true),
        ("in, own SA, runs", false, true, true),
        ("in, one SA, runs", true, true, true),
    ];
    if let Some(t) = threads.iter().find(|&&t| !(1..=256).contains(&t)) {
        bail!("--threads {t}: give numbers of threads from 1 to 256");
    }
    if !(48..=65535).contains(&size) {
        bail!("--sizes {size}: an IPv4 packet of 48 to 65535 bytes");
    }
    let mut rows = Vec::new();
    if !json {
        println!(
            "ESP aes-gcm-16, {size}-byte packets, {BATCH} of one flow a call; ns of CPU per packet (median of the threads) and Mpps of all threads, medians of {rounds} rounds"
        );
        print!("{:>7}", "threads");
        for (name, _, _, _) in CASES {
            print!(" {:>16} {:>6}", format!("{name} ns"), "Mpps");
        }
        println!();
    }
    for &t in threads {
        let mut ns = vec![Vec::new(); CASES.len()];
        let mut pps = vec![Vec::new(); CASES.len()];
        for _ in 0..rounds.max(1) {
            for (c, (_, shared, runs, inbound)) in CASES.iter().enumerate() {
                let (n, p) = if *inbound {
                    measure_in(t, *shared, *runs, size)?
                } else {
                    measure(t, *shared, *runs, size, d)?
                };
                ns[c].push(n);
                pps[c].push(p);
            }
        }
        let ns: Vec<f64> = ns.into_iter().map(super::median).collect();
        let pps: Vec<f64> = pps.into_iter().map(super::median).collect();
        if !json {
            print!("{t:>7}");
            for c in 0..CASES.len() {
                print!(" {:>16.0} {:>6.2}", ns[c], pps[c] / 1e6);
            }
            println!();
        }
        let cases: Vec<_> = CASES
            .iter()
            .enumerate()
            .map(|(c, (name, shared, runs, inbound))| {
                serde_json::json!({"case": name, "shared_sa": shared, "runs": runs,
                    "direction": if *inbound { "in" } else { "out" }, "ns": ns[c], "pps": pps[c]})
            })
            .collect();
        rows.push(serde_json::json!({ "threads": t, "cases": cases }));
    }
    if json {
        println!("{}", serde_json::json!({ "size": size, "rows": rows }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_runs_without_a_drop() {
        // Two threads on one SA: outbound in runs, and inbound, where the
        // threads' interleaved numbers must all fit the replay window.
        let (ns, pps) = measure(2, true, true, 64, Duration::from_millis(20)).unwrap();
        assert!(ns > 0.0 && pps > 0.0, "{ns} {pps}");
        for runs in [false, true] {
            let (ns, pps) = measure_in(2, true, runs, 64).unwrap();
            assert!(ns > 0.0 && pps > 0.0, "{ns} {pps}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let d = Duration::from_millis(1);
        let e = run(&[0], 64, d, 1, true).unwrap_err().to_string();
        assert!(e.contains("--threads 0"), "{e}");
        let e = run(&[1], 47, d, 1, true).unwrap_err().to_string();
        assert!(e.contains("--sizes 47"), "{e}");
    }
}
