//! tunsec's nftables table, as text for `nft -f`: the inbound SPD
//! enforced on packets that did not come through tunsec (plaintext from a
//! peer where a policy requires IPsec), the early drop of received IPsec,
//! and IKE's way out.
//!
//! Inbound policies from one host to another for all traffic (what an IKE
//! daemon installs per peer) go in sets of address pairs, two per family
//! and priority (the pairs whose plaintext is refused, and those let
//! through), each looked up by one rule, instead of a rule each: a packet
//! costs a lookup or two whatever the number of peers, and a change of
//! such a policy is an element added or deleted ([`super::nfnl`]), not a
//! reload of the table. Sets, not a verdict map: when a rule is added,
//! nf_tables checks every verdict of every verdict map in the table (1 ms
//! at 10,000 peers), and a set has none. Sets that come and go with such
//! policies, and the rules of other inbound policies, go over netlink too
//! (`known`, [`policy_rule`]); what cannot (a change that turns a
//! priority's elements into rules or back) rewrites the input chain and
//! adds or drops whole sets ([`input_update`]), leaving the elements in
//! place; the table is loaded whole only at start, or when that fails
//! (changed from outside).

use super::nfnl::{Deleted, Match, Msg, Op, Verdict};
use super::plumbing::Instance;
use crate::spd::{Action, Dir, Policy, Prefix, rank};
use crate::state::State;
use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

mod known;
pub use known::{Census, ChainChange, Known, Route};

/// An inbound policy that belongs in the sets (its "map"): host to host,
/// any protocol and port.
pub fn in_map(p: &Policy) -> bool {
    let s = &p.selector;
    p.dir == Dir::In
        && s.src.is_host()
        && s.dst.is_host()
        && s.proto.is_none()
        && s.sport.is_none()
        && s.dport.is_none()
}

/// An inbound policy before and after a change (None: none).
pub type PolicyChange = (Option<Arc<Policy>>, Option<Arc<Policy>>);

/// The sets of host-to-host policies of a family and priority, with
/// their two rules (a "map"): (IPv6, priority).
pub type MapKey = (bool, u32);

pub fn map_key(p: &Policy) -> MapKey {
    (p.selector.dst.addr.is_ipv6(), p.priority)
}

/// The set of the map's pairs whose plaintext is refused (`drop`), or let
/// through.
pub fn set_name((v6, prio): MapKey, drop: bool) -> String {
    format!(
        "in{}_{prio}_{}",
        if v6 { 6 } else { 4 },
        if drop { "drop" } else { "pass" }
    )
}

/// What the table does with plaintext a policy matches: refuse it where
/// the policy requires IPsec (or discards), let it pass otherwise.
fn refuses(p: &Policy) -> bool {
    match &p.action {
        Action::Bypass => false,
        Action::Discard => true,
        Action::Ipsec(rules) => rules
            .iter()
            .any(|r| r.level.required() && r.proto != crate::sad::Proto::IpComp),
    }
}

/// The element change for a map policy that went (`old`) or came.
pub fn element(p: &Policy, add: bool) -> Op {
    Op {
        set: set_name(map_key(p), refuses(p)),
        src: p.selector.src.addr,
        dst: p.selector.dst.addr,
        add,
    }
}

/// The maps the ruleset for `state` uses. A map stands for its policies
/// at the place of the first of them in evaluation order; that is the
/// ordered scan's answer when they are contiguous in that order, which
/// holds unless another inbound policy of the family has the same priority
/// and the same specificity (then they stay rules).
pub fn maps(state: &State) -> HashSet<MapKey> {
    Census::of(state).maps()
}

fn addr_match(p: &Prefix, dir: &str) -> Option<String> {
    if p.len == 0 {
        return None;
    }
    let f = if p.addr.is_ipv4() { "ip" } else { "ip6" };
    Some(if p.is_host() {
        format!("{f} {dir} {}", p.addr)
    } else {
        format!("{f} {dir} {p}")
    })
}

