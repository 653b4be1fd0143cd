//! A hash map for immutable snapshots that change one entry at a time:
//! 128 shards behind `Arc`s, copied on write. Cloning the map costs one
//! reference count; changing an entry copies the array of 128 shard
//! pointers (if shared) and the one shard it lands in, 1/128th of the map.
//! Reads are a plain hash-map lookup after picking the shard, so the
//! per-packet SAD and SPD lookups keep their speed while a change at
//! 10,000 entries copies about 80 of them instead of all (64 shards: 48 µs
//! per SA added at 10,000 peers, 128: 28 µs, 256: 17 µs but 3.5 µs per
//! change on a small state; `tunsec bench --peers`).

use foldhash::fast::FixedState;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

const SHARDS: usize = 128;

/// foldhash, not FxHash: IPv6 peers that differ only in their last bytes
/// put all their entropy in the high bits of FxHash's input words, which
/// its multiply never carries down to the bits that pick a bucket (one
/// bucket for 10,000 peers, measured). foldhash mixes them.
type Map<K, V> = HashMap<K, V, FixedState>;
const SEED: FixedState = FixedState::with_seed(0x7453_6563);

pub struct CowMap<K, V> {
    shards: Arc<[Arc<Map<K, V>>; SHARDS]>,
    len: usize,
}

impl<K, V> Clone for CowMap<K, V> {
    fn clone(&self) -> Self {
        CowMap {
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        CowMap {
            shards: Arc::new(std::array::from_fn(|_| Arc::new(Map::with_hasher(SEED)))),
            len: 0,
        }
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.shards.iter().flat_map(|s| s.iter()))
            .finish()
    }
}

#[inline]
fn shard_of<Q: Hash + ?Sized>(k: &Q) -> usize {
    (SEED.hash_one(k) >> 57) as usize
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
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
        self.shards[shard_of(k)].get(k)
    }

    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(k).is_some()
    }

    fn shard_mut(&mut self, i: usize) -> &mut Map<K, V> {
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[i])
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let old = self.shard_mut(shard_of(&k)).insert(k, v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = shard_of(k);
        if !self.shards[i].contains_key(k) {
            return None;
        }
        let old = self.shard_mut(i).remove(k);
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
        let i = shard_of(&k);
        if !self.shards[i].contains_key(&k) {
            self.len += 1;
        }
        self.shard_mut(i).entry(k).or_default()
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let i = shard_of(k);
        if !self.shards[i].contains_key(k) {
            return None;
        }
        self.shard_mut(i).get_mut(k)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// Keep the entries `f` accepts; shards with nothing to drop are not
    /// copied.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &V) -> bool) {
        for i in 0..SHARDS {
            if self.shards[i].iter().all(|(k, v)| f(k, v)) {
                continue;
            }
            let s = self.shard_mut(i);
            let before = s.len();
            s.retain(|k, v| f(k, v));
            self.len -= before - s.len();
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
        for i in 0..SHARDS {
            let (a, b) = (&old.shards[i], &self.shards[i]);
            if Arc::ptr_eq(a, b) {
                continue;
            }
            for (k, v) in b.iter() {
                match a.get(k) {
                    Some(o) if same(o, v) => {}
                    o => out.push((o, Some(v))),
                }
            }
            for (k, v) in a.iter() {
                if !b.contains_key(k) {
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
        let shared = (0..SHARDS)
            .filter(|i| Arc::ptr_eq(&a.shards[*i], &b.shards[*i]))
            .count();
        assert!(shared >= SHARDS - 4, "{shared}");
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
