//! What the daemon changes in the host's networking, as a plan of steps
//! with their undo: routes that send the protected peers' traffic into the
//! TUN device, a policy-routing rule that lets tunsec's own (marked)
//! packets bypass those routes, and an nftables table that refuses
//! plaintext the inbound SPD says must be protected. Routes and rules are
//! made over rtnetlink from within tunsec (`rtnl`); the nftables table is
//! loaded by `nft`. `--dry-run` prints the plan (as `ip` and `nft`
//! commands); a run applies it and undoes it in reverse at exit. Undo
//! steps are also run (errors ignored) before applying, so a crashed
//! instance leaves nothing that blocks the next start.
//!
//! Fail closed: under each peer's route into the TUN device lies a
//! blackhole route to the same peer (a higher metric). While tunsec runs
//! the TUN route wins; if tunsec is killed, the TUN device and its routes
//! go with it, and the peer's traffic meets the blackhole instead of
//! leaving in the clear by the main table. A clean stop removes both.

use super::nfnl::{Msg, Nfnl};
use super::nftables::{self, Known, Route};
use super::rtnl::{Change, Rtnl};
use crate::spd::{Action, Dir, Policy, Prefix, Rank, rank};
use crate::state::State;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// One change and how to take it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    /// A route or rule, made and removed over rtnetlink.
    Net(Change),
    /// A command and its undo (the nftables table, loaded from `stdin`).
    Cmd {
        apply: Vec<String>,
        undo: Vec<String>,
        stdin: Option<String>,
    },
}

/// The metric of the blackhole routes under the TUN routes (the TUN
/// routes have the kernel's default, 0 for IPv4 and 1024 for IPv6).
pub const BLACKHOLE_METRIC: u32 = 0x7453;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

/// Names and numbers owned by one instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub tun: String,
    /// Firewall mark on tunsec's sending sockets.
    pub mark: u32,
    /// Routing table holding the routes into the TUN device.
    pub table: u32,
    /// Priority of the policy-routing rule.
    pub rule_priority: u32,
}

impl Instance {
    /// Numbers derived from a 16-bit hash of the TUN device's name, which
    /// is unique within the network namespace (and known before the device
    /// exists, for --dry-run).
    pub fn new(tun: &str) -> Instance {
        let h = Self::hash(tun);
        Instance {
            tun: tun.to_string(),
            mark: 0x7453_0000 | h,
            table: 0x7453_0000 | h,
            rule_priority: 1000 + h % 1000,
        }
    }

    /// FNV-1a folded to 16 bits.
    pub fn hash(s: &str) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for b in s.bytes() {
            h ^= b as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        (h ^ (h >> 16)) & 0xffff
    }

    pub fn nft_table(&self) -> String {
        format!(
            "tunsec_{}",
            self.tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        )
    }
}

