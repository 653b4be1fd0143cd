//! What tunsec knows of its nftables table in force, kept so that an
//! inbound policy change finds what it does to the table at the cost of
//! the change, not of the SPD: at 10,000 peers each scan of the SPD reads
//! 20,000 policies out of cache (2–3 ms here), and a change of
//! host-to-host policies needs none.
//!
//! A change goes one of three ways ([`Route`]): elements of the sets in
//! force; or rules of the input chain that come and go (a policy that is
//! not host to host, or a priority's sets, its "map", that come with its
//! first host-to-host policy or go with its last), as netlink messages
//! placed by the rules' handles ([`ChainChange::plan`]); or, where the
//! policies the change does not touch would turn from elements into
//! rules or back, or the batch would be too large, the text of
//! [`super::input_update`].

use super::{
    MapKey, Place, PolicyChange, element, full_specificity, in_map, input_rules, map_comment,
    map_key, map_place, policy_comment, policy_place, policy_rule, rule_comment, set_name, sorted,
};
use crate::daemon::nfnl::{Msg, Op, Rule, Verdict};
use crate::daemon::plumbing::Instance;
use crate::spd::{Dir, Policy};
use crate::state::State;
use std::collections::{HashMap, HashSet};

/// How many messages one netlink batch may carry: the batch must fit the
/// socket's send buffer ([`crate::daemon::nfnl::Nfnl::open`] asks for 1
/// MiB; an element is 76 to 100 bytes, a rule up to about 700). Bigger
/// changes go as text.
const BATCH_MESSAGES: usize = 1000;

/// Per map key, how many inbound policies would be its elements, and how
/// many other inbound policies share its priority and specificity (any
/// one of them keeps the key's policies rules: see [`super::maps`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    elements: HashMap<MapKey, usize>,
    mixers: HashMap<MapKey, usize>,
}

impl Census {
    /// Count `state`'s policies (a scan: at load).
    pub fn of(state: &State) -> Census {
        let mut c = Census::default();
        for p in state.spd.iter_unordered() {
            c.count(p, true);
        }
        c
    }

    fn count(&mut self, p: &Policy, add: bool) {
        if p.dir != Dir::In {
            return;
        }
        let counts = if in_map(p) {
            &mut self.elements
        } else if p.selector.specificity() == full_specificity(p.selector.dst.addr.is_ipv6()) {
            &mut self.mixers
        } else {
            return;
        };
        let k = map_key(p);
        let n = counts.entry(k).or_insert(0);
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&k);
            }
        }
    }

    /// Count a change of inbound policies.
    pub fn apply(&mut self, changes: &[PolicyChange]) {
        for (old, new) in changes {
            if let Some(p) = old {
                self.count(p, false);
            }
            if let Some(p) = new {
                self.count(p, true);
            }
        }
    }

    /// The maps: keys with elements and no other policy among them.
    pub fn maps(&self) -> HashSet<MapKey> {
        self.elements
            .keys()
            .filter(|k| !self.mixers.contains_key(k))
            .copied()
            .collect()
    }
}

/// The table in force: the census its maps follow from, and the input
/// chain's rules (comment and place in evaluation order; the base
/// rules, first, have none).
#[derive(Debug, Clone)]
pub struct Known {
    census: Census,
    chain: Vec<(String, Option<Place>)>,
}

/// How a change of inbound policies goes to the table.
#[derive(Debug)]
pub enum Route {
    /// Elements of the maps in force, added and deleted (deletions first).
    Elements { ops: Vec<Op>, next: Known },
    /// Rules that come or go, maps that come or go with their rules, and
    /// elements, placed by the rules' handles.
    Chain(ChainChange),
    /// Anything else: the input chain rewritten ([`super::input_update`]).
    Text,
}

/// A rule a change adds.
#[derive(Debug)]
enum Added {
    /// One of a new map's two rules: its refused pairs (`true`) or its
    /// allowed ones.
    Map(MapKey, bool),
    /// A policy's rule ([`super::policy_rule`]), placed by [`ChainChange::plan`].
    Policy(Msg),
}

