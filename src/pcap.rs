//! `tunsec pcap`: run the engine over a capture file, no kernel involved.
//!
//! Reads pcap (linktype RAW, Ethernet, Linux cooked v1/v2, IPv4, IPv6),
//! writes pcap with linktype RAW (bare IP packets). Packet timestamps are
//! the engine's clock, relative to the first packet, so SA lifetimes play
//! out as they would have live.

use crate::buf::PacketBuf;
use crate::engine::{self, Counters, DropReason, Event, Verdict, Worker};
use crate::packet;
use crate::state::State;
use anyhow::{Context, Result, bail};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Out,
    In,
}

/// What a run did, for the summary line.
#[derive(Debug, Default)]
pub struct Summary {
    pub read: u64,
    pub written: u64,
    /// Frames that are not IP at all (ARP, truncated link headers).
    pub not_ip: u64,
    pub counters: Counters,
    pub events: Vec<Event>,
}

impl Summary {
    pub fn dropped(&self) -> u64 {
        self.counters.total_drops() + self.not_ip
    }

    /// `read N, written N, dropped N (reason N, ...)`
    pub fn line(&self) -> String {
        let mut s = format!(
            "read {}, written {}, dropped {}",
            self.read,
            self.written,
            self.dropped()
        );
        let mut parts: Vec<String> = DropReason::ALL
            .iter()
            .filter(|r| self.counters.drop_count(**r) > 0)
            .map(|r| format!("{} {}", r.name(), self.counters.drop_count(*r)))
            .collect();
        if self.not_ip > 0 {
            parts.push(format!("not-ip {}", self.not_ip));
        }
        if !parts.is_empty() {
            s.push_str(&format!(" ({})", parts.join(", ")));
        }
        s
    }
}

/// The IP packet inside a frame of the given link type, if any.
pub fn ip_payload(link: DataLink, frame: &[u8]) -> Option<&[u8]> {
    let (ethertype, rest) = match link {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => return Some(frame),
        DataLink::ETHERNET => {
            let mut off = 12;
            let mut et = packet::be16(frame.get(..14)?, 12);
            // 802.1Q / 802.1ad tags
            while et == 0x8100 || et == 0x88a8 {
                off += 4;
                et = packet::be16(frame.get(..off + 2)?, off);
            }
            (et, frame.get(off + 2..)?)
        }
        DataLink::LINUX_SLL => (packet::be16(frame.get(..16)?, 14), frame.get(16..)?),
        DataLink::LINUX_SLL2 => (packet::be16(frame.get(..20)?, 0), frame.get(20..)?),
        DataLink::NULL | DataLink::LOOP => {
            let fam = frame.get(..4)?;
            let f = u32::from_le_bytes(fam.try_into().ok()?)
                .max(u32::from_be_bytes(fam.try_into().ok()?));
            return match f {
                2 => Some(&frame[4..]),
                24 | 28 | 30 => Some(&frame[4..]),
                _ => None,
            };
        }
        _ => return None,
    };
    match ethertype {
        0x0800 | 0x86dd => Some(rest),
        _ => None,
    }
}

/// Run the engine in `dir` over `input`, writing what it emits to `output`.
pub fn run(
    state: &State,
    dir: Direction,
    input: &Path,
    output: &Path,
    seed: [u8; 32],
) -> Result<Summary> {
    let f = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    let mut reader = PcapReader::new(BufReader::new(f))
        .with_context(|| format!("{}: not a readable pcap file", input.display()))?;
    let link = reader.header().datalink;
    if !matches!(
        link,
        DataLink::RAW
            | DataLink::IPV4
            | DataLink::IPV6
            | DataLink::ETHERNET
            | DataLink::LINUX_SLL
            | DataLink::LINUX_SLL2
            | DataLink::NULL
            | DataLink::LOOP
    ) {
        bail!(
            "{}: unsupported link type {:?} (use RAW or Ethernet)",
            input.display(),
            link
        );
    }
    let out =
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let header = PcapHeader {
        datalink: DataLink::RAW,
        snaplen: 65535 + 40,
        ..PcapHeader::default()
    };
    let mut writer = PcapWriter::with_header(BufWriter::new(out), header)
        .with_context(|| format!("cannot write {}", output.display()))?;

    let mut w = Worker::new(seed);
    let mut buf = PacketBuf::new();
    let mut summary = Summary::default();
    let mut first: Option<Duration> = None;
    while let Some(p) = reader.next_packet() {
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                eprintln!("{}: stopped at a damaged record: {e}", input.display());
                break;
            }
        };
        summary.read += 1;
        let now = p
            .timestamp
            .saturating_sub(*first.get_or_insert(p.timestamp));
        let Some(ip) = ip_payload(link, &p.data) else {
            summary.not_ip += 1;
            continue;
        };
        // Trim link-layer padding; a short packet stays short and is
        // reported malformed by the engine.
        let ip = match packet::ip_len(ip) {
            Some(n) if n <= ip.len() => &ip[..n],
            _ => ip,
        };
        if !buf.load(ip) {
            summary.counters.count_drop(DropReason::TooBig);
            continue;
        }
        let v = match dir {
            Direction::Out => engine::outbound(state, &mut w, &mut buf, now),
            Direction::In => engine::inbound(state, &mut w, &mut buf, now),
        };
        if v == Verdict::Forward {
            let pkt = PcapPacket::new(p.timestamp, buf.len() as u32, buf.data());
            writer
                .write_packet(&pkt)
                .with_context(|| format!("cannot write {}", output.display()))?;
            summary.written += 1;
        }
    }
    use std::io::Write;
    writer
        .into_writer()
        .flush()
        .with_context(|| format!("cannot write {}", output.display()))?;
    summary.counters.add(&w.counters);
    summary.events = std::mem::take(&mut w.events);
    Ok(summary)
}
