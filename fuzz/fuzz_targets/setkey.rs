//! The setkey language: any text is parsed and applied to an empty state
//! and then to the state with every transform (so updates, deletes and
//! flushes meet SAs and policies). Errors are fine; panics are not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::state::State;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = Duration::from_secs(5);
    if let Ok((next, applied, _)) = State::default().apply_text(text, "fuzz.conf", now) {
        // Whatever was applied can be dumped.
        let _ = applied.output.len();
        for sa in next.sad.iter() {
            let _ = tunsec::control::sa_json(sa, now, true).to_string();
        }
        for p in next.spd.iter() {
            let _ = p.to_string();
        }
    }
    let _ = tunsec_fuzz::all().apply_text(text, "fuzz.conf", now);
});
