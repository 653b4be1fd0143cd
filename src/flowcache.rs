//! A worker's cache of per-flow decisions: what the SPD and SAD said
//! about a flow (its policy and, outbound, its SA), so that a packet of a
//! flow seen before costs one hashed probe instead of the SPD's index
//! lookups and the SAD's, as VPP keeps a flow cache in front of its SPD.
//!
//! Exact: an entry is found only for the same flow (addresses, protocol
//! and ports, compared whole) and only under the state it was filled
//! from: a new state snapshot (another generation) makes every entry
//! stale at once, by one counter, without touching them. An SA that died
//! since is checked by the engine on each hit.
//!
//! Four-way sets of 64-byte entries (a set is four cache lines, the first
//! two fetched ahead by a batch). The number of entries follows the size
//! of the state (about two per policy of the cache's direction: 2 MiB a
//! cache at 10,000 peers) and only grows. With 10,000 flows round robin
//! (the worst case for any cache: each flow comes back only after all the
//! others) about 0.4% of packets miss: two-way sets of the same total
//! size missed 3-4% (flows of one set beyond its ways evict each other on
//! every round). Entries hold `Arc`s: a stale entry keeps its policy and
//! SA alive until it is replaced or swept ([`FlowCache::sweep`]).

use crate::sad::Sa;
use crate::spd::{Action, Flow, Policy};
use std::net::IpAddr;
use std::sync::Arc;

/// A flow as 40 bytes: source, destination (IPv4 in the low word),
/// then protocol, flags (IPv6, ports present) and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowKey([u64; 5]);

const KEY_V6: u64 = 1 << 8;
const KEY_PORTS: u64 = 1 << 9;

impl FlowKey {
    #[inline]
    fn addr(a: IpAddr) -> (u64, u64) {
        match a {
            IpAddr::V4(a) => (0, u32::from(a) as u64),
            IpAddr::V6(a) => {
                let x = u128::from(a);
                ((x >> 64) as u64, x as u64)
            }
        }
    }

    /// The key of a flow.
    #[inline]
    pub fn of(f: &Flow) -> FlowKey {
        let (s0, s1) = Self::addr(f.src);
        let (d0, d1) = Self::addr(f.dst);
        let mut w = f.proto as u64;
        if f.src.is_ipv6() {
            w |= KEY_V6;
        }
        if let Some((sp, dp)) = f.ports {
            w |= KEY_PORTS | (sp as u64) << 16 | (dp as u64) << 32;
        }
        FlowKey([s0, s1, d0, d1, w])
    }
}

/// What a replaced entry held, kept until the batch ends.
type Released = (Option<Arc<Policy>>, Option<Arc<Sa>>);

/// One cached decision (64 bytes, one cache line).
#[repr(C, align(64))]
#[derive(Default)]
struct Entry {
    key: FlowKey,
    /// The cache's epoch when filled; 0: empty.
    epoch: u32,
    /// The policy's action ([`Kind`], top two bits) and the engine second
    /// (plus one) in which this flow last touched the policy's use time
    /// (see [`second`]): a packet of the flow then reads nothing of the
    /// policy, whose lines are not fetched.
    meta: u32,
    policy: Option<Arc<Policy>>,
    sa: Option<Arc<Sa>>,
}

/// A policy's action, as the entry keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No policy.
    None,
    Bypass,
    Discard,
    Ipsec,
}

impl Kind {
    fn of(p: Option<&Policy>) -> Kind {
        match p.map(|p| &p.action) {
            None => Kind::None,
            Some(Action::Bypass) => Kind::Bypass,
            Some(Action::Discard) => Kind::Discard,
            Some(Action::Ipsec(_)) => Kind::Ipsec,
        }
    }

    fn from_bits(b: u32) -> Kind {
        match b {
            0 => Kind::None,
            1 => Kind::Bypass,
            2 => Kind::Discard,
            _ => Kind::Ipsec,
        }
    }
}

const SECONDS: u32 = (1 << 30) - 1;

