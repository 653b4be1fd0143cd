//! Outbound: plaintext leaving this host, matched against the SPD and
//! protected by its SAs, in chunks whose cache misses overlap.

use super::*;
use crate::sad::Run;

/// The most SAs one bundle applies (IPComp, ESP, AH).
pub(super) const MAX_BUNDLE: usize = 3;

/// Packets the batch functions take through each stage together: enough
/// for the cache misses of one stage to overlap, few enough that the lines
/// asked for are still there when the next stage reads them.
pub const CHUNK: usize = 32;

/// The last outbound decision for a bundle of more than one SA (the flow
/// cache holds one SA per flow): consecutive packets of that flow skip
/// the SPD and SAD lookups; a new state snapshot or an SA that died
/// invalidates it.
pub(super) struct OutCache {
    generation: u64,
    flow: Flow,
    policy: Arc<Policy>,
    sas: [Option<Arc<Sa>>; MAX_BUNDLE],
}

/// Find the policy and SAs for an outbound flow, or the verdict when the
/// packet is not to be protected.
fn resolve_out(state: &State, w: &mut Worker, flow: &Flow) -> Result<OutCache, Verdict> {
    let Some(policy) = state.spd.lookup(Dir::Out, flow) else {
        w.counters.bypassed += 1;
        return Err(Verdict::Forward);
    };
    let mut sas: [Option<Arc<Sa>>; MAX_BUNDLE] = Default::default();
    if let Action::Ipsec(rules) = &policy.action {
        let mut n = 0;
        for r in rules.iter().take(MAX_BUNDLE) {
            match state.sad.lookup_flow(flow, r.proto, r.level.reqid()) {
                Some(sa) => {
                    sas[n] = Some(sa.clone());
                    n += 1;
                }
                None if r.level.required() => {
                    w.events.push(Event::Acquire {
                        policy: policy.id,
                        src: flow.src,
                        dst: flow.dst,
                        proto: r.proto,
                        reqid: r.level.reqid(),
                        upper: flow.proto,
                        ports: flow.ports,
                    });
                    return Err(Verdict::Pending);
                }
                None => {}
            }
        }
    }
    Ok(OutCache {
        generation: state.generation,
        flow: *flow,
        policy: policy.clone(),
        sas,
    })
}

/// Process a plaintext packet leaving this host ([`outbound_batch`] of
/// one packet).
pub fn outbound(state: &State, w: &mut Worker, buf: &mut PacketBuf, now: Duration) -> Verdict {
    let mut v = [Verdict::Forward];
    outbound_batch(state, w, std::slice::from_mut(buf), now, &mut v);
    v[0]
}

/// Where a packet of a chunk stands between the stages.
#[derive(Clone, Copy)]
enum Step {
    /// Decided (`verdicts[i]` is set).
    Done,
    /// Parsed; its flow is looked up next.
    Parsed,
    /// Its decision, from the flow cache (pointers valid until the chunk
    /// ends, see [`flowcache::Hit`]).
    Hit(flowcache::Hit),
    /// A bundle of several SAs: the worker's `out_cache` holds it.
    Bundle,
}

/// What the stages of a chunk keep per packet (in the worker: nothing is
/// allocated per batch).
pub(super) struct Scratch {
    step: [Step; CHUNK],
    pub(super) info: [IpInfo; CHUNK],
    pub(super) flow: [Flow; CHUNK],
    pub(super) key: [FlowKey; CHUNK],
    pub(super) hash: [u64; CHUNK],
}

impl Scratch {
    pub(super) fn new() -> Box<Scratch> {
        let info = IpInfo {
            v6: false,
            insert_at: 0,
            next_hdr_pos: 0,
            next_hdr: 0,
            upper_proto: 0,
            upper_off: 0,
            fragment: false,
            later_fragment: false,
            final_dst_at: None,
        };
        let flow = Flow {
            src: IpAddr::V4(0.into()),
            dst: IpAddr::V4(0.into()),
            proto: 0,
            ports: None,
        };
        Box::new(Scratch {
            step: [Step::Done; CHUNK],
            info: [info; CHUNK],
            flow: [flow; CHUNK],
            key: [FlowKey::default(); CHUNK],
            hash: [0; CHUNK],
        })
    }
}

