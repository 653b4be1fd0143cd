//! IPComp (RFC 3173) with DEFLATE (RFC 2394): raw RFC 1951 data after a
//! 4-byte header (next header, flags, CPI).
//!
//! Outbound, a payload is compressed only when it is large enough to be
//! worth it and the result is smaller; otherwise it is sent without an
//! IPComp header, as RFC 3173 section 2.2 requires. A payload that is
//! already IPComp is never compressed again.
//!
//! Adaptive (RFC 3173 section 2.1): per SA, after a run of payloads that
//! did not shrink, the next ones are sent uncompressed without trying,
//! for a stretch that doubles while the data stays incompressible
//! ([`Adaptive`]). Encrypted or already compressed traffic (most bulk
//! data) then costs no DEFLATE run per packet.

use crate::buf::PacketBuf;
use crate::packet::{PROTO_IPCOMP, be16, put16, set_next_header};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

pub const HEADER: usize = 4;

/// Payloads shorter than this are sent uncompressed (Linux uses the same
/// threshold): DEFLATE seldom wins on them and costs a compressor run.
pub const THRESHOLD: usize = 90;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpCompError {
    #[error("IPComp header truncated")]
    Malformed,
    #[error("DEFLATE data corrupt or truncated")]
    Corrupt,
    #[error("decompressed packet exceeds the maximum IP length")]
    TooBig,
}

/// Consecutive payloads that did not shrink before compression pauses.
pub const ADAPT_FAILS: u32 = 8;
/// Payloads sent without trying, the first time and at most.
pub const ADAPT_MIN_SKIP: u32 = 16;
pub const ADAPT_MAX_SKIP: u32 = 1024;

/// RFC 3173 section 2.1's adaptive compression, kept per SA (relaxed
/// atomics: the workers share it, and a lost update only shifts a pause).
/// After [`ADAPT_FAILS`] payloads in a row that did not shrink, the next
/// `skip` are sent without trying; `skip` starts at [`ADAPT_MIN_SKIP`] and
/// doubles up to [`ADAPT_MAX_SKIP`] while tries keep failing. A payload
/// that shrinks starts over. Compressible traffic never pauses.
#[derive(Debug, Default)]
pub struct Adaptive {
    fails: AtomicU32,
    skip: AtomicU32,
    backoff: AtomicU32,
}

impl Adaptive {
    /// Whether to try this payload (false: in a pause, one step used).
    pub fn try_now(&self) -> bool {
        let s = self.skip.load(Relaxed);
        if s == 0 {
            return true;
        }
        self.skip.store(s - 1, Relaxed);
        false
    }

    /// What a try gave.
    pub fn record(&self, shrank: bool) {
        if shrank {
            if self.fails.load(Relaxed) != 0 || self.backoff.load(Relaxed) != 0 {
                self.fails.store(0, Relaxed);
                self.backoff.store(0, Relaxed);
            }
            return;
        }
        let f = self.fails.load(Relaxed) + 1;
        if f < ADAPT_FAILS {
            self.fails.store(f, Relaxed);
            return;
        }
        self.fails.store(0, Relaxed);
        let b = (self.backoff.load(Relaxed) * 2).clamp(ADAPT_MIN_SKIP, ADAPT_MAX_SKIP);
        self.backoff.store(b, Relaxed);
        self.skip.store(b, Relaxed);
    }
}

