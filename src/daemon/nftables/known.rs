//! What tunsec knows of its nftables table in force, kept so that an
//! inbound policy change finds what it does to the table at the cost of
//! the change, not of the SPD: at 10,000 peers each scan of the SPD reads
//! 20,000 policies out of cache (2–3 ms here), and a change of
//! host-to-host policies needs none.
//!
//! A change goes one of three ways ([`Route`]): elements of the sets in
//! force; a priority's sets (its "map") that come with its first policy
//! or go with its last, with their rules in the input chain, as netlink
//! messages placed by the rules' handles ([`MapsChange::plan`]); or, for
//! anything else, the text of [`super::input_update`].

use super::{
    MapKey, Place, PolicyChange, element, full_specificity, in_map, input_rules, map_comment,
    map_key, map_place, rule_comment, set_name, sorted,
};
use crate::daemon::nfnl::{Msg, Op, Rule, Verdict};
use crate::daemon::plumbing::Instance;
use crate::spd::{Dir, Policy};
use crate::state::State;
use std::collections::{HashMap, HashSet};

/// How many elements one netlink batch may carry: each is a message, and
/// the batch must fit the socket's send buffer (212,992 bytes by default;
/// an element is 76 to 100 bytes). Bigger changes go as text.
const MAPS_CHANGE_ELEMENTS: usize = 1000;

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
    /// Maps that come or go, with their rules.
    Maps(MapsChange),
    /// Anything else: the input chain rewritten ([`super::input_update`]).
    Text,
}

/// Maps added and dropped with their input-chain rules, and elements
/// moved in the maps kept, as one netlink batch.
#[derive(Debug)]
pub struct MapsChange {
    /// What the table is once it is done.
    pub next: Known,
    /// The input chain's comments before it, in order.
    before: Vec<String>,
    added: Vec<MapKey>,
    dropped: Vec<MapKey>,
    /// Deletions from the maps kept, then additions: the new maps'
    /// elements and those of the maps kept.
    deletions: Vec<Op>,
    additions: Vec<Op>,
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
        let mapped =
            |p: &Policy| in_map(p) && (before.contains(&map_key(p)) || after.contains(&map_key(p)));
        if !changes
            .iter()
            .all(|(o, n)| o.iter().chain(n.iter()).all(|p| mapped(p)))
        {
            return Route::Text;
        }
        let kept = |p: &Policy| before.contains(&map_key(p)) && after.contains(&map_key(p));
        // Elements go one by one even from sets that go too: the kernel
        // echoes each with its counter, which `tunsec stats` keeps.
        let deletions: Vec<Op> = changes
            .iter()
            .filter_map(|(o, _)| o.as_deref())
            .filter(|p| before.contains(&map_key(p)))
            .map(|p| element(p, false))
            .collect();
        let additions = changes
            .iter()
            .filter_map(|(_, n)| n.as_deref())
            .filter(|p| kept(p))
            .map(|p| element(p, true));
        if after == before {
            let mut ops = deletions;
            ops.extend(additions);
            if ops.len() > MAPS_CHANGE_ELEMENTS {
                return Route::Text;
            }
            let next = Known {
                census,
                ..self.clone()
            };
            return Route::Elements { ops, next };
        }
        let added: Vec<MapKey> = sorted(&after)
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect();
        let dropped: Vec<MapKey> = sorted(&before)
            .into_iter()
            .filter(|k| !after.contains(k))
            .collect();
        // A new map's policies all come with this change: before it its
        // key had none (or they were rules, kept so by a policy this change
        // did not touch, and still are). Should the counts say otherwise,
        // the text path finds them.
        let mut news = Vec::new();
        for k in &added {
            let before = news.len();
            news.extend(
                changes
                    .iter()
                    .filter_map(|(_, n)| n.as_deref())
                    .filter(|p| map_key(p) == *k)
                    .map(|p| element(p, true)),
            );
            if news.len() - before != census.elements.get(k).copied().unwrap_or(0) {
                return Route::Text;
            }
        }
        news.extend(additions);
        if deletions.len() + news.len() > MAPS_CHANGE_ELEMENTS {
            return Route::Text;
        }
        let mut chain: Vec<(String, Option<Place>)> = self
            .chain
            .iter()
            .filter(|(c, _)| !dropped.iter().any(|k| is_map_rule(*k, c)))
            .cloned()
            .collect();
        for k in &added {
            // Its two rules, refused pairs first, before the first rule
            // that comes after them.
            let place = map_place(*k);
            let at = chain
                .iter()
                .position(|(_, p)| p.is_some_and(|p| p > place))
                .unwrap_or(chain.len());
            chain.insert(at, (map_comment(*k, false), Some(place)));
            chain.insert(at, (map_comment(*k, true), Some(place)));
        }
        Route::Maps(MapsChange {
            next: Known { census, chain },
            before: self.comments().map(str::to_string).collect(),
            added,
            dropped,
            deletions,
            additions: news,
        })
    }
}

/// Whether `comment` names one of map `k`'s two rules.
fn is_map_rule(k: MapKey, comment: &str) -> bool {
    comment == map_comment(k, true) || comment == map_comment(k, false)
}