fn argv(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// Destinations (and the local source to use) of outbound policies that
/// tunsec must see: `ipsec` ones and bypasses, except catch-all prefixes.
pub fn routed_peers(state: &State) -> Vec<(Prefix, Option<IpAddr>)> {
    // Sets, not scans: with 10,000 peers a scan per policy was 50 ms.
    let protected: std::collections::HashSet<Prefix> = state
        .spd
        .iter()
        .filter(|q| q.dir == Dir::Out && matches!(q.action, Action::Ipsec(_)))
        .map(|q| q.selector.dst)
        .collect();
    let mut seen = std::collections::HashSet::new();
    let mut v: Vec<(Prefix, Option<IpAddr>)> = Vec::new();
    for p in state.spd.iter().filter(|p| p.dir == Dir::Out) {
        let s = &p.selector;
        if s.dst.len == 0 || matches!(p.action, Action::Discard) {
            continue;
        }
        if matches!(p.action, Action::Bypass) && !protected.contains(&s.dst) {
            continue;
        }
        let src = s.src.is_host().then_some(s.src.addr);
        if seen.insert(s.dst) {
            v.push((s.dst, src));
        }
    }
    v
}

/// The plan for `state` on this instance.
pub fn plan(state: &State, inst: &Instance) -> Plan {
    let mut steps = Vec::new();
    let peers = routed_peers(state);
    for v6 in [false, true] {
        if !peers.iter().any(|(d, _)| d.addr.is_ipv6() == v6) {
            continue;
        }
        steps.push(Step::Net(Change::Rule {
            v6,
            mark: inst.mark,
            table: inst.table,
            priority: inst.rule_priority,
        }));
    }
    for (dst, src) in &peers {
        steps.push(Step::Net(Change::Route {
            dst: *dst,
            dev: None,
            table: inst.table,
            src: None,
            metric: Some(BLACKHOLE_METRIC),
        }));
        steps.push(Step::Net(Change::Route {
            dst: *dst,
            dev: Some(inst.tun.clone()),
            table: inst.table,
            src: *src,
            metric: None,
        }));
    }
    let ruleset = nftables::ruleset(state, inst);
    steps.push(Step::Cmd {
        apply: argv("nft -f -"),
        undo: argv(&format!("nft delete table inet {}", inst.nft_table())),
        stdin: Some(ruleset),
    });
    Plan { steps }
}

impl Plan {
    /// Shell-like lines for `--dry-run` and the log.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for step in &self.steps {
            match step {
                Step::Net(c) => writeln!(s, "{}", c.describe(true)).unwrap(),
                Step::Cmd { apply, stdin, .. } => {
                    writeln!(s, "{}", apply.join(" ")).unwrap();
                    for line in stdin.iter().flat_map(|i| i.lines()) {
                        writeln!(s, "    {line}").unwrap();
                    }
                }
            }
        }
        s
    }

    /// Apply every step; on failure undo what was applied and report.
    /// Returns the steps applied (to undo at exit).
    pub fn apply(&self, rtnl: &mut Rtnl) -> Result<Vec<Step>> {
        for step in self.steps.iter().rev() {
            let _ = exec(rtnl, step, false);
        }
        let mut done = Vec::new();
        for step in &self.steps {
            if let Err(e) = exec(rtnl, step, true) {
                undo(rtnl, &done);
                return Err(e);
            }
            done.push(step.clone());
        }
        Ok(done)
    }
}

/// Make (`add`) or take back one step.
fn exec(rtnl: &mut Rtnl, step: &Step, add: bool) -> Result<()> {
    match step {
        Step::Net(c) => rtnl.apply(c, add),
        Step::Cmd { apply, undo, stdin } => {
            if add {
                run(apply, stdin.as_deref())
            } else {
                run(undo, None)
            }
        }
    }
}

/// An outbound policy, as it decides its destination's route.
#[derive(Debug, Clone, Copy)]
struct Out {
    ipsec: bool,
    discard: bool,
    src: Option<IpAddr>,
}

/// Outbound policies by destination prefix, in evaluation order.
type OutIndex = HashMap<Prefix, BTreeMap<Rank, Out>>;

fn out_entry(p: &Policy) -> Option<(Prefix, Rank, Out)> {
    let s = &p.selector;
    (p.dir == Dir::Out && s.dst.len > 0).then(|| {
        (
            s.dst,
            rank(p),
            Out {
                ipsec: matches!(p.action, Action::Ipsec(_)),
                discard: matches!(p.action, Action::Discard),
                src: s.src.is_host().then_some(s.src.addr),
            },
        )
    })
}

fn out_index(state: &State) -> OutIndex {
    let mut idx = OutIndex::new();
    for p in state.spd.iter() {
        if let Some((dst, r, o)) = out_entry(p) {
            idx.entry(dst).or_default().insert(r, o);
        }
    }
    idx
}

/// Inbound policies that changed: (before, after).
type InChanges = Vec<nftables::PolicyChange>;

