//! `tunsec pcap` over a capture in memory (pcap or pcapng, any link type),
//! in the direction the first byte picks, against the state with every
//! transform. Unusable files must give errors, not panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tunsec::pcap::{Direction, run_bytes};

fuzz_target!(|data: &[u8]| {
    let Some((dir, file)) = data.split_first() else {
        return;
    };
    let dir = if dir & 1 == 0 {
        Direction::In
    } else {
        Direction::Out
    };
    if let Ok((summary, out)) = run_bytes(tunsec_fuzz::all(), dir, file, [6; 32]) {
        assert!(summary.written <= summary.read);
        assert!(out.len() >= 24 || summary.read == 0);
    }
});