impl MapsChange {
    /// The messages that make `chain`, the input chain in force as the
    /// kernel lists it, what the change asks: a new map's rule goes just
    /// before the rule that follows it in evaluation order (or last). An
    /// error when `chain` is not the chain tunsec left (changed from
    /// outside).
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
        let handle = |c: &str| present.iter().find(|(p, _)| *p == c).map(|(_, h)| *h);
        let is_added = |c: &str| self.added.iter().any(|k| is_map_rule(*k, c));
        // The sets' ids in this batch: two a map, refused pairs first.
        let id = |k: &MapKey, drop: bool| {
            let i = self.added.iter().position(|a| a == k).unwrap_or(0) as u32;
            2 * i + 1 + !drop as u32
        };
        let mut msgs: Vec<Msg> = self.deletions.iter().cloned().map(Msg::Element).collect();
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
        let after = &self.next.chain;
        for (i, (c, _)) in after.iter().enumerate() {
            let Some((k, drop)) = self
                .added
                .iter()
                .flat_map(|k| [(*k, true), (*k, false)])
                .find(|(k, drop)| map_comment(*k, *drop) == *c)
            else {
                continue;
            };
            let before = after[i + 1..]
                .iter()
                .find(|(x, _)| !is_added(x))
                .and_then(|(x, _)| handle(x));
            msgs.push(Msg::NewSetRule {
                chain: "input".into(),
                set: set_name(k, drop),
                v6: k.0,
                set_id: Some(id(&k, drop)),
                verdict: if drop { Verdict::Drop } else { Verdict::Accept },
                comment: c.clone(),
                before,
            });
        }
        for k in &self.dropped {
            for drop in [true, false] {
                let Some(h) = handle(&map_comment(*k, drop)) else {
                    return Err(format!("no rule looks set {} up", set_name(*k, drop)));
                };
                msgs.push(Msg::DelRule {
                    chain: "input".into(),
                    handle: h,
                });
            }
        }
        for k in &self.dropped {
            for drop in [true, false] {
                msgs.push(Msg::DelSet {
                    name: set_name(*k, drop),
                });
            }
        }
        Ok(msgs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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

    /// What the kernel does to `chain` with `msgs`' rules.
    fn run(chain: &mut Vec<Rule>, msgs: &[Msg], handles: &mut u64) {
        for m in msgs {
            match m {
                Msg::NewSetRule {
                    comment, before, ..
                } => {
                    let r = Rule {
                        handle: *handles,
                        comment: Some(comment.clone()),
                        dropped: 0,
                    };
                    *handles += 1;
                    match before {
                        Some(h) => {
                            let at = chain.iter().position(|x| x.handle == *h).unwrap();
                            chain.insert(at, r);
                        }
                        None => chain.push(r),
                    }
                }
                Msg::DelRule { handle, .. } => chain.retain(|x| x.handle != *handle),
                _ => {}
            }
        }
    }

    /// One policy statement: a host-to-host policy of one of a few peers,
    /// families and priorities (`kind` 0, a map element), or a rule:
    /// host to host for TCP (1); or (2) an IPv4 /31 to a host for TCP,
    /// whose specificity keeps the host-to-host policies of its priority
    /// out of a map, or an IPv6 /32 to a /32, which ties with the IPv4
    /// maps in priority and specificity.
    fn statement(peer: u8, v6: bool, prio: u8, kind: u8, add: bool) -> String {
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
        if add {
            format!("spdadd {src} {dst} {proto} -P in priority {prio} discard;\n")
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
                    (0u8..6, any::<bool>(), 0u8..3, prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)], any::<bool>()),
                    1..4,
                ),
                1..25,
            )
        ) {
            let inst = Instance::new("t0");
            let mut state = apply(&State::default(), "spdadd 10.0.0.1 10.0.0.255 any -P in none;\n");
            let mut known = Known::of(&state, &inst);
            let mut chain = listed(&known);
            let mut handles = 1000;
            for batch in batches {
                let mut text = String::new();
                for (peer, v6, prio, kind, add) in batch {
                    let line = statement(peer, v6, prio, kind, add);
                    // Only what applies to the state (no duplicate adds, no
                    // deletes of what is not there).
                    if state.apply_text(&(text.clone() + &line), "t", Duration::ZERO).is_ok() {
                        text.push_str(&line);
                    }
                }
                if text.is_empty() {
                    continue;
                }
                let next = apply(&state, &text);
                let whole = Known::of(&next, &inst);
                match known.route(&changes(&state, &next)) {
                    Route::Elements { next: k, .. } => known = k,
                    Route::Maps(mc) => {
                        let msgs = mc.plan(&chain).unwrap();
                        run(&mut chain, &msgs, &mut handles);
                        known = mc.next;
                        let got: Vec<_> = chain.iter().map(|r| r.comment.clone().unwrap()).collect();
                        let want: Vec<_> = whole.comments().map(str::to_string).collect();
                        prop_assert_eq!(got, want);
                    }
                    Route::Text => {
                        known = Known::of(&next, &inst);
                        chain = listed(&known);
                    }
                }
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
        let Route::Maps(mc) = known.route(&changes(&state, &next)) else {
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
        let text: String = (0..=MAPS_CHANGE_ELEMENTS)
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
        // A rule is text too.
        let next = apply(&state, "spdadd 10.0.0.2 10.0.0.9 tcp -P in discard;\n");
        assert!(matches!(known.route(&changes(&state, &next)), Route::Text));
    }
}
