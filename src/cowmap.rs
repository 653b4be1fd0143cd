//! A hash map for immutable snapshots that change one entry at a time:
//! 1,024 shards behind `Arc`s in two levels of 32, copied on write.
//! Cloning the map costs one reference count; changing an entry copies the
//! root's 32 pointers and one second level's (if shared) and the one shard
//! it lands in, 1/1024th of the map. Reads are a hash-table lookup after
//! picking the shard (two loads of hot pointers). See `FAN` for what
//! one and two levels cost.
//!
//! A shard is an open-addressing table of its own ([`Table`]: linear
//! probing, each slot holding the key's hash beside it), so that a batch
//! can ask for the slot a key will be found in before it looks
//! ([`CowMap::prefetch`]): with the standard map the slot's address was
//! known only inside the lookup. The key is hashed once per lookup (the
//! standard map hashed it again after the shard was picked).

use foldhash::fast::FixedState;
use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

/// Shards per level: two levels of 32, 1,024 shards. A change copies the
/// root's 32 pointers, one second level's 32 and one shard (about 20
/// entries at 20,000 SAs): each pointer and entry copied is a reference
/// count raised, and at 10,000 peers the entries' counts are cache misses
/// (asked for together before the copy: [`Counted`]).
/// One level of 128 shards copied 128 pointers and about 156 entries: an
/// SA added at 10,000 peers took 30-45 µs in the engine and 80-110 µs
/// through the daemon. (A second level once made every packet dearer;
/// packets now find their SA through the workers' flow caches, and the
/// inbound SPI lookup asks for its slot ahead.)
const FAN: usize = 32;

/// foldhash, not FxHash: IPv6 peers that differ only in their last bytes
/// put all their entropy in the high bits of FxHash's input words, which
/// its multiply never carries down to the bits that pick a bucket (one
/// bucket for 10,000 peers, measured). foldhash mixes them.
type Map<K, V> = Table<K, V>;
const SEED: FixedState = FixedState::with_seed(0x7453_6563);

/// One shard: linear probing over a power-of-two array of slots, at most
/// three quarters full; removal shifts the following entries back (no
/// tombstones). A slot keeps the key's hash, so a probe compares keys only
/// where the hashes agree and growing does not hash again.
#[derive(Clone)]
pub struct Table<K, V> {
    slots: Box<[Option<(u64, K, V)>]>,
    len: usize,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table {
            slots: Box::new([]),
            len: 0,
        }
    }
}

impl<K, V> Table<K, V> {
    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots.iter().flatten().map(|(_, k, v)| (k, v))
    }
}

impl<K: Eq, V> Table<K, V> {
    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The slot where `k` (hashed `h`) is, or the empty one ending its
    /// probe.
    #[inline]
    fn find<Q: Eq + ?Sized>(&self, h: u64, k: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            match &self.slots[i] {
                None => return Err(i),
                Some((sh, sk, _)) if *sh == h && sk.borrow() == k => return Ok(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    #[inline]
    fn get<Q: Eq + ?Sized>(&self, h: u64, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        if self.len == 0 {
            return None;
        }
        let i = self.find(h, k).ok()?;
        self.slots[i].as_ref().map(|(_, _, v)| v)
    }

    fn get_mut<Q: Eq + ?Sized>(&mut self, h: u64, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        if self.len == 0 {
            return None;
        }
        let i = self.find(h, k).ok()?;
        self.slots[i].as_mut().map(|(_, _, v)| v)
    }

    /// The address of the slot a lookup of hash `h` starts at.
    #[inline]
    fn slot_addr(&self, h: u64) -> Option<*const Option<(u64, K, V)>> {
        self.slots
            .get(h as usize & self.mask())
            .map(|s| s as *const _)
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(8);
        let old = std::mem::replace(&mut self.slots, (0..cap).map(|_| None).collect());
        let mask = cap - 1;
        for (h, k, v) in old.into_vec().into_iter().flatten() {
            let mut i = h as usize & mask;
            while self.slots[i].is_some() {
                i = (i + 1) & mask;
            }
            self.slots[i] = Some((h, k, v));
        }
    }

    /// The slot for `k`, filled with `make()` if it was missing (and
    /// whether it was).
    fn slot_or_insert(&mut self, h: u64, k: K, make: impl FnOnce() -> V) -> (usize, bool) {
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        match self.find(h, &k) {
            Ok(i) => (i, false),
            Err(i) => {
                self.slots[i] = Some((h, k, make()));
                self.len += 1;
                (i, true)
            }
        }
    }

    fn insert(&mut self, h: u64, k: K, v: V) -> Option<V> {
        let mut v = Some(v);
        let (i, new) = self.slot_or_insert(h, k, || v.take().expect("once"));
        if new {
            return None;
        }
        let slot = self.slots[i].as_mut().expect("found");
        Some(std::mem::replace(&mut slot.2, v.take().expect("not used")))
    }

    fn remove<Q: Eq + ?Sized>(&mut self, h: u64, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        if self.len == 0 {
            return None;
        }
        let mut i = self.find(h, k).ok()?;
        let (_, _, v) = self.slots[i].take().expect("found");
        self.len -= 1;
        // Shift back the entries after it that probed past slot i.
        let mask = self.mask();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let Some((hj, _, _)) = &self.slots[j] else {
                break;
            };
            let home = *hj as usize & mask;
            // Entry j may move to i unless its home lies in (i, j].
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(i) & mask) {
                self.slots[i] = self.slots[j].take();
                i = j;
            }
        }
        Some(v)
    }

    fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        let old = std::mem::take(&mut self.slots);
        let cap = old.len();
        self.slots = (0..cap).map(|_| None).collect();
        self.len = 0;
        let mask = self.mask();
        for (h, k, mut v) in old.into_vec().into_iter().flatten() {
            if f(&k, &mut v) {
                let mut i = h as usize & mask;
                while self.slots[i].is_some() {
                    i = (i + 1) & mask;
                }
                self.slots[i] = Some((h, k, v));
                self.len += 1;
            }
        }
    }
}

