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
use std::io::{BufReader, BufWriter, Read};
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

/// The 24-byte pcap file header, with a snapshot length raised to at least
/// 256 KiB: some writers (scapy, for one) record 65535 while storing
/// larger packets, which libpcap reads but a strict reader refuses.
fn lenient_header<R: Read>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut h = vec![0u8; 24];
    let mut got = 0;
    while got < 24 {
        match r.read(&mut h[got..])? {
            0 => break,
            n => got += n,
        }
    }
    h.truncate(got);
    if got == 24 {
        let le = matches!(h[..4], [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1]);
        let be = matches!(h[..4], [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d]);
        let snap = |b: &[u8]| {
            let b: [u8; 4] = b.try_into().unwrap();
            if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        };
        if (le || be) && snap(&h[16..20]) < 262_144 {
            let v = if le {
                262_144u32.to_le_bytes()
            } else {
                262_144u32.to_be_bytes()
            };
            h[16..20].copy_from_slice(&v);
        }
    }
    Ok(h)
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
    let mut f = BufReader::new(f);
    let header =
        lenient_header(&mut f).with_context(|| format!("cannot read {}", input.display()))?;
    if header.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        bail!(
            "{}: pcapng is not supported; convert it with `editcap -F pcap {} OUT.pcap` (or capture with `tshark -F pcap`)",
            input.display(),
            input.display()
        );
    }
    let mut reader = PcapReader::new(std::io::Cursor::new(header).chain(f))
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
        // Offline, nobody answers the ACQUIRE: the packet is dropped.
        let v = if v == Verdict::Pending {
            w.give_up()
        } else {
            v
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_snaplen_is_raised_in_either_byte_order() {
        let mut le = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        le.extend_from_slice(&65535u32.to_le_bytes());
        le.extend_from_slice(&101u32.to_le_bytes());
        let h = lenient_header(&mut &le[..]).unwrap();
        assert_eq!(u32::from_le_bytes(h[16..20].try_into().unwrap()), 262_144);
        assert_eq!(h[20..], le[20..]);
        let mut be = vec![0xa1, 0xb2, 0xc3, 0xd4, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0];
        be.extend_from_slice(&1_000_000u32.to_be_bytes());
        be.extend_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            lenient_header(&mut &be[..]).unwrap(),
            be,
            "a large snaplen is kept"
        );
        assert_eq!(
            lenient_header(&mut &be[..7]).unwrap(),
            be[..7],
            "short input is passed on"
        );
    }

    #[test]
    fn link_layers() {
        let ip = [0x45u8, 0, 0, 20];
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x81, 0x00, 0x00, 0x05, 0x08, 0x00]);
        eth.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::ETHERNET, &eth), Some(&ip[..]));
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 1, 2]);
        assert_eq!(ip_payload(DataLink::ETHERNET, &arp), None);
        assert_eq!(ip_payload(DataLink::ETHERNET, &[0u8; 13]), None);
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x86, 0xdd]);
        sll.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::LINUX_SLL, &sll), Some(&ip[..]));
        assert_eq!(ip_payload(DataLink::RAW, &ip), Some(&ip[..]));
    }
}
