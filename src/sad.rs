//! The Security Association Database: SAs by (dst, proto, SPI) for inbound
//! packets and by (src, dst, proto) for outbound ones.
//!
//! An [`Sa`] is immutable configuration (algorithms, keyed ciphers,
//! lifetimes) plus a small mutable part (sequence counter, replay window,
//! counters, lifetime state) in atomics and one small lock, so that many
//! workers can share it through an `Arc` while the database itself is an
//! immutable snapshot replaced as a whole when keys change.

use crate::cowmap::CowMap;
use crate::crypto::{Auth, AuthAlg, Cipher, EncAlg, KeyError};
use crate::replay::{ReplayError, ReplayWindow};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

/// The IPsec protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Esp,
    Ah,
    IpComp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Esp => "esp",
            Proto::Ah => "ah",
            Proto::IpComp => "ipcomp",
        }
    }

    pub fn from_name(s: &str) -> Option<Proto> {
        Some(match s {
            "esp" => Proto::Esp,
            "ah" => Proto::Ah,
            "ipcomp" => Proto::IpComp,
            _ => return None,
        })
    }

    pub fn ip_proto(self) -> u8 {
        match self {
            Proto::Esp => crate::packet::PROTO_ESP,
            Proto::Ah => crate::packet::PROTO_AH,
            Proto::IpComp => crate::packet::PROTO_IPCOMP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The well-known IPComp CPI for DEFLATE (RFC 2394), used on the wire when
/// an `ipcomp` SA is added without `-R`.
pub const CPI_DEFLATE: u16 = 2;

/// SA lifetimes: 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    pub soft_secs: u64,
    pub hard_secs: u64,
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub soft_packets: u64,
    pub hard_packets: u64,
}

/// Everything `add` says about an SA. Laid out (`repr(C)`) with what
/// packets read first (addresses, SPI, flags, lifetimes, selector) and
/// the keys, read only when the SA is made or dumped, last.
#[derive(Clone, PartialEq, Eq)]
#[repr(C)]
pub struct SaConfig {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub esn: bool,
    /// IPComp: `-R` given, the SPI field is the CPI on the wire.
    pub raw_cpi: bool,
    pub enc: EncAlg,
    pub auth: AuthAlg,
    pub spi: u32,
    pub reqid: u32,
    /// Replay window in packets; 0 = no replay check.
    pub replay: u32,
    /// ESP only: carried in UDP (RFC 3948), with these ports.
    pub encap: Option<crate::udp_encap::Encap>,
    pub lifetime: Lifetime,
    /// The traffic this SA may carry out, when narrower than everything
    /// between its two addresses (XFRM's `xfrm_usersa_info.sel`: the
    /// traffic selector an IKE daemon negotiated). An outbound lookup skips
    /// an SA whose selector does not match the flow, as the kernel's
    /// `xfrm_state_find` does; setkey SAs have none.
    pub selector: Option<crate::spd::Selector>,
    pub enc_key: Zeroizing<Vec<u8>>,
    pub auth_key: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaConfig")
            .field("src", &self.src)
            .field("dst", &self.dst)
            .field("proto", &self.proto)
            .field("spi", &format_args!("{:#x}", self.spi))
            .field("reqid", &self.reqid)
            .field("replay", &self.replay)
            .field("enc", &self.enc)
            .field("auth", &self.auth)
            .field("encap", &self.encap)
            .finish_non_exhaustive()
    }
}

impl SaConfig {
    /// The protocol as setkey names it: `esp-udp` for ESP in UDP.
    pub fn proto_name(&self) -> &'static str {
        if self.encap.is_some() {
            "esp-udp"
        } else {
            self.proto.name()
        }
    }

    /// `SRC DST`, as setkey shows them (`SRC[PORT] DST[PORT]` in UDP).
    pub fn endpoints(&self) -> String {
        match self.encap {
            Some(e) => format!("{}[{}] {}[{}]", self.src, e.sport, self.dst, e.dport),
            None => format!("{} {}", self.src, self.dst),
        }
    }

    /// The CPI carried on the wire for an IPComp SA.
    pub fn wire_cpi(&self) -> u16 {
        if self.raw_cpi {
            self.spi as u16
        } else {
            CPI_DEFLATE
        }
    }

    /// The value the SAD is indexed by for inbound lookups: the SPI, or
    /// for IPComp the CPI as it appears on the wire.
    pub fn wire_spi(&self) -> u32 {
        match self.proto {
            Proto::IpComp => self.wire_cpi() as u32,
            _ => self.spi,
        }
    }
}

/// When an SA or a policy last carried a packet: engine time in whole
/// seconds plus one (0: never). A worker stores only when the second
/// changes, so the shared line is read per packet and written once a
/// second at most. The XFRM front end reports it as `curlft.use_time`
/// (charon reads it for dead-peer detection and inactivity timeouts).
#[derive(Default)]
pub struct UseTime(AtomicU64);

impl UseTime {
    #[inline]
    pub fn touch(&self, now: Duration) {
        let s = now.as_secs() + 1;
        if self.0.load(Relaxed) != s {
            self.0.store(s, Relaxed);
        }
    }

    pub fn get(&self) -> Option<Duration> {
        match self.0.load(Relaxed) {
            0 => None,
            s => Some(Duration::from_secs(s - 1)),
        }
    }
}

impl Clone for UseTime {
    fn clone(&self) -> UseTime {
        UseTime(AtomicU64::new(self.0.load(Relaxed)))
    }
}

/// Usage is not part of a policy's identity.
impl PartialEq for UseTime {
    fn eq(&self, _: &UseTime) -> bool {
        true
    }
}

