//! `tunsec pcap`: run the engine over a capture file, no kernel involved.
//!
//! Reads pcap and pcapng (link types RAW, Ethernet, Linux cooked v1/v2,
//! IPv4, IPv6, BSD loopback), writes pcap with linktype RAW (bare IP
//! packets). Packet timestamps are
//! the engine's clock, relative to the first packet, so SA lifetimes play
//! out as they would have live.

use crate::buf::PacketBuf;
use crate::engine::{self, Counters, DropReason, Event, Verdict, Worker};
use crate::packet;
use crate::state::State;
use anyhow::{Context, Result, bail};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::{
    Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption,
};
use pcap_file::{DataLink, Endianness};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
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
    /// Where the walk stopped at a damaged record, if it did (the
    /// message names the input).
    pub damaged: Option<String>,
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

    /// `reassembled N datagrams from M fragments`, when fragments of IPsec
    /// packets were merged: then read = written + dropped + M - N.
    pub fn fragments_line(&self) -> Option<String> {
        (self.counters.fragments > 0).then(|| {
            format!(
                "reassembled {} datagrams from {} fragments",
                self.counters.reassembled, self.counters.fragments
            )
        })
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

/// The link types read, as `--help` and errors name them.
pub const LINK_TYPES: &str =
    "RAW (or IPv4, IPv6), Ethernet (VLAN tags too), Linux cooked v1 and v2, BSD loopback";

fn supported(link: DataLink) -> bool {
    matches!(
        link,
        DataLink::RAW
            | DataLink::IPV4
            | DataLink::IPV6
            | DataLink::ETHERNET
            | DataLink::LINUX_SLL
            | DataLink::LINUX_SLL2
            | DataLink::NULL
            | DataLink::LOOP
    )
}

/// A pcapng timestamp in units of `if_tsresol` (RFC-to-be
/// draft-ietf-opsawg-pcapng 4.2: 10^-n seconds, or 2^-n with the top bit
/// set; microseconds by default). pcap-file hands the raw count over as
/// nanoseconds, whatever the interface said.
fn pcapng_time(raw: u64, tsresol: u8) -> Duration {
    let n = (tsresol & 0x7f) as u32;
    let nanos: u128 = if tsresol & 0x80 != 0 {
        (raw as u128 * 1_000_000_000) >> n.min(127)
    } else if n <= 9 {
        raw as u128 * 10u128.pow(9 - n)
    } else {
        raw as u128 / 10u128.pow((n - 9).min(38))
    };
    Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
}

/// Per pcapng interface: link type, if_tsresol, if_tsoffset (seconds,
/// signed in the format; pcap-file hands it over unsigned).
#[derive(Clone, Copy)]
struct Iface {
    link: DataLink,
    tsresol: u8,
    tsoffset: i64,
}

/// Call `f` with (timestamp, link type, frame) for every packet of a pcap
/// or pcapng file; the timestamp is `None` for pcapng simple packet blocks,
/// which carry none. Errors in the file's header are returned; a damaged
/// record ends the walk with a message, as a truncated capture would.
/// Frames of a link type tunsec cannot read reach `f` too (and are counted
/// as not IP): a pcapng file may describe interfaces it never uses.
fn for_each_frame<R: Read>(
    name: &str,
    mut file: R,
    damaged_at: &mut Option<String>,
    mut f: impl FnMut(Option<Duration>, DataLink, &[u8]) -> Result<()>,
) -> Result<()> {
    let header = lenient_header(&mut file).with_context(|| format!("cannot read {name}"))?;
    let mut damaged = |e: &dyn std::fmt::Display| {
        *damaged_at = Some(format!("{name}: stopped at a damaged record: {e}"));
    };
    if header.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
        let mut reader = PcapNgReader::new(std::io::Cursor::new(header).chain(file))
            .with_context(|| format!("{name}: not a readable pcapng file"))?;
        let mut little = reader.section().endianness == Endianness::Little;
        let mut ifaces: Vec<Iface> = Vec::new();
        while let Some(block) = reader.next_block() {
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    damaged(&e);
                    break;
                }
            };
            // (interface, raw timestamp, data, captured length)
            let (iface, raw, data, len) = match block {
                Block::SectionHeader(shb) => {
                    little = shb.endianness == Endianness::Little;
                    ifaces.clear();
                    continue;
                }
                Block::InterfaceDescription(idb) => {
                    let mut i = Iface {
                        link: idb.linktype,
                        tsresol: 6,
                        tsoffset: 0,
                    };
                    for o in &idb.options {
                        match o {
                            InterfaceDescriptionOption::IfTsResol(r) => i.tsresol = *r,
                            InterfaceDescriptionOption::IfTsOffset(s) => i.tsoffset = *s as i64,
                            _ => {}
                        }
                    }
                    ifaces.push(i);
                    continue;
                }
                // pcap-file hands the raw count over as nanoseconds.
                Block::EnhancedPacket(p) => {
                    let len = p.data.len();
                    (
                        p.interface_id as usize,
                        Some(p.timestamp.as_nanos() as u64),
                        p.data,
                        len,
                    )
                }
                // The obsolete packet block: pcap-file reads its two 32-bit
                // halves as one 64-bit number, swapped in little-endian
                // sections.
                Block::Packet(p) => {
                    let t = if little {
                        p.timestamp.rotate_left(32)
                    } else {
                        p.timestamp
                    };
                    let len = p.data.len();
                    (p.interface_id as usize, Some(t), p.data, len)
                }
                // No timestamp, and the data runs to the end of the block:
                // the packet is its original length, padding aside.
                Block::SimplePacket(p) => {
                    let len = p.data.len().min(p.original_len as usize);
                    (0, None, p.data, len)
                }
                _ => continue,
            };
            let Some(&i) = ifaces.get(iface) else {
                damaged(&format!(
                    "a packet names interface {iface}, which is not described"
                ));
                break;
            };
            let t = raw.map(|r| {
                let t = pcapng_time(r, i.tsresol);
                let off = Duration::from_secs(i.tsoffset.unsigned_abs());
                if i.tsoffset >= 0 {
                    t.saturating_add(off)
                } else {
                    t.saturating_sub(off)
                }
            });
            f(t, i.link, &data[..len])?;
        }
        return Ok(());
    }
    let mut reader = PcapReader::new(std::io::Cursor::new(header).chain(file))
        .with_context(|| format!("{name}: not a readable pcap file"))?;
    let link = reader.header().datalink;
    if !supported(link) {
        bail!("{name}: unsupported link type {link:?} (tunsec reads {LINK_TYPES})");
    }
    while let Some(p) = reader.next_packet() {
        match p {
            Ok(p) => f(Some(p.timestamp), link, &p.data)?,
            Err(e) => {
                damaged(&e);
                break;
            }
        }
    }
    Ok(())
}

