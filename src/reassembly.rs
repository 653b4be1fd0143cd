//! Reassembly of fragmented IPsec packets, IPv4 and IPv6, sans-IO: bytes
//! in, bytes out, time passed in.
//!
//! A peer whose protected packet exceeds the path MTU fragments it (IPv4
//! without DF, and always IPv6 at the sender), and IPsec can only open the
//! whole datagram. The engine hands every inbound fragment that carries
//! ESP, AH or IPComp ([`wanted`]) to the worker's [`Reassembler`], and goes
//! on with the datagram once it is complete. Plaintext fragments are left
//! alone (the inbound policy decides about them as before).
//!
//! Rules, each with its drop reason:
//! - **Bounded memory**: at most [`Limits::max_datagrams`] datagrams in
//!   progress and [`Limits::max_bytes`] bytes held per worker, and at most
//!   [`Limits::max_fragments`] fragments per datagram. A new datagram
//!   evicts the oldest one when full; what is evicted, or a datagram with
//!   too many fragments, is dropped as `frag-limit`.
//! - **Timeouts**: a datagram not complete [`Limits::timeout_v4`] (30 s)
//!   or [`Limits::timeout_v6`] (60 s, RFC 8200 section 4.5) after its
//!   first fragment arrived is abandoned; its fragments are dropped as
//!   `frag-incomplete` (also what is still waiting when a capture ends).
//!   These are Linux's defaults (`ipfrag_time`, `IPV6_FRAG_TIMEOUT`).
//! - **Overlaps are refused** (RFC 5722 for IPv6; Linux does the same for
//!   IPv4 since 2018): a fragment that overlaps another, or that
//!   contradicts the datagram's length, discards the whole datagram, and
//!   fragments of it that arrive later, until its timeout: `frag-overlap`.
//!   An exact duplicate (same place, same bytes) is dropped alone, as
//!   `frag-duplicate`, and the datagram goes on (RFC 8200 allows this).
//! - **Atomic fragments** (IPv6, offset 0 and M clear; RFC 6946) are
//!   processed in isolation: the fragment header is removed and the packet
//!   goes on at once, whatever is in progress under the same identification.
//! - Fragments that cannot be right (IPv6: a non-last fragment whose length
//!   is not a multiple of 8; empty fragments) are `malformed`; a datagram
//!   that would exceed the largest IP packet is `too-big`.
//!
//! The reassembled datagram is what the sender had before fragmenting: the
//! first fragment's header (IPv4: total length, flags, offset and checksum
//! rewritten; IPv6: the unfragmentable part without the fragment header,
//! the payload length rewritten), then the data in order. AH's ICV covers
//! exactly that.
//!
//! In the daemon, each worker reassembles on its own. That is enough
//! because the packet fanout hashes by flow (`PACKET_FANOUT_HASH`), and the
//! kernel's hash (`__skb_get_hash_symmetric`, flow dissector without
//! `FLOW_DISSECTOR_F_PARSE_1ST_FRAG`) stops at an IPv6 fragment header: it
//! covers the addresses, the flow label and protocol 44, which are the
//! same in every fragment of a datagram, so they all reach one worker.
//! IPv4 fragments are reassembled by the kernel before the fanout
//! (`PACKET_FANOUT_FLAG_DEFRAG`); this module reassembles them too for
//! `tunsec pcap` and any other caller of [`crate::engine::inbound`].

use crate::buf::{MAX_PACKET, PacketBuf};
use crate::engine::{Counters, DropReason};
use crate::packet::{self, IpInfo};
use std::time::Duration;

/// Bounds on what one reassembler keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_datagrams: usize,
    pub max_bytes: usize,
    pub max_fragments: usize,
    pub timeout_v4: Duration,
    pub timeout_v6: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_datagrams: 64,
            // Sixteen datagrams of the largest size.
            max_bytes: 1 << 20,
            // 64 KiB in fragments of IPv4's minimum MTU (576) is 119.
            max_fragments: 128,
            timeout_v4: Duration::from_secs(30),
            timeout_v6: Duration::from_secs(60),
        }
    }
}

/// What became of a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Kept until the rest arrives; nothing to do now.
    Held,
    /// The buffer now holds the whole datagram.
    Complete,
    /// Dropped (counted), with the reason.
    Dropped(DropReason),
}

/// Which datagram a fragment belongs to (RFC 791: addresses, protocol and
/// identification; RFC 8200: addresses and identification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    id: u32,
    proto: u8,
}

/// One fragment's place in its datagram, as parsed.
struct Frag {
    key: Key,
    /// Length of the header part kept from the first fragment (IPv4
    /// header; IPv6 unfragmentable part without the fragment header).
    head_len: usize,
    /// Offset of the fragment's data in the packet.
    data_at: usize,
    /// Offset of the data in the datagram, and whether more follow.
    offset: usize,
    more: bool,
}

struct Datagram {
    key: Key,
    /// When its first fragment arrived, and when it is abandoned.
    since: Duration,
    deadline: Duration,
    /// The header part, once the first fragment arrived.
    head: Vec<u8>,
    /// The data, as far as received (holes are zeros).
    data: Vec<u8>,
    /// The received fragments' ranges of `data`, sorted, never
    /// overlapping (one per fragment: at most `max_fragments`).
    ranges: Vec<(usize, usize)>,
    /// Data length, known from the last fragment.
    total: Option<usize>,
    /// Overlap seen: everything of this datagram is dropped until the
    /// deadline.
    poisoned: bool,
}

