//! The Security Policy Database: ordered policies and selector matching.
//!
//! Order: a lower priority number wins (as in Linux); at equal priority the
//! more specific selector wins (longer prefixes, a protocol, ports); then
//! the policy added first.

use crate::cowmap::CowMap;
use crate::sad::Proto;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// setkey's `priority default` (ipsec-tools' PRIORITY_DEFAULT): policies
/// without a priority lose against any explicit small number.
pub const PRIORITY_DEFAULT: u32 = 0x8000_0000;
pub const PRIORITY_HIGH: u32 = 0x4000_0000;
pub const PRIORITY_LOW: u32 = 0xC000_0000;

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// `addr/len`, with host bits cleared. `len` must fit the family.
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((u128::from(a) & m).into())
            }
        };
        Some(Prefix { addr, len })
    }

    pub fn host(addr: IpAddr) -> Prefix {
        Prefix {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let m = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len)
                };
                u32::from(a) & m == u32::from(p)
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let m = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len)
                };
                u128::from(a) & m == u128::from(p)
            }
            _ => false,
        }
    }

    pub fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selector {
    pub src: Prefix,
    pub dst: Prefix,
    /// Upper-layer protocol; `None` is `any`.
    pub proto: Option<u8>,
    /// Source port, or ICMP type (PF_KEY's encoding); `None` is any.
    pub sport: Option<u16>,
    /// Destination port, or ICMP code.
    pub dport: Option<u16>,
}

/// The facts of one packet a selector looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ports: Option<(u16, u16)>,
}

impl Selector {
    #[inline]
    pub fn matches(&self, f: &Flow) -> bool {
        self.src.contains(f.src)
            && self.dst.contains(f.dst)
            && self.proto.is_none_or(|p| p == f.proto)
            && self
                .sport
                .is_none_or(|p| f.ports.is_some_and(|(s, _)| s == p))
            && self
                .dport
                .is_none_or(|p| f.ports.is_some_and(|(_, d)| d == p))
    }

    pub fn specificity(&self) -> u32 {
        self.src.len as u32
            + self.dst.len as u32
            + self.proto.is_some() as u32
            + self.sport.is_some() as u32
            + self.dport.is_some() as u32
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    In,
    Out,
    Fwd,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        }
    }
}

/// A rule's level (setkey: `default|use|require|unique[:ID]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The system default, which on Linux is `require`.
    Default,
    Use,
    Require,
    /// `unique` with the reqid given (`unique:ID`) or none.
    Unique(Option<u32>),
}

impl Level {
    /// Must an SA be present (outbound) / the transform be found (inbound)?
    pub fn required(self) -> bool {
        !matches!(self, Level::Use)
    }

    pub fn reqid(self) -> Option<u32> {
        match self {
            Level::Unique(r) => r,
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Default => f.write_str("default"),
            Level::Use => f.write_str("use"),
            Level::Require => f.write_str("require"),
            Level::Unique(None) => f.write_str("unique"),
            Level::Unique(Some(id)) => write!(f, "unique:{id}"),
        }
    }
}

/// One transform of a bundle (`esp/transport//require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub proto: Proto,
    pub level: Level,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `none`: pass without IPsec.
    Bypass,
    Discard,
    /// `ipsec`: the bundle, innermost first.
    Ipsec(Vec<Rule>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub dir: Dir,
    pub selector: Selector,
    pub priority: u32,
    pub action: Action,
    /// Insertion order, also the policy's id in events.
    pub id: u64,
    /// Last packet this policy decided.
    pub used: crate::sad::UseTime,
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.selector;
        let port = |p: Option<u16>| p.map_or("any".to_string(), |p| p.to_string());
        write!(
            f,
            "{}[{}] {}[{}] ",
            s.src,
            port(s.sport),
            s.dst,
            port(s.dport)
        )?;
        match s.proto {
            None => f.write_str("any")?,
            Some(p) => write!(f, "{p}")?,
        }
        write!(f, " -P {} priority {} ", self.dir.name(), self.priority)?;
        match &self.action {
            Action::Bypass => f.write_str("none"),
            Action::Discard => f.write_str("discard"),
            Action::Ipsec(rules) => {
                f.write_str("ipsec")?;
                for r in rules {
                    write!(f, " {}/transport//{}", r.proto, r.level)?;
                }
                Ok(())
            }
        }
    }
}

