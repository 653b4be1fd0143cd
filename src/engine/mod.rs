//! The engine: the two entry points the shells call, `outbound` and
//! `inbound` (and their batch forms). Pure functions of (state, per-worker
//! context, packet, time): no sockets, no threads, no clock reads. This
//! file holds what both directions share (verdicts, drop reasons, events,
//! counters, the per-worker state); `outbound.rs` and `inbound.rs` the
//! two paths.

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
    /// An inbound run's numbers (taken while a batch runs).
    in_run: Option<Box<in_run::InRun>>,
    /// Per-flow decisions, outbound (policy and SA) and inbound (policy,
    /// and the SA a flow last passed it with).
    out_flows: FlowCache,
    in_flows: FlowCache,
    out_cache: Option<OutCache>,
    pub counters: Counters,
    pub events: Vec<Event>,
    /// ESP in UDP, transport mode: leave the inner TCP checksum stale and
    /// mark the buffer ([`PacketBuf::csum_stale`]) instead of recomputing
    /// it (RFC 3948 section 3.1.2), for a shell whose writer tells the
    /// kernel not to verify it (the TUN device's offload, [`crate::gro`]),
    /// as Linux marks such packets `CHECKSUM_UNNECESSARY`. Off by default:
    /// pcap output and other writers need a correct checksum.
    pub defer_tcp_checksum: bool,
    /// Account consecutive packets of one SA in a batch together
    /// ([`Sa::account_run`]; inbound, accepted into the replay window
    /// under one lock, [`Sa::accept_inbound_run`]): for workers that share
    /// SAs with other workers, whose writes to the SA's counters and
    /// window would otherwise pass its lines between CPUs for every packet. Off by default: a worker alone
    /// accounts a packet at a time, which costs it a little less
    /// (`tunsec bench --threads` measures both).
    pub account_runs: bool,
}

impl Worker {
    /// IPComp compression tries this worker made (DEFLATE runs).
    pub fn compression_tries(&self) -> u64 {
        self.codec.runs()
    }

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
            in_run: Some(in_run::InRun::new()),
            out_flows: FlowCache::new(out_seed),
            in_flows: FlowCache::new(in_seed),
            out_cache: None,
            counters: Counters::default(),
            events: Vec::with_capacity(16),
            defer_tcp_checksum: false,
            account_runs: false,
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

mod in_run;
mod inbound;
mod outbound;
pub use inbound::{inbound, inbound_batch};
pub use outbound::{CHUNK, outbound, outbound_batch};
use outbound::{MAX_BUNDLE, OutCache, Scratch, replay_drop};
