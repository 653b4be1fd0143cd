//! Outbound packets (raw bytes, as read from the TUN device) against a
//! state with every transform; what is protected then goes through
//! `engine::inbound` of the same state. Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tunsec::buf::PacketBuf;
use tunsec::engine::{self, Verdict, Worker};

fuzz_target!(|data: &[u8]| {
    let state = tunsec_fuzz::all();
    let mut w = Worker::new([4; 32]);
    let mut buf = PacketBuf::new();
    if !buf.load(data) {
        return;
    }
    if engine::outbound(state, &mut w, &mut buf, Duration::ZERO) == Verdict::Forward {
        let mut back = Worker::new([5; 32]);
        engine::inbound(state, &mut back, &mut buf, Duration::ZERO);
    }
});