/// The nftables match for a policy's selector.
fn nft_match(p: &Policy) -> String {
    let s = &p.selector;
    let mut m = Vec::new();
    m.push(if s.src.addr.is_ipv4() {
        "meta nfproto ipv4".to_string()
    } else {
        "meta nfproto ipv6".to_string()
    });
    m.extend(addr_match(&s.src, "saddr"));
    m.extend(addr_match(&s.dst, "daddr"));
    if let Some(proto) = s.proto {
        m.push(format!("meta l4proto {proto}"));
        match proto {
            1 | 58 => {
                let kw = if proto == 1 { "icmp" } else { "icmpv6" };
                if let Some(t) = s.sport {
                    m.push(format!("{kw} type {t}"));
                }
                if let Some(c) = s.dport {
                    m.push(format!("{kw} code {c}"));
                }
            }
            _ => {
                if let Some(sp) = s.sport {
                    m.push(format!("th sport {sp}"));
                }
                if let Some(dp) = s.dport {
                    m.push(format!("th dport {dp}"));
                }
            }
        }
    }
    m.join(" ")
}

/// The input chain's rule for inbound policy `p` (not a map element), as
/// a netlink message: the same matches as `nft_match`'s text, each as
/// nft encodes it. `None` for what nft would refuse (an ICMP type or code
/// over 255).
pub fn policy_rule(p: &Policy, before: Option<u64>) -> Option<Msg> {
    let s = &p.selector;
    let v6 = s.src.addr.is_ipv6();
    let mut m = vec![Match::nfproto(v6)];
    for (prefix, src) in [(&s.src, true), (&s.dst, false)] {
        if prefix.len == 0 {
            continue;
        }
        let (octets, offset) = match prefix.addr {
            IpAddr::V4(a) => (a.octets().to_vec(), if src { 12 } else { 16 }),
            IpAddr::V6(a) => (a.octets().to_vec(), if src { 8 } else { 24 }),
        };
        m.push(Match::prefix(offset, &octets, prefix.len));
    }
    if let Some(proto) = s.proto {
        m.push(Match::l4proto(proto));
        // Neighbours in the header are loaded together, as nft does: the
        // ICMP type (one byte at 0) and code (at 1), the ports (two bytes
        // at 0 and 2).
        let width = if matches!(proto, 1 | 58) { 1 } else { 2 };
        let field = |v: u16| -> Option<Vec<u8>> {
            if width == 1 {
                Some(vec![u8::try_from(v).ok()?])
            } else {
                Some(v.to_be_bytes().to_vec())
            }
        };
        match (s.sport, s.dport) {
            (Some(a), Some(b)) => m.push(Match::transport(0, [field(a)?, field(b)?].concat())),
            (Some(a), None) => m.push(Match::transport(0, field(a)?)),
            (None, Some(b)) => m.push(Match::transport(width, field(b)?)),
            (None, None) => {}
        }
    }
    let drop = refuses(p);
    Some(Msg::NewRule {
        chain: "input".into(),
        matches: m,
        counter: drop,
        verdict: if drop { Verdict::Drop } else { Verdict::Accept },
        comment: policy_comment(p),
        before,
    })
}

/// The comment of inbound policy `p`'s rule.
fn policy_comment(p: &Policy) -> String {
    format!("policy {}", p.id)
}