/// Rules and maps added and dropped, and elements moved, as one netlink
/// batch.
#[derive(Debug)]
pub struct ChainChange {
    /// What the table is once it is done.
    pub next: Known,
    /// The input chain's comments before it, in order.
    before: Vec<String>,
    added: Vec<MapKey>,
    dropped: Vec<MapKey>,
    /// Element deletions, then additions (the new maps' and the kept
    /// maps').
    deletions: Vec<Op>,
    additions: Vec<Op>,
    /// The rules that go, by comment (a dropped map's two among them).
    gone: Vec<String>,
    /// The rules that come, in chain order, each with the comment of the
    /// rule already there that it goes before (`None`: last).
    new_rules: Vec<(Added, Option<String>)>,
}

impl Known {
    /// What `state`'s table is once loaded (a scan: at load, or after the
    /// input chain was rewritten).
    pub fn of(state: &State, inst: &Instance) -> Known {
        let census = Census::of(state);
        let chain = input_rules(state, inst, &census.maps())
            .into_iter()
            .map(|(r, place)| (rule_comment(&r).unwrap_or_default().to_string(), place))
            .collect();
        Known { census, chain }
    }

    /// The maps the table has (its census's).
    pub fn maps(&self) -> HashSet<MapKey> {
        self.census.maps()
    }

    /// The input chain's comments, in order.
    pub fn comments(&self) -> impl Iterator<Item = &str> {
        self.chain.iter().map(|(c, _)| c.as_str())
    }