impl Eq for UseTime {}

impl fmt::Debug for UseTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

/// Per-SA counters (read by `stats`). The two every packet writes come
/// first (they share the SA's first cache line with the sequence number).
#[derive(Debug, Default)]
#[repr(C)]
pub struct SaCounters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    pub replay_drops: AtomicU64,
    pub icv_failures: AtomicU64,
    pub format_errors: AtomicU64,
}

/// The lifetime state of an SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Alive,
    /// Soft limit reached: still usable, the keying daemon should rekey.
    Soft,
    /// Hard limit reached: unusable.
    Hard,
}

/// A live SA. Laid out (`repr(C)`, cache-line aligned) for the packet
/// path: line 0 holds what every packet writes (sequence number, packet
/// and byte counters, use time, replay top); line 1 the flags and copies
/// of what a packet reads of the configuration (protocol, ESN, SPI,
/// replay size, UDP encapsulation, the lifetimes folded into the first
/// limit a packet could reach); line 2 the replay window and, inbound, the
/// source; then the cipher with its AEAD context inline. The rest (age,
/// configuration, keys, MAC) is read when the SA is made, looked up,
/// shown or near a limit. An outbound packet reads 12 lines (2 + 10 of
/// the AES-GCM context), an inbound one 13; a batch prefetches them from
/// the SA's address in one step (see [`Sa::prefetch`]).
#[repr(C, align(64))]
pub struct Sa {
    /// Next outbound sequence number minus one.
    seq: AtomicU64,
    pub counters: SaCounters,
    /// Last packet protected or accepted.
    pub used: UseTime,
    /// The window's highest accepted number, readable without the lock:
    /// an in-order packet (the common case) is checked against it alone.
    replay_top: AtomicU64,
    // Line 1.
    dead: AtomicBool,
    soft_fired: AtomicBool,
    hard_fired: AtomicBool,
    proto: Proto,
    esn: bool,
    spi: u32,
    replay_size: u32,
    encap: Option<crate::udp_encap::Encap>,
    /// No lifetime is reached while packets, bytes and time stay below
    /// these (the smallest limits set; `u64::MAX` and `Duration::MAX`
    /// when none is): below them a packet does not read the lifetimes.
    first_packets: u64,
    first_bytes: u64,
    first_deadline: Duration,
    // Line 2.
    pub replay: Mutex<ReplayWindow>,
    src: IpAddr,
    pub cipher: Cipher,
    /// When it was added (engine time).
    pub added: Duration,
    pub config: SaConfig,
    pub mac: Auth,
    /// Insertion order: among several matching SAs the newest wins.
    pub serial: u64,
    /// IPComp: RFC 3173's adaptive pauses (unused by ESP and AH, so out
    /// of their lines).
    pub ipcomp: crate::ipcomp::Adaptive,
}

impl fmt::Debug for Sa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sa")
            .field("config", &self.config)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// Why an SA could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{0}")]
    Invalid(String),
}