/// The order policies are evaluated in: a lower key decides first.
/// A policy that changed: (before, after), either missing.
pub type Change<'a> = (Option<&'a Arc<Policy>>, Option<&'a Arc<Policy>>);

/// Evaluation order: priority, then specificity, then age.
pub type Rank = (u32, std::cmp::Reverse<u32>, u64);

#[inline]
pub fn rank(p: &Policy) -> Rank {
    (
        p.priority,
        std::cmp::Reverse(p.selector.specificity()),
        p.id,
    )
}

/// A policy in an index bucket, its selector and rank beside it: a
/// lookup reads a bucket's contiguous entries and touches the policy
/// itself only once it matched (each policy is an allocation of its own,
/// and at 10,000 peers a cache miss).
#[derive(Debug, Clone)]
struct Entry {
    selector: Selector,
    rank: Rank,
    policy: Arc<Policy>,
}

/// Policies of one index bucket, in evaluation order.
type Bucket = Vec<Entry>;

/// A bucket in an index map, shared: copying the map's shard (on every
/// change that lands in it) raises one reference count an entry instead
/// of copying each entry's bucket, and a batch of changes to one bucket
/// edits it in place once it is its own.
type Shared = Arc<Bucket>;

/// Apply `f` to the bucket of `k` in `map` (a new one if none); an
/// emptied bucket goes.
fn edit<K: std::hash::Hash + Eq + Clone>(
    map: &mut CowMap<K, Shared>,
    k: K,
    f: impl FnOnce(&mut Bucket),
) {
    let b = map.entry_or_default(k.clone());
    f(Arc::make_mut(b));
    if b.is_empty() {
        map.remove(&k);
    }
}