/// Process plaintext packets leaving this host: `verdicts[i]` is the
/// verdict for `bufs[i]`, as [`outbound`] would give packet by packet, in
/// order. Packets go through in chunks of [`CHUNK`], each in three stages
/// (as VPP's graph nodes do): parse every packet, hash its flow and ask
/// for the flow cache's lines; then find every flow's decision and ask
/// for the lines of its policy and SA (counters, configuration and AEAD
/// context, see [`Sa::prefetch`]); then protect them. At 10,000 peers
/// each of those is a cache miss; asked for a chunk ahead they overlap
/// instead of each waiting for the last.
pub fn outbound_batch<B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    assert_eq!(bufs.len(), verdicts.len(), "one verdict per packet");
    w.out_flows
        .begin_batch(state.generation, state.spd.len_dir(Dir::Out));
    let mut sc = w.scratch.take().unwrap_or_else(Scratch::new);
    for (b, v) in bufs.chunks_mut(CHUNK).zip(verdicts.chunks_mut(CHUNK)) {
        outbound_chunk(state, w, &mut sc, b, now, v);
        w.out_flows.end_batch();
    }
    w.scratch = Some(sc);
}

// Each stage walks the chunk by index: a packet's records are in several
// arrays.
#[allow(clippy::needless_range_loop)]
fn outbound_chunk<B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    sc: &mut Scratch,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    let n = bufs.len();
    let second = flowcache::second(now);
    // Stage 1: parse, hash the flow, ask for its set of the flow cache.
    for i in 0..n {
        let buf = bufs[i].as_mut();
        let Ok(info) = packet::parse(buf.data()) else {
            verdicts[i] = w.drop(DropReason::Malformed);
            sc.step[i] = Step::Done;
            continue;
        };
        // Outbound, policies and SAs are chosen for the final destination.
        let flow = flow_of(&info, buf.data(), info.final_dst(buf.data()));
        let key = FlowKey::of(&flow);
        let h = w.out_flows.hash(&key);
        w.out_flows.prefetch(h);
        sc.info[i] = info;
        sc.flow[i] = flow;
        sc.key[i] = key;
        sc.hash[i] = h;
        sc.step[i] = Step::Parsed;
    }
    // Stage 2: each flow's decision (the cache, else the SPD and SAD);
    // ask for its policy's and SA's lines.
    for i in 0..n {
        if !matches!(sc.step[i], Step::Parsed) {
            continue;
        }
        let step = match w.out_flows.get(&sc.key[i], sc.hash[i]) {
            Some(hit) => Step::Hit(hit),
            None => match resolve_step(state, w, sc, i) {
                Ok(step) => step,
                Err(v) => {
                    verdicts[i] = v;
                    Step::Done
                }
            },
        };
        if let Step::Hit(hit) = step {
            // The policy is read only to touch its use time, once a second.
            if let Some(p) = hit.policy
                && hit.kind == Kind::Ipsec
                && hit.must_touch(second)
            {
                crate::prefetch::bytes(p, std::mem::size_of::<Policy>());
            }
            if let Some(sa) = hit.sa {
                // SAFETY: valid until the chunk ends (flowcache::Hit).
                unsafe { (*sa).prefetch() };
            }
        }
        sc.step[i] = step;
    }
    // Stage 3: protect. With `account_runs`, consecutive packets protected
    // by one SA alone (a flow's packets, or several flows to one peer) are
    // accounted as a run ([`Sa::account_run`]): one write to the SA's
    // counters and sequence number for the run, not one per packet.
    let mut run: Option<Open> = None;
    for i in 0..n {
        let info = &sc.info[i];
        verdicts[i] = match sc.step[i] {
            Step::Done => continue,
            Step::Parsed => unreachable!("stage 2 decides every parsed packet"),
            Step::Hit(hit) => {
                // SAFETY: valid until the chunk ends (flowcache::Hit).
                let sa = hit.sa.map(|p| unsafe { &*p });
                if let Some(sa) = sa.filter(|sa| sa.is_dead()) {
                    // The SA died since the flow was cached (or during
                    // this packet's run, by the timer's or another
                    // worker's hard expiry): forget it and decide again
                    // (an older SA may serve).
                    run.take_if(|r| std::ptr::eq(r.sa, sa));
                    let buf = bufs[i].as_mut();
                    w.out_flows.remove(&sc.key[i], sc.hash[i]);
                    match resolve_step(state, w, sc, i) {
                        Ok(Step::Hit(hit)) => protect_hit(hit, w, buf, info, &sc.key[i], now, None),
                        Ok(_) => protect_bundle(w, buf, info, now),
                        Err(v) => v,
                    }
                } else {
                    let pre = match sa {
                        Some(sa) if w.account_runs && runs(&hit, info) => {
                            in_run(&mut run, sc, bufs, i, sa, now)
                        }
                        _ => None,
                    };
                    let buf = bufs[i].as_mut();
                    protect_hit(hit, w, buf, info, &sc.key[i], now, pre)
                }
            }
            Step::Bundle => protect_bundle(w, bufs[i].as_mut(), info, now),
        };
    }
}

