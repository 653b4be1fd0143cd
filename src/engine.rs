//! The engine: the two entry points the shells call, `outbound` and
//! `inbound`. Pure functions of (state, per-worker context, packet, time):
//! no sockets, no threads, no clock reads.

use crate::ah::{self, AhError};
use crate::buf::PacketBuf;
use crate::esp::{self, EspError};
use crate::flowcache::{self, FlowCache, FlowKey, Kind};
use crate::ipcomp::{Codec, IpCompError};
use crate::packet::{self, IpInfo};
use crate::reassembly::{self, Outcome, Reassembler};
use crate::replay::ReplayError;
use crate::sad::{Expiry, Proto, Sa};
use crate::spd::{Action, Dir, Flow, Level, Policy};
use crate::state::State;
use crate::udp_encap;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Why a packet was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a valid IP packet, or a truncated IPsec header.
    Malformed,
    /// Outbound fragments cannot be protected in transport mode.
    Fragment,
    /// A `discard` policy matched.
    PolicyDiscard,
    /// `require` with no usable SA (an ACQUIRE was raised).
    NoSa,
    /// Inbound SPI/CPI with no SA.
    UnknownSpi,
    IcvFailure,
    /// A sequence number seen before.
    Replay,
    /// A sequence number left of the replay window.
    ReplayOld,
    BadPadding,
    /// IPComp data that does not inflate.
    Decompress,
    /// Protection found does not match the inbound policy's bundle.
    PolicyMismatch,
    /// Plaintext where the inbound policy requires IPsec.
    PlaintextRefused,
    /// The SA reached a hard lifetime.
    SaExpired,
    /// The SA ran out of sequence numbers.
    SeqExhausted,
    /// The result would exceed the maximum IP packet size.
    TooBig,
    /// ESP in UDP (RFC 3948) for an SA without UDP encapsulation or with
    /// another port, or bare ESP for one with it.
    EncapMismatch,
    /// An inbound fragment overlaps another of its datagram (or
    /// contradicts its length): the whole datagram is dropped (RFC 5722).
    FragOverlap,
    /// An exact copy of a fragment already held.
    FragDuplicate,
    /// Fragments of a datagram that did not complete in time (or before
    /// a capture ended).
    FragIncomplete,
    /// Fragments given up to bound memory: too many datagrams, bytes or
    /// fragments in progress.
    FragLimit,
}

impl DropReason {
    pub const ALL: [DropReason; 20] = [
        DropReason::Malformed,
        DropReason::Fragment,
        DropReason::PolicyDiscard,
        DropReason::NoSa,
        DropReason::UnknownSpi,
        DropReason::IcvFailure,
        DropReason::Replay,
        DropReason::ReplayOld,
        DropReason::BadPadding,
        DropReason::Decompress,
        DropReason::PolicyMismatch,
        DropReason::PlaintextRefused,
        DropReason::SaExpired,
        DropReason::SeqExhausted,
        DropReason::TooBig,
        DropReason::EncapMismatch,
        DropReason::FragOverlap,
        DropReason::FragDuplicate,
        DropReason::FragIncomplete,
        DropReason::FragLimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::PolicyDiscard => "policy-discard",
            DropReason::NoSa => "no-sa",
            DropReason::UnknownSpi => "unknown-spi",
            DropReason::IcvFailure => "icv-failure",
            DropReason::Replay => "replay",
            DropReason::ReplayOld => "replay-old",
            DropReason::BadPadding => "bad-padding",
            DropReason::Decompress => "decompress",
            DropReason::PolicyMismatch => "policy-mismatch",
            DropReason::PlaintextRefused => "plaintext-refused",
            DropReason::SaExpired => "sa-expired",
            DropReason::SeqExhausted => "seq-exhausted",
            DropReason::TooBig => "too-big",
            DropReason::EncapMismatch => "encap-mismatch",
            DropReason::FragOverlap => "frag-overlap",
            DropReason::FragDuplicate => "frag-duplicate",
            DropReason::FragIncomplete => "frag-incomplete",
            DropReason::FragLimit => "frag-limit",
        }
    }

    fn index(self) -> usize {
        DropReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What to do with the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the buffer's contents on (protected, decapsulated or bypassed).
    Forward,
    /// A `require` rule found no SA. An ACQUIRE event was raised and no drop
    /// was counted: the shell decides. It may hold the packet (unchanged) and
    /// run it through [`outbound`] again once the state changes, or give up
    /// with [`Worker::give_up`], which counts the `no-sa` drop.
    Pending,
    /// Inbound: a fragment was kept until its datagram is complete
    /// ([`crate::reassembly`]); nothing to send now.
    Held,
    Drop(DropReason),
}