/// A value whose copy raises a reference count somewhere else in memory:
/// where that count is, so that a shard's copy can ask for all its counts'
/// lines first. Each count is raised by a locked instruction, which waits
/// for its line before the next one starts: at 10,000 peers the counts of
/// a shard's 20 entries and of a level's 32 shards were cold misses one
/// after another, most of an SA change's own time in the daemon.
pub trait Counted {
    /// The address of the reference count this value's copy raises.
    fn count(&self) -> Option<*const u8> {
        None
    }
}

impl<T: ?Sized> Counted for Arc<T> {
    #[inline]
    fn count(&self) -> Option<*const u8> {
        // `ArcInner` is the two counts, then the value at its alignment
        // (16 bytes in at least).
        let offset = std::mem::align_of_val::<T>(self).max(16);
        Some(Arc::as_ptr(self).cast::<u8>().wrapping_sub(offset))
    }
}

impl<A, B> Counted for (A, B) {}
impl Counted for u64 {}
impl Counted for String {}

/// Ask for the lines of the reference counts a copy of `items` raises.
#[inline]
fn prefetch_counts<'a, T: Counted + 'a>(items: impl Iterator<Item = &'a T>) {
    for c in items.filter_map(Counted::count) {
        crate::prefetch::line(c);
    }
}

pub struct CowMap<K, V> {
    root: Arc<[Arc<Mid<K, V>>; FAN]>,
    len: usize,
}

/// A second level: FAN shards.
type Mid<K, V> = [Arc<Map<K, V>>; FAN];

impl<K, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        CowMap {
            root: self.root.clone(),
            len: self.len,
        }
    }
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        // One empty shard shared by all: copied when first written.
        let empty = Arc::new(Map::default());
        let mid = Arc::new(std::array::from_fn(|_| empty.clone()));
        CowMap {
            root: Arc::new(std::array::from_fn(|_| mid.clone())),
            len: 0,
        }
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.shards().flat_map(|s| s.iter()))
            .finish()
    }
}

#[inline]
fn hash<Q: Hash + ?Sized>(k: &Q) -> u64 {
    SEED.hash_one(k)
}

/// The shard: ten bits of the hash (five per level) above those that
/// place a key in its shard's table (up to 2^54 slots).
#[inline]
fn shard_of(h: u64) -> (usize, usize) {
    ((h >> 59) as usize, (h >> 54) as usize & (FAN - 1))
}

impl<K, V> CowMap<K, V> {
    #[inline]
    fn shard(&self, h: u64) -> &Map<K, V> {
        let (a, b) = shard_of(h);
        &self.root[a][b]
    }

