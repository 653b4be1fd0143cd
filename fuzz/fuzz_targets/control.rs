//! Control-protocol requests as the daemon's control socket handles them
//! (`src/daemon/control.rs`): UTF-8 check, `control::parse_request`, then
//! setkey text applied to the state with every transform, or the dumps and
//! stats built from it as JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::control::{self, Request};
use tunsec::engine::Counters;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let state = tunsec_fuzz::all();
    let now = Duration::from_secs(10);
    let reply = match control::parse_request(text) {
        Err(e) => control::error(&e),
        Ok(Request::Setkey(t)) => match state.apply_text(&t, "control", now) {
            Ok((_, applied, _)) => control::ok(&applied.output),
            Err(e) => control::error(&e.to_string()),
        },
        Ok(Request::Dump { proto, keys }) => serde_json::Value::Array(
            state
                .sad
                .iter()
                .filter(|sa| proto.is_none_or(|p| sa.config.proto == p))
                .map(|sa| {
                    // The daemon's listings serialize it directly.
                    let _ = serde_json::to_string(&control::SaJson::of(sa, now, keys));
                    control::sa_json(sa, now, keys)
                })
                .collect(),
        ),
        Ok(Request::SpdDump) => {
            serde_json::Value::Array(state.spd.iter().map(|p| control::policy_json(p)).collect())
        }
        Ok(Request::Stats) => control::counters_json(&Counters::default()),
        Ok(Request::Monitor) => control::ok(&[]),
    };
    let _ = control::event_line(&reply);
    let _ = reply.to_string();
});