/// Move `idx` from `cur`'s policies to `next`'s, looking only at the
/// policies that changed. Returns the destinations whose policies
/// changed, and the inbound policies that did.
fn update_index(idx: &mut OutIndex, cur: &State, next: &State) -> (HashSet<Prefix>, InChanges) {
    let mut touched = HashSet::new();
    let mut inbound = Vec::new();
    for (old, new) in next.spd.changes_since(&cur.spd) {
        if old.is_some_and(|p| p.dir == Dir::In) || new.is_some_and(|p| p.dir == Dir::In) {
            inbound.push((old.cloned(), new.cloned()));
        }
        if let Some((dst, r, _)) = old.and_then(|p| out_entry(p)) {
            if let Some(m) = idx.get_mut(&dst) {
                m.remove(&r);
                if m.is_empty() {
                    idx.remove(&dst);
                }
            }
            touched.insert(dst);
        }
        if let Some((dst, r, o)) = new.and_then(|p| out_entry(p)) {
            idx.entry(dst).or_default().insert(r, o);
            touched.insert(dst);
        }
    }
    (touched, inbound)
}

/// The route a destination needs (with its source), as [`routed_peers`]
/// decides it: one if an `ipsec` policy goes there, its source from the
/// first policy in order that is not `discard`.
fn wanted_route(policies: Option<&BTreeMap<Rank, Out>>) -> Option<Option<IpAddr>> {
    let policies = policies?;
    if !policies.values().any(|o| o.ipsec) {
        return None;
    }
    policies.values().find(|o| !o.discard).map(|o| o.src)
}

/// The plumbing in force, kept so that a policy change applies only its
/// own difference (routes over rtnetlink, the nftables table only when
/// inbound policies changed) and exit undoes exactly what is there.
pub struct Plumbing {
    pub inst: Instance,
    rtnl: Rtnl,
    /// Set by `stop`: the daemon is going down, no more changes.
    closed: bool,
    out: OutIndex,
    /// Routed destinations and their source: a blackhole route and a
    /// route into the TUN device each.
    routes: HashMap<Prefix, Option<IpAddr>>,
    /// How many of `routes` are IPv4 and IPv6 (a family's rule goes with
    /// its last route, known without a scan).
    per_family: [usize; 2],
    /// The policy-routing rule, per family (IPv4, IPv6).
    rules: [bool; 2],
    nft: Option<Step>,
    /// The ingress chain of the tap receive mode, when loaded.
    ingress: Option<Step>,
    /// The table in force as tunsec left it, and the socket that changes
    /// its maps and their rules.
    known: Known,
    /// Plaintext the table refused with counters it no longer has (an
    /// element deleted, a rule flushed): `tunsec stats` adds it to what
    /// the table counts, so the figure never goes back.
    refused_gone: u64,
    /// The last figure [`Plumbing::refused`] gave.
    refused_shown: u64,
    nfnl: Nfnl,
}

impl Plumbing {
    /// Apply the plan for `state`.
    pub fn start(state: &State, inst: Instance) -> Result<Plumbing> {
        let mut rtnl = Rtnl::open().context("cannot open a NETLINK_ROUTE socket")?;
        let applied = plan(state, &inst).apply(&mut rtnl)?;
        let known = Known::of(state, &inst);
        let mut p = Plumbing {
            inst,
            rtnl,
            closed: false,
            out: out_index(state),
            routes: HashMap::new(),
            per_family: [0; 2],
            rules: [false; 2],
            nft: None,
            ingress: None,
            known,
            refused_gone: 0,
            refused_shown: 0,
            nfnl: Nfnl::open().context("cannot open a NETLINK_NETFILTER socket")?,
        };
        for (dst, src) in routed_peers(state) {
            p.set_route(dst, Some(src));
        }
        for step in applied {
            match step {
                Step::Net(Change::Rule { v6, .. }) => p.rules[v6 as usize] = true,
                Step::Cmd { .. } => p.nft = Some(step),
                Step::Net(_) => {}
            }
        }
        Ok(p)
    }

    /// Record `dst`'s route (`Some(src)`) or its absence (`None`), keeping
    /// the per-family counts; returns what was recorded before.
    fn set_route(&mut self, dst: Prefix, src: Option<Option<IpAddr>>) -> Option<Option<IpAddr>> {
        let old = match src {
            Some(src) => self.routes.insert(dst, src),
            None => self.routes.remove(&dst),
        };
        let fam = &mut self.per_family[dst.addr.is_ipv6() as usize];
        match (old.is_some(), src.is_some()) {
            (false, true) => *fam += 1,
            (true, false) => *fam -= 1,
            _ => {}
        }
        old
    }