impl Sa {
    pub fn new(config: SaConfig, added: Duration, serial: u64) -> Result<Sa, SaError> {
        let invalid = |m: &str| Err(SaError::Invalid(m.to_string()));
        match config.proto {
            Proto::Esp => {
                if config.enc == EncAlg::Null && config.auth == AuthAlg::Null {
                    return invalid(
                        "esp with null encryption and null authentication protects nothing (RFC 4303 section 3.2)",
                    );
                }
                if config.enc.is_aead() && config.auth != AuthAlg::Null {
                    return invalid(&format!("{} is an AEAD: give no -A", config.enc.name()));
                }
            }
            Proto::Ah | Proto::IpComp if config.encap.is_some() => {
                return invalid(&format!(
                    "UDP encapsulation (RFC 3948) is for esp only, not {}",
                    config.proto
                ));
            }
            Proto::Ah => {
                if config.auth == AuthAlg::Null {
                    return invalid("ah needs an authentication algorithm (-A)");
                }
                if config.enc != EncAlg::Null {
                    return invalid("ah takes no encryption algorithm (-E)");
                }
            }
            Proto::IpComp => {
                if config.raw_cpi && config.spi > 0xffff {
                    return invalid("an ipcomp CPI used on the wire (-R) must fit in 16 bits");
                }
            }
        }
        if config.src.is_ipv4() != config.dst.is_ipv4() {
            return invalid("source and destination are of different address families");
        }
        let cipher = Cipher::new(config.enc, &config.enc_key)?;
        let mac = Auth::new(config.auth, &config.auth_key)?;
        let lt = &config.lifetime;
        let first = |a: u64, b: u64| match (a, b) {
            (0, 0) => u64::MAX,
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        let first_secs = first(lt.soft_secs, lt.hard_secs);
        Ok(Sa {
            replay: Mutex::new(ReplayWindow::new(config.replay)),
            replay_top: AtomicU64::new(0),
            proto: config.proto,
            esn: config.esn,
            spi: config.spi,
            replay_size: config.replay,
            encap: config.encap,
            first_packets: first(lt.soft_packets, lt.hard_packets),
            first_bytes: first(lt.soft_bytes, lt.hard_bytes),
            first_deadline: if first_secs == u64::MAX {
                Duration::MAX
            } else {
                added.saturating_add(Duration::from_secs(first_secs))
            },
            src: config.src,
            cipher,
            mac,
            added,
            serial,
            seq: AtomicU64::new(0),
            counters: SaCounters::default(),
            ipcomp: Default::default(),
            used: UseTime::default(),
            soft_fired: AtomicBool::new(false),
            hard_fired: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            config,
        })
    }

    /// Bytes from the SA's start that a packet reads besides the cipher:
    /// counters, flags, configuration copies, replay window and source.
    pub const HOT_BYTES: usize = std::mem::offset_of!(Sa, cipher);

    /// Ask for the lines a packet of this SA will read (see
    /// [`crate::prefetch`]): [`Sa::HOT_BYTES`] and the cipher with its
    /// AEAD context (the MAC's keyed state, for HMAC suites, is a box
    /// away): 13 lines for AES-GCM. At 10,000 peers each line costs a
    /// packet about 5 ns, fetched ahead or not: the fetches queue.
    #[inline(always)]
    pub fn prefetch(&self) {
        crate::prefetch::bytes(
            self as *const Sa,
            Self::HOT_BYTES + std::mem::size_of::<Cipher>(),
        );
    }

    /// The SPI (a copy of the configuration's, on the SA's hot lines).
    #[inline]
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Extended sequence numbers (as [`Sa::spi`]).
    #[inline]
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// The protocol (as [`Sa::spi`]).
    #[inline]
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// UDP encapsulation (as [`Sa::spi`]).
    #[inline]
    pub fn encap(&self) -> Option<crate::udp_encap::Encap> {
        self.encap
    }

    /// The source address (as [`Sa::spi`]).
    #[inline]
    pub fn src(&self) -> IpAddr {
        self.src
    }

    /// Largest sequence number this SA may send.
    fn seq_limit(&self) -> u64 {
        if self.esn { u64::MAX } else { u32::MAX as u64 }
    }

    /// Take the next outbound sequence number. `None` once the space is
    /// exhausted: the SA then counts as hard-expired and is never wrapped.
    pub fn next_seq(&self) -> Option<u64> {
        let s = self.seq.fetch_add(1, Relaxed).wrapping_add(1);
        if s == 0 || s > self.seq_limit() {
            self.seq.store(self.seq_limit(), Relaxed);
            self.dead.store(true, Relaxed);
            return None;
        }
        Some(s)
    }

    /// The last sequence number sent.
    pub fn last_seq(&self) -> u64 {
        self.seq.load(Relaxed)
    }

    /// Start the outbound counter at `s` (tests and resynchronisation).
    pub fn set_last_seq(&self, s: u64) {
        self.seq.store(s, Relaxed);
    }

    #[inline]
    pub fn is_dead(&self) -> bool {
        self.dead.load(Relaxed)
    }

    pub fn mark_dead(&self) {
        self.dead.store(true, Relaxed);
    }

    /// Account one packet of `bytes` and evaluate the lifetimes at `now`.
    /// Returns the state and whether this call is the one that crossed a
    /// limit (so that an event is reported once).
    #[inline]
    pub fn account(&self, bytes: usize, now: Duration) -> (Expiry, bool) {
        self.used.touch(now);
        let packets = self.counters.packets.fetch_add(1, Relaxed) + 1;
        let total = self.counters.bytes.fetch_add(bytes as u64, Relaxed) + bytes as u64;
        self.evaluate(packets, total, now)
    }

    /// Account a run of `n` packets, `bytes` bytes in all, at `now`, and
    /// take `n` sequence numbers when `seqs` (ESP and AH): one write to
    /// each counter for the run. Workers protecting packets of one SA at
    /// once otherwise pass its counters' line back and forth for every
    /// packet. Each packet is then judged by [`Run::next`] as
    /// [`Sa::account`] and [`Sa::next_seq`] would judge it alone.
    ///
    /// `None` (account a packet at a time) unless the whole run stays
    /// below every lifetime limit and the sequence space: near a limit,
    /// another worker or the lifetime timer must not see a run's packets
    /// counted before they are sent (they could expire the SA early).
    /// Still, two workers may each take a run just below a limit; each
    /// packet past it is then refused, as it would be alone. A run cut
    /// short by the SA's death (another worker's or the timer's hard
    /// expiry) leaves its packets counted and its numbers used, as a
    /// packet accounted just before it died is: the bound is one run, not
    /// one packet. The numbers are taken when the run starts: the last
    /// number shown ([`Sa::last_seq`]) may be ahead of what was sent by a
    /// run in progress, and [`Sa::set_last_seq`] (XFRM's NEWAE) does not
    /// move numbers a run already holds.
    #[inline]
    pub fn account_run(&self, n: usize, bytes: u64, now: Duration, seqs: bool) -> Option<Run> {
        if !self.run_clear(n, bytes, now, seqs) {
            return None;
        }
        let c = &self.counters;
        let n64 = n as u64;
        self.used.touch(now);
        Some(Run {
            seqs,
            exhausted: false,
            packets: c.packets.fetch_add(n64, Relaxed),
            bytes: c.bytes.fetch_add(bytes, Relaxed),
            seq: if seqs {
                self.seq.fetch_add(n64, Relaxed)
            } else {
                0
            },
        })
    }

    /// Would a run of `n` packets, `bytes` in all, at `now` stay below
    /// every lifetime limit (and, with `seqs`, the end of the sequence
    /// numbers)? Only then is a run accounted as one ([`Sa::account_run`],
    /// [`Sa::accept_inbound_run`]).
    #[inline]
    pub fn run_clear(&self, n: usize, bytes: u64, now: Duration, seqs: bool) -> bool {
        let c = &self.counters;
        let n64 = n as u64;
        c.packets.load(Relaxed).saturating_add(n64) < self.first_packets
            && c.bytes.load(Relaxed).saturating_add(bytes) < self.first_bytes
            && now < self.first_deadline
            && !self.is_dead()
            && (!seqs || self.seq.load(Relaxed).saturating_add(n64) < self.seq_limit())
    }

    /// Evaluate the lifetimes at `now` without traffic (timers).
    pub fn expiry(&self, now: Duration) -> (Expiry, bool) {
        let p = self.counters.packets.load(Relaxed);
        let b = self.counters.bytes.load(Relaxed);
        self.evaluate(p, b, now)
    }

    #[inline]
    fn evaluate(&self, packets: u64, bytes: u64, now: Duration) -> (Expiry, bool) {
        if packets < self.first_packets
            && bytes < self.first_bytes
            && now < self.first_deadline
            && !self.is_dead()
        {
            // Below every limit: the answer of the full check below.
            return (Expiry::Alive, false);
        }
        self.evaluate_limits(packets, bytes, now)
    }

    #[cold]
    fn evaluate_limits(&self, packets: u64, bytes: u64, now: Duration) -> (Expiry, bool) {
        let lt = &self.config.lifetime;
        let age = now.saturating_sub(self.added).as_secs();
        let over = |limit: u64, v: u64| limit != 0 && v >= limit;
        let hard =
            over(lt.hard_secs, age) || over(lt.hard_bytes, bytes) || over(lt.hard_packets, packets);
        if hard || self.is_dead() {
            self.dead.store(true, Relaxed);
            let first = !self.hard_fired.swap(true, Relaxed);
            return (Expiry::Hard, first);
        }
        let soft =
            over(lt.soft_secs, age) || over(lt.soft_bytes, bytes) || over(lt.soft_packets, packets);
        if soft {
            let first = !self.soft_fired.swap(true, Relaxed);
            return (Expiry::Soft, first);
        }
        (Expiry::Alive, false)
    }

    /// Check a received sequence number against the replay window (before
    /// the ICV is verified). Returns the full (ESN-inferred) number.
    #[inline]
    pub fn replay_check(&self, seq_lo: u32) -> Result<u64, ReplayError> {
        self.replay_check_from(self.replay_top.load(Relaxed), seq_lo)
    }

    /// [`Sa::replay_check`], the full number inferred from `top` (the top
    /// the window would have with numbers not yet accepted).
    #[inline]
    pub fn replay_check_from(&self, top: u64, seq_lo: u32) -> Result<u64, ReplayError> {
        let full = crate::replay::infer(top, self.replay_size, seq_lo, self.esn);
        if full > self.replay_top.load(Relaxed) {
            // Right of the window: accepted whatever the bitmap says. The
            // lock is taken again (and the check repeated) in replay_accept.
            return Ok(full);
        }
        let w = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        w.check(full).map(|_| full)
    }

    /// The replay window's size in packets (0: no check).
    #[inline]
    pub fn replay_size(&self) -> u32 {
        self.replay_size.min(crate::replay::MAX_WINDOW)
    }

    /// Inbound, a run of this SA's packets before any of them is
    /// accepted: `out[k]` is [`Sa::replay_check`] of `los[k]`, each
    /// inferred from the same top (returned), under one lock at most.
    pub fn replay_check_run(&self, los: &[u32], out: &mut [Result<u64, ReplayError>]) -> u64 {
        let top = self.replay_top.load(Relaxed);
        let mut left = false;
        for (lo, o) in los.iter().zip(out.iter_mut()) {
            let full = crate::replay::infer(top, self.replay_size, *lo, self.esn);
            *o = Ok(full);
            left |= full <= top;
        }
        if left {
            let w = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            for o in out[..los.len()].iter_mut() {
                if let Ok(full) = *o
                    && full <= top
                {
                    *o = w.check(full).map(|_| full);
                }
            }
        }
        top
    }

    /// Move the window after the ICV was verified.
    pub fn replay_accept(&self, seq: u64) -> Result<(), ReplayError> {
        let mut w = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        w.accept(seq)?;
        self.replay_top.store(w.top(), Relaxed);
        Ok(())
    }

    /// Inbound: move the window and account one packet of `bytes` in one
    /// critical section. Every inbound packet of an SA takes this lock, so
    /// the counters need plain loads and stores here, not atomic
    /// read-modify-writes.
    pub fn accept_inbound(
        &self,
        seq: u64,
        bytes: usize,
        now: Duration,
    ) -> Result<(Expiry, bool), ReplayError> {
        let (packets, total) = {
            let mut w = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            w.accept(seq)?;
            self.replay_top.store(w.top(), Relaxed);
            let c = &self.counters;
            let p = c.packets.load(Relaxed) + 1;
            let b = c.bytes.load(Relaxed) + bytes as u64;
            c.packets.store(p, Relaxed);
            c.bytes.store(b, Relaxed);
            (p, b)
        };
        self.used.touch(now);
        Ok(self.evaluate(packets, total, now))
    }

    /// Inbound: [`Sa::accept_inbound`] of each of a run's packets (its
    /// number and bytes), in order, under one lock: `out[k]` for
    /// `items[k]`. Workers opening packets of one SA at once otherwise
    /// pass the window's lock and line back and forth for every packet.
    pub fn accept_inbound_run(
        &self,
        items: &[(u64, u32)],
        now: Duration,
        out: &mut [Result<(Expiry, bool), ReplayError>],
    ) {
        {
            let mut w = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            let c = &self.counters;
            let p0 = c.packets.load(Relaxed);
            let (mut p, mut b) = (p0, c.bytes.load(Relaxed));
            for ((seq, len), o) in items.iter().zip(out.iter_mut()) {
                *o = w.accept(*seq).map(|()| {
                    p += 1;
                    b += *len as u64;
                    self.evaluate(p, b, now)
                });
            }
            self.replay_top.store(w.top(), Relaxed);
            if p == p0 {
                // None accepted: nothing counted, nothing touched.
                return;
            }
            c.packets.store(p, Relaxed);
            c.bytes.store(b, Relaxed);
        }
        self.used.touch(now);
    }

    /// The highest sequence number the replay window accepted.
    pub fn replay_top(&self) -> u64 {
        self.replay_top.load(Relaxed)
    }
}

/// The inbound key (dst, proto, SPI). It hashes the SPI and protocol only:
/// one multiplication instead of hashing an address enum per packet;
/// equality still compares the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpiKey(IpAddr, Proto, u32);

impl std::hash::Hash for SpiKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write_u64(((self.2 as u64) << 8) | self.1 as u64);
    }
}