impl Datagram {
    fn bytes(&self) -> usize {
        self.head.capacity() + self.data.capacity()
    }

    /// First fragment, last fragment, and no hole between.
    fn complete(&self) -> bool {
        let Some(total) = self.total else {
            return false;
        };
        let mut next = 0;
        for r in &self.ranges {
            if r.0 != next {
                return false;
            }
            next = r.1;
        }
        !self.head.is_empty() && next == total
    }
}

/// A worker's fragments in progress.
pub struct Reassembler {
    limits: Limits,
    pending: Vec<Datagram>,
    bytes: usize,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler")
            .field("datagrams", &self.pending.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Is `pkt` (parsed as `info`) a fragment that tunsec reassembles: one
/// that carries ESP, AH or IPComp (IPv6: also destination options, which
/// may precede ESP)? `info.fragment` must be true.
pub fn wanted(pkt: &[u8], info: &IpInfo) -> bool {
    if !info.fragment {
        return false;
    }
    if !info.is_v6() {
        return matches!(
            pkt[9],
            packet::PROTO_ESP | packet::PROTO_AH | packet::PROTO_IPCOMP
        );
    }
    match v6_fragment_header(pkt) {
        Some((_, at)) => matches!(
            pkt[at],
            packet::PROTO_ESP | packet::PROTO_AH | packet::PROTO_IPCOMP | packet::PROTO_DSTOPTS
        ),
        None => false,
    }
}

/// Why [`fragment`] refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentError {
    /// Not a whole IPv4 or IPv6 packet ([`packet::parse`] refuses it).
    Malformed,
    /// Already a fragment (IPv4 MF or an offset, an IPv6 fragment header).
    Fragment,
    /// IPv4 with DF set: neither its sender nor a router fragments it.
    DontFragment,
}

impl std::fmt::Display for FragmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FragmentError::Malformed => "not a whole IPv4 or IPv6 packet",
            FragmentError::Fragment => "already a fragment",
            FragmentError::DontFragment => "IPv4 with DF set",
        })
    }
}

impl std::error::Error for FragmentError {}

/// IPv4 option types with the copied flag go into every fragment (RFC
/// 791); the others only into the first.
const IPOPT_COPIED: u8 = 0x80;
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;

