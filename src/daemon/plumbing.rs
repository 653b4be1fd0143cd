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

use super::rtnl::{Change, Rtnl};
use crate::spd::{Action, Dir, Policy, Prefix};
use crate::state::State;
use anyhow::{Context, Result, bail};
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
    let mut v: Vec<(Prefix, Option<IpAddr>)> = Vec::new();
    for p in state.spd.iter().filter(|p| p.dir == Dir::Out) {
        let s = &p.selector;
        if s.dst.len == 0 || matches!(p.action, Action::Discard) {
            continue;
        }
        if matches!(p.action, Action::Bypass)
            && !state.spd.iter().any(|q| {
                q.dir == Dir::Out && matches!(q.action, Action::Ipsec(_)) && q.selector.dst == s.dst
            })
        {
            continue;
        }
        let src = s.src.is_host().then_some(s.src.addr);
        if !v.iter().any(|(d, _)| *d == s.dst) {
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
    let ruleset = nft_ruleset(state, inst);
    steps.push(Step::Cmd {
        apply: argv("nft -f -"),
        undo: argv(&format!("nft delete table inet {}", inst.nft_table())),
        stdin: Some(ruleset),
    });
    Plan { steps }
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

/// The nftables table that enforces the inbound SPD on packets that did
/// not come through tunsec: the kernel would otherwise hand plaintext from
/// a peer straight to the application.
pub fn nft_ruleset(state: &State, inst: &Instance) -> String {
    let t = inst.nft_table();
    let mut r = String::new();
    // Declaring, then deleting, then declaring again makes the load
    // atomic and idempotent (a stale table from a crash is replaced).
    writeln!(
        r,
        "table inet {t}\ndelete table inet {t}\ntable inet {t} {{"
    )
    .unwrap();
    writeln!(
        r,
        "  chain input {{\n    type filter hook input priority filter - 10; policy accept;"
    )
    .unwrap();
    writeln!(
        r,
        "    iifname \"{}\" accept comment \"decapsulated by tunsec\"",
        inst.tun
    )
    .unwrap();
    writeln!(
        r,
        "    meta l4proto {{ 50, 51, 108 }} accept comment \"ESP, AH, IPComp go to tunsec\""
    )
    .unwrap();
    writeln!(
        r,
        "    udp dport {{ {IKE_PORTS} }} accept comment \"IKE goes to the keying daemon\""
    )
    .unwrap();
    for p in state.spd.iter().filter(|p| p.dir == Dir::In) {
        let verdict = match &p.action {
            Action::Bypass => "accept",
            Action::Discard => "counter drop",
            Action::Ipsec(rules)
                if rules
                    .iter()
                    .any(|r| r.level.required() && r.proto != crate::sad::Proto::IpComp) =>
            {
                "counter drop"
            }
            Action::Ipsec(_) => "accept",
        };
        writeln!(
            r,
            "    {} {verdict} comment \"policy {}\"",
            nft_match(p),
            p.id
        )
        .unwrap();
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

/// UDP ports of IKE (RFC 7296) and of IKE with NAT traversal (RFC 3948).
pub const IKE_PORTS: &str = "500, 4500";

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

/// The plumbing in force: what was applied, kept so that a policy change
/// applies only the difference and exit undoes exactly what is there.
pub struct Plumbing {
    pub inst: Instance,
    applied: Vec<Step>,
    rtnl: Rtnl,
    /// Set by `stop`: the daemon is going down, no more changes.
    closed: bool,
}

impl Plumbing {
    /// Apply the plan for `state`.
    pub fn start(state: &State, inst: Instance) -> Result<Plumbing> {
        let mut rtnl = Rtnl::open().context("cannot open a NETLINK_ROUTE socket")?;
        let applied = plan(state, &inst).apply(&mut rtnl)?;
        Ok(Plumbing {
            inst,
            applied,
            rtnl,
            closed: false,
        })
    }

    /// Move to the plan for `state`: apply new steps, undo vanished ones.
    /// On failure, what this call applied is undone and the old plumbing
    /// stays in force.
    pub fn update(&mut self, state: &State) -> Result<()> {
        if self.closed {
            bail!("tunsec is shutting down");
        }
        let next = plan(state, &self.inst);
        // Sets, not lists: a change at 10,000 peers compares 20,000 steps.
        let applied: std::collections::HashSet<&Step> = self.applied.iter().collect();
        let wanted: std::collections::HashSet<&Step> = next.steps.iter().collect();
        let mut added = Vec::new();
        for step in &next.steps {
            if applied.contains(step) {
                continue;
            }
            if let Err(e) = exec(&mut self.rtnl, step, true) {
                undo(&mut self.rtnl, &added);
                // The nft step replaces the table whole: put the old one back.
                for old in self
                    .applied
                    .iter()
                    .filter(|s| matches!(s, Step::Cmd { .. }))
                {
                    let _ = exec(&mut self.rtnl, old, true);
                }
                return Err(e);
            }
            added.push(step.clone());
        }
        let stale: Vec<Step> = self
            .applied
            .iter()
            .filter(|s| !wanted.contains(s) && matches!(s, Step::Net(_)))
            .cloned()
            .collect();
        undo(&mut self.rtnl, &stale);
        self.applied = next.steps;
        Ok(())
    }

    /// Leave everything in place and make no more changes: after a fault,
    /// the blackhole routes keep protected traffic from leaving in the
    /// clear (as after `kill -9`) until a new instance takes over.
    pub fn abandon(&mut self) {
        self.applied.clear();
        self.closed = true;
    }

    /// Undo everything, in reverse order (once).
    pub fn stop(&mut self) {
        let applied = std::mem::take(&mut self.applied);
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
        let drop = d
            .find("meta nfproto ipv4 ip saddr 172.17.207.66 ip daddr 172.17.207.12 counter drop")
            .expect(&d);
        assert!(icmp < drop);
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
}