/// Which SA an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub spi: u32,
}

impl SaId {
    pub fn of(sa: &Sa) -> SaId {
        SaId {
            src: sa.config.src,
            dst: sa.config.dst,
            proto: sa.config.proto,
            spi: sa.config.spi,
        }
    }
}

/// Something the keying daemon should hear about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Outbound traffic hit `require` with no usable SA.
    Acquire {
        policy: u64,
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        reqid: Option<u32>,
        /// The packet's upper-layer protocol and ports (ICMP: type and
        /// code), for the selector an XFRM ACQUIRE carries.
        upper: u8,
        ports: Option<(u16, u16)>,
    },
    SoftExpire(SaId),
    HardExpire(SaId),
}

/// Counters of one worker: summed by the shell.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub out_packets: u64,
    pub out_bytes: u64,
    pub in_packets: u64,
    pub in_bytes: u64,
    pub bypassed: u64,
    /// Inbound fragments merged into datagrams, and the datagrams made
    /// whole from them (each then counted as one packet: `fragments -
    /// reassembled` packets read are in no other counter).
    pub fragments: u64,
    pub reassembled: u64,
    pub drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    pub fn count_drop(&mut self, r: DropReason) {
        self.drops[r.index()] += 1;
    }

    pub fn drop_count(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }

    pub fn add(&mut self, o: &Counters) {
        self.out_packets += o.out_packets;
        self.out_bytes += o.out_bytes;
        self.in_packets += o.in_packets;
        self.in_bytes += o.in_bytes;
        self.bypassed += o.bypassed;
        self.fragments += o.fragments;
        self.reassembled += o.reassembled;
        for (a, b) in self.drops.iter_mut().zip(o.drops.iter()) {
            *a += b;
        }
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Per-worker state: random source for CBC IVs, DEFLATE codec, scratch
/// space, fragments in reassembly, counters and the events raised since
/// the shell last drained them.
pub struct Worker {
    pub reassembly: Reassembler,
    rng: StdRng,
    codec: Codec,
    /// AH's working space.
    scratch_bytes: Vec<u8>,
    /// The stages' per-packet records (taken while a batch runs).
    scratch: Option<Box<Scratch>>,
    /// Per-flow decisions, outbound (policy and SA) and inbound (policy,
    /// and the SA a flow last passed it with).
    out_flows: FlowCache,
    in_flows: FlowCache,
    out_cache: Option<OutCache>,
    pub counters: Counters,
    pub events: Vec<Event>,
}

impl Worker {
    /// `seed` must come from a CSPRNG (the shell reads the OS's): it keys
    /// the ChaCha generator that makes CBC IVs unpredictable.
    pub fn new(seed: [u8; 32]) -> Worker {
        let mut rng = StdRng::from_seed(seed);
        let mut hash_seed = || std::array::from_fn(|_| rng.next_u64());
        let (out_seed, in_seed) = (hash_seed(), hash_seed());
        Worker {
            reassembly: Reassembler::default(),
            rng,
            codec: Codec::new(),
            scratch_bytes: Vec::with_capacity(512),
            scratch: Some(Scratch::new()),
            out_flows: FlowCache::new(out_seed),
            in_flows: FlowCache::new(in_seed),
            out_cache: None,
            counters: Counters::default(),
            events: Vec::with_capacity(16),
        }
    }

    fn drop(&mut self, r: DropReason) -> Verdict {
        self.counters.count_drop(r);
        Verdict::Drop(r)
    }

    /// Abandon fragments whose datagram timed out (counted). The engine
    /// does it whenever a fragment arrives; a shell calls this now and then
    /// so that a lone fragment does not stay counted nowhere.
    pub fn expire_fragments(&mut self, now: Duration) {
        self.reassembly.expire(now, &mut self.counters);
    }

    /// Abandon every fragment in progress (counted as `frag-incomplete`):
    /// the input ended.
    pub fn flush_fragments(&mut self) {
        self.reassembly.flush(&mut self.counters);
    }

    /// Let the flow caches release, `sets` sets at a time, what they hold
    /// of states older than `state` (policies and SAs, keys included, that
    /// the state no longer has). A shell calls this between batches, also
    /// when no packet comes.
    pub fn sweep(&mut self, state: &State, sets: usize) {
        for c in [&mut self.out_flows, &mut self.in_flows] {
            c.observe(state.generation);
            c.sweep(sets);
        }
    }

    /// Bytes the flow caches take (per worker).
    pub fn flow_cache_bytes(&self) -> usize {
        self.out_flows.capacity_bytes() + self.in_flows.capacity_bytes()
    }

    /// The shell drops a packet that got [`Verdict::Pending`]: count it.
    pub fn give_up(&mut self) -> Verdict {
        self.drop(DropReason::NoSa)
    }

    fn expiry(&mut self, sa: &Sa, e: (Expiry, bool)) -> Result<(), DropReason> {
        match e {
            (Expiry::Alive, _) => Ok(()),
            (Expiry::Soft, first) => {
                if first {
                    self.events.push(Event::SoftExpire(SaId::of(sa)));
                }
                Ok(())
            }
            (Expiry::Hard, first) => {
                if first {
                    self.events.push(Event::HardExpire(SaId::of(sa)));
                }
                Err(DropReason::SaExpired)
            }
        }
    }
}

#[inline]
fn flow_of(info: &IpInfo, pkt: &[u8], dst: IpAddr) -> Flow {
    Flow {
        src: info.src(pkt),
        dst,
        proto: info.upper_proto,
        ports: info.ports(pkt),
    }
}

/// The most SAs one bundle applies (IPComp, ESP, AH).
const MAX_BUNDLE: usize = 3;

/// Packets the batch functions take through each stage together: enough
/// for the cache misses of one stage to overlap, few enough that the lines
/// asked for are still there when the next stage reads them.
pub const CHUNK: usize = 32;

/// The last outbound decision for a bundle of more than one SA (the flow
/// cache holds one SA per flow): consecutive packets of that flow skip
/// the SPD and SAD lookups; a new state snapshot or an SA that died
/// invalidates it.
struct OutCache {
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
struct Scratch {
    step: [Step; CHUNK],
    info: [IpInfo; CHUNK],
    flow: [Flow; CHUNK],
    key: [FlowKey; CHUNK],
    hash: [u64; CHUNK],
}

impl Scratch {
    fn new() -> Box<Scratch> {
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
    // Stage 3: protect.
    for i in 0..n {
        let buf = bufs[i].as_mut();
        let info = &sc.info[i];
        verdicts[i] = match sc.step[i] {
            Step::Done => continue,
            Step::Parsed => unreachable!("stage 2 decides every parsed packet"),
            Step::Hit(hit) => {
                // SAFETY: valid until the chunk ends (flowcache::Hit).
                let sa = hit.sa.map(|p| unsafe { &*p });
                if sa.is_some_and(|sa| sa.is_dead()) {
                    // The SA died since the flow was cached: forget it and
                    // decide again (an older SA may serve).
                    w.out_flows.remove(&sc.key[i], sc.hash[i]);
                    match resolve_step(state, w, sc, i) {
                        Ok(Step::Hit(hit)) => protect_hit(hit, w, buf, info, &sc.key[i], now),
                        Ok(_) => protect_bundle(w, buf, info, now),
                        Err(v) => v,
                    }
                } else {
                    protect_hit(hit, w, buf, info, &sc.key[i], now)
                }
            }
            Step::Bundle => protect_bundle(w, buf, info, now),
        };
    }
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

fn protect_hit(
    hit: flowcache::Hit,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    key: &FlowKey,
    now: Duration,
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
    let v = protect_sas(&[sa], w, buf, info, now);
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
    let v = protect_sas(sas, w, buf, info, now);
    if v == Verdict::Forward {
        policy.used.touch(now);
    }
    v
}

/// Apply an `ipsec` policy's SAs (innermost first) to a packet.
fn protect_sas(
    sas: &[Option<&Sa>],
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    now: Duration,
) -> Verdict {
    if info.fragment {
        return w.drop(DropReason::Fragment);
    }
    let plain_len = buf.len();
    for sa in sas.iter().flatten() {
        let e = sa.account(buf.len(), now);
        if let Err(r) = w.expiry(sa, e) {
            return w.drop(r);
        }
        let r = match sa.proto() {
            Proto::IpComp => {
                w.codec
                    .compress(buf, info.insert_at, info.next_hdr_pos, sa.config.wire_cpi());
                Ok(())
            }
            Proto::Esp | Proto::Ah => {
                let Some(seq) = sa.next_seq() else {
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

fn replay_drop(sa: &Sa, e: ReplayError) -> DropReason {
    sa.counters.replay_drops.fetch_add(1, Relaxed);
    match e {
        ReplayError::TooOld => DropReason::ReplayOld,
        ReplayError::Duplicate | ReplayError::Zero => DropReason::Replay,
    }
}

/// Process a packet arriving for this host: verify and remove AH, ESP and
/// IPComp, then check the result against the inbound policy. A fragment of
/// an IPsec packet is held ([`Verdict::Held`]) until its datagram is
/// complete; the packet that completes it returns the datagram's verdict
/// with the datagram in `buf`. ([`inbound_batch`] of one packet.)
pub fn inbound(state: &State, w: &mut Worker, buf: &mut PacketBuf, now: Duration) -> Verdict {
    let mut v = [Verdict::Forward];
    inbound_batch(state, w, std::slice::from_mut(buf), now, &mut v);
    v[0]
}

/// A transform found on an inbound packet (all `Some` in `found[..n]`).
type Found<'s> = Option<(Proto, &'s Arc<Sa>)>;

/// Where an inbound packet of a chunk stands between the stages.
#[derive(Clone, Copy)]
enum InStep<'s> {
    /// Decided (`verdicts[i]` is set).
    Done,
    /// Parsed (`info`), outer UDP removed (`encap`), its first IPsec
    /// header at (`at`, `nh_pos`) with the SA its SPI names, if found.
    Header {
        encap: Option<udp_encap::Encap>,
        ipsec: Option<(usize, usize)>,
        sa: Option<&'s Arc<Sa>>,
    },
    /// Decapsulated by at most one SA (more are checked at once); its
    /// flow is in the scratch.
    Open(Found<'s>),
    /// And the flow's inbound policy: from the flow cache (with the SA it
    /// last passed with), or looked up.
    Policy(Found<'s>, PolicyOf<'s>),
}

#[derive(Clone, Copy)]
enum PolicyOf<'s> {
    Cached(flowcache::Hit),
    Looked(Option<&'s Arc<Policy>>),
}

/// Process packets arriving for this host: `verdicts[i]` is the verdict
/// for `bufs[i]`, as [`inbound`] would give packet by packet, in order.
/// In chunks of [`CHUNK`], four stages: parse, find the IPsec header and
/// its SA, ask for the SA's lines; verify and decapsulate, hash the inner
/// flow, ask for its flow cache set; find the flow's policy, ask for its
/// lines; check the policy.
pub fn inbound_batch<B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    assert_eq!(bufs.len(), verdicts.len(), "one verdict per packet");
    w.in_flows
        .begin_batch(state.generation, state.spd.len_dir(Dir::In));
    let mut sc = w.scratch.take().unwrap_or_else(Scratch::new);
    for (b, v) in bufs.chunks_mut(CHUNK).zip(verdicts.chunks_mut(CHUNK)) {
        // The stages' arrays are made (zeroed) per chunk: a packet alone
        // does not pay for 32.
        if b.len() == 1 {
            inbound_chunk::<1, B>(state, w, &mut sc, b, now, v);
        } else {
            inbound_chunk::<CHUNK, B>(state, w, &mut sc, b, now, v);
        }
        w.in_flows.end_batch();
    }
    w.scratch = Some(sc);
}

#[allow(clippy::needless_range_loop)]
fn inbound_chunk<const N: usize, B: AsMut<PacketBuf>>(
    state: &State,
    w: &mut Worker,
    sc: &mut Scratch,
    bufs: &mut [B],
    now: Duration,
    verdicts: &mut [Verdict],
) {
    let n = bufs.len();
    let second = flowcache::second(now);
    let mut steps = [InStep::Done; N];
    let mut spis = [None; N];
    // Stage 1: parse (and reassemble), take off UDP, find the SPI.
    for i in 0..n {
        let buf = bufs[i].as_mut();
        // (Results written in place: a packet's records moved through
        // the stack cost store-forwarding stalls.)
        if let Err(v) = inbound_header(
            state,
            w,
            buf,
            now,
            &mut sc.info[i],
            &mut steps[i],
            &mut spis[i],
        ) {
            verdicts[i] = v;
        }
    }
    // Then look up the SAs (their slots were asked for in stage 1); ask
    // for each SA's lines.
    for i in 0..n {
        if let (Some((dst, proto, spi)), InStep::Header { sa, .. }) = (spis[i], &mut steps[i]) {
            *sa = state.sad.lookup_inbound(dst, proto, spi);
            if let Some(sa) = sa {
                sa.prefetch();
            }
        }
    }
    // Stage 2: verify and decapsulate; hash the inner flow.
    for i in 0..n {
        let InStep::Header { encap, ipsec, sa } = steps[i] else {
            continue;
        };
        let buf = bufs[i].as_mut();
        let mut found = [None; MAX_BUNDLE];
        let flow = &mut sc.flow[i];
        let nfound = match decap_all(
            state,
            w,
            buf,
            &sc.info[i],
            encap,
            ipsec,
            sa,
            now,
            &mut found,
            flow,
        ) {
            Ok(n) => n,
            Err(r) => {
                verdicts[i] = w.drop(r);
                steps[i] = InStep::Done;
                continue;
            }
        };
        if nfound > 1 {
            // A bundle: checked now, without the flow cache.
            let policy = state.spd.lookup(Dir::In, flow);
            verdicts[i] = accept(w, buf, policy.map(|p| &**p), &found[..nfound], flow, now);
            steps[i] = InStep::Done;
            continue;
        }
        sc.key[i] = FlowKey::of(flow);
        let h = w.in_flows.hash(&sc.key[i]);
        w.in_flows.prefetch(h);
        sc.hash[i] = h;
        steps[i] = InStep::Open(found[0]);
    }
    // Stage 3: the flow's policy.
    for i in 0..n {
        let InStep::Open(found) = steps[i] else {
            continue;
        };
        let p = match w.in_flows.get(&sc.key[i], sc.hash[i]) {
            Some(hit) => {
                // Read only when the bundle is checked or the use time
                // touched (once a second).
                let memo = found.is_some_and(|(_, sa)| hit.sa == Some(Arc::as_ptr(sa)));
                if let Some(p) = hit.policy
                    && (!memo || hit.must_touch(second))
                {
                    crate::prefetch::bytes(p, std::mem::size_of::<Policy>());
                }
                PolicyOf::Cached(hit)
            }
            None => PolicyOf::Looked(state.spd.lookup(Dir::In, &sc.flow[i])),
        };
        steps[i] = InStep::Policy(found, p);
    }
    // Stage 4: check it.
    for i in 0..n {
        let InStep::Policy(found, p) = steps[i] else {
            continue;
        };
        let buf = bufs[i].as_mut();
        let flow = &sc.flow[i];
        let one = [found];
        let found = &one[..found.is_some() as usize];
        verdicts[i] = match p {
            PolicyOf::Cached(hit) => {
                // SAFETY: valid until the chunk ends (flowcache::Hit).
                let policy = hit.policy.map(|p| unsafe { &*p });
                let passed = found
                    .first()
                    .and_then(|f| *f)
                    .is_some_and(|(_, sa)| hit.sa == Some(Arc::as_ptr(sa)));
                if passed {
                    // The same flow passed this policy with this SA.
                    if let Some(p) = policy
                        && hit.must_touch(second)
                    {
                        p.used.touch(now);
                        w.in_flows.touched(hit.slot, &sc.key[i], second);
                    }
                    w.counters.in_packets += 1;
                    w.counters.in_bytes += buf.len() as u64;
                    Verdict::Forward
                } else {
                    let v = accept(w, buf, policy, found, flow, now);
                    if let (Verdict::Forward, [Some((_, sa))]) = (v, found) {
                        w.in_flows.set_sa(&sc.key[i], sc.hash[i], Arc::clone(sa));
                    }
                    v
                }
            }
            PolicyOf::Looked(policy) => {
                let v = accept(w, buf, policy.map(|p| &**p), found, flow, now);
                let sa = match (v, found) {
                    (Verdict::Forward, [Some((_, sa))]) => Some(Arc::clone(sa)),
                    _ => None,
                };
                w.in_flows
                    .insert(sc.key[i], sc.hash[i], policy.cloned(), sa);
                v
            }
        };
    }
}

/// Check the transforms found against the flow's inbound policy and count
/// the packet.
fn accept(
    w: &mut Worker,
    buf: &PacketBuf,
    policy: Option<&Policy>,
    found: &[Found<'_>],
    flow: &Flow,
    now: Duration,
) -> Verdict {
    if let Some(policy) = policy {
        if let Err(r) = check_inbound_policy(policy, found, flow) {
            return w.drop(r);
        }
        policy.used.touch(now);
    }
    w.counters.in_packets += 1;
    w.counters.in_bytes += buf.len() as u64;
    Verdict::Forward
}

/// Stage 1 of a packet: parse it (a fragment goes to reassembly), take
/// off an ESP-in-UDP header meant for us, find its first IPsec header and
/// the key of the SA it names (destination, protocol, SPI).
#[inline(always)]
fn inbound_header<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    now: Duration,
    info: &mut IpInfo,
    step: &mut InStep<'s>,
    out_spi: &mut Option<(IpAddr, Proto, u32)>,
) -> Result<(), Verdict> {
    // Parsed into place: a packet's record copied through the stack after
    // narrow stores costs a store-forwarding stall.
    *info = match packet::parse(buf.data()) {
        Ok(i) => i,
        Err(_) => return Err(w.drop(DropReason::Malformed)),
    };
    if info.fragment && reassembly::wanted(buf.data(), info) {
        match w.reassembly.push(buf, info, now, &mut w.counters) {
            Outcome::Held => return Err(Verdict::Held),
            Outcome::Dropped(r) => return Err(Verdict::Drop(r)),
            Outcome::Complete => match packet::parse(buf.data()) {
                Ok(i) => *info = i,
                Err(_) => return Err(w.drop(DropReason::Malformed)),
            },
        }
    }
    // ESP in UDP (RFC 3948): to an SA that expects it on this port, or to
    // the NAT-T port (where an unknown SPI is counted as one).
    let mut encap = None;
    if let Some((spi, e)) = udp_encap::peek(buf.data(), info) {
        let expected = state
            .sad
            .lookup_inbound(info.dst(buf.data()), Proto::Esp, spi)
            .is_some_and(|sa| sa.config.encap.is_some_and(|x| x.dport == e.dport));
        if expected || e.dport == udp_encap::NAT_T_PORT {
            udp_encap::decapsulate(buf, info);
            *info = match packet::parse(buf.data()) {
                Ok(i) => i,
                Err(_) => return Err(w.drop(DropReason::Malformed)),
            };
            encap = Some(e);
        }
    }
    let ipsec = match packet::find_ipsec_header(buf.data(), info) {
        Ok(h) => h.map(|(at, nh_pos, _)| (at, nh_pos)),
        Err(_) => return Err(w.drop(DropReason::Malformed)),
    };
    // The SA the first header names (AH or ESP), looked up next.
    let mut spi = None;
    if let Some((at, nh_pos)) = ipsec {
        let d = buf.data();
        let proto = match d[nh_pos] {
            packet::PROTO_AH => Some(Proto::Ah),
            packet::PROTO_ESP => Some(Proto::Esp),
            _ => None,
        };
        if let Some(proto) = proto {
            let peek = match proto {
                Proto::Ah => ah::peek(d, at),
                _ => esp::peek(d, at),
            };
            spi = peek.map(|(spi, _)| (info.dst(d), proto, spi));
            if let Some((dst, proto, spi)) = spi {
                state.sad.prefetch_inbound(dst, proto, spi);
            }
        }
    }
    *step = InStep::Header {
        encap,
        ipsec,
        sa: None,
    };
    *out_spi = spi;
    Ok(())
}

/// Stage 2 of a packet: remove its IPsec headers, outermost first (`sa`:
/// the first one's, found in stage 1), and check the UDP encapsulation.
/// Fills in the SAs found (outermost first) and the inner flow; returns
/// how many SAs.
#[allow(clippy::too_many_arguments)]
fn decap_all<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    encap: Option<udp_encap::Encap>,
    ipsec: Option<(usize, usize)>,
    sa: Option<&'s Arc<Sa>>,
    now: Duration,
    found: &mut [Found<'s>; MAX_BUNDLE],
    out_flow: &mut Flow,
) -> Result<usize, DropReason> {
    let info = *info;
    let mut n = 0;
    let mut first = sa;
    if let Some((at, nh_pos)) = ipsec {
        loop {
            let proto = match buf.data()[nh_pos] {
                packet::PROTO_AH => Proto::Ah,
                packet::PROTO_ESP => Proto::Esp,
                packet::PROTO_IPCOMP => Proto::IpComp,
                _ => break,
            };
            if n == MAX_BUNDLE || found[..n].iter().flatten().any(|(p, _)| *p == proto) {
                // Each protocol once, at most three layers.
                return Err(DropReason::PolicyMismatch);
            }
            let sa = decap_one(state, w, buf, &info, at, nh_pos, proto, first.take(), now)?;
            // The UDP header came off the outermost header, which must be
            // the ESP of an SA with that encapsulation (as `xfrm_input`
            // checks the encapsulation type); no other SA may expect UDP.
            let wanted = if n == 0 && proto == Proto::Esp {
                encap.map(|e| e.dport)
            } else {
                None
            };
            if sa.encap().map(|e| e.dport) != wanted {
                return Err(DropReason::EncapMismatch);
            }
            found[n] = Some((proto, sa));
            n += 1;
        }
    }
    if encap.is_some() {
        if n == 0 {
            return Err(DropReason::EncapMismatch);
        }
        let inner = packet::parse(buf.data()).map_err(|_| DropReason::Malformed)?;
        udp_encap::fix_inner_checksum(buf.data_mut(), &inner);
    }
    *out_flow = if n == 0 {
        flow_of(&info, buf.data(), info.dst(buf.data()))
    } else if !info.is_v6() {
        // IPv4 after decapsulation: same header, the protocol byte now
        // names the upper layer.
        let info = IpInfo {
            next_hdr: buf.data()[9],
            upper_proto: buf.data()[9],
            ..info
        };
        flow_of(&info, buf.data(), info.dst(buf.data()))
    } else {
        let info = packet::parse(buf.data()).map_err(|_| DropReason::Malformed)?;
        flow_of(&info, buf.data(), info.dst(buf.data()))
    };
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn decap_one<'s>(
    state: &'s State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    at: usize,
    nh_pos: usize,
    proto: Proto,
    // The SA of this header's SPI if looked up already (stage 1).
    pre: Option<&'s Arc<Sa>>,
    now: Duration,
) -> Result<&'s Arc<Sa>, DropReason> {
    if proto == Proto::IpComp {
        let cpi = Codec::peek(buf.data(), at).ok_or(DropReason::Malformed)?;
        let sa = state
            .sad
            .lookup_inbound(info.dst(buf.data()), Proto::IpComp, cpi as u32)
            .ok_or(DropReason::UnknownSpi)?;
        w.codec.decompress(buf, at, nh_pos).map_err(|e| {
            sa.counters.format_errors.fetch_add(1, Relaxed);
            match e {
                IpCompError::TooBig => DropReason::TooBig,
                IpCompError::Malformed => DropReason::Malformed,
                IpCompError::Corrupt => DropReason::Decompress,
            }
        })?;
        let e = sa.account(buf.len(), now);
        w.expiry(sa, e)?;
        return Ok(sa);
    }
    let (spi, seq_lo) = match proto {
        Proto::Ah => ah::peek(buf.data(), at),
        _ => esp::peek(buf.data(), at),
    }
    .ok_or(DropReason::Malformed)?;
    let sa = match pre {
        Some(sa) => sa,
        None => state
            .sad
            .lookup_inbound(info.dst(buf.data()), proto, spi)
            .ok_or(DropReason::UnknownSpi)?,
    };
    if sa.src() != info.src(buf.data()) {
        return Err(DropReason::UnknownSpi);
    }
    if sa.is_dead() {
        return Err(DropReason::SaExpired);
    }
    let seq = sa.replay_check(seq_lo).map_err(|e| replay_drop(sa, e))?;
    let seq_hi = (seq >> 32) as u32;
    let len = buf.len();
    let r = match proto {
        Proto::Ah => {
            ah::open(buf, at, nh_pos, sa, seq_hi, &mut w.scratch_bytes).map_err(|e| match e {
                AhError::Icv => DropReason::IcvFailure,
                _ => DropReason::Malformed,
            })
        }
        _ => esp::open(buf, at, nh_pos, sa, seq_hi).map_err(|e| match e {
            EspError::Icv => DropReason::IcvFailure,
            EspError::Padding => DropReason::BadPadding,
            _ => DropReason::Malformed,
        }),
    };
    if let Err(r) = r {
        match r {
            DropReason::IcvFailure => sa.counters.icv_failures.fetch_add(1, Relaxed),
            _ => sa.counters.format_errors.fetch_add(1, Relaxed),
        };
        return Err(r);
    }
    let e = sa
        .accept_inbound(seq, len, now)
        .map_err(|e| replay_drop(sa, e))?;
    w.expiry(sa, e)?;
    Ok(sa)
}

/// Do the transforms found (outermost first) satisfy the policy's bundle
/// (innermost first)? IPComp is always optional: RFC 3173 has the sender
/// skip it when compression would not help.
fn check_inbound_policy(
    policy: &Policy,
    found: &[Found<'_>],
    flow: &Flow,
) -> Result<(), DropReason> {
    let rules = match &policy.action {
        Action::Bypass => return Ok(()),
        Action::Discard => return Err(DropReason::PolicyDiscard),
        Action::Ipsec(rules) => rules,
    };
    let mut inner_first = found.iter().rev().flatten().peekable();
    for r in rules {
        let hit = inner_first.peek().is_some_and(|(p, sa)| {
            *p == r.proto
                && sa.config.src == flow.src
                && sa.config.dst == flow.dst
                && match r.level {
                    Level::Unique(Some(id)) => sa.config.reqid == id,
                    _ => true,
                }
        });
        if hit {
            inner_first.next();
        } else if r.level.required() && r.proto != Proto::IpComp {
            return Err(if found.is_empty() {
                DropReason::PlaintextRefused
            } else {
                DropReason::PolicyMismatch
            });
        }
    }
    if inner_first.next().is_some() {
        return Err(DropReason::PolicyMismatch);
    }
    Ok(())
}