    /// How `changes` (inbound policies, before and after) reach the table.
    pub fn route(&self, changes: &[PolicyChange]) -> Route {
        let mut census = self.census.clone();
        census.apply(changes);
        let before = self.maps();
        let after = census.maps();
        let inbound = |p: &&Policy| p.dir == Dir::In;
        let olds = || {
            changes
                .iter()
                .filter_map(|(o, _)| o.as_deref())
                .filter(inbound)
        };
        let news = || {
            changes
                .iter()
                .filter_map(|(_, n)| n.as_deref())
                .filter(inbound)
        };
        let element_before = |p: &Policy| in_map(p) && before.contains(&map_key(p));
        let element_after = |p: &Policy| in_map(p) && after.contains(&map_key(p));
        let added: Vec<MapKey> = sorted(&after)
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        let dropped: Vec<MapKey> = sorted(&before)
            .into_iter()
            .filter(|k| !after.contains(k))
            .collect();
        // Policies this change does not touch stay what they are: a map
        // that goes takes its last elements with it (else its policies
        // left would turn into rules), and a new map's policies all come
        // with this change (else some were rules, kept so by a policy
        // the change takes away). Should the counts say otherwise, the
        // text path finds them.
        let census_of = |k: &MapKey| census.elements.get(k).copied().unwrap_or(0);
        if dropped.iter().any(|k| census_of(k) != 0)
            || added.iter().any(|k| {
                news()
                    .filter(|p| element_after(p) && map_key(p) == *k)
                    .count()
                    != census_of(k)
            })
        {
            return Route::Text;
        }
        // Elements go one by one even from sets that go too: the kernel
        // echoes each with its counter, which `tunsec stats` keeps.
        let deletions: Vec<Op> = olds()
            .filter(|p| element_before(p))
            .map(|p| element(p, false))
            .collect();
        let mut additions: Vec<Op> = Vec::new();
        // The new maps' elements first, map by map, then the kept maps'.
        for k in &added {
            additions.extend(
                news()
                    .filter(|p| element_after(p) && map_key(p) == *k)
                    .map(|p| element(p, true)),
            );
        }
        additions.extend(
            news()
                .filter(|p| element_after(p) && before.contains(&map_key(p)))
                .map(|p| element(p, true)),
        );
        let gone_rules: Vec<String> = olds()
            .filter(|p| !element_before(p))
            .map(policy_comment)
            .collect();
        let mut adds: Vec<(String, Place, Added)> = Vec::new();
        for p in news().filter(|p| !element_after(p)) {
            let Some(msg) = policy_rule(p, None) else {
                return Route::Text;
            };
            adds.push((policy_comment(p), policy_place(p), Added::Policy(msg)));
        }
        if added.is_empty() && dropped.is_empty() && gone_rules.is_empty() && adds.is_empty() {
            let mut ops = deletions;
            ops.extend(additions);
            if ops.len() > BATCH_MESSAGES {
                return Route::Text;
            }
            let next = Known {
                census,
                ..self.clone()
            };
            return Route::Elements { ops, next };
        }
        for k in &added {
            for drop in [true, false] {
                adds.push((map_comment(*k, drop), map_place(*k), Added::Map(*k, drop)));
            }
        }
        let mut gone = gone_rules;
        for k in &dropped {
            gone.extend([map_comment(*k, true), map_comment(*k, false)]);
        }
        let messages = deletions.len() + additions.len() + gone.len() + adds.len();
        if messages + 2 * (added.len() + dropped.len()) > BATCH_MESSAGES {
            return Route::Text;
        }
        let going: HashSet<&str> = gone.iter().map(String::as_str).collect();
        // The next chain: the rules that stay, and each new one before the
        // first that comes after it in evaluation order (a stable sort
        // keeps a map's refused pairs before its allowed ones).
        let mut chain: Vec<(String, Option<Place>, Option<Added>)> = self
            .chain
            .iter()
            .filter(|(c, _)| !going.contains(c.as_str()))
            .map(|(c, p)| (c.clone(), *p, None))
            .collect();
        adds.sort_by_key(|(_, place, _)| *place);
        for (c, place, a) in adds {
            let at = chain
                .iter()
                .position(|(_, p, _)| p.is_some_and(|p| p > place))
                .unwrap_or(chain.len());
            chain.insert(at, (c, Some(place), Some(a)));
        }
        let mut new_rules = Vec::new();
        let mut anchor = None;
        for (c, _, a) in chain.iter_mut().rev() {
            match a.take() {
                Some(a) => new_rules.push((a, anchor.clone())),
                None => anchor = Some(c.clone()),
            }
        }
        new_rules.reverse();
        Route::Chain(ChainChange {
            next: Known {
                census,
                chain: chain.into_iter().map(|(c, p, _)| (c, p)).collect(),
            },
            before: self.comments().map(str::to_string).collect(),
            added,
            dropped,
            deletions,
            additions,
            gone,
            new_rules,
        })
    }
}

