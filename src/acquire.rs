//! Pending ACQUIREs: the kernel's larval "acquire" state, as bookkeeping.
//! An ACQUIRE is raised once per SA asked for (source, destination,
//! protocol, reqid: not per policy, since pluto replaces its `%trap`
//! policy with a `%hold` one while it negotiates) and stays pending until
//! an outbound SA that resolves it is added, or `ACQUIRE_TIMEOUT` passes.
//! The daemon resolves at every committed change, not when it next looks:
//! an SA that is added and deleted within one look still answered it. Other
//! changes, such as the keying daemon reserving its inbound SPI with
//! getspi/ALLOCSPI while it negotiates, do not raise it again: a second
//! ACQUIRE in the middle of a negotiation makes pluto build a second
//! CHILD_SA. Time is passed in.

use crate::engine::Event;
use crate::sad::Proto;
use crate::spd::Flow;
use crate::state::State;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// How long an ACQUIRE stays pending before it is raised again (Linux's
/// `xfrm_acq_expires` default).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    proto: Proto,
    reqid: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Pending {
    /// When each was raised, and the flow that raised it.
    raised: HashMap<Key, (Duration, Flow)>,
}

impl Pending {
    /// Should this ACQUIRE event go out now, with `state` the running
    /// state? (Other events always do.) Not if an SA that carries its
    /// flow exists by now: a worker raised it against an older state, and
    /// the keying daemon answered meanwhile.
    pub fn raise(&mut self, e: &Event, now: Duration, state: &State) -> bool {
        let Event::Acquire {
            src,
            dst,
            proto,
            reqid,
            upper,
            ports,
            ..
        } = *e
        else {
            return true;
        };
        let flow = Flow {
            src,
            dst,
            proto: upper,
            ports,
        };
        let k = Key {
            src,
            dst,
            proto,
            reqid,
        };
        if state.sad.lookup_flow(&flow, proto, reqid).is_some() {
            self.raised.remove(&k);
            return false;
        }
        let due = self
            .raised
            .get(&k)
            .is_none_or(|(t, _)| now.saturating_sub(*t) >= ACQUIRE_TIMEOUT);
        if due {
            self.raised.insert(k, (now, flow));
        }
        due
    }

    /// After a change: forget the ACQUIREs that `state` resolves (an
    /// outbound SA that would carry the flow that raised them).
    pub fn resolve(&mut self, state: &State) {
        self.raised
            .retain(|k, (_, flow)| state.sad.lookup_flow(flow, k.proto, k.reqid).is_none());
    }

    pub fn len(&self) -> usize {
        self.raised.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raised.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ACQUIRE for TCP from 10.0.0.1:`sport` to 10.0.0.2:`dport`.
    fn acquire(sport: u16, dport: u16) -> Event {
        Event::Acquire {
            policy: 1,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: Proto::Esp,
            reqid: None,
            upper: 6,
            ports: Some((sport, dport)),
        }
    }

    fn apply(s: &State, text: &str) -> State {
        let p = crate::setkey::parse(text, "t").unwrap();
        s.apply(&p.statements, "t", Duration::ZERO).unwrap().0
    }

    #[test]
    fn an_sa_for_other_traffic_does_not_resolve_it() {
        let e = acquire(40000, 5101);
        let mut p = Pending::default();
        let empty = State::default();
        assert!(p.raise(&e, Duration::ZERO, &empty));
        // An outbound SA negotiated for TCP port 5102 between the same hosts.
        let text = "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213;";
        let add = |spi: u32, dport: u16, base: &State| {
            let mut st = crate::setkey::parse(text, "t").unwrap().statements;
            if let crate::setkey::Command::Add(cfg) = &mut st[0].cmd {
                cfg.spi = spi;
                cfg.selector = Some(crate::spd::Selector {
                    src: crate::spd::Prefix::host(cfg.src),
                    dst: crate::spd::Prefix::host(cfg.dst),
                    proto: Some(6),
                    sport: None,
                    dport: Some(dport),
                });
            }
            base.apply(&st, "t", Duration::ZERO).unwrap().0
        };
        let s = add(0x1000, 5102, &State::seeded(1));
        p.resolve(&s);
        assert!(!p.raise(&e, Duration::from_secs(1), &s), "still pending");
        // The one for port 5101 resolves it.
        let s2 = add(0x2000, 5101, &s);
        p.resolve(&s2);
        assert!(p.is_empty());
        // An event raised against the older state, reported after the SA
        // came: it does not go out.
        assert!(p.raise(&e, Duration::from_secs(2), &s));
        assert!(!p.raise(&e, Duration::from_secs(2), &s2));
    }

    #[test]
    fn raised_once_until_an_sa_resolves_it_or_it_times_out() {
        let e = acquire(1000, 22);
        let mut p = Pending::default();
        let t = Duration::from_secs(5);
        let empty = State::default();
        assert!(p.raise(&e, t, &empty));
        assert!(!p.raise(&e, t + Duration::from_secs(1), &empty));
        // The keying daemon replaces its trap policy while it negotiates:
        // the same SA asked for by another policy is the same ACQUIRE.
        let mut other = e;
        if let Event::Acquire { policy, .. } = &mut other {
            *policy = 2;
        }
        assert!(!p.raise(&other, t + Duration::from_secs(1), &empty));
        // The keying daemon reserves its inbound SPI: still pending.
        let s = apply(&State::seeded(1), "getspi 10.0.0.2 10.0.0.1 esp;");
        p.resolve(&s);
        assert!(!p.raise(&e, t + Duration::from_secs(2), &s));
        // An inbound SA alone does not resolve it either.
        let s = apply(
            &s,
            "add 10.0.0.2 10.0.0.1 esp 0x2000 -E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213;",
        );
        p.resolve(&s);
        assert!(!p.raise(&e, t + Duration::from_secs(3), &s));
        // The outbound SA does.
        let s = apply(
            &s,
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213;",
        );
        p.resolve(&s);
        assert!(p.is_empty());
        // While the SA is there, none is raised; once it is gone, one is.
        assert!(!p.raise(&e, t + Duration::from_secs(4), &s));
        assert!(p.raise(&e, t + Duration::from_secs(4), &empty));
        // Unanswered, it is raised again after the timeout.
        assert!(!p.raise(&e, t + Duration::from_secs(33), &empty));
        assert!(p.raise(&e, t + Duration::from_secs(34), &empty));
    }
}