/// Per-worker DEFLATE state and scratch space, reused packet after packet.
pub struct Codec {
    /// DEFLATE runs so far (compression tries), for tests and profiles.
    runs: u64,
    comp: Compress,
    decomp: Decompress,
    scratch: Vec<u8>,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        Codec {
            runs: 0,
            comp: Compress::new(Compression::default(), false),
            decomp: Decompress::new(false),
            scratch: Vec::with_capacity(65536 + 64),
        }
    }

    /// Compress the payload at `at` under CPI `cpi` if that makes it
    /// smaller. Returns whether an IPComp header was added, or `None` when
    /// the payload is not worth a try (too short, or IPComp already).
    pub fn compress(
        &mut self,
        buf: &mut PacketBuf,
        at: usize,
        nh_pos: usize,
        cpi: u16,
    ) -> Option<bool> {
        let next = buf.data()[nh_pos];
        let plen = buf.len() - at;
        if plen < THRESHOLD || next == PROTO_IPCOMP {
            return None;
        }
        self.runs += 1;
        Some(self.deflate(buf, at, nh_pos, cpi, next, plen))
    }

    /// Compression tries so far.
    pub fn runs(&self) -> u64 {
        self.runs
    }

    fn deflate(
        &mut self,
        buf: &mut PacketBuf,
        at: usize,
        nh_pos: usize,
        cpi: u16,
        next: u8,
        plen: usize,
    ) -> bool {
        // The result must be smaller than the payload, header included.
        let limit = plen - HEADER - 1;
        self.comp.reset();
        self.scratch.clear();
        // The scratch buffer holds any deflated packet (DEFLATE expands
        // incompressible data by a few bytes per 16 KiB block), so one call
        // finishes the stream; compress_vec never grows it.
        self.scratch.reserve(plen + 64);
        let st =
            self.comp
                .compress_vec(&buf.data()[at..], &mut self.scratch, FlushCompress::Finish);
        if !matches!(st, Ok(Status::StreamEnd)) || self.scratch.len() > limit {
            return false;
        }
        let out = &self.scratch;
        if !buf.replace_tail(at + HEADER, out) {
            return false;
        }
        let d = buf.data_mut();
        d[at] = next;
        d[at + 1] = 0;
        put16(d, at + 2, cpi);
        set_next_header(d, nh_pos, PROTO_IPCOMP);
        true
    }

    /// CPI of the IPComp header at `at`.
    pub fn peek(pkt: &[u8], at: usize) -> Option<u16> {
        (pkt.len() >= at + HEADER).then(|| be16(pkt, at + 2))
    }

    /// Inflate the IPComp payload at `at` and restore the original packet.
    pub fn decompress(
        &mut self,
        buf: &mut PacketBuf,
        at: usize,
        nh_pos: usize,
    ) -> Result<(), IpCompError> {
        let d = buf.data();
        if d.len() < at + HEADER {
            return Err(IpCompError::Malformed);
        }
        let next = d[at];
        let max_ip = if d[0] >> 4 == 4 { 65535 } else { 65535 + 40 };
        let limit = max_ip.min(buf.max_len()) - at;
        self.decomp.reset(false);
        self.scratch.clear();
        if self.scratch.capacity() < limit + 1 {
            self.scratch.reserve(limit + 1);
        }
        // One byte of room beyond the limit tells "too big" from "fits".
        let cap = self.scratch.capacity();
        let input = &buf.data()[at + HEADER..];
        let status = loop_decompress(
            &mut self.decomp,
            input,
            &mut self.scratch,
            (limit + 1).min(cap),
        )?;
        if self.scratch.len() > limit {
            return Err(IpCompError::TooBig);
        }
        if status != Status::StreamEnd {
            return Err(IpCompError::Corrupt);
        }
        if !buf.replace_tail(at, &self.scratch) {
            return Err(IpCompError::TooBig);
        }
        set_next_header(buf.data_mut(), nh_pos, next);
        Ok(())
    }
}

fn loop_decompress(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    cap: usize,
) -> Result<Status, IpCompError> {
    loop {
        let consumed = d.total_in() as usize;
        let before_out = out.len();
        let st = d
            .decompress_vec(&input[consumed..], out, FlushDecompress::Finish)
            .map_err(|_| IpCompError::Corrupt)?;
        if st == Status::StreamEnd || out.len() >= cap {
            return Ok(st);
        }
        if d.total_in() as usize == consumed && out.len() == before_out {
            // No progress: input ended before the stream did.
            return Ok(st);
        }
    }
}