/// An SA as it was and as it is (`None`: absent), for [`Sad::changes_since`].
pub type SaChange<'a> = (Option<&'a Arc<Sa>>, Option<&'a Arc<Sa>>);

/// The SAs from one address to another of one protocol, newest last.
type Pair = Arc<[Arc<Sa>]>;

/// The SAD: an immutable snapshot, cheap to clone (its maps are
/// copy-on-write, SAs are shared), changed at the cost of the change.
#[derive(Debug, Clone, Default)]
pub struct Sad {
    /// Inbound index: (dst, proto, SPI or wire CPI).
    by_spi: CowMap<SpiKey, Arc<Sa>>,
    /// Outbound index: (src, dst, proto), newest last. A shared slice,
    /// not a `Vec`: a change copies the shard it lands in, and a `Vec`
    /// per entry was an allocation and a reference count raised per SA
    /// of the shard (at 10,000 peers most of an SA change's own time).
    by_pair: CowMap<(IpAddr, IpAddr, Proto), Pair>,
    /// SPIs reserved by `getspi` (larval SAs): source and expiry time.
    larval: CowMap<SpiKey, (IpAddr, Duration)>,
    next_serial: u64,
}

/// What [`Sa::account_run`] took for a run of packets: the counts and
/// the sequence number before its next packet.
pub struct Run {
    seqs: bool,
    /// The sequence space ran out during the run (another worker took
    /// numbers too): no number after that.
    exhausted: bool,
    packets: u64,
    bytes: u64,
    seq: u64,
}