/// The nftables table that enforces the inbound SPD on packets that did
/// not come through tunsec: the kernel would otherwise hand plaintext from
/// a peer straight to the application.
pub fn ruleset(state: &State, inst: &Instance) -> String {
    let t = inst.nft_table();
    let mut r = String::new();
    // Declaring, then deleting, then declaring again makes the load
    // atomic and idempotent (a stale table from a crash is replaced).
    writeln!(
        r,
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{"
    )
    .unwrap();
    let maps = maps(state);
    for k in sorted(&maps) {
        r.push_str(&map_decl(state, k, "  set"));
    }
    // ESP, AH, IPComp and ESP in UDP to this host: tunsec's packet sockets
    // have their copy. The kernel's would cost a route lookup, netfilter's
    // input hooks and a clone per raw socket, then die (no handler), or
    // find an IKE daemon's encapsulation socket and no SA; so it dies here,
    // as early as the IP layer allows. IKE (a zero non-ESP marker) and NAT
    // keepalives (too short to load the word) go on. Forwarded IPsec
    // (not to a local address) is left alone. So is what comes in by a
    // bridge: with br_netfilter the bridge runs this hook (the bridge as
    // iif) before it hands the frame up to the bridge device, where
    // tunsec's per-family sockets would have taken their copy; it dies
    // at input instead.
    if early_drop() {
        writeln!(
            r,
            "  chain prerouting {{\n    type filter hook prerouting priority raw; policy accept;"
        )
        .unwrap();
        writeln!(
            r,
            "    meta iifkind \"bridge\" accept comment \"bridged: seen here before tunsec sees it\""
        )
        .unwrap();
        writeln!(
            r,
            "    meta l4proto {{ 50, 51, 108 }} fib daddr type local drop comment \"tunsec has ESP, AH, IPComp\""
        )
        .unwrap();
        writeln!(
            r,
            "    udp dport {} @th,64,32 != 0 fib daddr type local drop comment \"tunsec has ESP in UDP\"\n  }}",
            crate::udp_encap::NAT_T_PORT
        )
        .unwrap();
    }
    writeln!(
        r,
        "  chain input {{\n    type filter hook input priority filter - 10; policy accept;"
    )
    .unwrap();
    for (rule, _) in input_rules(state, inst, &maps) {
        writeln!(r, "    {rule}").unwrap();
    }
    // The keying daemon's own packets must leave in the clear whatever the
    // SPD says (the kernel gives IKE sockets a bypass policy): marked,
    // they skip tunsec's routing table as tunsec's own packets do.
    writeln!(
        r,
        "  }}\n  chain output {{\n    type route hook output priority mangle - 10; policy accept;"
    )
    .unwrap();
    writeln!(
        r,
        "    udp sport {{ {IKE_PORTS} }} meta mark set {:#x} comment \"IKE leaves by the main table\"",
        inst.mark
    )
    .unwrap();
    writeln!(r, "  }}\n}}").unwrap();
    r
}

fn sorted(maps: &HashSet<MapKey>) -> Vec<MapKey> {
    let mut v: Vec<_> = maps.iter().copied().collect();
    v.sort();
    v
}

/// A host-to-host policy as a set element: `SRC . DST`.
fn element_text(p: &Policy) -> String {
    format!("{} . {}", p.selector.src.addr, p.selector.dst.addr)
}

/// The map's two sets with their elements: the host-to-host inbound
/// policies of `state` with its key, each with a counter. `head` is what a
/// declaration starts with (`  set` inside a table, `add set inet TABLE`
/// alone).
fn map_decl(state: &State, k: MapKey, head: &str) -> String {
    let mut els: [Vec<String>; 2] = Default::default();
    for p in state
        .spd
        .iter_unordered()
        .filter(|p| in_map(p) && map_key(p) == k)
    {
        els[refuses(p) as usize].push(element_text(p));
    }
    let ty = if k.0 { "ipv6_addr" } else { "ipv4_addr" };
    let mut r = String::new();
    for drop in [true, false] {
        write!(
            r,
            "{head} {} {{\n    type {ty} . {ty}\n    counter\n",
            set_name(k, drop)
        )
        .unwrap();
        let els = &mut els[drop as usize];
        if !els.is_empty() {
            els.sort();
            writeln!(r, "    elements = {{ {} }}", els.join(",\n      ")).unwrap();
        }
        r.push_str("  }\n");
    }
    r
}

/// The input chain's rules, in order, for `state` whose verdict maps are
/// `maps`.
fn input_rules(
    state: &State,
    inst: &Instance,
    maps: &HashSet<MapKey>,
) -> Vec<(String, Option<Place>)> {
    let base = [
        format!(
            "iifname \"{}\" accept comment \"decapsulated by tunsec\"",
            inst.tun
        ),
        "meta l4proto { 50, 51, 108 } accept comment \"ESP, AH, IPComp go to tunsec\"".to_string(),
        // ESP in UDP that got past the early drop (TUNSEC_EARLY_DROP=0):
        // nothing may answer it.
        format!(
            "udp dport {} @th,64,32 != 0 drop comment \"ESP in UDP goes to tunsec\"",
            crate::udp_encap::NAT_T_PORT
        ),
        format!("udp dport {{ {IKE_PORTS} }} accept comment \"IKE goes to the keying daemon\""),
    ];
    let mut r: Vec<(String, Option<Place>)> = base.into_iter().map(|b| (b, None)).collect();
    // The rules in evaluation order: the inbound policies that are not map
    // elements, and each map at its first policy. Found without sorting
    // the whole SPD (at 10,000 peers the maps' policies are most of it
    // and the sort took milliseconds): only those are sorted.
    let mut firsts: HashMap<MapKey, &Arc<Policy>> = HashMap::new();
    let mut order: Vec<&Arc<Policy>> = Vec::new();
    for p in state.spd.iter_unordered().filter(|p| p.dir == Dir::In) {
        if in_map(p) && maps.contains(&map_key(p)) {
            let first = firsts.entry(map_key(p)).or_insert(p);
            if rank(p) < rank(first) {
                *first = p;
            }
        } else {
            order.push(p);
        }
    }
    order.extend(firsts.into_values());
    let place = |p: &Policy| {
        if in_map(p) && maps.contains(&map_key(p)) {
            map_place(map_key(p))
        } else {
            policy_place(p)
        }
    };
    order.sort_by_key(|p| place(p));
    for p in order {
        if in_map(p) && maps.contains(&map_key(p)) {
            let k = map_key(p);
            let f = if k.0 { "ip6" } else { "ip" };
            for (drop, verdict) in [(true, "drop"), (false, "accept")] {
                let rule = format!(
                    "{f} saddr . {f} daddr @{} {verdict} comment \"{}\"",
                    set_name(k, drop),
                    map_comment(k, drop)
                );
                r.push((rule, Some(map_place(k))));
            }
            continue;
        }
        let verdict = if refuses(p) { "counter drop" } else { "accept" };
        let rule = format!(
            "{} {verdict} comment \"{}\"",
            nft_match(p),
            policy_comment(p)
        );
        r.push((rule, Some(policy_place(p))));
    }
    r
}

/// Where a rule of the input chain sits: evaluation order (priority,
/// specificity, age), the family before the age. Rules of the two
/// families never match the same packet, so where they tie on priority
/// and specificity either order is the SPD's; putting IPv4 first makes
/// the place of a map's rule independent of its policies' ages.
pub type Place = (u32, Reverse<u32>, bool, u64);

fn policy_place(p: &Policy) -> Place {
    let (prio, spec, id) = rank(p);
    (prio, spec, p.selector.dst.addr.is_ipv6(), id)
}

/// Where the rule of map `k` sits: at its priority, its policies'
/// specificity and family, which no other rule shares (such a rule would
/// keep the policies out of a map), so the age is left out.
fn map_place((v6, prio): MapKey) -> Place {
    (prio, Reverse(full_specificity(v6)), v6, 0)
}

/// The specificity of a host-to-host policy for any protocol and port.
fn full_specificity(v6: bool) -> u32 {
    if v6 { 256 } else { 64 }
}

/// The comment of the rule that looks up map `k`'s refused (`drop`) or
/// allowed pairs: what names the rule in the chain (unique, as every
/// rule's comment there).
fn map_comment((v6, prio): MapKey, drop: bool) -> String {
    format!(
        "IPv{} policies from host to host at priority {prio}: {}",
        if v6 { 6 } else { 4 },
        if drop { "refused" } else { "allowed" }
    )
}

/// The comment at the end of a rule's text.
fn rule_comment(rule: &str) -> Option<&str> {
    let (_, c) = rule.rsplit_once(" comment \"")?;
    c.strip_suffix('"')
}

/// What an inbound change does to the table in force, whose verdict maps
/// are `before`, to make it `state`'s, without loading it whole: the
/// input chain's rules again (a few, when the policies are map elements);
/// the maps `state` adds, with their elements; the elements `changes` move
/// in the maps both have; the maps it drops. One `nft -f` transaction,
/// whose cost grows with the rules and the change, not with the elements
/// already in place (at 10,000 peers a whole load took 0.1 s). The table
/// then is [`Known::of`] `state`.
pub fn input_update(
    state: &State,
    inst: &Instance,
    before: &HashSet<MapKey>,
    changes: &[PolicyChange],
) -> String {
    let t = inst.nft_table();
    let after = maps(state);
    let mut r = format!("flush chain inet {t} input\n");
    for k in sorted(&after) {
        if !before.contains(&k) {
            r.push_str(&map_decl(state, k, &format!("add set inet {t}")));
        }
    }
    let kept =
        |p: &Policy| in_map(p) && before.contains(&map_key(p)) && after.contains(&map_key(p));
    // Deletions first: an update is its old element out, its new one in.
    let olds = changes
        .iter()
        .filter_map(|(o, _)| Some((o.as_deref()?, "delete")));
    let news = changes
        .iter()
        .filter_map(|(_, n)| Some((n.as_deref()?, "add")));
    for (p, verb) in olds.chain(news).filter(|(p, _)| kept(p)) {
        let e = element_text(p);
        writeln!(
            r,
            "{verb} element inet {t} {} {{ {e} }}",
            set_name(map_key(p), refuses(p))
        )
        .unwrap();
    }
    for (rule, _) in input_rules(state, inst, &after) {
        writeln!(r, "add rule inet {t} input {rule}").unwrap();
    }
    for k in sorted(before) {
        if !after.contains(&k) {
            for drop in [true, false] {
                writeln!(r, "delete set inet {t} {}", set_name(k, drop)).unwrap();
            }
        }
    }
    r
}

/// The early drop one step earlier, for tunsec's tap receive mode
/// ([`super::net::Rx::Tap`]): an ingress chain on each link in `devices`
/// drops ESP, AH, IPComp and ESP in UDP to this host before the IP layer
/// sees them (no `ip_rcv`, no prerouting hook, no route lookup but the
/// `fib` match). The tap took its copy before ingress
/// (`__netif_receive_skb_core` runs the taps, then ingress, then the
/// protocol handlers). Forwarded IPsec goes on, as at prerouting, which
/// still catches what arrives on links that came later.
pub fn ingress_ruleset(inst: &Instance, devices: &[String]) -> String {
    let t = inst.nft_table();
    let devs = devices
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "table netdev {t}\ndelete table netdev {t}\ntable netdev {t} {{\n  chain ingress {{\n    \
         type filter hook ingress devices = {{ {devs} }} priority -500; policy accept;\n    \
         meta l4proto {{ 50, 51, 108 }} fib daddr type local counter drop comment \"tunsec has ESP, AH, IPComp\"\n    \
         udp dport {} @th,64,32 != 0 fib daddr type local counter drop comment \"tunsec has ESP in UDP\"\n  }}\n}}\n",
        crate::udp_encap::NAT_T_PORT
    )
}