    fn rule(&self, v6: bool) -> Step {
        Step::Net(Change::Rule {
            v6,
            mark: self.inst.mark,
            table: self.inst.table,
            priority: self.inst.rule_priority,
        })
    }

    /// A destination's two routes: the blackhole under it (fail closed),
    /// then the one into the TUN device.
    fn route_steps(&self, dst: Prefix, src: Option<IpAddr>) -> [Step; 2] {
        [
            Step::Net(Change::Route {
                dst,
                dev: None,
                table: self.inst.table,
                src: None,
                metric: Some(BLACKHOLE_METRIC),
            }),
            Step::Net(Change::Route {
                dst,
                dev: Some(self.inst.tun.clone()),
                table: self.inst.table,
                src,
                metric: None,
            }),
        ]
    }

    /// Everything in force, in the order it was put in place.
    pub fn steps(&self) -> Vec<Step> {
        let mut v = Vec::new();
        for v6 in [false, true] {
            if self.rules[v6 as usize] {
                v.push(self.rule(v6));
            }
        }
        for (dst, src) in &self.routes {
            v.extend(self.route_steps(*dst, *src));
        }
        v.extend(self.nft.iter().cloned());
        v.extend(self.ingress.iter().cloned());
        v
    }

    /// Drop received IPsec at ingress on `links` (the tap receive mode),
    /// or, with `None`, make sure no such chain is left by an instance
    /// that died (it would starve the per-family sockets).
    pub fn set_ingress(&mut self, links: Option<&[String]>) -> Result<()> {
        let t = self.inst.nft_table();
        let step = Step::Cmd {
            apply: argv("nft -f -"),
            undo: argv(&format!("nft delete table netdev {t}")),
            stdin: links.map(|l| nftables::ingress_ruleset(&self.inst, l)),
        };
        if links.is_none() {
            let _ = exec(&mut self.rtnl, &step, false);
            return Ok(());
        }
        exec(&mut self.rtnl, &step, true)?;
        self.ingress = Some(step);
        Ok(())
    }

    /// Move from `cur`'s plumbing to `next`'s, applying only what the
    /// policies that changed between them change. On failure, what this
    /// call applied is undone and the old plumbing stays in force.
    pub fn update(&mut self, cur: &State, next: &State) -> Result<()> {
        if self.closed {
            bail!("tunsec is shutting down");
        }
        let (touched, inbound) = update_index(&mut self.out, cur, next);
        // Not a copy of `routes` (10,000 entries: it was most of a policy
        // change's time), but what this call changed in it.
        let (rules, known) = (self.rules, self.known.clone());
        // What this call did, with the step that takes each back, and the
        // routes it recorded with what they were before.
        let mut done: Vec<(Step, bool)> = Vec::new();
        let mut was = Vec::new();
        let r = self.apply_changes(&touched, inbound, next, &mut done, &mut was);
        if let Err(e) = r {
            for (step, add) in done.iter().rev() {
                let _ = exec(&mut self.rtnl, step, *add);
            }
            for (dst, old) in was.into_iter().rev() {
                self.set_route(dst, old);
            }
            self.rules = rules;
            self.known = known;
            self.out = out_index(cur);
            return Err(e);
        }
        Ok(())
    }