impl ChainChange {
    /// The messages that make `chain`, the input chain in force as the
    /// kernel lists it, what the change asks: the rules that go deleted
    /// by their handles, each new rule put just before the rule already
    /// there that follows it (or last). An error when `chain` is not the
    /// chain tunsec left (changed from outside).
    pub fn plan(&self, chain: &[Rule]) -> Result<Vec<Msg>, String> {
        let mut present = Vec::with_capacity(chain.len());
        for r in chain {
            match &r.comment {
                Some(c) => present.push((c.as_str(), r.handle)),
                None => return Err(format!("rule handle {} has no comment", r.handle)),
            }
        }
        let listed: Vec<&str> = present.iter().map(|(c, _)| *c).collect();
        if listed != self.before {
            return Err(format!(
                "the input chain has the rules {listed:?}, tunsec expected {:?}",
                self.before
            ));
        }
        let handles: HashMap<&str, u64> = present.iter().copied().collect();
        let handle = |c: &str| handles.get(c).copied();
        // The sets' ids in this batch: two a map, refused pairs first.
        let id = |k: &MapKey, drop: bool| {
            let i = self.added.iter().position(|a| a == k).unwrap_or(0) as u32;
            2 * i + 1 + !drop as u32
        };
        let mut msgs: Vec<Msg> = self.deletions.iter().cloned().map(Msg::Element).collect();
        for c in &self.gone {
            let Some(h) = handle(c) else {
                return Err(format!("no rule has the comment {c:?}"));
            };
            msgs.push(Msg::DelRule {
                chain: "input".into(),
                handle: h,
            });
        }
        for k in &self.dropped {
            for drop in [true, false] {
                msgs.push(Msg::DelSet {
                    name: set_name(*k, drop),
                });
            }
        }
        for k in &self.added {
            for drop in [true, false] {
                msgs.push(Msg::NewSet {
                    name: set_name(*k, drop),
                    v6: k.0,
                    id: id(k, drop),
                });
            }
        }
        msgs.extend(self.additions.iter().cloned().map(Msg::Element));
        // In chain order, each before the first rule after it that is
        // already there: several before the same rule stay in order.
        for (a, anchor) in &self.new_rules {
            let before = match anchor {
                Some(c) => Some(handle(c).ok_or_else(|| format!("no rule has the comment {c:?}"))?),
                None => None,
            };
            msgs.push(match a {
                Added::Map(k, drop) => Msg::NewSetRule {
                    chain: "input".into(),
                    set: set_name(*k, *drop),
                    v6: k.0,
                    set_id: Some(id(k, *drop)),
                    verdict: if *drop {
                        Verdict::Drop
                    } else {
                        Verdict::Accept
                    },
                    comment: map_comment(*k, *drop),
                    before,
                },
                Added::Policy(m) => {
                    let mut m = m.clone();
                    if let Msg::NewRule { before: b, .. } = &mut m {
                        *b = before;
                    }
                    m
                }
            });
        }
        Ok(msgs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::time::Duration;

    fn apply(state: &State, text: &str) -> State {
        state.apply_text(text, "t", Duration::ZERO).unwrap().0
    }

    fn changes(before: &State, after: &State) -> Vec<PolicyChange> {
        after
            .spd
            .changes_since(&before.spd)
            .into_iter()
            .map(|(o, n)| (o.cloned(), n.cloned()))
            .collect()
    }

    /// The input chain as the kernel would list it after a whole load of
    /// `known`'s table: handles from 100.
    fn listed(known: &Known) -> Vec<Rule> {
        known
            .comments()
            .enumerate()
            .map(|(i, c)| Rule {
                handle: 100 + i as u64,
                comment: Some(c.to_string()),
                dropped: 0,
            })
            .collect()
    }

    /// The kernel's side of the table in the tests: the input chain, the
    /// sets with their pairs, and the set each rule looks up.
    #[derive(Debug)]
    struct Kernel {
        chain: Vec<Rule>,
        sets: BTreeMap<String, BTreeSet<(IpAddr, IpAddr)>>,
        uses: HashMap<u64, String>,
        handles: u64,
    }

    /// The sets a whole load of `state`'s table makes, with their pairs.
    fn sets_of(state: &State) -> BTreeMap<String, BTreeSet<(IpAddr, IpAddr)>> {
        let maps = super::super::maps(state);
        let mut sets = BTreeMap::new();
        for k in &maps {
            for drop in [true, false] {
                sets.insert(set_name(*k, drop), BTreeSet::new());
            }
        }
        for p in state.spd.iter_unordered() {
            if in_map(p) && maps.contains(&map_key(p)) {
                let set = set_name(map_key(p), super::super::refuses(p));
                let pair = (p.selector.src.addr, p.selector.dst.addr);
                sets.get_mut(&set).unwrap().insert(pair);
            }
        }
        sets
    }

    /// The kernel after a whole load of `state`'s table.
    fn loaded(state: &State, inst: &Instance) -> Kernel {
        let known = Known::of(state, inst);
        let chain = listed(&known);
        let mut uses = HashMap::new();
        for k in known.maps() {
            for drop in [true, false] {
                let r = chain
                    .iter()
                    .find(|r| r.comment.as_deref() == Some(&map_comment(k, drop)))
                    .unwrap();
                uses.insert(r.handle, set_name(k, drop));
            }
        }
        Kernel {
            chain,
            sets: sets_of(state),
            uses,
            handles: 1000,
        }
    }

    /// What the kernel does with `msgs`, in order; an error where it would
    /// refuse one (a set that is not there or still looked up, an element
    /// added twice or deleted when absent, a handle that is not there),
    /// or where counters would go unechoed (a set dropped with elements).
    fn run(k: &mut Kernel, msgs: &[Msg]) -> Result<(), String> {
        for m in msgs {
            match m {
                Msg::Element(op) => {
                    let set = k
                        .sets
                        .get_mut(&op.set)
                        .ok_or(format!("{m:?}: no such set"))?;
                    let pair = (op.src, op.dst);
                    let ok = if op.add {
                        set.insert(pair)
                    } else {
                        set.remove(&pair)
                    };
                    if !ok {
                        return Err(format!("{m:?}: the element is (not) there"));
                    }
                }
                Msg::NewSet { name, .. } => {
                    if k.sets.insert(name.clone(), BTreeSet::new()).is_some() {
                        return Err(format!("{m:?}: the set is there"));
                    }
                }
                Msg::DelSet { name } => {
                    if k.uses.values().any(|s| s == name) {
                        return Err(format!("{m:?}: a rule still looks it up"));
                    }
                    let set = k.sets.remove(name).ok_or(format!("{m:?}: no such set"))?;
                    // The kernel would take them, but their counters would
                    // not be echoed: elements go one by one first.
                    if !set.is_empty() {
                        return Err(format!("{m:?}: its elements go uncounted"));
                    }
                }
                Msg::NewSetRule {
                    comment, before, ..
                }
                | Msg::NewRule {
                    comment, before, ..
                } => {
                    if let Msg::NewSetRule { set, .. } = m {
                        if !k.sets.contains_key(set) {
                            return Err(format!("{m:?}: no such set"));
                        }
                        k.uses.insert(k.handles, set.clone());
                    }
                    let r = Rule {
                        handle: k.handles,
                        comment: Some(comment.clone()),
                        dropped: 0,
                    };
                    k.handles += 1;
                    match before {
                        Some(h) => {
                            let at = k
                                .chain
                                .iter()
                                .position(|x| x.handle == *h)
                                .ok_or(format!("{m:?}: no such handle"))?;
                            k.chain.insert(at, r);
                        }
                        None => k.chain.push(r),
                    }
                }
                Msg::DelRule { handle, .. } => {
                    let at = k
                        .chain
                        .iter()
                        .position(|x| x.handle == *handle)
                        .ok_or(format!("{m:?}: no such handle"))?;
                    k.chain.remove(at);
                    k.uses.remove(handle);
                }
            }
        }
        Ok(())
    }

    /// One policy statement: a host-to-host policy of one of a few peers,
    /// families and priorities (`kind` 0, a map element), or a rule:
    /// host to host for TCP (1); or (2) an IPv4 /31 to a host for TCP,
    /// whose specificity keeps the host-to-host policies of its priority
    /// out of a map, or an IPv6 /32 to a /32, which ties with the IPv4
    /// maps in priority and specificity.
    fn statement(peer: u8, v6: bool, prio: u8, kind: u8, add: bool, allow: bool) -> String {
        let (src, dst, proto): (String, String, &str) = match (kind, v6) {
            (2, false) => (
                format!("10.0.{}.0/31", peer + 1),
                "10.0.0.255".into(),
                "tcp",
            ),
            (2, true) => (
                format!("fd{:02x}::/32", peer + 1),
                "fd01::/32".into(),
                "any",
            ),
            (_, false) => (format!("10.0.0.{}", peer + 1), "10.0.0.255".into(), "any"),
            (_, true) => (format!("fd00::{}", peer + 1), "fd00::ff".into(), "any"),
        };
        let proto = if kind == 1 { "tcp" } else { proto };
        let prio = [10, 20, 0x8000_0000u32][prio as usize % 3];
        let action = if allow { "none" } else { "discard" };
        if add {
            format!("spdadd {src} {dst} {proto} -P in priority {prio} {action};\n")
        } else {
            format!("spddelete {src} {dst} {proto} -P in;\n")
        }
    }

    proptest! {
        /// Changes made by route, each batch as the kernel would apply its
        /// messages, leave the table a whole load of the state would make:
        /// the same maps, and the input chain's rules in the same order.
        #[test]
        fn routed_changes_leave_the_table_a_whole_load_makes(
            batches in proptest::collection::vec(
                proptest::collection::vec(
                    (0u8..6, any::<bool>(), 0u8..3, prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)], any::<bool>(), any::<bool>()),
                    1..4,
                ),
                1..25,
            )
        ) {
            let inst = Instance::new("t0");
            let mut state = apply(&State::default(), "spdadd 10.0.0.1 10.0.0.255 any -P in none;\n");
            let mut known = Known::of(&state, &inst);
            let mut kernel = loaded(&state, &inst);
            for batch in batches {
                let mut text = String::new();
                for (peer, v6, prio, kind, add, allow) in batch {
                    let line = statement(peer, v6, prio, kind, add, allow);
                    // Only what applies to the state (no deletes of what
                    // is not there); an add of what is there is an update
                    // (its verdict, or its priority and so its map).
                    let update = line.replacen("spdadd", "spdupdate", 1);
                    for l in [line, update] {
                        if state.apply_text(&(text.clone() + &l), "t", Duration::ZERO).is_ok() {
                            text.push_str(&l);
                            break;
                        }
                    }
                }
                if text.is_empty() {
                    continue;
                }
                let next = apply(&state, &text);
                let whole = Known::of(&next, &inst);
                match known.route(&changes(&state, &next)) {
                    Route::Elements { ops, next: k } => {
                        let msgs: Vec<Msg> = ops.into_iter().map(Msg::Element).collect();
                        run(&mut kernel, &msgs).map_err(TestCaseError::fail)?;
                        known = k;
                    }
                    Route::Chain(cc) => {
                        let msgs = cc.plan(&kernel.chain).unwrap();
                        run(&mut kernel, &msgs).map_err(TestCaseError::fail)?;
                        known = cc.next;
                    }
                    Route::Text => {
                        known = Known::of(&next, &inst);
                        kernel = loaded(&next, &inst);
                    }
                }
                let got: Vec<_> = kernel.chain.iter().map(|r| r.comment.clone().unwrap()).collect();
                let want: Vec<_> = whole.comments().map(str::to_string).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(&kernel.sets, &sets_of(&next));
                prop_assert_eq!(known.maps(), whole.maps());
                prop_assert_eq!(&known.census, &whole.census);
                prop_assert!(known.comments().eq(whole.comments()));
                state = next;
            }
        }
    }