/// The SPD: an immutable snapshot, cheap to clone and changed at the cost
/// of the change. Policies are indexed by their selector's host
/// addresses, as Linux keeps its `bydst` hashes beside "inexact" lists:
/// both addresses hosts by (dir, src, dst), only the destination a host
/// by (dir, dst), only the source by (dir, src), and the rest (subnets,
/// catch-alls: few) in one ordered list per direction. A lookup takes the
/// first match of each of the three buckets and of the inexact list and
/// keeps the one that comes first in evaluation order, which is the
/// ordered scan's answer without the scan.
#[derive(Debug, Clone, Default)]
pub struct Spd {
    pairs: CowMap<(Dir, IpAddr, IpAddr), Shared>,
    dsts: CowMap<(Dir, IpAddr), Shared>,
    srcs: CowMap<(Dir, IpAddr), Shared>,
    inexact: [Arc<Bucket>; 3],
    by_selector: CowMap<(Dir, Selector), Arc<Policy>>,
    next_id: u64,
    version: u64,
    /// Policies per direction (in, out, fwd).
    per_dir: [usize; 3],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpdError {
    #[error("a policy for {0} -P {1} exists already (use spdupdate or spddelete)")]
    Exists(String, &'static str),
    #[error("no policy for {0} -P {1}")]
    NotFound(String, &'static str),
}

fn describe(s: &Selector) -> String {
    let mut d = format!("{} {}", s.src, s.dst);
    match s.proto {
        None => d.push_str(" any"),
        Some(p) => d.push_str(&format!(" proto {p}")),
    }
    d
}

fn dir_index(d: Dir) -> usize {
    match d {
        Dir::In => 0,
        Dir::Out => 1,
        Dir::Fwd => 2,
    }
}

fn bucket_insert(v: &mut Bucket, p: Arc<Policy>) {
    let r = rank(&p);
    let at = v.partition_point(|e| e.rank < r);
    v.insert(
        at,
        Entry {
            selector: p.selector,
            rank: r,
            policy: p,
        },
    );
}

/// The first entry of `v` (in order) that matches `flow`, if it comes
/// before `best`.
#[inline]
fn first_match<'a>(v: &'a [Entry], flow: &Flow, best: &mut Option<&'a Entry>) {
    for e in v {
        if best.is_some_and(|b| e.rank > b.rank) {
            return;
        }
        if e.selector.matches(flow) {
            *best = Some(e);
            return;
        }
    }
}

impl Spd {
    pub fn len(&self) -> usize {
        self.by_selector.len()
    }

    /// Policies of one direction.
    pub fn len_dir(&self, dir: Dir) -> usize {
        self.per_dir[dir_index(dir)]
    }

    pub fn is_empty(&self) -> bool {
        self.by_selector.is_empty()
    }

    /// Changes with every change to this SPD (and only then).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Apply `f` to the bucket `p` belongs in.
    fn with_bucket(&mut self, p: &Policy, f: impl FnOnce(&mut Bucket)) {
        let (s, d) = (&p.selector.src, &p.selector.dst);
        match (s.is_host(), d.is_host()) {
            (true, true) => edit(&mut self.pairs, (p.dir, s.addr, d.addr), f),
            (false, true) => edit(&mut self.dsts, (p.dir, d.addr), f),
            (true, false) => edit(&mut self.srcs, (p.dir, s.addr), f),
            (false, false) => f(Arc::make_mut(&mut self.inexact[dir_index(p.dir)])),
        }
    }

    fn insert(
        &mut self,
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    ) -> Arc<Policy> {
        self.next_id += 1;
        self.version += 1;
        let p = Arc::new(Policy {
            dir,
            selector,
            priority,
            action,
            id: self.next_id,
            used: Default::default(),
        });
        self.by_selector.insert((dir, selector), p.clone());
        self.with_bucket(&p, |v| bucket_insert(v, p.clone()));
        self.per_dir[dir_index(dir)] += 1;
        p
    }

    fn remove(&mut self, dir: Dir, sel: &Selector) -> Option<Arc<Policy>> {
        let p = self.by_selector.remove(&(dir, *sel))?;
        self.version += 1;
        self.per_dir[dir_index(dir)] -= 1;
        self.with_bucket(&p, |v| v.retain(|e| e.policy.id != p.id));
        Some(p)
    }

    /// setkey `spdadd`: fails if a policy with the same selector and
    /// direction exists.
    pub fn add(
        &mut self,
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    ) -> Result<Arc<Policy>, SpdError> {
        if self.by_selector.contains_key(&(dir, selector)) {
            return Err(SpdError::Exists(describe(&selector), dir.name()));
        }
        Ok(self.insert(dir, selector, priority, action))
    }

    /// setkey `spdupdate`: replace or add.
    pub fn update(
        &mut self,
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    ) -> Arc<Policy> {
        self.remove(dir, &selector);
        self.insert(dir, selector, priority, action)
    }

    /// setkey `spddelete`.
    pub fn delete(&mut self, dir: Dir, selector: &Selector) -> Result<Arc<Policy>, SpdError> {
        self.remove(dir, selector)
            .ok_or_else(|| SpdError::NotFound(describe(selector), dir.name()))
    }

    /// The policy for (dir, selector), if there is one.
    pub fn get(&self, dir: Dir, selector: &Selector) -> Option<&Arc<Policy>> {
        self.by_selector.get(&(dir, *selector))
    }

    pub fn flush(&mut self) {
        let (next_id, version) = (self.next_id, self.version + 1);
        *self = Spd {
            next_id,
            version,
            ..Spd::default()
        };
    }

    /// The policy that decides for `flow` in direction `dir`: the first in
    /// evaluation order whose selector matches.
    #[inline]
    pub fn lookup(&self, dir: Dir, flow: &Flow) -> Option<&Arc<Policy>> {
        let mut best = None;
        if let Some(v) = self.pairs.get(&(dir, flow.src, flow.dst)) {
            first_match(v, flow, &mut best);
        }
        if let Some(v) = self.dsts.get(&(dir, flow.dst)) {
            first_match(v, flow, &mut best);
        }
        if let Some(v) = self.srcs.get(&(dir, flow.src)) {
            first_match(v, flow, &mut best);
        }
        first_match(&self.inexact[dir_index(dir)], flow, &mut best);
        best.map(|e| &e.policy)
    }

    /// Policies that differ from `old`, an earlier version of this SPD:
    /// `(old, new)` for each added, removed or replaced one. Costs what
    /// changed, not the SPD (see [`CowMap::changes_since`]).
    pub fn changes_since<'a>(&'a self, old: &'a Spd) -> Vec<Change<'a>> {
        self.by_selector
            .changes_since(&old.by_selector, Arc::ptr_eq)
    }

    /// All policies in no particular order (no sort: to find one by id,
    /// or count).
    pub fn iter_unordered(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.by_selector.values()
    }

    /// All policies in evaluation order (sorted on each call: for dumps
    /// and plumbing, not packets).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        let mut v: Vec<&Arc<Policy>> = self.by_selector.values().collect();
        v.sort_by_key(|p| rank(p));
        v.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pfx(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').unwrap();
        Prefix::new(a.parse().unwrap(), l.parse().unwrap()).unwrap()
    }

    fn sel(src: &str, dst: &str, proto: Option<u8>) -> Selector {
        Selector {
            src: pfx(src),
            dst: pfx(dst),
            proto,
            sport: None,
            dport: None,
        }
    }

    fn flow(src: &str, dst: &str, proto: u8, ports: Option<(u16, u16)>) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            ports,
        }
    }

