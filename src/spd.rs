//! The Security Policy Database: ordered policies and selector matching.
//!
//! Order: a lower priority number wins (as in Linux); at equal priority the
//! more specific selector wins (longer prefixes, a protocol, ports); then
//! the policy added first.

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

    fn specificity(&self) -> u32 {
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

/// The SPD: an immutable snapshot, cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Spd {
    /// Sorted by (priority, specificity descending, id).
    policies: Vec<Arc<Policy>>,
    next_id: u64,
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

impl Spd {
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn position(&self, dir: Dir, sel: &Selector) -> Option<usize> {
        self.policies
            .iter()
            .position(|p| p.dir == dir && p.selector == *sel)
    }

    fn insert(
        &mut self,
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    ) -> Arc<Policy> {
        self.next_id += 1;
        let p = Arc::new(Policy {
            dir,
            selector,
            priority,
            action,
            id: self.next_id,
            used: Default::default(),
        });
        self.policies.push(p.clone());
        self.policies.sort_by_key(|p| {
            (
                p.priority,
                std::cmp::Reverse(p.selector.specificity()),
                p.id,
            )
        });
        p
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
        if self.position(dir, &selector).is_some() {
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
        if let Some(i) = self.position(dir, &selector) {
            self.policies.remove(i);
        }
        self.insert(dir, selector, priority, action)
    }

    /// setkey `spddelete`.
    pub fn delete(&mut self, dir: Dir, selector: &Selector) -> Result<Arc<Policy>, SpdError> {
        match self.position(dir, selector) {
            Some(i) => Ok(self.policies.remove(i)),
            None => Err(SpdError::NotFound(describe(selector), dir.name())),
        }
    }

    pub fn flush(&mut self) {
        self.policies.clear();
    }

    /// The policy that decides for `flow` in direction `dir`.
    #[inline]
    pub fn lookup(&self, dir: Dir, flow: &Flow) -> Option<&Arc<Policy>> {
        self.policies
            .iter()
            .find(|p| p.dir == dir && p.selector.matches(flow))
    }

    /// All policies in evaluation order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.policies.iter()
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