/// Whether received IPsec is dropped at prerouting (TUNSEC_EARLY_DROP=0
/// keeps the old input-hook handling: for comparison).
pub fn early_drop() -> bool {
    std::env::var("TUNSEC_EARLY_DROP").map_or(true, |v| v != "0")
}

/// UDP ports of IKE (RFC 7296) and of IKE with NAT traversal (RFC 3948).
pub const IKE_PORTS: &str = "500, 4500";

/// What deleted elements and rules had refused: the counters of elements
/// of the sets of refused pairs and of rules that drop. `deleted` as
/// [`super::nfnl::Nfnl::apply`] returns it.
pub fn refused_in(deleted: &[Deleted]) -> u64 {
    deleted
        .iter()
        .map(|d| match d {
            Deleted::Element { set, packets } if set.ends_with("_drop") => *packets,
            Deleted::Element { .. } => 0,
            Deleted::Rule { dropped, .. } => *dropped,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_chain_hooks_every_link_and_drops_only_local_ipsec() {
        let inst = Instance::new("tsec0");
        let r = ingress_ruleset(&inst, &["eth0".into(), "veth1".into()]);
        assert!(
            r.starts_with("table netdev tunsec_tsec0\ndelete table netdev tunsec_tsec0\n"),
            "{r}"
        );
        assert!(
            r.contains("hook ingress devices = { \"eth0\", \"veth1\" } priority -500;"),
            "{r}"
        );
        assert!(
            r.contains("meta l4proto { 50, 51, 108 } fib daddr type local counter drop"),
            "{r}"
        );
        assert!(
            r.contains("udp dport 4500 @th,64,32 != 0 fib daddr type local counter drop"),
            "{r}"
        );
    }
    use std::time::Duration;

    fn state(text: &str) -> State {
        State::default()
            .apply_text(text, "t", Duration::ZERO)
            .unwrap()
            .0
    }

    #[test]
    fn host_to_host_policies_share_a_map_unless_another_policy_sits_among_them() {
        let s = state(
            "spdadd 10.0.0.1 10.0.0.9 any -P in ipsec esp/transport//require;
             spdadd 10.0.0.2 10.0.0.9 any -P in none;
             spdadd fd00::1 fd00::9 any -P in priority 5 discard;
             spdadd 10.0.0.3 10.0.0.9 tcp -P in discard;",
        );
        let m = maps(&s);
        assert_eq!(m, HashSet::from([(false, 0x8000_0000), (true, 5)]));
        // A policy of the same priority and specificity, not host to host:
        // the map would change the order, so those stay rules.
        let s = state(
            "spdadd 10.0.0.1 10.0.0.9 any -P in ipsec esp/transport//require;
             spdadd 10.0.0.0/30 10.0.0.9[80] tcp -P in none;",
        );
        assert!(maps(&s).is_empty());
        let r = ruleset(&s, &Instance::new("t0"));
        assert!(
            r.contains("ip saddr 10.0.0.1 ip daddr 10.0.0.9 counter drop"),
            "{r}"
        );
    }
    #[test]
    fn an_inbound_change_rewrites_the_chain_and_moves_only_what_changed() {
        let inst = Instance::new("t0");
        let before = state(
            "spdadd 10.0.0.1 10.0.0.9 any -P in ipsec esp/transport//require;
             spdadd 10.0.0.2 10.0.0.9 any -P in priority 7 none;",
        );
        // A new priority (a map), a policy of the kept map changed, the
        // map of priority 7 emptied, and a rule.
        let after = before
            .apply_text(
                "spdadd 10.0.0.5 10.0.0.9 any -P in priority 5 discard;
                 spdupdate 10.0.0.1 10.0.0.9 any -P in none;
                 spddelete 10.0.0.2 10.0.0.9 any -P in;
                 spdadd 10.0.0.3 10.0.0.9 tcp -P in discard;",
                "t",
                Duration::ZERO,
            )
            .unwrap()
            .0;
        let changes: Vec<_> = after
            .spd
            .changes_since(&before.spd)
            .into_iter()
            .map(|(o, n)| (o.cloned(), n.cloned()))
            .collect();
        let r = input_update(&after, &inst, &maps(&before), &changes);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "flush chain inet tunsec_t0 input", "{r}");
        assert!(r.contains("add set inet tunsec_t0 in4_5_drop {"), "{r}");
        assert!(r.contains("add set inet tunsec_t0 in4_5_pass {"), "{r}");
        assert!(r.contains("elements = { 10.0.0.5 . 10.0.0.9 }"), "{r}");
        // Its verdict changed: out of the refused pairs, into the allowed.
        let del = "delete element inet tunsec_t0 in4_2147483648_drop { 10.0.0.1 . 10.0.0.9 }";
        let add = "add element inet tunsec_t0 in4_2147483648_pass { 10.0.0.1 . 10.0.0.9 }";
        let at = |l: &str| lines.iter().position(|x| *x == l);
        assert!(at(del).unwrap() < at(add).unwrap(), "{r}");
        // The rules: the base ones, then the policies in evaluation order
        // (priority 5's map first), as the whole table has them.
        let rules: Vec<_> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("add rule inet tunsec_t0 input "))
            .collect();
        let whole = ruleset(&after, &inst);
        let mut in_chain = whole
            .split("chain input {")
            .nth(1)
            .unwrap()
            .lines()
            .skip(2)
            .map(str::trim)
            .take_while(|l| *l != "}");
        assert!(
            rules.iter().all(|r| in_chain.next() == Some(*r)),
            "{r}\n{whole}"
        );
        assert!(rules[4].contains("@in4_5_drop drop"), "{r}");
        assert!(rules[5].contains("@in4_5_pass accept"), "{r}");
        assert!(
            rules
                .iter()
                .any(|r| r.contains("10.0.0.3") && r.contains("counter drop")),
            "{r}"
        );
        // The emptied map's sets go, after the rules that named them.
        assert_eq!(
            &lines[lines.len() - 2..],
            &[
                "delete set inet tunsec_t0 in4_7_drop",
                "delete set inet tunsec_t0 in4_7_pass"
            ],
            "{r}"
        );
        // Nothing about the elements that did not change.
        assert!(!r.contains("10.0.0.2 . 10.0.0.9"), "{r}");
    }
    /// From setkey text to the bytes `nft --debug=mnl add rule inet t
    /// input TEXT ... comment "C"` sends (nftables 1.0.6), for each shape
    /// tunsec writes: addresses whole, as a prefix of whole bytes or
    /// masked (shorter than a byte too), either family; ports alone and
    /// together; ICMP type and code together, the code alone (as XFRM can
    /// give it), ICMPv6; protocol 58 over IPv4; a counter when it drops.
    /// TEXT is also what [`nft_match`] writes for the policy, so the
    /// table loaded from text and the rules built over netlink agree.
    #[test]
    fn a_policy_rule_is_the_bytes_nft_sends_for_its_text() {
        let cases = [
            (
                "spdadd 10.0.0.1[22] 10.0.0.0/24[80] tcp -P in discard;",
                "meta nfproto ipv4 ip saddr 10.0.0.1 ip daddr 10.0.0.0/24 meta l4proto 6 th sport 22 th dport 80",
                "policy 7",
                "06000100740000000a000200696e7075740000000802048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a000001340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000032c00018008000100636d700020000280080001000000000108000200000000000c000380070001000a00000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c0003800800010000160050140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000f0007000009706f6c69637920370000",
            ),
            (
                "spdadd 10.1.0.0/20 0.0.0.0/0 icmp 8,0 -P in none;",
                "meta nfproto ipv4 ip saddr 10.1.0.0/20 meta l4proto 1 icmp type 8 icmp code 0",
                "policy 8",
                "06000100740000000a000200696e707574000000d801048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100fffff0000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a01000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010001000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000022c00018008000100636d700020000280080001000000000108000200000000000c0003800600010008000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000010f0007000009706f6c69637920380000",
            ),
            (
                "spdadd fd00::/61 fd00::2[500] udp -P in ipsec esp/transport//require;",
                "meta nfproto ipv6 ip6 saddr fd00::/61 ip6 daddr fd00::2 meta l4proto 17 th dport 500",
                "policy 10",
                "06000100740000000a000200696e7075740000007c02048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000105c0001800c00010062697477697365004c0002800800010000000001080002000000000108000300000000101800048014000100fffffffffffffff800000000000000001800058014000100000000000000000000000000000000003800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd000000000000000000000000000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd00000000000000000000000000000224000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c0003800600010001f40000140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c000280080001000000000010000700000a706f6c69637920313000",
            ),
            (
                "spdadd 10.0.0.1 10.0.0.2 icmp 0,3 -P in none;",
                "meta nfproto ipv4 ip saddr 10.0.0.1 ip daddr 10.0.0.2 meta l4proto 1 icmp code 3",
                "a",
                "06000100740000000a000200696e707574000000f401048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a000001340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a00000224000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010001000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000108000400000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010003000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000010800070000026100",
            ),
            (
                "spdadd 16.0.0.0/4[22] 0.0.0.0/0 tcp -P in discard;",
                "meta nfproto ipv4 ip saddr 16.0.0.0/4 meta l4proto 6 th sport 22",
                "b",
                "06000100740000000a000200696e707574000000ec01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000040c00048008000100f00000000c00058008000100000000002c00018008000100636d700020000280080001000000000108000200000000000c000380080001001000000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000022c00018008000100636d700020000280080001000000000108000200000000000c0003800600010000160000140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000800070000026200",
            ),
            (
                "spdadd 0.0.0.0/0 10.0.0.2 58 -P in none;",
                "meta nfproto ipv4 ip daddr 10.0.0.2 meta l4proto 58",
                "c",
                "06000100740000000a000200696e7075740000003401048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a00000224000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001003a000000300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000010800070000026300",
            ),
            (
                "spdadd fd00::/127 fd00::1 icmp6 128 -P in discard;",
                "meta nfproto ipv6 ip6 saddr fd00::/127 ip6 daddr fd00::1 meta l4proto 58 icmpv6 type 128",
                "d",
                "06000100740000000a000200696e7075740000007c02048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000105c0001800c00010062697477697365004c0002800800010000000001080002000000000108000300000000101800048014000100fffffffffffffffffffffffffffffffe1800058014000100000000000000000000000000000000003800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd000000000000000000000000000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd00000000000000000000000000000124000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001003a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010080000000140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000800070000026400",
            ),
        ];
        for (line, text, comment, nft) in cases {
            let st = state(line);
            let mut p = (**st.spd.iter_unordered().next().unwrap()).clone();
            if text.ends_with("icmp code 3") {
                // The code alone.
                p.selector.sport = None;
            }
            assert_eq!(nft_match(&p), text);
            let Some(Msg::NewRule {
                chain,
                matches,
                counter,
                verdict,
                before,
                ..
            }) = policy_rule(&p, None)
            else {
                panic!("{p:?}");
            };
            assert_eq!(counter, verdict == Verdict::Drop, "{text}");
            let m = Msg::NewRule {
                chain,
                matches,
                counter,
                verdict,
                comment: comment.into(),
                before,
            };
            let b = crate::daemon::nfnl::batch("t", &[m], 1);
            // The message after the batch's begin marker, past its headers.
            let len = u32::from_ne_bytes(b[20..24].try_into().unwrap()) as usize;
            assert_eq!(
                &b[40..20 + len],
                &crate::daemon::nfnl::hex(nft)[..],
                "{text}"
            );
        }
        // An ICMP type nft would refuse (over 255, as XFRM could carry):
        // no rule.
        let st = state("spdadd 10.0.0.1 10.0.0.2 icmp 3 -P in none;");
        let mut p = (**st.spd.iter_unordered().next().unwrap()).clone();
        p.selector.sport = Some(300);
        assert!(policy_rule(&p, None).is_none());
        // Its comment names its policy.
        p.selector.sport = Some(3);
        let Some(Msg::NewRule { comment, .. }) = policy_rule(&p, None) else {
            panic!("{p:?}");
        };
        assert_eq!(comment, format!("policy {}", p.id));
    }
}