/// The engine second of `now` plus one as entries record it; 0 (never
/// equal to a recorded second, so the policy is always touched) after 34
/// years.
#[inline]
pub fn second(now: std::time::Duration) -> u32 {
    let s = now.as_secs().saturating_add(1);
    if s >= SECONDS as u64 { 0 } else { s as u32 }
}

/// What a hit gives: pointers into the entry's `Arc`s. They stay valid
/// until the end of the current batch: an entry replaced meanwhile hands
/// its `Arc`s to the cache's graveyard, which is emptied only by
/// [`FlowCache::end_batch`].
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub policy: Option<*const Policy>,
    pub sa: Option<*const Sa>,
    pub kind: Kind,
    /// The second this flow last touched the policy (see [`second`]).
    pub touched: u32,
    /// The entry, for [`FlowCache::touched`].
    pub slot: usize,
}

impl Hit {
    /// Must the policy's use time be touched for a packet at `second`?
    #[inline]
    pub fn must_touch(&self, second: u32) -> bool {
        second == 0 || self.touched != second
    }
}

/// Entries per set.
const WAYS: usize = 4;

pub struct FlowCache {
    entries: Vec<Entry>,
    /// Sets minus one (sets are a power of two; WAYS entries each).
    mask: usize,
    epoch: u32,
    generation: u64,
    seed: [u64; 3],
    /// `Arc`s of entries replaced during the current batch.
    graveyard: Vec<Released>,
    /// Next set [`FlowCache::sweep`] looks at.
    sweep_at: usize,
}

/// Sets for a state of `n` policies (of the cache's direction): two
/// entries per policy, at least 64 entries, at most 65,536 (4 MiB).
fn sets_for(n: usize) -> usize {
    (2 * n / WAYS)
        .next_power_of_two()
        .clamp(16, (1 << 16) / WAYS)
}

#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

impl FlowCache {
    /// An empty cache; `seed` keys its hash (from the worker's CSPRNG
    /// seed: flows cannot be chosen to share a set).
    pub fn new(seed: [u64; 3]) -> FlowCache {
        FlowCache {
            entries: Vec::new(),
            mask: 0,
            epoch: 1,
            generation: 0,
            seed,
            graveyard: Vec::with_capacity(crate::engine::CHUNK),
            sweep_at: 0,
        }
    }

    /// Entries in use (for the memory report).
    pub fn capacity_bytes(&self) -> usize {
        self.entries.len() * std::mem::size_of::<Entry>()
    }

    /// Start a batch under a state of `generation` with `size` policies
    /// and SAs: a new generation makes all entries stale; a state that
    /// outgrew the cache gets a larger one (the first batch allocates it).
    #[inline]
    pub fn begin_batch(&mut self, generation: u64, size: usize) {
        self.observe(generation);
        let sets = sets_for(size);
        if sets > self.mask + 1 || self.entries.is_empty() {
            let sets = sets.max(self.mask + 1);
            self.entries = (0..WAYS * sets).map(|_| Entry::default()).collect();
            self.mask = sets - 1;
        }
    }