/// Split `pkt` as its sender's kernel (or, IPv4 without DF, a router)
/// would: pieces of its fragmentable part of at most `size` bytes
/// (rounded down to a multiple of 8, at least 8), each after a copy of
/// the headers every fragment carries. [`Reassembler`] puts them back
/// together into `pkt`, in any order.
///
/// - **IPv4**: every fragment keeps the datagram's identification: its
///   sender chose it when it built the packet, AH's ICV covers it, and
///   all fragments of one datagram must share it (`v6_id` is not used).
///   The first fragment carries all options; in the later ones the
///   options without the copied flag (Record Route, Timestamp...) are
///   overwritten with NOPs, so that every header keeps its length, as
///   Linux's `ip_options_fragment` does. Total length, flags, offset and
///   checksum are set per fragment.
/// - **IPv6**: the unfragmentable part (the header and the extension
///   headers up to hop-by-hop or the last routing header, destination
///   options before it included: RFC 8200 section 4.5) starts every
///   fragment, then a Fragment header with identification `v6_id` naming
///   what followed the unfragmentable part.
///
/// A packet whose fragmentable part fits in one piece comes back as one:
/// IPv4 unchanged, IPv6 as an atomic fragment (RFC 6946). A packet with
/// nothing after its headers comes back unchanged.
pub fn fragment(pkt: &[u8], size: usize, v6_id: u32) -> Result<Vec<Vec<u8>>, FragmentError> {
    let info = packet::parse(pkt).map_err(|_| FragmentError::Malformed)?;
    if info.fragment {
        return Err(FragmentError::Fragment);
    }
    let v6 = info.is_v6();
    let hl = info.insert_at;
    let data = &pkt[hl..];
    let size = (size / 8).max(1) * 8;
    if data.is_empty() || (!v6 && data.len() <= size) {
        return Ok(vec![pkt.to_vec()]);
    }
    if !v6 && packet::be16(pkt, 6) & 0x4000 != 0 {
        return Err(FragmentError::DontFragment);
    }
    // The headers of the later IPv4 fragments: options not to be copied
    // become NOPs.
    let mut later_head = pkt[..hl].to_vec();
    if !v6 {
        let mut i = 20;
        while i < hl {
            match later_head[i] {
                IPOPT_END => break,
                IPOPT_NOOP => i += 1,
                ty => {
                    let len = later_head.get(i + 1).map_or(0, |l| *l as usize);
                    if len < 2 || i + len > hl {
                        break; // malformed options: left as they are
                    }
                    if ty & IPOPT_COPIED == 0 {
                        later_head[i..i + len].fill(IPOPT_NOOP);
                    }
                    i += len;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(data.len().div_ceil(size));
    for (i, chunk) in data.chunks(size).enumerate() {
        let off = i * size;
        let more = off + chunk.len() < data.len();
        let mut f = Vec::with_capacity(hl + 8 + chunk.len());
        f.extend_from_slice(if i == 0 { &pkt[..hl] } else { &later_head });
        if v6 {
            f[info.next_hdr_pos] = packet::PROTO_FRAGMENT;
            f.extend_from_slice(&[info.next_hdr, 0]);
            f.extend_from_slice(&(off as u16 | more as u16).to_be_bytes());
            f.extend_from_slice(&v6_id.to_be_bytes());
        } else {
            let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            f[6..8].copy_from_slice(&fo.to_be_bytes());
        }
        f.extend_from_slice(chunk);
        packet::fix_lengths(&mut f);
        out.push(f);
    }
    Ok(out)
}

/// The IPv6 fragment header: (position of the next-header byte naming
/// it, its offset).
fn v6_fragment_header(pkt: &[u8]) -> Option<(usize, usize)> {
    let mut nh_pos = 6;
    let mut off = 40;
    loop {
        let nh = *pkt.get(nh_pos)?;
        match nh {
            packet::PROTO_FRAGMENT => return (pkt.len() >= off + 8).then_some((nh_pos, off)),
            packet::PROTO_HOPOPTS | packet::PROTO_ROUTING | packet::PROTO_DSTOPTS => {
                let len = (*pkt.get(off + 1)? as usize + 1) * 8;
                nh_pos = off;
                off += len;
            }
            _ => return None,
        }
    }
}

/// The largest datagram: IPv4 total length, IPv6 payload length + 40.
fn max_len(v6: bool) -> usize {
    if v6 { MAX_PACKET } else { MAX_PACKET - 40 }
}

/// `head` starts with the unfragmentable part of `pkt`, an IPv6 fragment:
/// the header that named the fragment header now names what it named.
fn unfragment_v6_head(pkt: &[u8], head: &mut [u8]) {
    if let Some((nh_pos, at)) = v6_fragment_header(pkt) {
        head[nh_pos] = pkt[at];
    }
}

fn parse(pkt: &[u8], info: &IpInfo) -> Option<Frag> {
    let mut key = Key {
        v6: info.is_v6(),
        src: [0; 16],
        dst: [0; 16],
        id: 0,
        proto: 0,
    };
    if !info.is_v6() {
        key.src[..4].copy_from_slice(&pkt[12..16]);
        key.dst[..4].copy_from_slice(&pkt[16..20]);
        key.id = packet::be16(pkt, 4) as u32;
        key.proto = pkt[9];
        let frag = packet::be16(pkt, 6);
        return Some(Frag {
            key,
            head_len: info.insert_at,
            data_at: info.insert_at,
            offset: (frag & 0x1fff) as usize * 8,
            more: frag & 0x2000 != 0,
        });
    }
    let (_, at) = v6_fragment_header(pkt)?;
    key.src.copy_from_slice(&pkt[8..24]);
    key.dst.copy_from_slice(&pkt[24..40]);
    key.id = packet::be32(pkt, at + 4);
    let fo = packet::be16(pkt, at + 2);
    Some(Frag {
        key,
        head_len: at,
        data_at: at + 8,
        offset: (fo & 0xfff8) as usize,
        more: fo & 1 != 0,
    })
}

impl Reassembler {
    pub fn new(limits: Limits) -> Reassembler {
        Reassembler {
            limits,
            pending: Vec::new(),
            bytes: 0,
        }
    }

    /// Datagrams in progress (poisoned ones included).
    pub fn in_progress(&self) -> usize {
        self.pending.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Take the fragment in `buf` (parsed as `info`, for which [`wanted`]
    /// is true). On [`Outcome::Complete`] `buf` holds the datagram; drops
    /// are counted in `counters`, the fragment's own included.
    pub fn push(
        &mut self,
        buf: &mut PacketBuf,
        info: &IpInfo,
        now: Duration,
        counters: &mut Counters,
    ) -> Outcome {
        self.expire(now, counters);
        let drop = |counters: &mut Counters, r: DropReason| {
            counters.count_drop(r);
            Outcome::Dropped(r)
        };
        let pkt = buf.data();
        let Some(f) = parse(pkt, info) else {
            return drop(counters, DropReason::Malformed);
        };
        let len = pkt.len() - f.data_at;
        if len == 0 || (f.more && !len.is_multiple_of(8)) {
            return drop(counters, DropReason::Malformed);
        }
        let end = f.offset + len;
        let max = max_len(f.key.v6);
        if f.head_len + end > max {
            return drop(counters, DropReason::TooBig);
        }
        if f.key.v6 && f.offset == 0 && !f.more {
            // An atomic fragment (RFC 6946): on its own, at once.
            let mut whole = Vec::with_capacity(pkt.len() - 8);
            whole.extend_from_slice(&pkt[..f.head_len]);
            whole.extend_from_slice(&pkt[f.data_at..]);
            unfragment_v6_head(pkt, &mut whole);
            packet::fix_lengths(&mut whole);
            buf.load(&whole);
            counters.fragments += 1;
            counters.reassembled += 1;
            return Outcome::Complete;
        }
        let i = match self.pending.iter().position(|d| d.key == f.key) {
            Some(i) => i,
            None => {
                if self.pending.len() >= self.limits.max_datagrams {
                    self.evict_oldest(counters);
                }
                let timeout = if f.key.v6 {
                    self.limits.timeout_v6
                } else {
                    self.limits.timeout_v4
                };
                self.pending.push(Datagram {
                    key: f.key,
                    since: now,
                    deadline: now.saturating_add(timeout),
                    head: Vec::new(),
                    data: Vec::new(),
                    ranges: Vec::new(),
                    total: None,
                    poisoned: false,
                });
                self.pending.len() - 1
            }
        };
        let d = &self.pending[i];
        if d.poisoned {
            return drop(counters, DropReason::FragOverlap);
        }
        // Where it goes, and whether it agrees with what is there.
        let at = d.ranges.partition_point(|r| r.1 <= f.offset);
        let data = &pkt[f.data_at..];
        if d.ranges.get(at).is_some_and(|r| r.0 < end) {
            let r = d.ranges[at];
            let same_end = if f.more {
                d.total != Some(end)
            } else {
                d.total == Some(end)
            };
            if r == (f.offset, end) && same_end && d.data[f.offset..end] == *data {
                return drop(counters, DropReason::FragDuplicate);
            }
            return self.poison(i, counters);
        }
        let contradicts = if f.more {
            d.total.is_some_and(|t| end > t)
        } else {
            d.total.is_some() || d.ranges.last().is_some_and(|r| r.1 > end)
        };
        if contradicts {
            return self.poison(i, counters);
        }
        if d.ranges.len() >= self.limits.max_fragments {
            return self.discard(i, counters, DropReason::FragLimit, true);
        }
        // Memory: make room by evicting older datagrams, or give this one up.
        let grow = end.saturating_sub(d.data.len()) + if f.offset == 0 { f.head_len } else { 0 };
        // (Discarding moves the last datagram into the hole: find this
        // one again each time.)
        let mut i = i;
        while self.bytes + grow > self.limits.max_bytes && self.pending.len() > 1 {
            let oldest = self.oldest_except(i);
            self.discard(oldest, counters, DropReason::FragLimit, false);
            i = self
                .pending
                .iter()
                .position(|d| d.key == f.key)
                .expect("never evicts itself");
        }
        if self.bytes + grow > self.limits.max_bytes {
            return self.discard(i, counters, DropReason::FragLimit, true);
        }
        let d = &mut self.pending[i];
        let before = d.bytes();
        if d.data.len() < end {
            // exactly: the byte budget counts capacity
            d.data.reserve_exact(end - d.data.len());
            d.data.resize(end, 0);
        }
        d.data[f.offset..end].copy_from_slice(data);
        if f.offset == 0 {
            d.head.extend_from_slice(&pkt[..f.head_len]);
            if f.key.v6 {
                unfragment_v6_head(pkt, &mut d.head);
            }
        }
        if !f.more {
            d.total = Some(end);
        }
        d.ranges.insert(at, (f.offset, end));
        self.bytes = self.bytes - before + d.bytes();
        if !d.complete() {
            return Outcome::Held;
        }
        if d.head.len() + d.data.len() > max {
            return self.discard(i, counters, DropReason::TooBig, false);
        }
        let d = self.pending.swap_remove(i);
        self.bytes -= d.bytes();
        counters.fragments += d.ranges.len() as u64;
        counters.reassembled += 1;
        let n = d.head.len() + d.data.len();
        let area = buf.load_area();
        area[..d.head.len()].copy_from_slice(&d.head);
        area[d.head.len()..n].copy_from_slice(&d.data);
        buf.set_loaded(n);
        let out = buf.data_mut();
        if !f.key.v6 {
            // Whole again: no more fragments, offset 0 (DF and the
            // reserved bit stay).
            out[6] &= 0xc0;
            out[7] = 0;
        }
        packet::fix_lengths(out);
        Outcome::Complete
    }

    /// Abandon datagrams whose time is up (counted as `frag-incomplete`).
    /// The daemon calls this now and then; [`Reassembler::push`] calls it
    /// itself.
    pub fn expire(&mut self, now: Duration, counters: &mut Counters) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline <= now {
                self.discard(i, counters, DropReason::FragIncomplete, false);
            } else {
                i += 1;
            }
        }
    }

    /// Abandon everything (a capture ended): `frag-incomplete`.
    pub fn flush(&mut self, counters: &mut Counters) {
        while !self.pending.is_empty() {
            self.discard(0, counters, DropReason::FragIncomplete, false);
        }
    }

    /// Count the held fragments of datagram `i` (and the current one, with
    /// `current`) as dropped for `r`, and forget the datagram.
    fn discard(
        &mut self,
        i: usize,
        counters: &mut Counters,
        r: DropReason,
        current: bool,
    ) -> Outcome {
        let d = self.pending.swap_remove(i);
        self.bytes -= d.bytes();
        let held = if d.poisoned { 0 } else { d.ranges.len() };
        for _ in 0..held + current as usize {
            counters.count_drop(r);
        }
        Outcome::Dropped(r)
    }

    /// RFC 5722: drop the datagram's fragments, this one too, and keep
    /// refusing it until its deadline.
    fn poison(&mut self, i: usize, counters: &mut Counters) -> Outcome {
        let d = &mut self.pending[i];
        let held = d.ranges.len();
        self.bytes -= d.bytes();
        d.poisoned = true;
        d.head = Vec::new();
        d.data = Vec::new();
        d.ranges = Vec::new();
        for _ in 0..held + 1 {
            counters.count_drop(DropReason::FragOverlap);
        }
        Outcome::Dropped(DropReason::FragOverlap)
    }

    fn oldest_except(&self, keep: usize) -> usize {
        (0..self.pending.len())
            .filter(|&j| j != keep)
            .min_by_key(|&j| self.pending[j].since)
            .expect("more than one datagram")
    }

    fn evict_oldest(&mut self, counters: &mut Counters) {
        if let Some(j) = (0..self.pending.len()).min_by_key(|&j| self.pending[j].since) {
            self.discard(j, counters, DropReason::FragLimit, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::fix_lengths;

    /// An IPv6 (or IPv4) ESP packet of `n` payload bytes, split into
    /// fragments of `size` data bytes: (whole packet, fragments).
    fn esp(v6: bool, n: usize, size: usize, id: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
        let body: Vec<u8> = (0..n).map(|i| (i * 13 + 5) as u8).collect();
        let mut p = if v6 {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, packet::PROTO_ESP, 64];
            h.extend_from_slice(&[0xfd; 16]);
            h.extend_from_slice(&[0xfe; 16]);
            h
        } else {
            vec![
                0x45,
                0,
                0,
                0,
                (id >> 8) as u8,
                id as u8,
                0,
                0,
                64,
                packet::PROTO_ESP,
                0,
                0,
                10,
                0,
                0,
                1,
                10,
                0,
                0,
                2,
            ]
        };
        p.extend_from_slice(&body);
        fix_lengths(&mut p);
        let frags = fragment(&p, size, id).unwrap();
        (p, frags)
    }

    struct T {
        r: Reassembler,
        c: Counters,
        buf: PacketBuf,
    }

    impl T {
        fn new(limits: Limits) -> T {
            T {
                r: Reassembler::new(limits),
                c: Counters::default(),
                buf: PacketBuf::new(),
            }
        }

        fn push(&mut self, f: &[u8], secs: u64) -> Outcome {
            assert!(self.buf.load(f));
            let info = packet::parse(f).unwrap();
            assert!(info.fragment && wanted(f, &info), "a wanted fragment");
            self.r
                .push(&mut self.buf, &info, Duration::from_secs(secs), &mut self.c)
        }

        fn drops(&self, r: DropReason) -> u64 {
            self.c.drop_count(r)
        }
    }

    #[test]
    fn every_order_gives_the_original() {
        for v6 in [false, true] {
            let (whole, frags) = esp(v6, 3000, 1024, 77);
            let orders = [
                [0, 1, 2],
                [0, 2, 1],
                [1, 0, 2],
                [1, 2, 0],
                [2, 0, 1],
                [2, 1, 0],
            ];
            for o in orders {
                let mut t = T::new(Limits::default());
                assert_eq!(t.push(&frags[o[0]], 0), Outcome::Held);
                assert_eq!(t.push(&frags[o[1]], 0), Outcome::Held);
                assert_eq!(t.push(&frags[o[2]], 0), Outcome::Complete, "{o:?}");
                assert_eq!(t.buf.data(), &whole[..], "v6 {v6} {o:?}");
                assert_eq!((t.r.in_progress(), t.r.bytes()), (0, 0));
            }
        }
    }

    #[test]
    fn interleaved_datagrams_stay_apart() {
        let (w1, f1) = esp(true, 2000, 1000, 1);
        let (w2, f2) = esp(true, 2000, 1000, 2);
        let mut t = T::new(Limits::default());
        assert_eq!(t.push(&f1[0], 0), Outcome::Held);
        assert_eq!(t.push(&f2[1], 0), Outcome::Held);
        assert_eq!(t.push(&f2[0], 0), Outcome::Complete);
        assert_eq!(t.buf.data(), &w2[..]);
        assert_eq!(t.push(&f1[1], 0), Outcome::Complete);
        assert_eq!(t.buf.data(), &w1[..]);
    }

    #[test]
    fn an_exact_duplicate_is_dropped_alone() {
        let (whole, frags) = esp(true, 3000, 1024, 5);
        let mut t = T::new(Limits::default());
        assert_eq!(t.push(&frags[0], 0), Outcome::Held);
        assert_eq!(
            t.push(&frags[0], 0),
            Outcome::Dropped(DropReason::FragDuplicate)
        );
        assert_eq!(t.push(&frags[2], 0), Outcome::Held);
        assert_eq!(
            t.push(&frags[2], 0),
            Outcome::Dropped(DropReason::FragDuplicate)
        );
        assert_eq!(t.push(&frags[1], 0), Outcome::Complete);
        assert_eq!(t.buf.data(), &whole[..]);
        assert_eq!(t.drops(DropReason::FragDuplicate), 2);
        // The same place with other bytes is an overlap.
        let mut t = T::new(Limits::default());
        t.push(&frags[0], 0);
        let mut other = frags[0].clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(t.push(&other, 0), Outcome::Dropped(DropReason::FragOverlap));
    }

    #[test]
    fn overlaps_and_contradictions_poison_the_datagram() {
        let (_, frags) = esp(true, 3000, 1024, 5);
        // [0,1024) [1024,2048) [2048,3000)
        let shifted = |f: &[u8], by: i32, more: Option<bool>| {
            let mut f = f.to_vec();
            let fo = packet::be16(&f, 42);
            let off = ((fo & 0xfff8) as i32 + by) as u16;
            let m = more.unwrap_or(fo & 1 != 0) as u16;
            f[42..44].copy_from_slice(&(off | m).to_be_bytes());
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("overlaps the next", shifted(&frags[0], 8, None)),
            ("a second last fragment", shifted(&frags[1], 0, Some(false))),
            ("beyond the end", shifted(&frags[1], 2048, None)),
        ];
        for (what, evil) in cases {
            let mut t = T::new(Limits::default());
            assert_eq!(t.push(&frags[1], 0), Outcome::Held);
            assert_eq!(t.push(&frags[2], 0), Outcome::Held);
            assert_eq!(
                t.push(&evil, 1),
                Outcome::Dropped(DropReason::FragOverlap),
                "{what}"
            );
            assert_eq!(t.drops(DropReason::FragOverlap), 3, "{what}: all three");
            assert_eq!(t.r.bytes(), 0, "{what}: memory released");
            // Later fragments of it are refused until the timeout...
            assert_eq!(
                t.push(&frags[0], 59),
                Outcome::Dropped(DropReason::FragOverlap)
            );
            // ...after which the identification starts afresh.
            assert_eq!(t.push(&frags[0], 61), Outcome::Held);
        }
        // A last fragment that ends before data already held (at offset
        // 0 it would be atomic, and go on alone).
        let mut t = T::new(Limits::default());
        assert_eq!(t.push(&frags[2], 0), Outcome::Held);
        let early_end = shifted(&frags[1], -1024 + 8, Some(false));
        assert_eq!(
            t.push(&early_end, 0),
            Outcome::Dropped(DropReason::FragOverlap)
        );
    }

    #[test]
    fn atomic_fragments_go_on_alone() {
        let (whole, frags) = esp(true, 500, 1024, 9);
        assert_eq!(frags.len(), 1, "offset 0 and M clear: atomic");
        let (_, pending) = esp(true, 3000, 1024, 9);
        let mut t = T::new(Limits::default());
        assert_eq!(t.push(&pending[0], 0), Outcome::Held);
        assert_eq!(t.push(&frags[0], 0), Outcome::Complete);
        assert_eq!(t.buf.data(), &whole[..]);
        // the datagram in progress under the same identification is intact
        assert_eq!(t.push(&pending[1], 0), Outcome::Held);
        assert_eq!(t.push(&pending[2], 0), Outcome::Complete);
        // A copy of an atomic fragment comes out again, as a copy of a
        // whole packet would: replays are for IPsec to refuse (found by
        // the reassembly fuzz target, whose check assumed otherwise).
        assert_eq!(t.push(&frags[0], 1), Outcome::Complete);
        assert_eq!(t.c.reassembled, 3);
    }

    #[test]
    fn malformed_and_oversized_fragments() {
        let (_, frags) = esp(true, 3000, 1024, 3);
        let mut t = T::new(Limits::default());
        // a non-last fragment whose length is not a multiple of 8
        let mut odd = frags[0].clone();
        odd.pop();
        fix_lengths(&mut odd);
        assert_eq!(t.push(&odd, 0), Outcome::Dropped(DropReason::Malformed));
        // an empty one
        let mut empty = frags[1][..48].to_vec();
        fix_lengths(&mut empty);
        assert_eq!(t.push(&empty, 0), Outcome::Dropped(DropReason::Malformed));
        // data beyond 65535 bytes of payload
        let mut far = frags[2].clone();
        far[42..44].copy_from_slice(&0xfff8u16.to_be_bytes());
        assert_eq!(t.push(&far, 0), Outcome::Dropped(DropReason::TooBig));
        assert_eq!(t.r.in_progress(), 0);
        // IPv4 too
        let (_, v4) = esp(false, 3000, 1024, 3);
        let mut far = v4[2].clone();
        far[6..8].copy_from_slice(&0x1fffu16.to_be_bytes());
        assert_eq!(t.push(&far, 0), Outcome::Dropped(DropReason::TooBig));
    }

    #[test]
    fn memory_is_bounded() {
        let limits = Limits {
            max_datagrams: 2,
            max_bytes: 5000,
            max_fragments: 4,
            ..Limits::default()
        };
        // Too many datagrams: the oldest goes.
        let mut t = T::new(limits);
        for id in 1..=3u32 {
            let (_, f) = esp(true, 2000, 1000, id);
            assert_eq!(t.push(&f[0], id as u64), Outcome::Held);
        }
        assert_eq!(t.r.in_progress(), 2);
        assert_eq!(t.drops(DropReason::FragLimit), 1);
        let (_, f1) = esp(true, 2000, 1000, 1);
        assert_eq!(t.push(&f1[1], 5), Outcome::Held, "id 1 was evicted");
        // Too many bytes: older datagrams make room.
        let mut t = T::new(limits);
        let (_, a) = esp(true, 4096, 1024, 1);
        let (_, b) = esp(true, 8192, 1024, 2);
        assert_eq!(t.push(&a[2], 0), Outcome::Held); // 3072 bytes
        assert_eq!(t.push(&b[1], 1), Outcome::Held); // 2048 more: a goes
        assert_eq!(t.drops(DropReason::FragLimit), 1, "a was evicted");
        assert_eq!((t.r.in_progress(), t.r.bytes()), (1, 2048));
        // One datagram larger than the budget is given up.
        assert_eq!(t.push(&b[7], 1), Outcome::Dropped(DropReason::FragLimit));
        assert_eq!(t.drops(DropReason::FragLimit), 3, "b's two fragments");
        assert_eq!((t.r.in_progress(), t.r.bytes()), (0, 0));
        // Too many fragments.
        let mut t = T::new(limits);
        let (_, f) = esp(true, 800, 128, 4);
        for (i, frag) in f.iter().enumerate().take(4) {
            assert_eq!(t.push(frag, 0), Outcome::Held, "{i}");
        }
        assert_eq!(t.push(&f[4], 0), Outcome::Dropped(DropReason::FragLimit));
        assert_eq!(t.drops(DropReason::FragLimit), 5);
    }

    /// Fragments of a made-up IPv6 ESP datagram of `len` bytes, cut at
    /// `cuts`: (whole, fragments).
    fn cut(id: u32, len: usize, cuts: &[usize]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (whole, _) = esp(true, len, len, id);
        let mut bounds = vec![0];
        bounds.extend_from_slice(cuts);
        bounds.push(len);
        let frags = bounds
            .windows(2)
            .map(|w| {
                let mut f = whole[..40].to_vec();
                f[6] = packet::PROTO_FRAGMENT;
                f.extend_from_slice(&[packet::PROTO_ESP, 0]);
                let more = (w[1] < len) as u16;
                f.extend_from_slice(&(w[0] as u16 | more).to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
                f.extend_from_slice(&whole[40 + w[0]..40 + w[1]]);
                fix_lengths(&mut f);
                f
            })
            .collect();
        (whole, frags)
    }

    #[test]
    fn making_room_never_evicts_the_datagram_it_makes_room_for() {
        // Found by the reassembly fuzz target: evicting moved the last
        // datagram in the list, and the next eviction in the same round
        // could pick the one the fragment belonged to (a panic).
        let limits = Limits {
            max_bytes: 2300,
            ..Limits::default()
        };
        let mut t = T::new(limits);
        let (_, a) = cut(1, 1000, &[512]);
        let (_, d) = cut(2, 520, &[512]);
        let (whole, ours) = cut(3, 512 + 1200, &[512]);
        let (_, n) = cut(4, 1000, &[512]);
        assert_eq!(t.push(&a[0], 0), Outcome::Held);
        assert_eq!(t.push(&d[0], 1), Outcome::Held);
        assert_eq!(t.push(&ours[0], 2), Outcome::Held);
        assert_eq!(t.push(&n[0], 3), Outcome::Held);
        // d completes and leaves: the list is [a, n, ours]
        assert_eq!(t.push(&d[1], 4), Outcome::Complete);
        // 1200 more bytes for ours: a and n must both go, not ours.
        assert_eq!(t.push(&ours[1], 5), Outcome::Complete);
        assert_eq!(t.buf.data(), &whole[..]);
        assert_eq!(t.drops(DropReason::FragLimit), 2);
        assert_eq!((t.r.in_progress(), t.r.bytes()), (0, 0));
    }

    #[test]
    fn the_first_to_arrive_is_evicted_first() {
        // IPv6 waits longer (60 s) than IPv4 (30 s): arrival decides.
        let limits = Limits {
            max_datagrams: 2,
            ..Limits::default()
        };
        let mut t = T::new(limits);
        let (_, six) = esp(true, 2000, 1000, 1);
        let (_, four) = esp(false, 2000, 1000, 2);
        let (_, other) = esp(true, 2000, 1000, 3);
        assert_eq!(t.push(&six[0], 0), Outcome::Held);
        assert_eq!(t.push(&four[0], 10), Outcome::Held);
        assert_eq!(t.push(&other[0], 20), Outcome::Held);
        assert_eq!(t.drops(DropReason::FragLimit), 1);
        assert_eq!(t.push(&four[1], 20), Outcome::Complete, "IPv4 kept");
    }

    #[test]
    fn flush_counts_what_waits() {
        let (_, f) = esp(false, 3000, 1024, 3);
        let mut t = T::new(Limits::default());
        t.push(&f[0], 0);
        t.push(&f[1], 0);
        t.r.flush(&mut t.c);
        assert_eq!(t.drops(DropReason::FragIncomplete), 2);
        assert_eq!((t.r.in_progress(), t.r.bytes()), (0, 0));
    }

    /// Reassemble `frags` pushed in reverse order (the last one first):
    /// the datagram.
    fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
        let mut t = T::new(Limits::default());
        for (k, f) in frags.iter().rev().enumerate() {
            let want = if k + 1 == frags.len() {
                Outcome::Complete
            } else {
                Outcome::Held
            };
            assert_eq!(t.push(f, 0), want, "fragment {k} from the end");
        }
        t.buf.data().to_vec()
    }

    #[test]
    fn ipv4_fragments_copy_only_the_options_marked_copied() {
        // Router alert (copied), record route and timestamp (not copied),
        // a NOP and EOL: 20 + 4 + 7 + 1 + 12 = 44 bytes of header.
        let mut p = vec![
            0x40 | 11,
            0,
            0,
            0,
            0xbe,
            0xef,
            0,
            0,
            64,
            packet::PROTO_ESP,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        p.extend_from_slice(&[0x94, 4, 0, 0]);
        p.extend_from_slice(&[7, 7, 4, 0, 0, 0, 0]);
        p.push(IPOPT_NOOP);
        p.extend_from_slice(&[0x44, 12, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p.len(), 44);
        p.extend((0..2500u32).map(|i| (i * 7) as u8));
        fix_lengths(&mut p);
        let frags = fragment(&p, 1000, 0x1234_5678).unwrap();
        assert_eq!(frags.len(), 3);
        let mut later = p[..44].to_vec();
        later[24..31].fill(IPOPT_NOOP);
        later[32..44].fill(IPOPT_NOOP);
        for (i, f) in frags.iter().enumerate() {
            let info = packet::parse(f).unwrap();
            assert!(info.fragment);
            assert_eq!(info.insert_at, 44, "every header keeps its length");
            assert_eq!(&f[4..6], &[0xbe, 0xef], "the datagram's identification");
            let fo = packet::be16(f, 6);
            assert_eq!(fo & 0x1fff, (i * 1000 / 8) as u16);
            assert_eq!(fo & 0x2000 != 0, i < 2, "MF");
            let head = if i == 0 { &p[..44] } else { &later[..] };
            assert_eq!(&f[8..10], &head[8..10], "TTL and protocol");
            assert_eq!(
                &f[12..44],
                &head[12..44],
                "addresses and options of fragment {i}"
            );
            assert_eq!(
                packet::checksum(&f[..44]),
                0,
                "header checksum of fragment {i}"
            );
        }
        assert_eq!(frags[2].len(), 44 + 500);
        assert_eq!(reassemble(&frags), p);
    }

    #[test]
    fn ipv6_fragments_repeat_the_unfragmentable_part() {
        // Hop-by-hop, destination options, a routing header (type 2, one
        // address), then destination options again (fragmentable: after
        // the routing header), then ESP.
        let mut p = vec![0x60, 0, 0, 0, 0, 0, packet::PROTO_HOPOPTS, 64];
        p.extend_from_slice(&[0xfd; 16]);
        p.extend_from_slice(&[0xfe; 16]);
        p.extend_from_slice(&[packet::PROTO_DSTOPTS, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&[packet::PROTO_ROUTING, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&[packet::PROTO_DSTOPTS, 2, 2, 1, 0, 0, 0, 0]);
        p.extend_from_slice(&[0x20; 16]);
        let unfrag = p.len();
        p.extend_from_slice(&[packet::PROTO_ESP, 0, 1, 4, 0, 0, 0, 0]);
        p.extend((0..3000u32).map(|i| (i * 3) as u8));
        fix_lengths(&mut p);
        let frags = fragment(&p, 1027, 0xfeed).unwrap();
        assert_eq!(frags.len(), 3, "1027 rounds down to 1024");
        for (i, f) in frags.iter().enumerate() {
            assert_eq!(&f[..4], &p[..4]);
            assert_eq!(packet::be16(f, 4) as usize, f.len() - 40, "payload length");
            assert_eq!(&f[6..unfrag - 24], &p[6..unfrag - 24]);
            assert_eq!(
                f[unfrag - 24],
                packet::PROTO_FRAGMENT,
                "the routing header names it"
            );
            assert_eq!(&f[unfrag - 23..unfrag], &p[unfrag - 23..unfrag]);
            let fh = &f[unfrag..unfrag + 8];
            assert_eq!(
                fh[0],
                packet::PROTO_DSTOPTS,
                "what followed the routing header"
            );
            assert_eq!(packet::be16(fh, 2), (i * 1024) as u16 | (i < 2) as u16);
            assert_eq!(packet::be32(fh, 4), 0xfeed);
        }
        assert_eq!(reassemble(&frags), p);
    }

    #[test]
    fn what_fragment_refuses_or_leaves_whole() {
        let (whole4, _) = esp(false, 100, 1024, 1);
        let (whole6, _) = esp(true, 100, 1024, 1);
        assert_eq!(
            fragment(&whole4, 1024, 0).unwrap(),
            vec![whole4.clone()],
            "fits"
        );
        let atomic = fragment(&whole6, 1024, 0x77).unwrap();
        assert_eq!(atomic.len(), 1);
        let info = packet::parse(&atomic[0]).unwrap();
        assert!(
            info.fragment && !info.later_fragment,
            "IPv6: an atomic fragment"
        );
        let mut t = T::new(Limits::default());
        assert_eq!(t.push(&atomic[0], 0), Outcome::Complete);
        assert_eq!(t.buf.data(), &whole6[..]);

        let mut df = whole4.clone();
        df[6] = 0x40;
        fix_lengths(&mut df);
        assert_eq!(fragment(&df, 16, 0), Err(FragmentError::DontFragment));
        assert_eq!(
            fragment(&df, 1024, 0).unwrap(),
            vec![df.clone()],
            "DF, but it fits"
        );
        let (_, frags) = esp(true, 100, 16, 1);
        assert_eq!(fragment(&frags[0], 8, 0), Err(FragmentError::Fragment));
        let (_, frags) = esp(false, 100, 16, 1);
        assert_eq!(fragment(&frags[1], 8, 0), Err(FragmentError::Fragment));
        assert_eq!(fragment(&whole4[..50], 8, 0), Err(FragmentError::Malformed));
        assert_eq!(fragment(&[], 8, 0), Err(FragmentError::Malformed));
        // Headers alone: nothing to cut.
        let mut bare = whole6[..40].to_vec();
        fix_lengths(&mut bare);
        assert_eq!(fragment(&bare, 8, 0).unwrap(), vec![bare.clone()]);
        // A size under 8 is 8.
        assert_eq!(fragment(&whole4, 3, 0).unwrap().len(), 100 / 8 + 1);
    }
}