impl Run {
    /// The next packet of the run, of `bytes` bytes: its lifetime state
    /// (as [`Sa::account`]) and, for ESP and AH, its sequence number (as
    /// [`Sa::next_seq`]: `None` once the space is exhausted).
    #[inline]
    pub fn next(&mut self, sa: &Sa, bytes: usize, now: Duration) -> ((Expiry, bool), Option<u64>) {
        self.packets += 1;
        self.bytes += bytes as u64;
        let e = sa.evaluate(self.packets, self.bytes, now);
        if !self.seqs {
            return (e, None);
        }
        self.seq = self.seq.wrapping_add(1);
        let s = self.seq;
        if self.exhausted || s == 0 || s > sa.seq_limit() {
            self.exhausted = true;
            sa.seq.store(sa.seq_limit(), Relaxed);
            sa.dead.store(true, Relaxed);
            return (e, None);
        }
        (e, Some(s))
    }
}

/// How long a larval SA waits for its `update` (Linux uses 30 s for SAs
/// in ACQUIRE state).
pub const LARVAL_LIFETIME: Duration = Duration::from_secs(30);

impl Sad {
    pub fn len(&self) -> usize {
        self.by_spi.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_spi.is_empty()
    }

    /// Is (dst, proto, spi) taken, by an SA or a reservation alive at `now`?
    pub fn spi_in_use(&self, dst: IpAddr, proto: Proto, spi: u32, now: Duration) -> bool {
        let k = SpiKey(dst, proto, spi);
        self.by_spi.contains_key(&k) || self.larval.get(&k).is_some_and(|(_, exp)| *exp > now)
    }

    /// Reserve `spi` (setkey `getspi`) until `now + LARVAL_LIFETIME`.
    pub fn reserve(&mut self, src: IpAddr, dst: IpAddr, proto: Proto, spi: u32, now: Duration) {
        self.larval
            .insert(SpiKey(dst, proto, spi), (src, now + LARVAL_LIFETIME));
    }

    /// Is there a live reservation for this SA?
    pub fn is_larval(&self, config: &SaConfig, now: Duration) -> bool {
        self.larval
            .get(&SpiKey(config.dst, config.proto, config.wire_spi()))
            .is_some_and(|(src, exp)| *src == config.src && *exp > now)
    }