/// Is a packet of this flow cache hit protected by its SA alone, and
/// accounted (so part of a run)? Fragments are dropped unaccounted.
#[inline]
fn runs(hit: &flowcache::Hit, info: &IpInfo) -> bool {
    hit.kind == Kind::Ipsec && hit.sa.is_some() && !info.fragment
}

/// A run being protected: its SA, its packets still to come, and what
/// [`Sa::account_run`] took for it (None: refused near a limit, so its
/// packets are accounted one at a time without looking for a run again).
struct Open {
    sa: *const Sa,
    left: usize,
    run: Option<Run>,
}

/// Packet `i`'s lifetime state and sequence number from its run (a new
/// run when `run` is not one of `sa` with packets to come), or None when
/// it is accounted alone: a run of one, or near a limit. (Not inlined:
/// in the chunk's function it made the first stage's code slower.)
#[inline(never)]
fn in_run<B: AsMut<PacketBuf>>(
    run: &mut Option<Open>,
    sc: &Scratch,
    bufs: &mut [B],
    i: usize,
    sa: &Sa,
    now: Duration,
) -> Option<Pre> {
    let p = sa as *const Sa;
    let open = match run {
        Some(r) if r.sa == p && r.left > 0 => r,
        _ => {
            let (k, bytes) = run_of(sc, bufs, i, p);
            let seqs = sa.proto() != Proto::IpComp;
            run.insert(Open {
                sa: p,
                left: k,
                run: (k > 1)
                    .then(|| sa.account_run(k, bytes, now, seqs))
                    .flatten(),
            })
        }
    };
    open.left -= 1;
    let len = bufs[i].as_mut().len();
    open.run.as_mut().map(|r| r.next(sa, len, now))
}

/// The run of packets from `i` on protected by the SA at `sa` alone: how
/// many, and their bytes.
fn run_of<B: AsMut<PacketBuf>>(
    sc: &Scratch,
    bufs: &mut [B],
    i: usize,
    sa: *const Sa,
) -> (usize, u64) {
    let mut k = 0;
    let mut bytes = 0u64;
    for (j, b) in bufs.iter_mut().enumerate().skip(i) {
        match sc.step[j] {
            Step::Hit(h) if h.sa == Some(sa) && runs(&h, &sc.info[j]) => {
                k += 1;
                bytes += b.as_mut().len() as u64;
            }
            _ => break,
        }
    }
    (k, bytes)
}

/// Decide packet `i` of the chunk without the flow cache: the bundle in
/// `out_cache` if it is this flow's, else the SPD and SAD (then the flow
/// cache or `out_cache` remembers the decision), or the verdict when the
/// packet is not to be protected.
fn resolve_step(state: &State, w: &mut Worker, sc: &Scratch, i: usize) -> Result<Step, Verdict> {
    let flow = &sc.flow[i];
    if w.out_cache.as_ref().is_some_and(|c| {
        c.generation == state.generation
            && c.flow == *flow
            && c.sas.iter().flatten().all(|sa| !sa.is_dead())
    }) {
        return Ok(Step::Bundle);
    }
    match resolve_out(state, w, flow) {
        Ok(c) if c.sas[1].is_some() => {
            w.out_cache = Some(c);
            Ok(Step::Bundle)
        }
        Ok(OutCache {
            policy,
            sas: [sa, _, _],
            ..
        }) => Ok(Step::Hit(w.out_flows.insert(
            sc.key[i],
            sc.hash[i],
            Some(policy),
            sa,
        ))),
        Err(Verdict::Forward) => {
            // No policy: bypassed (counted by resolve_out); cached as such.
            w.out_flows.insert(sc.key[i], sc.hash[i], None, None);
            Err(Verdict::Forward)
        }
        // A fragment would be dropped once the SA exists: not worth
        // holding (the ACQUIRE is raised all the same).
        Err(Verdict::Pending) if sc.info[i].fragment => Err(w.drop(DropReason::Fragment)),
        Err(v) => Err(v),
    }
}