    /// A state of one host-to-host inbound policy, and its table.
    fn one_peer() -> (State, Known) {
        let state = apply(
            &State::default(),
            "spdadd 10.0.0.1 10.0.0.9 any -P in none;\n",
        );
        let known = Known::of(&state, &Instance::new("t0"));
        (state, known)
    }

    #[test]
    fn a_chain_changed_from_outside_is_refused() {
        let (state, known) = one_peer();
        let next = apply(
            &state,
            "spdadd 10.0.0.2 10.0.0.9 any -P in priority 5 none;\n",
        );
        let Route::Chain(mc) = known.route(&changes(&state, &next)) else {
            panic!("a new priority is a new map");
        };
        let chain = listed(&known);
        assert!(mc.plan(&chain).is_ok());
        let mut other = chain.clone();
        other.remove(4);
        assert!(mc.plan(&other).unwrap_err().contains("tunsec expected"));
        let mut other = chain.clone();
        other[1].comment = None;
        assert!(mc.plan(&other).unwrap_err().contains("no comment"));
    }

    #[test]
    fn too_many_elements_for_one_batch_go_as_text() {
        let (state, known) = one_peer();
        let text: String = (0..=BATCH_MESSAGES)
            .map(|i| {
                format!(
                    "spdadd 10.1.{}.{} 10.0.0.9 any -P in priority 5 none;\n",
                    i / 250,
                    i % 250
                )
            })
            .collect();
        let next = apply(&state, &text);
        assert!(matches!(known.route(&changes(&state, &next)), Route::Text));
    }

