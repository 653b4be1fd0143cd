//! The engine: the two entry points the shells call, `outbound` and
//! `inbound`. Pure functions of (state, per-worker context, packet, time):
//! no sockets, no threads, no clock reads.

use crate::ah::{self, AhError};
use crate::buf::PacketBuf;
use crate::esp::{self, EspError};
use crate::ipcomp::{Codec, IpCompError};
use crate::packet::{self, IpInfo};
use crate::reassembly::{self, Outcome, Reassembler};
use crate::replay::ReplayError;
use crate::sad::{Expiry, Proto, Sa};
use crate::spd::{Action, Dir, Flow, Level, Policy};
use crate::state::State;
use crate::udp_encap;
use rand::SeedableRng;
use rand::rngs::StdRng;
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
    scratch: Vec<u8>,
    out_cache: Option<OutCache>,
    in_cache: Option<InCache>,
    pub counters: Counters,
    pub events: Vec<Event>,
}

impl Worker {
    /// IPComp compression tries this worker made (DEFLATE runs).
    pub fn compression_tries(&self) -> u64 {
        self.codec.runs()
    }

    /// `seed` must come from a CSPRNG (the shell reads the OS's): it keys
    /// the ChaCha generator that makes CBC IVs unpredictable.
    pub fn new(seed: [u8; 32]) -> Worker {
        Worker {
            reassembly: Reassembler::default(),
            rng: StdRng::from_seed(seed),
            codec: Codec::new(),
            scratch: Vec::with_capacity(512),
            out_cache: None,
            in_cache: None,
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

/// The last outbound decision of a worker. Consecutive packets of one flow
/// (the common case in a batch) skip the SPD and SAD lookups; a new state
/// snapshot or an SA that died invalidates it.
struct OutCache {
    generation: u64,
    flow: Flow,
    policy: Arc<Policy>,
    sas: [Option<Arc<Sa>>; MAX_BUNDLE],
}

/// The last inbound policy decision of a worker.
struct InCache {
    generation: u64,
    flow: Flow,
    policy: Option<Arc<Policy>>,
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

/// Process a plaintext packet leaving this host.
pub fn outbound(state: &State, w: &mut Worker, buf: &mut PacketBuf, now: Duration) -> Verdict {
    let info = match packet::parse(buf.data()) {
        Ok(i) => i,
        Err(_) => return w.drop(DropReason::Malformed),
    };
    // Outbound, policies and SAs are chosen for the final destination.
    let flow = flow_of(&info, buf.data(), info.final_dst(buf.data()));
    let hit = w.out_cache.as_ref().is_some_and(|c| {
        c.generation == state.generation
            && c.flow == flow
            && c.sas.iter().flatten().all(|sa| !sa.is_dead())
    });
    if !hit {
        match resolve_out(state, w, &flow) {
            Ok(c) => w.out_cache = Some(c),
            // A fragment would be dropped once the SA exists: not worth
            // holding (the ACQUIRE is raised all the same).
            Err(Verdict::Pending) if info.fragment => return w.drop(DropReason::Fragment),
            Err(v) => return v,
        }
    }
    let cache = w.out_cache.take().expect("resolved above");
    let v = protect(&cache, w, buf, &info, now);
    w.out_cache = Some(cache);
    v
}

fn protect(
    cache: &OutCache,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: &IpInfo,
    now: Duration,
) -> Verdict {
    match &cache.policy.action {
        Action::Bypass => {
            w.counters.bypassed += 1;
            return Verdict::Forward;
        }
        Action::Discard => return w.drop(DropReason::PolicyDiscard),
        Action::Ipsec(_) => {}
    }
    if info.fragment {
        return w.drop(DropReason::Fragment);
    }
    let plain_len = buf.len();
    for sa in cache.sas.iter().flatten() {
        let e = sa.account(buf.len(), now);
        if let Err(r) = w.expiry(sa, e) {
            return w.drop(r);
        }
        let r = match sa.config.proto {
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
                let Some(seq) = sa.next_seq() else {
                    let e = sa.expiry(now);
                    let _ = w.expiry(sa, e);
                    return w.drop(DropReason::SeqExhausted);
                };
                if sa.config.proto == Proto::Esp {
                    esp::seal(buf, info.insert_at, info.next_hdr_pos, sa, seq, &mut w.rng)
                        .map_err(|e| match e {
                            EspError::TooBig => DropReason::TooBig,
                            _ => DropReason::Malformed,
                        })
                        .and_then(|()| match sa.config.encap {
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
                        &mut w.scratch,
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
    cache.policy.used.touch(now);
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
/// with the datagram in `buf`.
pub fn inbound(state: &State, w: &mut Worker, buf: &mut PacketBuf, now: Duration) -> Verdict {
    let info = match packet::parse(buf.data()) {
        Ok(i) => i,
        Err(_) => return w.drop(DropReason::Malformed),
    };
    let info = if info.fragment && reassembly::wanted(buf.data(), &info) {
        match w.reassembly.push(buf, &info, now, &mut w.counters) {
            Outcome::Held => return Verdict::Held,
            Outcome::Dropped(r) => return Verdict::Drop(r),
            Outcome::Complete => match packet::parse(buf.data()) {
                Ok(i) => i,
                Err(_) => return w.drop(DropReason::Malformed),
            },
        }
    } else {
        info
    };
    match inbound_inner(state, w, buf, info, now) {
        Ok(()) => {
            w.counters.in_packets += 1;
            w.counters.in_bytes += buf.len() as u64;
            Verdict::Forward
        }
        Err(r) => w.drop(r),
    }
}

fn inbound_inner(
    state: &State,
    w: &mut Worker,
    buf: &mut PacketBuf,
    info: IpInfo,
    now: Duration,
) -> Result<(), DropReason> {
    let mut info = info;
    // ESP in UDP (RFC 3948): to an SA that expects it on this port, or to
    // the NAT-T port (where an unknown SPI is counted as one).
    let mut encap = None;
    if let Some((spi, e)) = udp_encap::peek(buf.data(), &info) {
        let expected = state
            .sad
            .lookup_inbound(info.dst(buf.data()), Proto::Esp, spi)
            .is_some_and(|sa| sa.config.encap.is_some_and(|x| x.dport == e.dport));
        if expected || e.dport == udp_encap::NAT_T_PORT {
            udp_encap::decapsulate(buf, &info);
            info = packet::parse(buf.data()).map_err(|_| DropReason::Malformed)?;
            encap = Some(e);
        }
    }
    let mut found: [Option<(Proto, &Arc<Sa>)>; MAX_BUNDLE] = [None; MAX_BUNDLE];
    let mut n = 0;
    if let Some((at, nh_pos, _)) =
        packet::find_ipsec_header(buf.data(), &info).map_err(|_| DropReason::Malformed)?
    {
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
            let sa = decap_one(state, w, buf, &info, at, nh_pos, proto, now)?;
            // The UDP header came off the outermost header, which must be
            // the ESP of an SA with that encapsulation (as `xfrm_input`
            // checks the encapsulation type); no other SA may expect UDP.
            let wanted = if n == 0 && proto == Proto::Esp {
                encap.map(|e| e.dport)
            } else {
                None
            };
            if sa.config.encap.map(|e| e.dport) != wanted {
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
    let flow = if n == 0 {
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
    let hit = w
        .in_cache
        .as_ref()
        .is_some_and(|c| c.generation == state.generation && c.flow == flow);
    if !hit {
        w.in_cache = Some(InCache {
            generation: state.generation,
            flow,
            policy: state.spd.lookup(Dir::In, &flow).cloned(),
        });
    }
    match w.in_cache.as_ref().and_then(|c| c.policy.as_deref()) {
        None => Ok(()),
        Some(policy) => {
            check_inbound_policy(policy, &found[..n], &flow)?;
            policy.used.touch(now);
            Ok(())
        }
    }
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
    let sa = state
        .sad
        .lookup_inbound(info.dst(buf.data()), proto, spi)
        .ok_or(DropReason::UnknownSpi)?;
    if sa.config.src != info.src(buf.data()) {
        return Err(DropReason::UnknownSpi);
    }
    if sa.is_dead() {
        return Err(DropReason::SaExpired);
    }
    let seq = sa.replay_check(seq_lo).map_err(|e| replay_drop(sa, e))?;
    let seq_hi = (seq >> 32) as u32;
    let len = buf.len();
    let r = match proto {
        Proto::Ah => ah::open(buf, at, nh_pos, sa, seq_hi, &mut w.scratch).map_err(|e| match e {
            AhError::Icv => DropReason::IcvFailure,
            _ => DropReason::Malformed,
        }),
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
    found: &[Option<(Proto, &Arc<Sa>)>],
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