/// Protect a packet by its flow cache hit. `pre`: its lifetime state and
/// sequence number, when taken with its run's ([`Run::next`]).
fn protect_hit(
    hit: flowcache::Hit,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    key: &FlowKey,
    now: Duration,
    pre: Option<Pre>,
) -> Verdict {
    match hit.kind {
        Kind::None | Kind::Bypass => {
            w.counters.bypassed += 1;
            return Verdict::Forward;
        }
        Kind::Discard => return w.drop(DropReason::PolicyDiscard),
        Kind::Ipsec => {}
    }
    // SAFETY: valid until the chunk ends (flowcache::Hit).
    let sa = hit.sa.map(|p| unsafe { &*p });
    let v = protect_sas(&[sa], w, buf, info, now, pre);
    let second = flowcache::second(now);
    if v == Verdict::Forward
        && hit.must_touch(second)
        && let Some(p) = hit.policy
    {
        // SAFETY: as above.
        unsafe { (*p).used.touch(now) };
        w.out_flows.touched(hit.slot, key, second);
    }
    v
}

fn protect_bundle(w: &mut Worker, buf: &mut PacketBuf, info: &IpInfo, now: Duration) -> Verdict {
    let cache = w.out_cache.take().expect("resolved in stage 2");
    let sas = cache.sas.each_ref().map(|s| s.as_deref());
    let v = protect(&cache.policy, &sas, w, buf, info, now);
    w.out_cache = Some(cache);
    v
}

fn protect(
    policy: &Policy,
    sas: &[Option<&Sa>],
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    now: Duration,
) -> Verdict {
    match &policy.action {
        Action::Bypass => {
            w.counters.bypassed += 1;
            return Verdict::Forward;
        }
        Action::Discard => return w.drop(DropReason::PolicyDiscard),
        Action::Ipsec(_) => {}
    }
    let v = protect_sas(sas, w, buf, info, now, None);
    if v == Verdict::Forward {
        policy.used.touch(now);
    }
    v
}

/// A packet's lifetime state and sequence number, taken with its run's.
type Pre = ((Expiry, bool), Option<u64>);

/// Apply an `ipsec` policy's SAs (innermost first) to a packet. `pre`
/// (one SA only): what [`Sa::account`] and [`Sa::next_seq`] would give,
/// already taken.
fn protect_sas(
    sas: &[Option<&Sa>],
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    now: Duration,
    pre: Option<Pre>,
) -> Verdict {
    if info.fragment {
        return w.drop(DropReason::Fragment);
    }
    debug_assert!(pre.is_none() || sas.len() == 1, "a run is of one SA");
    let plain_len = buf.len();
    for sa in sas.iter().flatten() {
        let e = pre.map_or_else(|| sa.account(buf.len(), now), |p| p.0);
        if let Err(r) = w.expiry(sa, e) {
            return w.drop(r);
        }
        let r = match sa.proto() {
            Proto::IpComp => {
                if sa.ipcomp.try_now()
                    && let Some(shrank) = w.codec.compress(
                        buf,
                        info.insert_at,
                        info.next_hdr_pos,
                        sa.config.wire_cpi(),
                    )
                {
                    sa.ipcomp.record(shrank);
                }
                Ok(())
            }
            Proto::Esp | Proto::Ah => {
                let Some(seq) = pre.map_or_else(|| sa.next_seq(), |p| p.1) else {
                    let e = sa.expiry(now);
                    let _ = w.expiry(sa, e);
                    return w.drop(DropReason::SeqExhausted);
                };
                if sa.proto() == Proto::Esp {
                    esp::seal(buf, info.insert_at, info.next_hdr_pos, sa, seq, &mut w.rng)
                        .map_err(|e| match e {
                            EspError::TooBig => DropReason::TooBig,
                            _ => DropReason::Malformed,
                        })
                        .and_then(|()| match sa.encap() {
                            Some(e)
                                if !udp_encap::encapsulate(
                                    buf,
                                    info.insert_at,
                                    info.next_hdr_pos,
                                    e,
                                ) =>
                            {
                                Err(DropReason::TooBig)
                            }
                            _ => Ok(()),
                        })
                } else {
                    ah::seal(
                        buf,
                        info.insert_at,
                        info.next_hdr_pos,
                        sa,
                        seq,
                        &mut w.scratch_bytes,
                    )
                    .map_err(|e| match e {
                        AhError::TooBig => DropReason::TooBig,
                        _ => DropReason::Malformed,
                    })
                }
            }
        };
        if let Err(r) = r {
            return w.drop(r);
        }
    }
    w.counters.out_packets += 1;
    w.counters.out_bytes += plain_len as u64;
    Verdict::Forward
}

pub(super) fn replay_drop(sa: &Sa, e: ReplayError) -> DropReason {
    sa.counters.replay_drops.fetch_add(1, Relaxed);
    match e {
        ReplayError::TooOld => DropReason::ReplayOld,
        ReplayError::Duplicate | ReplayError::Zero => DropReason::Replay,
    }
}