    #[test]
    fn prefixes() {
        assert!(pfx("10.1.0.0/16").contains("10.1.200.3".parse().unwrap()));
        assert!(!pfx("10.1.0.0/16").contains("10.2.0.1".parse().unwrap()));
        assert!(pfx("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(!pfx("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(pfx("::/0").contains("2001:db8::1".parse().unwrap()));
        assert_eq!(pfx("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!(Prefix::new("10.0.0.1".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn explicit_priority_beats_default_and_specific_beats_general() {
        let mut spd = Spd::default();
        let ipsec = Action::Ipsec(vec![Rule {
            proto: Proto::Esp,
            level: Level::Require,
        }]);
        spd.add(
            Dir::Out,
            sel("192.0.2.1/32", "192.0.2.2/32", None),
            PRIORITY_DEFAULT,
            ipsec.clone(),
        )
        .unwrap();
        spd.add(
            Dir::Out,
            sel("0.0.0.0/0", "0.0.0.0/0", Some(1)),
            10,
            Action::Bypass,
        )
        .unwrap();
        let icmp = flow("192.0.2.1", "192.0.2.2", 1, Some((8, 0)));
        let tcp = flow("192.0.2.1", "192.0.2.2", 6, Some((1000, 22)));
        assert_eq!(spd.lookup(Dir::Out, &icmp).unwrap().action, Action::Bypass);
        assert_eq!(spd.lookup(Dir::Out, &tcp).unwrap().action, ipsec);
        assert!(spd.lookup(Dir::In, &tcp).is_none());

        // at equal priority the more specific selector wins, whatever the order
        let mut spd = Spd::default();
        spd.add(
            Dir::Out,
            sel("192.0.2.0/24", "0.0.0.0/0", None),
            5,
            Action::Discard,
        )
        .unwrap();
        let mut s = sel("192.0.2.0/24", "0.0.0.0/0", Some(6));
        s.dport = Some(22);
        spd.add(Dir::Out, s, 5, Action::Bypass).unwrap();
        assert_eq!(spd.lookup(Dir::Out, &tcp).unwrap().action, Action::Bypass);
        assert_eq!(spd.lookup(Dir::Out, &icmp).unwrap().action, Action::Discard);
    }

    #[test]
    fn add_update_delete() {
        let mut spd = Spd::default();
        let s = sel("::/0", "::/0", Some(58));
        spd.add(Dir::In, s, 10, Action::Bypass).unwrap();
        assert!(spd.add(Dir::In, s, 10, Action::Discard).is_err());
        spd.add(Dir::Out, s, 10, Action::Discard).unwrap();
        spd.update(Dir::In, s, 10, Action::Discard);
        assert_eq!(spd.len(), 2);
        spd.delete(Dir::In, &s).unwrap();
        assert!(spd.delete(Dir::In, &s).is_err());
        assert_eq!(spd.len(), 1);
    }

    #[test]
    fn ports_need_a_packet_with_ports() {
        let mut s = sel("0.0.0.0/0", "0.0.0.0/0", Some(17));
        s.dport = Some(53);
        assert!(s.matches(&flow("1.1.1.1", "2.2.2.2", 17, Some((999, 53)))));
        assert!(!s.matches(&flow("1.1.1.1", "2.2.2.2", 17, Some((999, 54)))));
        assert!(!s.matches(&flow("1.1.1.1", "2.2.2.2", 17, None)));
    }
}