/// Run the engine in `dir` over `input`, writing what it emits to `output`.
pub fn run(
    state: &State,
    dir: Direction,
    input: &Path,
    output: &Path,
    seed: [u8; 32],
) -> Result<Summary> {
    let file = File::open(input).with_context(|| format!("cannot open {}", input.display()))?;
    // The output is created with the first frame (or at the end), so that
    // an unreadable input leaves no empty output behind.
    let create = || -> Result<BufWriter<File>> {
        let out =
            File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
        Ok(BufWriter::new(out))
    };
    run_with(
        state,
        dir,
        &input.display().to_string(),
        BufReader::new(file),
        &output.display().to_string(),
        create,
        seed,
    )
}

/// [`run`] over a capture in memory; returns the summary and the pcap
/// written (empty when the input was unusable).
pub fn run_bytes(
    state: &State,
    dir: Direction,
    input: &[u8],
    seed: [u8; 32],
) -> Result<(Summary, Vec<u8>)> {
    let mut out = Vec::new();
    let summary = run_with(state, dir, "input", input, "output", || Ok(&mut out), seed)?;
    Ok((summary, out))
}

fn run_with<R: Read, W: Write>(
    state: &State,
    dir: Direction,
    name: &str,
    input: R,
    output: &str,
    create: impl FnOnce() -> Result<W>,
    seed: [u8; 32],
) -> Result<Summary> {
    let mut create = Some(create);
    let mut create = || -> Result<PcapWriter<W>> {
        let out = create.take().expect("the output is created once")()?;
        let header = PcapHeader {
            datalink: DataLink::RAW,
            snaplen: 65535 + 40,
            ..PcapHeader::default()
        };
        PcapWriter::with_header(out, header).with_context(|| format!("cannot write {output}"))
    };
    let mut writer = None;
    let mut w = Worker::new(seed);
    let mut buf = PacketBuf::new();
    let mut summary = Summary::default();
    // Engine time is relative to the first timestamp; a packet without one
    // (pcapng simple packet block) takes the previous packet's.
    let mut first: Option<Duration> = None;
    let mut last = (Duration::ZERO, Duration::ZERO); // (timestamp, now)
    let mut damaged = None;
    let walked = for_each_frame(name, input, &mut damaged, |timestamp, link, data| {
        let writer = match &mut writer {
            Some(wr) => wr,
            None => writer.insert(create()?),
        };
        summary.read += 1;
        if let Some(t) = timestamp {
            last = (t, t.saturating_sub(*first.get_or_insert(t)));
        }
        let (timestamp, now) = last;
        let Some(ip) = ip_payload(link, data) else {
            summary.not_ip += 1;
            return Ok(());
        };
        // Trim link-layer padding; a short packet stays short and is
        // reported malformed by the engine.
        let ip = match packet::ip_len(ip) {
            Some(n) if n <= ip.len() => &ip[..n],
            _ => ip,
        };
        if !buf.load(ip) {
            summary.counters.count_drop(DropReason::TooBig);
            return Ok(());
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
            let pkt = PcapPacket::new(timestamp, buf.len() as u32, buf.data());
            writer
                .write_packet(&pkt)
                .with_context(|| format!("cannot write {output}"))?;
            summary.written += 1;
        }
        Ok(())
    });
    summary.damaged = damaged;
    walked?;
    let writer = match writer {
        Some(wr) => wr,
        None => create()?,
    };
    writer
        .into_writer()
        .flush()
        .with_context(|| format!("cannot write {output}"))?;
    // Fragments still waiting will never be completed.
    w.flush_fragments();
    summary.counters.add(&w.counters);
    summary.events = std::mem::take(&mut w.events);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_named_link_types_are_the_supported_ones() {
        use pcap_file::DataLink as L;
        for (link, name) in [
            (L::RAW, "RAW"),
            (L::IPV4, "IPv4"),
            (L::IPV6, "IPv6"),
            (L::ETHERNET, "Ethernet (VLAN"),
            (L::LINUX_SLL, "Linux cooked v1"),
            (L::LINUX_SLL2, "v2"),
            (L::NULL, "BSD loopback"),
            (L::LOOP, "BSD loopback"),
        ] {
            assert!(super::supported(link), "{link:?}");
            assert!(super::LINK_TYPES.contains(name), "{name} is not named");
        }
        for link in [L::IEEE802_11, L::PPP, L::USER0] {
            assert!(!super::supported(link), "{link:?}");
        }
    }

    use super::*;

    #[test]
    fn pcapng_timestamp_resolutions() {
        let s = |secs: f64| Duration::from_secs_f64(secs);
        assert_eq!(pcapng_time(1_500_000, 6), s(1.5)); // the default: µs
        assert_eq!(pcapng_time(1_500_000_000, 9), s(1.5));
        assert_eq!(pcapng_time(15, 1), s(1.5));
        assert_eq!(pcapng_time(3, 0x81), s(1.5)); // 2^-1 s
        assert_eq!(pcapng_time(3 << 19, 0x94), s(1.5)); // 2^-20 s
        assert_eq!(pcapng_time(1_500_000_000_000, 12), s(1.5)); // ps
        // Absurd resolutions saturate instead of overflowing.
        assert_eq!(pcapng_time(u64::MAX, 0), Duration::from_nanos(u64::MAX));
        assert_eq!(pcapng_time(u64::MAX, 0xff), Duration::ZERO);
        assert_eq!(pcapng_time(u64::MAX, 127), Duration::ZERO);
    }

    /// A pcapng block of type `t` (little-endian).
    fn block(t: u32, body: &[u8]) -> Vec<u8> {
        let len = 12 + body.len().div_ceil(4) * 4;
        let mut b = t.to_le_bytes().to_vec();
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.extend_from_slice(body);
        b.resize(len - 4, 0);
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b
    }

    /// Section header and one interface of `link` (with if_tsresol and
    /// if_tsoffset options when given).
    fn section(link: u16, tsresol: Option<u8>, tsoffset: Option<u64>) -> Vec<u8> {
        let mut f = block(
            0x0a0d0d0a,
            &[
                0x4d, 0x3c, 0x2b, 0x1a, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        );
        let mut idb = link.to_le_bytes().to_vec();
        idb.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        if let Some(r) = tsresol {
            idb.extend_from_slice(&[9, 0, 1, 0, r, 0, 0, 0]);
        }
        if let Some(o) = tsoffset {
            idb.extend_from_slice(&[14, 0, 8, 0]);
            idb.extend_from_slice(&o.to_le_bytes());
        }
        idb.extend_from_slice(&[0, 0, 0, 0]);
        f.extend(block(1, &idb));
        f
    }

    /// Enhanced packet block (type 6) or the obsolete packet block (type 2).
    fn packet(t: u32, iface: u32, ts: u64, data: &[u8]) -> Vec<u8> {
        let mut b = if t == 6 {
            iface.to_le_bytes().to_vec()
        } else {
            let mut b = (iface as u16).to_le_bytes().to_vec();
            b.extend_from_slice(&[0, 0]); // drops
            b
        };
        b.extend_from_slice(&((ts >> 32) as u32).to_le_bytes());
        b.extend_from_slice(&(ts as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        block(t, &b)
    }

    fn simple(data: &[u8]) -> Vec<u8> {
        let mut b = (data.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(data);
        block(3, &b)
    }

    type Frame = (Option<Duration>, DataLink, Vec<u8>);

    fn frames(file: &[u8]) -> (Result<()>, Vec<Frame>) {
        let mut got = Vec::new();
        let r = for_each_frame("x.pcapng", file, &mut None, |t, l, d| {
            got.push((t, l, d.to_vec()));
            Ok(())
        });
        (r, got)
    }

    #[test]
    fn in_memory_runs_report_a_damaged_record() {
        let seed = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/seed-b.pcap"
        ))
        .unwrap();
        let state = State::default();
        let (whole, out) = run_bytes(&state, Direction::In, &seed, [0; 32]).unwrap();
        assert!(whole.read > 2 && whole.damaged.is_none(), "{whole:?}");
        assert_eq!(whole.written, whole.read, "no policy: everything passes");
        assert!(out.len() > 24);
        let (cut, _) = run_bytes(&state, Direction::In, &seed[..seed.len() - 3], [0; 32]).unwrap();
        assert_eq!(cut.read, whole.read - 1);
        let d = cut.damaged.expect("a damaged record");
        assert!(d.starts_with("input: stopped at a damaged record"), "{d}");
        assert!(run_bytes(&state, Direction::In, b"garbage", [0; 32]).is_err());
    }

    #[test]
    fn pcapng_frames_carry_their_interface_and_time() {
        let ms = |m| Some(Duration::from_millis(m));
        // if_tsresol 3 (ms); an enhanced block, the obsolete packet block
        // (its halves read the right way round: 2^32 + 5 ms), a simple one.
        let mut f = section(101, Some(3), None);
        f.extend(packet(6, 0, 2500, b"abc"));
        f.extend(packet(2, 0, (1 << 32) + 5, b"de"));
        f.extend(simple(b"fg"));
        let (r, got) = frames(&f);
        r.unwrap();
        assert_eq!(
            got,
            vec![
                (ms(2500), DataLink::RAW, b"abc".to_vec()),
                (ms((1 << 32) + 5), DataLink::RAW, b"de".to_vec()),
                (None, DataLink::RAW, b"fg".to_vec()),
            ]
        );
        // if_tsoffset adds whole seconds, maybe negative (it is signed);
        // the default resolution is µs.
        let mut f = section(1, None, Some(100));
        f.extend(packet(6, 0, 1_500_000, b"x"));
        assert_eq!(frames(&f).1[0].0, ms(101_500));
        let mut f = section(1, None, Some(-1i64 as u64));
        f.extend(packet(6, 0, 1_500_000, b"x"));
        f.extend(packet(6, 0, 500_000, b"y"));
        let got = frames(&f).1;
        assert_eq!((got[0].0, got[1].0), (ms(500), ms(0)));
        // A link type tunsec cannot read still yields its frames (the run
        // counts them as not IP) rather than failing the file.
        let mut f = section(105, None, None);
        f.extend(packet(6, 0, 1, b"x"));
        let (r, got) = frames(&f);
        r.unwrap();
        assert_eq!(got.len(), 1);
        assert!(ip_payload(got[0].1, &got[0].2).is_none());
        // A packet naming an interface never described ends the walk
        // after the good ones.
        let mut f = section(1, None, None);
        f.extend(packet(6, 0, 1, b"ok"));
        f.extend(packet(6, 3, 2, b"bad"));
        let (r, got) = frames(&f);
        r.unwrap();
        assert_eq!(got.len(), 1);
    }

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