    fn shards(&self) -> impl Iterator<Item = &Arc<Map<K, V>>> {
        self.root.iter().flat_map(|m| m.iter())
    }
}

impl<K: Hash + Eq + Clone, V: Clone + Counted> CowMap<K, V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let h = hash(k);
        self.shard(h).get(h, k)
    }

    /// Ask for the line where a lookup of `k` will start (see
    /// [`crate::prefetch`]).
    #[inline]
    pub fn prefetch<Q: Hash + ?Sized>(&self, k: &Q) {
        let h = hash(k);
        if let Some(p) = self.shard(h).slot_addr(h) {
            crate::prefetch::line(p);
        }
    }

    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(k).is_some()
    }

    /// The shard of hash `h`, made this map's own: the root, the second
    /// level and the shard are copied where shared (with a snapshot still
    /// in use), each copy's reference counts asked for first.
    fn shard_mut(&mut self, h: u64) -> &mut Map<K, V> {
        let (a, b) = shard_of(h);
        if Arc::strong_count(&self.root) > 1 {
            prefetch_counts(self.root.iter());
        }
        let root = Arc::make_mut(&mut self.root);
        if Arc::strong_count(&root[a]) > 1 {
            prefetch_counts(root[a].iter());
        }
        let mid = Arc::make_mut(&mut root[a]);
        if Arc::strong_count(&mid[b]) > 1 {
            prefetch_counts(mid[b].iter().map(|(_, v)| v));
        }
        Arc::make_mut(&mut mid[b])
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let h = hash(&k);
        let old = self.shard_mut(h).insert(h, k, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let h = hash(k);
        self.shard(h).get(h, k)?;
        let old = self.shard_mut(h).remove(h, k);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The entry for `k`, made with `V::default()` when missing.
    pub fn entry_or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let h = hash(&k);
        let shard = self.shard_mut(h);
        let (i, new) = shard.slot_or_insert(h, k, V::default);
        if new {
            self.len += 1;
        }
        let shard = self.shard_mut(h);
        &mut shard.slots[i].as_mut().expect("just found or made").2
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let h = hash(k);
        self.shard(h).get(h, k)?;
        self.shard_mut(h).get_mut(h, k)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Keep the entries `f` accepts; shards with nothing to drop are not
    /// copied.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &V) -> bool) {
        for a in 0..FAN {
            for b in 0..FAN {
                if self.root[a][b].iter().all(|(k, v)| f(k, v)) {
                    continue;
                }
                let mid = Arc::make_mut(&mut Arc::make_mut(&mut self.root)[a]);
                let s = Arc::make_mut(&mut mid[b]);
                let before = s.len();
                s.retain(|k, v| f(k, v));
                self.len -= before - s.len();
            }
        }
    }

    pub fn clear(&mut self) {
        *self = CowMap::default();
    }

    /// What differs from `old` (an earlier version of this map): `(old
    /// value, new value)` for every key added, removed or whose value is
    /// not `same`. Only shards that were copied since are looked at, so a
    /// change of one entry costs one shard, not the map.
    pub fn changes_since<'a>(
        &'a self,
        old: &'a CowMap<K, V>,
        same: impl Fn(&V, &V) -> bool,
    ) -> Vec<(Option<&'a V>, Option<&'a V>)> {
        let mut out = Vec::new();
        if Arc::ptr_eq(&old.root, &self.root) {
            return out;
        }
        let mids = old.root.iter().zip(self.root.iter());
        let changed = mids.filter(|(a, b)| !Arc::ptr_eq(a, b));
        for (a, b) in changed.flat_map(|(a, b)| a.iter().zip(b.iter())) {
            if Arc::ptr_eq(a, b) {
                continue;
            }
            for (h, k, v) in b.slots.iter().flatten() {
                match a.get(*h, k) {
                    Some(o) if same(o, v) => {}
                    o => out.push((o, Some(v))),
                }
            }
            for (h, k, v) in a.slots.iter().flatten() {
                if b.get(*h, k).is_none() {
                    out.push((Some(v), None));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Counted::count` points at the strong count, whatever the value's
    /// alignment and size (the layout of std's `ArcInner` is assumed, not
    /// promised: this checks it).
    #[test]
    fn an_arcs_count_is_where_its_strong_count_is() {
        // Only their layout matters.
        #[allow(dead_code)]
        #[repr(align(64))]
        struct Line([u8; 64]);
        #[allow(dead_code)]
        #[repr(align(128))]
        struct Two([u8; 128]);
        fn check<T: ?Sized>(a: Arc<T>) {
            let b = a.clone();
            let p = a.count().unwrap().cast::<usize>();
            // SAFETY: a test of the assumption; the address is inside the
            // live allocation of `a` (its counts).
            let strong = unsafe { p.read() };
            assert_eq!(strong, Arc::strong_count(&b));
            drop(b);
            assert_eq!(unsafe { p.read() }, 1);
        }
        check(Arc::new(7u64));
        check(Arc::new(Line([0; 64])));
        check(Arc::new(Two([0; 128])));
        check::<[u32]>(Arc::from(vec![1u32, 2, 3]));
        check::<[u8]>(Arc::from(Vec::<u8>::new()));
        check::<str>(Arc::from("x"));
    }

    /// Random inserts, removals, updates and retains agree with the
    /// standard map, and snapshots taken along the way do not change.
    #[test]
    fn agrees_with_a_hash_map() {
        use std::collections::HashMap;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for keys in [8u64, 64, 600, 5000] {
            let mut m: CowMap<u64, u64> = CowMap::default();
            let mut r: HashMap<u64, u64> = HashMap::new();
            let mut snaps = Vec::new();
            for step in 0..20_000u64 {
                let k = rnd(keys);
                match rnd(10) {
                    0..=3 => assert_eq!(m.insert(k, step), r.insert(k, step)),
                    4..=6 => assert_eq!(m.remove(&k), r.remove(&k)),
                    7 => {
                        *m.entry_or_default(k) += 1;
                        *r.entry(k).or_default() += 1;
                    }
                    8 => {
                        if let Some(v) = m.get_mut(&k) {
                            *v += 7;
                        }
                        if let Some(v) = r.get_mut(&k) {
                            *v += 7;
                        }
                    }
                    _ if step % 500 == 0 => {
                        let d = rnd(5) + 2;
                        m.retain(|k, _| k % d != 0);
                        r.retain(|k, _| k % d != 0);
                    }
                    _ => assert_eq!(m.get(&k), r.get(&k)),
                }
                assert_eq!(m.len(), r.len());
                if step % 2000 == 0 {
                    let mut v: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
                    v.sort();
                    snaps.push((m.clone(), v));
                }
            }
            for k in 0..keys {
                assert_eq!(m.get(&k), r.get(&k), "{k}");
            }
            for (snap, want) in snaps {
                let mut v: Vec<_> = snap.iter().map(|(k, v)| (*k, *v)).collect();
                v.sort();
                assert_eq!(v, want);
            }
        }
    }

    #[test]
    fn a_clone_is_a_snapshot() {
        let mut a: CowMap<u32, String> = CowMap::default();
        for i in 0..1000 {
            a.insert(i, i.to_string());
        }
        let b = a.clone();
        a.insert(5, "five".into());
        a.remove(&6);
        *a.entry_or_default(2000) = "new".into();
        a.retain(|k, _| *k != 7);
        assert_eq!((a.len(), b.len()), (999, 1000));
        assert_eq!(b.get(&5).unwrap(), "5");
        assert_eq!(a.get(&5).unwrap(), "five");
        assert!(b.contains_key(&6) && !a.contains_key(&6));
        assert!(b.contains_key(&7) && !a.contains_key(&7));
        assert_eq!(a.iter().count(), 999);
        assert_eq!(a.remove(&6), None);
        assert_eq!(a.len(), 999);
        // Unchanged shards are shared, not copied.
        let shared = a
            .shards()
            .zip(b.shards())
            .filter(|(x, y)| Arc::ptr_eq(x, y))
            .count();
        assert!(shared >= FAN * FAN - 4, "{shared}");
        // What changed, from the copied shards only.
        let mut ch: Vec<_> = a
            .changes_since(&b, |x, y| x == y)
            .into_iter()
            .map(|(o, n)| (o.cloned(), n.cloned()))
            .collect();
        ch.sort();
        assert_eq!(
            ch,
            [
                (None, Some("new".to_string())),
                (Some("5".into()), Some("five".into())),
                (Some("6".into()), None),
                (Some("7".into()), None),
            ]
        );
        assert!(a.changes_since(&a.clone(), |x, y| x == y).is_empty());
    }
}