    fn apply_changes(
        &mut self,
        touched: &HashSet<Prefix>,
        inbound: InChanges,
        next: &State,
        done: &mut Vec<(Step, bool)>,
        was: &mut Vec<(Prefix, Option<Option<IpAddr>>)>,
    ) -> Result<()> {
        for dst in touched {
            let want = wanted_route(self.out.get(dst));
            let have = self.routes.get(dst).copied();
            if want == have {
                continue;
            }
            let v6 = dst.addr.is_ipv6();
            match (have, want) {
                (None, Some(src)) => {
                    if !self.rules[v6 as usize] {
                        let rule = self.rule(v6);
                        exec(&mut self.rtnl, &rule, true)?;
                        done.push((rule, false));
                        self.rules[v6 as usize] = true;
                    }
                    // Both routes in one send, the blackhole first. Should
                    // it be refused, the TUN route the kernel still makes
                    // is taken back with the rest; the policy was never
                    // in force. (Removals stay one at a time: the
                    // blackhole never goes before the TUN route.)
                    let steps = self.route_steps(*dst, src);
                    let changes = steps.each_ref().map(|s| match s {
                        Step::Net(c) => c,
                        Step::Cmd { .. } => unreachable!("routes are rtnetlink steps"),
                    });
                    let mut failed = None;
                    for (step, r) in steps.iter().zip(self.rtnl.apply_all(&changes, true)) {
                        match r {
                            Ok(()) => done.push((step.clone(), false)),
                            Err(e) => {
                                failed.get_or_insert(e);
                            }
                        }
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    was.push((*dst, self.set_route(*dst, Some(src))));
                }
                (Some(old), Some(src)) => {
                    // Another source: the TUN route is replaced in place.
                    let [_, new] = self.route_steps(*dst, src);
                    exec(&mut self.rtnl, &new, true)?;
                    let [_, back] = self.route_steps(*dst, old);
                    done.push((back, true));
                    was.push((*dst, self.set_route(*dst, Some(src))));
                }
                (Some(old), None) => {
                    for step in self.route_steps(*dst, old).into_iter().rev() {
                        exec(&mut self.rtnl, &step, false)?;
                        done.push((step, true));
                    }
                    was.push((*dst, self.set_route(*dst, None)));
                }
                (None, None) => {}
            }
        }
        for v6 in [false, true] {
            if self.rules[v6 as usize] && self.per_family[v6 as usize] == 0 {
                let rule = self.rule(v6);
                exec(&mut self.rtnl, &rule, false)?;
                done.push((rule, true));
                self.rules[v6 as usize] = false;
            }
        }
        if inbound.is_empty() {
            return Ok(());
        }
        // Host-to-host policies as elements of the maps in force; rules,
        // and maps that come and go with their rules, placed by the
        // handles of a dump of the input chain: one netlink transaction.
        // Should that fail (the table was changed from outside), the input
        // chain is rewritten.
        let table = self.inst.nft_table();
        // What the kernel echoes as deleted is counted even when the
        // answer then fails: echoes come only from a batch it committed.
        let mut gone = Vec::new();
        let done = match self.known.route(&inbound) {
            Route::Elements { ops, next } => {
                let msgs: Vec<_> = ops.into_iter().map(Msg::Element).collect();
                // On failure the kernel may have applied the batch or not
                // (an answer lost): the text below makes the table right
                // either way, or loads it whole.
                Some(self.nfnl.apply(&table, &msgs, &mut gone).map(|()| next))
            }
            Route::Chain(cc) if self.nft.is_some() => Some(
                self.nfnl
                    .rules(&table, "input")
                    .and_then(|chain| {
                        let msgs = cc.plan(&chain).map_err(|e| anyhow!("nftables: {e}"))?;
                        self.nfnl.apply(&table, &msgs, &mut gone)
                    })
                    .map(|()| cc.next),
            ),
            _ => None,
        };
        self.refused_gone += nftables::refused_in(&gone);
        match done {
            Some(Ok(next)) => {
                self.known = next;
                return Ok(());
            }
            Some(Err(e)) => tracing::warn!("{e:#}: rewriting the input chain"),
            None => {}
        }
        // The table is in force: its input chain again, and the maps that
        // come, go or change, in one transaction (nothing else in the
        // table depends on the SPD). Its undo stays the table's removal.
        // Should that fail (the table was changed from outside), it is
        // loaded whole, as at start.
        // The rewrite flushes the rules and deletes elements and sets, and
        // a whole load all of it, with their counters: what the table
        // counted before and still counts after says what went, which is
        // kept.
        let before = self.counted();
        if self.nft.is_some() {
            let text = nftables::input_update(next, &self.inst, &self.known.maps(), &inbound);
            match run(&argv("nft -f -"), Some(&text)) {
                Ok(()) => {
                    self.known = Known::of(next, &self.inst);
                    self.refused_gone += before.saturating_sub(self.counted());
                    return Ok(());
                }
                Err(e) => tracing::warn!("nftables: {e:#}: loading the table whole"),
            }
        }
        let step = Step::Cmd {
            apply: argv("nft -f -"),
            undo: argv(&format!("nft delete table inet {}", self.inst.nft_table())),
            stdin: Some(nftables::ruleset(next, &self.inst)),
        };
        exec(&mut self.rtnl, &step, true)?;
        self.known = Known::of(next, &self.inst);
        self.nft = Some(step);
        self.refused_gone += before;
        Ok(())
    }

    /// Plaintext the table refused since start: what its counters count
    /// now and what counters it no longer has had counted. It never goes
    /// back: should a part of the table not list (changed from outside),
    /// the last figure stands.
    pub fn refused(&mut self) -> u64 {
        let n = self.refused_gone + self.counted();
        self.refused_shown = self.refused_shown.max(n);
        self.refused_shown
    }

    /// What the table's counters count now: the input chain's rules that
    /// drop and the elements of the sets of refused pairs, read over
    /// netlink. A part the kernel cannot list counts nothing.
    fn counted(&mut self) -> u64 {
        let mut n = 0;
        if self.nft.is_none() {
            return n;
        }
        let table = self.inst.nft_table();
        match self.nfnl.rules(&table, "input") {
            Ok(rules) => n += rules.iter().map(|r| r.dropped).sum::<u64>(),
            Err(e) => tracing::debug!("{e:#}"),
        }
        let mut maps: Vec<_> = self.known.maps().into_iter().collect();
        maps.sort();
        for k in maps {
            match self.nfnl.counted(&table, &nftables::set_name(k, true)) {
                Ok(c) => n += c,
                Err(e) => tracing::debug!("{e:#}"),
            }
        }
        n
    }

    /// Leave everything in place and make no more changes: after a fault,
    /// the blackhole routes keep protected traffic from leaving in the
    /// clear (as after `kill -9`) until a new instance takes over.
    pub fn abandon(&mut self) {
        self.routes.clear();
        self.per_family = [0; 2];
        self.rules = [false; 2];
        self.nft = None;
        self.ingress = None;
        self.closed = true;
    }

    /// Undo everything, in reverse order (once).
    pub fn stop(&mut self) {
        let applied = self.steps();
        self.routes.clear();
        self.per_family = [0; 2];
        self.rules = [false; 2];
        self.nft = None;
        self.ingress = None;
        undo(&mut self.rtnl, &applied);
        self.closed = true;
    }
}

/// Undo applied steps in reverse order; errors are logged, not fatal.
pub fn undo(rtnl: &mut Rtnl, done: &[Step]) {
    for step in done.iter().rev() {
        if let Err(e) = exec(rtnl, step, false) {
            tracing::warn!("undo failed: {e:#}");
        }
    }
}

/// Run a command, feeding `stdin`; its stderr becomes the error.
pub fn run(args: &[String], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn seed() -> State {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/netns/seed-linux-windows.conf"
        ))
        .unwrap();
        State::default()
            .apply_text(&text, "seed", Duration::ZERO)
            .unwrap()
            .0
    }

    #[test]
    fn seed_plan_routes_the_peers_and_refuses_their_plaintext() {
        let inst = Instance::new("tunsec0");
        assert_eq!(inst.mark, 0x7453_0000 | Instance::hash("tunsec0"));
        assert_ne!(Instance::hash("tunsec0"), Instance::hash("tunsec1"));
        let p = plan(&seed(), &inst);
        let d = p.describe();
        assert!(
            d.contains(&format!(
                "ip -4 rule add not fwmark {:#x} table {} priority {}",
                inst.mark, inst.table, inst.rule_priority
            )),
            "{d}"
        );
        assert!(
            d.contains(&format!(
                "ip -4 route replace 172.17.207.66/32 dev tunsec0 table {} src 172.17.207.12",
                inst.table
            )),
            "{d}"
        );
        assert!(d.contains(&format!("ip -6 route replace 2001:470:1f09:11ed::42/128 dev tunsec0 table {} src 2001:470:1f09:11ed::c", inst.table)), "{d}");
        // ICMP bypass first (priority 10), then the ipsec policy refuses plaintext
        let icmp = d.find("meta nfproto ipv4 meta l4proto 1 accept").expect(&d);
        // The host-to-host ipsec policies are elements of the sets of
        // refused pairs.
        let drop = d
            .find("ip saddr . ip daddr @in4_2147483648_drop drop")
            .expect(&d);
        assert!(icmp < drop);
        let set = |name: &str| {
            let rest = d.split(&format!("set {name} {{")).nth(1).expect(&d);
            rest.split("\n  }").next().unwrap_or_default().to_string()
        };
        assert!(
            set("in4_2147483648_drop").contains("elements = { 172.17.207.66 . 172.17.207.12 }"),
            "{d}"
        );
        assert!(
            set("in6_2147483648_drop")
                .contains("elements = { 2001:470:1f09:11ed::42 . 2001:470:1f09:11ed::c }"),
            "{d}"
        );
        assert!(
            !d.contains("0.0.0.0/0 dev"),
            "catch-all bypasses are not routed"
        );
        // Fail closed: a blackhole under every TUN route.
        assert!(
            d.contains(&format!(
                "ip -4 route replace blackhole 172.17.207.66/32 table {} metric {BLACKHOLE_METRIC}",
                inst.table
            )),
            "{d}"
        );
        // IKE is never refused nor routed into the TUN device
        let ike = d.find("udp dport { 500, 4500 } accept").expect(&d);
        assert!(ike < icmp, "IKE is accepted before any policy rule");
        assert!(
            d.contains(&format!(
                "udp sport {{ 500, 4500 }} meta mark set {:#x}",
                inst.mark
            )),
            "{d}"
        );
    }

    /// The routes an incrementally kept index asks for are the ones a
    /// plan made from scratch has, after every one of many random changes
    /// (bypasses, discards, sources, priorities, deletions, a flush).
    #[test]
    fn the_incremental_index_agrees_with_the_plan() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut cur = State::default();
        let mut idx = out_index(&cur);
        let mut applied = 0;
        for step in 0..600 {
            let n = next();
            let dst = format!("10.9.{}.{}", n % 3, (n >> 8) % 6);
            let dst = if n % 11 == 0 {
                format!("{dst}/24")
            } else {
                dst
            };
            let src = if (n >> 16) % 3 == 0 {
                "0.0.0.0/0".to_string()
            } else {
                format!("10.8.0.{}", (n >> 20) % 3)
            };
            let dir = if (n >> 24) % 4 == 0 { "in" } else { "out" };
            let action = match (n >> 28) % 4 {
                0 => "none",
                1 => "discard",
                _ => "ipsec esp/transport//require",
            };
            let prio = (n >> 32) % 3;
            let text = match (n >> 36) % 5 {
                0 => format!("spddelete {src} {dst} any -P {dir};"),
                _ if step == 300 => "spdflush;".to_string(),
                _ => format!("spdupdate {src} {dst} any -P {dir} priority {prio} {action};"),
            };
            let Ok((nxt, _, _)) = cur.apply_text(&text, "t", Duration::ZERO) else {
                continue;
            };
            update_index(&mut idx, &cur, &nxt);
            let mut got: Vec<_> = idx
                .iter()
                .filter_map(|(d, m)| wanted_route(Some(m)).map(|s| (*d, s)))
                .collect();
            let mut want = routed_peers(&nxt);
            got.sort_by_key(|(d, s)| (d.to_string(), format!("{s:?}")));
            want.sort_by_key(|(d, s)| (d.to_string(), format!("{s:?}")));
            assert_eq!(got, want, "after {text}");
            assert_eq!(idx.len(), out_index(&nxt).len(), "after {text}");
            cur = nxt;
            applied += 1;
        }
        assert!(applied > 300, "only {applied} changes applied");
    }
}