    /// A policy that is not host to host is a rule of its own, added
    /// before the rule that follows it and deleted by its handle, with
    /// its counter when it drops; an update is both.
    #[test]
    fn a_rule_goes_in_at_its_place_and_out_by_its_handle() {
        let (state, known) = one_peer();
        let mut kernel = loaded(&state, &Instance::new("t0"));
        let chain = kernel.chain.clone();
        let next = apply(
            &state,
            "spdadd 10.0.0.0/24[22] 10.0.0.9 tcp -P in priority 5 discard;\n",
        );
        let Route::Chain(cc) = known.route(&changes(&state, &next)) else {
            panic!("a rule goes over netlink");
        };
        let msgs = cc.plan(&chain).unwrap();
        let [
            Msg::NewRule {
                counter: true,
                verdict: Verdict::Drop,
                before: Some(h),
                comment,
                ..
            },
        ] = &msgs[..]
        else {
            panic!("{msgs:?}");
        };
        // Priority 5 comes before the map of the peer's (default)
        // priority, whose refused pairs' rule is the fifth.
        assert_eq!(*h, chain[4].handle);
        assert_eq!(
            comment,
            &format!(
                "policy {}",
                next.spd.iter_unordered().map(|p| p.id).max().unwrap()
            )
        );
        run(&mut kernel, &msgs).unwrap();
        let known2 = cc.next;
        // Updated to let the plaintext through: out by its handle, in again.
        let after = apply(
            &next,
            "spdupdate 10.0.0.0/24[22] 10.0.0.9 tcp -P in priority 5 none;\n",
        );
        let Route::Chain(cc) = known2.route(&changes(&next, &after)) else {
            panic!("an update of a rule goes over netlink");
        };
        let msgs = cc.plan(&kernel.chain).unwrap();
        assert!(
            matches!(&msgs[..], [Msg::DelRule { handle: 1000, .. }, Msg::NewRule { counter: false, verdict: Verdict::Accept, before: Some(h), .. }] if *h == chain[4].handle),
            "{msgs:?}"
        );
        // Deleted: out by its handle.
        let gone = apply(&after, "spddelete 10.0.0.0/24[22] 10.0.0.9 tcp -P in;\n");
        let Route::Chain(cc2) = cc.next.route(&changes(&after, &gone)) else {
            panic!("a deleted rule goes over netlink");
        };
        run(&mut kernel, &msgs).unwrap();
        let msgs = cc2.plan(&kernel.chain).unwrap();
        assert!(
            matches!(&msgs[..], [Msg::DelRule { handle: 1001, .. }]),
            "{msgs:?}"
        );
    }

    /// A rule that would keep a map's policies rules (the same priority
    /// and specificity: a /31 with a protocol is as specific as host to
    /// host) turns the map's elements into rules: the text.
    #[test]
    fn a_rule_among_a_maps_policies_is_text() {
        let (state, known) = one_peer();
        let next = apply(&state, "spdadd 10.0.1.0/31 10.0.0.9 tcp -P in discard;\n");
        assert!(matches!(known.route(&changes(&state, &next)), Route::Text));
        // And its going, which makes them elements again.
        let known = Known::of(&next, &Instance::new("t0"));
        assert!(matches!(known.route(&changes(&next, &state)), Route::Text));
    }
}