    /// The state is now `generation`: if that is new, every entry is
    /// stale.
    #[inline]
    pub fn observe(&mut self, generation: u64) {
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Epochs wrapped: an entry of 2^32 states ago would look
            // fresh. Empty them all.
            self.epoch = 1;
            self.entries.iter_mut().for_each(|e| *e = Entry::default());
        }
    }

    /// Drop the `Arc`s of entries replaced during the batch.
    #[inline]
    pub fn end_batch(&mut self) {
        self.graveyard.clear();
    }

    /// Three folded multiplications of the key's words with the seed
    /// (as foldhash does), then one more to spread the result over the
    /// low bits that pick the set.
    #[inline]
    pub fn hash(&self, k: &FlowKey) -> u64 {
        let w = &k.0;
        let s = &self.seed;
        let h = fold(w[0] ^ s[0], w[1] ^ s[1])
            ^ fold(w[2] ^ s[2], w[3] ^ s[0])
            ^ fold(w[4] ^ s[1], s[2] | 1);
        fold(h, 0x9e37_79b9_7f4a_7c15)
    }

    #[inline]
    fn set(&self, h: u64) -> usize {
        WAYS * (h as usize & self.mask)
    }

    /// Ask for the first two ways of the set `h` falls in: the newest
    /// entries, where a flow is unless three others came to its set after
    /// it (a few percent of flows at 10,000 round robin); a line less to
    /// wait for on every packet is worth a late one on those.
    #[inline(always)]
    pub fn prefetch(&self, h: u64) {
        if let Some(e) = self.entries.get(self.set(h)) {
            crate::prefetch::bytes(e as *const Entry, 2 * std::mem::size_of::<Entry>());
        }
    }

    /// The decision cached for `k` (hashed `h`), if fresh.
    #[inline(always)]
    pub fn get(&self, k: &FlowKey, h: u64) -> Option<Hit> {
        let i = self.set(h);
        let set = self.entries.get(i..i + WAYS)?;
        let w = set
            .iter()
            .position(|e| e.epoch == self.epoch && e.key == *k)?;
        let e = &set[w];
        Some(Hit {
            policy: e.policy.as_ref().map(Arc::as_ptr),
            sa: e.sa.as_ref().map(Arc::as_ptr),
            kind: Kind::from_bits(e.meta >> 30),
            touched: e.meta & SECONDS,
            slot: i + w,
        })
    }

    /// `k`'s flow (a hit at `slot`) touched its policy in `second`.
    #[inline]
    pub fn touched(&mut self, slot: usize, k: &FlowKey, second: u32) {
        if let Some(e) = self.entries.get_mut(slot)
            && e.key == *k
            && e.epoch == self.epoch
        {
            e.meta = (e.meta & !SECONDS) | second;
        }
    }

    /// Remember a decision (the newest in its set; the older of a full
    /// set goes).
    pub fn insert(
        &mut self,
        k: FlowKey,
        h: u64,
        policy: Option<Arc<Policy>>,
        sa: Option<Arc<Sa>>,
    ) -> Hit {
        let kind = Kind::of(policy.as_deref());
        let mut hit = Hit {
            policy: policy.as_ref().map(Arc::as_ptr),
            sa: sa.as_ref().map(Arc::as_ptr),
            kind,
            touched: 0,
            slot: usize::MAX,
        };
        let i = self.set(h);
        let epoch = self.epoch;
        let Some(set) = self.entries.get_mut(i..i + WAYS) else {
            return hit;
        };
        // Way 0 holds the newest entry. The new one replaces the same
        // flow's entry, else a stale or empty way, else the oldest (the
        // last); the ways before it move down one.
        let at = set
            .iter()
            .position(|e| e.key == k || e.epoch != epoch)
            .unwrap_or(WAYS - 1);
        let old = std::mem::replace(
            &mut set[at],
            Entry {
                key: k,
                epoch,
                meta: (kind as u32) << 30,
                policy,
                sa,
            },
        );
        set[..=at].rotate_right(1);
        hit.slot = i;
        if old.policy.is_some() || old.sa.is_some() {
            self.graveyard.push((old.policy, old.sa));
        }
        hit
    }

    /// Forget `k`'s entry (its SA died).
    pub fn remove(&mut self, k: &FlowKey, h: u64) {
        let i = self.set(h);
        if let Some(set) = self.entries.get_mut(i..i + WAYS) {
            for e in set {
                if e.key == *k && e.epoch != 0 {
                    let old = std::mem::take(e);
                    self.graveyard.push((old.policy, old.sa));
                }
            }
        }
    }

    /// Remember that `k`'s flow passed its policy with `sa` (inbound), if
    /// its entry is fresh.
    pub fn set_sa(&mut self, k: &FlowKey, h: u64, sa: Arc<Sa>) {
        let i = self.set(h);
        let epoch = self.epoch;
        if let Some(set) = self.entries.get_mut(i..i + WAYS)
            && let Some(e) = set.iter_mut().find(|e| e.epoch == epoch && e.key == *k)
            && let Some(old) = e.sa.replace(sa)
        {
            self.graveyard.push((None, Some(old)));
        }
    }

    /// Release stale entries of up to `sets` sets (between batches), so
    /// that a deleted SA is not kept alive by a worker's cache for long.
    pub fn sweep(&mut self, sets: usize) {
        if self.entries.is_empty() {
            return;
        }
        for _ in 0..sets {
            let i = WAYS * self.sweep_at;
            self.sweep_at = (self.sweep_at + 1) & self.mask;
            for e in &mut self.entries[i..i + WAYS] {
                if e.epoch != self.epoch && e.epoch != 0 {
                    *e = Entry::default();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u32, port: u16) -> Flow {
        Flow {
            src: "10.0.0.1".parse().unwrap(),
            dst: IpAddr::V4((0x0a80_0000 + i).into()),
            proto: 17,
            ports: Some((port, 5000)),
        }
    }

    #[test]
    fn entry_is_one_line() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    #[test]
    fn keys_tell_families_ports_and_protocols_apart() {
        let a = flow(1, 1);
        let mut v6 = a;
        v6.src = "::a00:1".parse().unwrap();
        v6.dst = "::a80:1".parse().unwrap();
        let mut noports = a;
        noports.ports = None;
        let mut zero = a;
        zero.ports = Some((0, 0));
        let keys = [a, v6, noports, zero, flow(1, 2), flow(2, 1)].map(|f| FlowKey::of(&f));
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }

    #[test]
    fn hits_only_the_same_flow_under_the_same_generation() {
        let mut c = FlowCache::new([1, 2, 3]);
        c.begin_batch(7, 2000);
        let p = Arc::new(Policy {
            dir: crate::spd::Dir::Out,
            selector: crate::spd::Selector {
                src: crate::spd::Prefix::host("10.0.0.1".parse().unwrap()),
                dst: crate::spd::Prefix::host("10.0.0.2".parse().unwrap()),
                proto: None,
                sport: None,
                dport: None,
            },
            priority: 0,
            action: crate::spd::Action::Bypass,
            id: 1,
            used: Default::default(),
        });
        let keys: Vec<_> = (0..1000).map(|i| FlowKey::of(&flow(i, 9))).collect();
        for k in &keys {
            let h = c.hash(k);
            assert!(c.get(k, h).is_none());
            c.insert(*k, h, Some(p.clone()), None);
        }
        c.end_batch();
        let hits = keys
            .iter()
            .filter(|k| c.get(k, c.hash(k)).is_some())
            .count();
        // 1,000 flows in 1,024 sets of four: nearly all stay.
        assert!(hits > 990, "{hits}");
        let k = FlowKey::of(&flow(5000, 9));
        assert!(c.get(&k, c.hash(&k)).is_none());
        // Another generation: all stale, then released by the sweep.
        c.begin_batch(8, 2000);
        assert!(keys.iter().all(|k| c.get(k, c.hash(k)).is_none()));
        assert!(Arc::strong_count(&p) > 900);
        c.sweep(1 << 20);
        assert_eq!(Arc::strong_count(&p), 1);
    }

    #[test]
    fn a_full_set_keeps_the_newest() {
        let mut c = FlowCache::new([0; 3]);
        c.begin_batch(1, 16);
        // Find WAYS + 1 keys of one set.
        let mut same = Vec::new();
        let k0 = FlowKey::of(&flow(0, 0));
        let s0 = c.set(c.hash(&k0));
        for i in 0..100_000 {
            let k = FlowKey::of(&flow(i, 0));
            if c.set(c.hash(&k)) == s0 {
                same.push(k);
            }
            if same.len() == WAYS + 1 {
                break;
            }
        }
        for k in &same {
            c.insert(*k, c.hash(k), None, None);
        }
        let found: Vec<bool> = same.iter().map(|k| c.get(k, c.hash(k)).is_some()).collect();
        let mut want = vec![true; WAYS + 1];
        want[0] = false;
        assert_eq!(found, want);
    }
}
