//! XFRM netlink: a datagram of messages, split and answered one by one as
//! the daemon's XFRM socket does (`xfrm::respond`, each change applied
//! before the next message), with the notifications of every change.
//! Seeds: the messages charon, pluto and `ip xfrm` sent
//! (tests/fixtures/xfrm).

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::state::State;
use tunsec::xfrm::convert::Clock;
use tunsec::xfrm::{self, Request, netlink};

const CLOCK: Clock = Clock {
    now: Duration::from_secs(100),
    wall: 1_800_000_000,
};

fuzz_target!(|data: &[u8]| {
    // Start from the state with every transform half the time.
    let mut state = if data.first().is_some_and(|b| b & 1 == 1) {
        tunsec_fuzz::state(None)
    } else {
        State::seeded(1)
    };
    for m in netlink::split(data.get(1..).unwrap_or_default()) {
        let Ok((header, payload, bytes)) = m else {
            continue;
        };
        let req = Request {
            header,
            payload,
            bytes,
            pid: 4242,
        };
        let mut next = None;
        let (replies, _refused) = xfrm::respond(&state, &req, CLOCK, |n| {
            next = Some(n);
            Ok(())
        });
        for r in &replies {
            assert!(
                netlink::Header::parse(r).is_some(),
                "replies are netlink messages"
            );
        }
        if let Some(n) = next {
            let _ = xfrm::notifications(&state, &n, CLOCK);
            state = n;
        }
    }
});