    /// Larval SAs: (src, dst, proto, spi, expiry).
    pub fn larval(&self) -> impl Iterator<Item = (IpAddr, IpAddr, Proto, u32, Duration)> + '_ {
        self.larval
            .iter()
            .map(|(k, (src, exp))| (*src, k.0, k.1, k.2, *exp))
    }

    /// Drop the reservation (src, dst, proto, spi), if there is one.
    pub fn unreserve(&mut self, src: IpAddr, dst: IpAddr, proto: Proto, spi: u32) -> bool {
        let k = SpiKey(dst, proto, spi);
        if self.larval.get(&k).is_some_and(|(s, _)| *s == src) {
            self.larval.remove(&k);
            return true;
        }
        false
    }

    /// Forget reservations that expired by `now`; returns how many.
    pub fn expire_larval(&mut self, now: Duration) -> usize {
        if self.larval.is_empty() {
            // Every change calls this: do not visit 1,024 empty shards.
            return 0;
        }
        let before = self.larval.len();
        self.larval.retain(|_, (_, exp)| *exp > now);
        before - self.larval.len()
    }

    /// Complete a larval SA (setkey `update` after `getspi`).
    pub fn complete(&mut self, config: SaConfig, now: Duration) -> Result<Arc<Sa>, SaError> {
        let key = SpiKey(config.dst, config.proto, config.wire_spi());
        self.larval.remove(&key);
        self.add(config, now)
    }

    /// Add an SA; fails if (dst, proto, spi) exists (setkey `add`).
    pub fn add(&mut self, config: SaConfig, now: Duration) -> Result<Arc<Sa>, SaError> {
        let key = SpiKey(config.dst, config.proto, config.wire_spi());
        if self.larval.get(&key).is_some_and(|(_, exp)| *exp > now) {
            return Err(SaError::Invalid(format!(
                "spi {:#x} to {} is reserved by getspi: complete it with update",
                config.spi, config.dst
            )));
        }
        if self.by_spi.contains_key(&key) {
            return Err(SaError::Invalid(format!(
                "an SA {} {} spi {:#x} exists already (delete it first)",
                config.dst, config.proto, config.spi
            )));
        }
        self.next_serial += 1;
        // The SA holds its keys and keyed state: in the key arena.
        let sa = crate::secret::within(|| Sa::new(config, now, self.next_serial).map(Arc::new))?;
        self.by_spi.insert(key, sa.clone());
        let pair = self
            .by_pair
            .entry_or_default((sa.config.src, sa.config.dst, sa.config.proto));
        *pair = pair.iter().chain([&sa]).cloned().collect();
        Ok(sa)
    }

    /// Remove the SA (src, dst, proto, spi); returns it if it existed.
    pub fn delete(&mut self, src: IpAddr, dst: IpAddr, proto: Proto, spi: u32) -> Option<Arc<Sa>> {
        let sa = self.get(src, dst, proto, spi)?.clone();
        self.remove(&sa);
        Some(sa)
    }

    fn remove(&mut self, sa: &Arc<Sa>) {
        let c = &sa.config;
        self.by_spi.remove(&SpiKey(c.dst, c.proto, c.wire_spi()));
        let key = (c.src, c.dst, c.proto);
        if let Some(v) = self.by_pair.get_mut(&key) {
            let kept: Pair = v.iter().filter(|x| !Arc::ptr_eq(x, sa)).cloned().collect();
            if kept.is_empty() {
                self.by_pair.remove(&key);
            } else {
                *v = kept;
            }
        }
    }

    /// Remove every SA between src and dst of `proto` (setkey `deleteall`).
    pub fn delete_all(&mut self, src: IpAddr, dst: IpAddr, proto: Proto) -> Vec<Arc<Sa>> {
        let v = self
            .by_pair
            .remove(&(src, dst, proto))
            .map_or_else(Vec::new, |v| v.to_vec());
        for sa in &v {
            self.by_spi.remove(&SpiKey(
                sa.config.dst,
                sa.config.proto,
                sa.config.wire_spi(),
            ));
        }
        v
    }

    /// Remove all SAs, or all of one protocol (setkey `flush [proto]`).
    pub fn flush(&mut self, proto: Option<Proto>) -> Vec<Arc<Sa>> {
        let victims: Vec<_> = self
            .by_spi
            .values()
            .filter(|sa| proto.is_none_or(|p| sa.config.proto == p))
            .cloned()
            .collect();
        for sa in &victims {
            self.remove(sa);
        }
        victims
    }

    /// The SA (src, dst, proto, spi) as setkey `get` names it.
    pub fn get(&self, src: IpAddr, dst: IpAddr, proto: Proto, spi: u32) -> Option<&Arc<Sa>> {
        self.by_pair
            .get(&(src, dst, proto))?
            .iter()
            .find(|sa| sa.config.spi == spi)
    }

    /// Ask for the line where [`Sad::lookup_inbound`] of these will look.
    #[inline]
    pub fn prefetch_inbound(&self, dst: IpAddr, proto: Proto, spi: u32) {
        self.by_spi.prefetch(&SpiKey(dst, proto, spi));
    }

    /// Inbound lookup by the SPI (or CPI) found in a packet.
    #[inline]
    pub fn lookup_inbound(&self, dst: IpAddr, proto: Proto, spi: u32) -> Option<&Arc<Sa>> {
        self.by_spi.get(&SpiKey(dst, proto, spi))
    }

    /// Outbound lookup: the newest usable SA from the flow's source to its
    /// destination, with the given reqid when `reqid` is set, skipping SAs
    /// whose own selector does not match the flow.
    #[inline]
    pub fn lookup_flow(
        &self,
        flow: &crate::spd::Flow,
        proto: Proto,
        reqid: Option<u32>,
    ) -> Option<&Arc<Sa>> {
        self.by_pair
            .get(&(flow.src, flow.dst, proto))?
            .iter()
            .rev()
            .find(|sa| {
                !sa.is_dead()
                    && reqid.is_none_or(|r| sa.config.reqid == r)
                    && sa.config.selector.is_none_or(|s| s.matches(flow))
            })
    }

    /// SAs in `self` that `old` does not have (added, or replaced by an
    /// update): at the cost of the change.
    pub fn added_since<'a>(&'a self, old: &'a Sad) -> impl Iterator<Item = &'a Arc<Sa>> {
        self.by_spi
            .changes_since(&old.by_spi, Arc::ptr_eq)
            .into_iter()
            .filter_map(|(_, new)| new)
    }

    /// SAs that differ from `old`, an earlier version of this SAD: `(old,
    /// new)` for each SA added, removed or replaced (an update), at the
    /// cost of the change (see [`CowMap::changes_since`]).
    pub fn changes_since<'a>(&'a self, old: &'a Sad) -> Vec<SaChange<'a>> {
        self.by_spi.changes_since(&old.by_spi, Arc::ptr_eq)
    }

    /// All SAs in no particular order (no sort: for scans of every SA).
    pub fn iter_unordered(&self) -> impl Iterator<Item = &Arc<Sa>> {
        self.by_spi.values()
    }

    /// All SAs, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Sa>> {
        let mut v: Vec<_> = self.by_spi.values().collect();
        v.sort_by_key(|sa| sa.serial);
        v.into_iter()
    }

    /// Remove hard-expired SAs; returns them.
    pub fn reap(&mut self) -> Vec<Arc<Sa>> {
        let dead: Vec<_> = self
            .by_spi
            .values()
            .filter(|sa| sa.is_dead())
            .cloned()
            .collect();
        for sa in &dead {
            self.remove(sa);
        }
        dead
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn esp_config(spi: u32) -> SaConfig {
        SaConfig {
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            proto: Proto::Esp,
            spi,
            reqid: 0,
            replay: 64,
            esn: false,
            enc: EncAlg::AesCbc,
            enc_key: Zeroizing::new(vec![1; 16]),
            auth: AuthAlg::HmacSha1,
            auth_key: Zeroizing::new(vec![2; 20]),
            raw_cpi: false,
            encap: None,
            lifetime: Lifetime::default(),
            selector: None,
        }
    }

    /// Twin SAs: one accounts a run, the other the same packets one by
    /// one; the states, numbers and counters must agree.
    fn twins(lifetime: Lifetime, proto: Proto) -> (Sa, Sa) {
        let mut c = esp_config(0x300);
        c.lifetime = lifetime;
        if proto == Proto::IpComp {
            c.proto = Proto::IpComp;
            c.enc = EncAlg::Null;
            c.enc_key = Zeroizing::new(Vec::new());
            c.auth = AuthAlg::Null;
            c.auth_key = Zeroizing::new(Vec::new());
        }
        let a = Sa::new(c.clone(), Duration::ZERO, 1).unwrap();
        let b = Sa::new(c, Duration::ZERO, 2).unwrap();
        (a, b)
    }

    #[test]
    fn a_run_accounts_as_its_packets_one_by_one() {
        let now = Duration::from_secs(5);
        let lengths = [100usize, 1400, 60, 9000, 1];
        let total: u64 = lengths.iter().map(|&l| l as u64).sum();
        for proto in [Proto::Esp, Proto::IpComp] {
            // Far from the limits (10 packets): a run.
            let lt = Lifetime {
                soft_packets: 10,
                hard_packets: 20,
                ..Lifetime::default()
            };
            let (a, b) = twins(lt, proto);
            a.set_last_seq(41);
            b.set_last_seq(41);
            let seqs = proto != Proto::IpComp;
            let mut run = a
                .account_run(5, total, now, seqs)
                .expect("a run far from limits");
            for &len in &lengths {
                let (e, seq) = run.next(&a, len, now);
                assert_eq!(e, b.account(len, now), "{proto}");
                let alone = if seqs { b.next_seq() } else { None };
                assert_eq!(seq, alone, "{proto}");
            }
            assert_eq!(a.counters.packets.load(Relaxed), 5);
            assert_eq!(a.counters.bytes.load(Relaxed), total);
            assert_eq!(a.last_seq(), b.last_seq(), "{proto}: numbers taken");
            assert_eq!(a.last_seq(), if seqs { 46 } else { 41 });
            assert_eq!(a.used.get(), b.used.get());
            // Five more would reach the soft limit: packets one by one.
            assert!(a.account_run(5, 500, now, seqs).is_none(), "{proto}");
            assert!(a.account_run(4, 500, now, seqs).is_some(), "{proto}");
        }
    }

    #[test]
    fn no_run_near_a_limit_or_the_end_of_the_numbers() {
        let now = Duration::from_secs(5);
        let bytes = Lifetime {
            hard_bytes: 1000,
            ..Lifetime::default()
        };
        let (a, _) = twins(bytes, Proto::Esp);
        assert!(
            a.account_run(3, 1000, now, true).is_none(),
            "would reach hard bytes"
        );
        assert!(a.account_run(3, 999, now, true).is_some());
        let secs = Lifetime {
            soft_secs: 5,
            ..Lifetime::default()
        };
        let (a, _) = twins(secs, Proto::Esp);
        assert!(
            a.account_run(2, 10, now, true).is_none(),
            "at the soft time limit"
        );
        let (a, _) = twins(Lifetime::default(), Proto::Esp);
        a.set_last_seq(u32::MAX as u64 - 3);
        assert!(
            a.account_run(3, 10, now, true).is_none(),
            "would take the last number"
        );
        assert!(a.account_run(2, 10, now, true).is_some());
        // IPComp has no numbers to run out of.
        let (c, _) = twins(Lifetime::default(), Proto::IpComp);
        c.set_last_seq(u32::MAX as u64);
        assert!(c.account_run(3, 10, now, false).is_some());
        let (d, _) = twins(Lifetime::default(), Proto::Esp);
        d.mark_dead();
        assert!(d.account_run(2, 10, now, true).is_none(), "a dead SA");
    }

    #[test]
    fn a_run_past_the_last_number_takes_none_after_it() {
        // Another worker took numbers after the run was checked: the run
        // crosses the end of the space; nothing after it is handed out,
        // even once the counter would have wrapped.
        let (a, _) = twins(Lifetime::default(), Proto::Esp);
        let limit = u32::MAX as u64;
        let mut run = Run {
            seqs: true,
            exhausted: false,
            packets: 0,
            bytes: 0,
            seq: limit - 1,
        };
        let now = Duration::ZERO;
        assert_eq!(run.next(&a, 10, now).1, Some(limit));
        assert!(!a.is_dead());
        assert_eq!(run.next(&a, 10, now).1, None);
        assert!(a.is_dead());
        run.seq = u64::MAX; // the next would wrap to 0, then 1
        assert_eq!(run.next(&a, 10, now).1, None);
        assert_eq!(run.next(&a, 10, now).1, None, "exhausted stays exhausted");
        assert_eq!(a.last_seq(), limit);
    }

    #[test]
    fn newest_sa_wins_and_duplicates_are_refused() {
        let mut sad = Sad::default();
        let t = Duration::ZERO;
        sad.add(esp_config(0x100), t).unwrap();
        sad.add(esp_config(0x200), t).unwrap();
        let e = sad.add(esp_config(0x100), t).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
        let c = esp_config(0);
        let flow = crate::spd::Flow {
            src: c.src,
            dst: c.dst,
            proto: 17,
            ports: None,
        };
        let out = sad.lookup_flow(&flow, Proto::Esp, None).unwrap();
        assert_eq!(out.config.spi, 0x200);
        assert!(sad.lookup_inbound(c.dst, Proto::Esp, 0x100).is_some());
        assert!(sad.delete(c.src, c.dst, Proto::Esp, 0x200).is_some());
        let out = sad.lookup_flow(&flow, Proto::Esp, None).unwrap();
        assert_eq!(out.config.spi, 0x100);
        assert_eq!(sad.flush(Some(Proto::Ah)).len(), 0);
        assert_eq!(sad.flush(None).len(), 1);
        assert!(sad.is_empty());
    }

    #[test]
    fn a_packet_reads_three_lines_and_the_cipher() {
        use std::mem::{offset_of, size_of};
        assert!(offset_of!(Sa, replay_top) + 8 <= 64, "line 0");
        assert_eq!(offset_of!(Sa, dead), 64);
        assert!(offset_of!(Sa, first_deadline) + 16 <= 128, "line 1");
        assert!(offset_of!(Sa, src) + size_of::<IpAddr>() <= 192, "line 2");
        // The AES-GCM context ends in the 13th line.
        let end = Sa::HOT_BYTES + size_of::<Cipher>();
        assert!(end <= 13 * 64, "{end}");
    }

    #[test]
    fn the_first_limit_decides_as_the_lifetimes_do() {
        for (soft, hard) in [(0, 0), (3, 0), (0, 4), (3, 5), (5, 3)] {
            let mut c = esp_config(1);
            c.lifetime = Lifetime {
                soft_packets: soft,
                hard_packets: hard,
                soft_secs: soft,
                hard_secs: hard,
                ..Default::default()
            };
            let added = Duration::from_secs(10);
            for p in 0..8 {
                for t in 0..8 {
                    let sa = Sa::new(c.clone(), added, 1).unwrap();
                    let now = added + Duration::from_millis(999 * t);
                    let limits = sa.evaluate_limits(p, 0, now).0;
                    let sa = Sa::new(c.clone(), added, 1).unwrap();
                    assert_eq!(
                        sa.evaluate(p, 0, now).0,
                        limits,
                        "{soft}/{hard} p={p} t={t}"
                    );
                }
            }
        }
    }

    #[test]
    fn sequence_numbers_never_wrap() {
        let sa = Sa::new(esp_config(1), Duration::ZERO, 1).unwrap();
        sa.set_last_seq(u32::MAX as u64 - 1);
        assert_eq!(sa.next_seq(), Some(u32::MAX as u64));
        assert_eq!(sa.next_seq(), None);
        assert!(sa.is_dead());
        assert_eq!(sa.next_seq(), None);
    }

    #[test]
    fn lifetimes_fire_once() {
        let mut c = esp_config(1);
        c.lifetime = Lifetime {
            soft_bytes: 1000,
            hard_bytes: 2000,
            soft_secs: 10,
            ..Default::default()
        };
        let sa = Sa::new(c, Duration::from_secs(100), 1).unwrap();
        let t = Duration::from_secs(101);
        assert_eq!(sa.account(500, t), (Expiry::Alive, false));
        assert_eq!(sa.account(500, t), (Expiry::Soft, true));
        assert_eq!(sa.account(500, t), (Expiry::Soft, false));
        assert_eq!(sa.account(500, t), (Expiry::Hard, true));
        assert_eq!(sa.account(1, t), (Expiry::Hard, false));
        let sa2 = Sa::new(esp_config(2), Duration::from_secs(100), 2).unwrap();
        assert_eq!(
            sa2.expiry(Duration::from_secs(1000)),
            (Expiry::Alive, false)
        );
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let mut c = esp_config(1);
        c.enc = EncAlg::Null;
        c.enc_key = Zeroizing::new(vec![]);
        c.auth = AuthAlg::Null;
        c.auth_key = Zeroizing::new(vec![]);
        assert!(Sa::new(c, Duration::ZERO, 1).is_err());
        let mut c = esp_config(1);
        c.proto = Proto::Ah;
        assert!(
            Sa::new(c, Duration::ZERO, 1)
                .unwrap_err()
                .to_string()
                .contains("no encryption")
        );
    }
}
