//! What the fuzz targets share: a state with every transform, keyed with
//! fixed keys, and plaintext packets built from fuzzer input. Everything
//! that is tested is tunsec's public API; nothing here re-implements it
//! (fragments are cut by `tunsec::reassembly::fragment`).

use arbitrary::{Result, Unstructured};
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tunsec::packet;
use tunsec::state::State;

/// One address pair per transform (IPv4 10.0.N.1 -> 10.0.N.2, IPv6
/// fd00::N:1 -> fd00::N:2), with the SAs' algorithms and the bundle.
pub struct Scenario {
    pub name: &'static str,
    /// `(proto, algorithms)` per SA, innermost first, as setkey writes them.
    pub sas: &'static [(&'static str, &'static str)],
    /// Extra SA flags (`-f esn`, `-r 32`...).
    pub flags: &'static str,
    pub rules: &'static str,
}

const K16: &str = "0x000102030405060708090a0b0c0d0e0f";
const K20: &str = "0x000102030405060708090a0b0c0d0e0f10111213";
const K32: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const K36: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223";
const K48: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f";
const K64: &str = "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "esp-gcm",
            sas: &[("esp", "GCM")],
            flags: "-r 64",
            rules: "esp/transport//require",
        },
        Scenario {
            name: "esp-cbc-sha256",
            sas: &[("esp", "CBC256")],
            flags: "-r 64",
            rules: "esp/transport//require",
        },
        Scenario {
            name: "esp-chacha",
            sas: &[("esp", "CHACHA")],
            flags: "-r 64",
            rules: "esp/transport//require",
        },
        Scenario {
            name: "esp-null-sha1",
            sas: &[("esp", "NULL")],
            flags: "-r 64",
            rules: "esp/transport//require",
        },
        Scenario {
            name: "ah-sha512",
            sas: &[("ah", "SHA512")],
            flags: "-r 64",
            rules: "ah/transport//require",
        },
        Scenario {
            name: "ipcomp",
            sas: &[("ipcomp", "DEFLATE")],
            flags: "",
            rules: "ipcomp/transport//require",
        },
        Scenario {
            name: "ipcomp+esp+ah",
            sas: &[("ipcomp", "DEFLATE"), ("esp", "CBC256"), ("ah", "SHA384")],
            flags: "-r 64",
            rules: "ipcomp/transport//use esp/transport//require ah/transport//require",
        },
        Scenario {
            name: "esp-gcm-esn",
            sas: &[("esp", "GCM")],
            flags: "-r 32 -f esn",
            rules: "esp/transport//require",
        },
        Scenario {
            name: "esp-cbc-sha1+ah-sha1",
            sas: &[("esp", "CBC1"), ("ah", "SHA1")],
            flags: "-r 1024",
            rules: "esp/transport//require ah/transport//require",
        },
    ]
}

fn algorithms(code: &str) -> String {
    match code {
        "GCM" => format!("-E aes-gcm-16 {K20}"),
        "CBC256" => format!("-E aes-cbc {K16} -A hmac-sha256 {K32}"),
        "CBC1" => format!("-E aes-cbc {K16} -A hmac-sha1 {K20}"),
        "CHACHA" => format!("-E chacha20-poly1305 {K36}"),
        "NULL" => format!("-E null -A hmac-sha1 {K20}"),
        "SHA512" => format!("-A hmac-sha512 {K64}"),
        "SHA384" => format!("-A hmac-sha384 {K48}"),
        "SHA1" => format!("-A hmac-sha1 {K20}"),
        "DEFLATE" => "-C deflate".to_string(),
        _ => unreachable!("{code}"),
    }
}

/// The addresses of scenario `i` (0-based) in one family.
pub fn addresses(i: usize, v6: bool) -> (IpAddr, IpAddr) {
    let n = i as u8 + 1;
    if v6 {
        (
            format!("fd00::{n}:1").parse().unwrap(),
            format!("fd00::{n}:2").parse().unwrap(),
        )
    } else {
        (
            format!("10.0.{n}.1").parse().unwrap(),
            format!("10.0.{n}.2").parse().unwrap(),
        )
    }
}

/// setkey text for scenario `i`: its SAs A -> B, an `out` policy on A's
/// side and an `in` policy on B's, in one state (the addresses tell them
/// apart), so that `outbound` seals what `inbound` opens.
pub fn setkey_text(i: usize) -> String {
    let s = &scenarios()[i];
    let mut t = String::new();
    for v6 in [false, true] {
        let (a, b) = addresses(i, v6);
        for (k, (proto, alg)) in s.sas.iter().enumerate() {
            let spi = 0x1000 * (i as u32 + 1) + 0x10 * (v6 as u32) + k as u32 + 0x100;
            let flags = if *proto == "ipcomp" { "" } else { s.flags };
            t += &format!(
                "add {a} {b} {proto} {spi:#x} {flags} {};\n",
                algorithms(alg)
            );
        }
        t += &format!("spdadd {a} {b} any -P out ipsec {};\n", s.rules);
        t += &format!("spdadd {a} {b} any -P in ipsec {};\n", s.rules);
    }
    t
}

/// The state with every scenario, built once per process: what most
/// targets run their inputs against. (Its SAs' counters, sequence numbers
/// and replay windows move as inputs use them, as in a daemon.)
pub fn all() -> &'static State {
    static S: OnceLock<State> = OnceLock::new();
    S.get_or_init(|| state(None))
}

/// The state of scenario `i`, or of all of them (`None`).
pub fn state(i: Option<usize>) -> State {
    let text = match i {
        Some(i) => setkey_text(i),
        None => (0..scenarios().len()).map(setkey_text).collect(),
    };
    match State::default().apply_text(&text, "fuzz.conf", Duration::ZERO) {
        Ok((s, _, _)) => s,
        Err(e) => panic!("the fuzz configuration does not parse: {e}"),
    }
}

/// A plaintext IP packet from `src` to `dst`: an upper layer the
/// selectors know (TCP, UDP, ICMP, SCTP, or any number), ports, and IPv6
/// extension headers before it (hop-by-hop, destination options), with
/// lengths and checksum right.
pub fn plaintext(u: &mut Unstructured, src: IpAddr, dst: IpAddr, max: usize) -> Result<Vec<u8>> {
    let upper: u8 = *u.choose(&[6u8, 17, 1, 58, 132, 47, 0xfd])?;
    let mut l4 = Vec::new();
    let sport: u16 = u.arbitrary()?;
    let dport: u16 = u.arbitrary()?;
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let len = u.int_in_range(0..=max)?;
    let fill: u8 = u.arbitrary()?;
    l4.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
    let mut p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let id: u16 = u.arbitrary()?;
            let opts = if u.ratio(1, 8)? {
                vec![0x94, 4, 0, 0] // router alert
            } else {
                vec![]
            };
            let mut h = vec![
                0x45 + (opts.len() / 4) as u8,
                u.arbitrary()?,
                0,
                0,
                (id >> 8) as u8,
                id as u8,
                0,
                0,
                u.int_in_range(1..=255)?,
                upper,
                0,
                0,
            ];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&opts);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut exts: Vec<u8> = Vec::new();
            let mut first = upper;
            let n_ext = u.int_in_range(0..=2)?;
            for _ in 0..n_ext {
                let ty = *u.choose(&[packet::PROTO_HOPOPTS, packet::PROTO_DSTOPTS])?;
                if ty == packet::PROTO_HOPOPTS && !exts.is_empty() {
                    continue; // hop-by-hop comes first
                }
                let mut e = vec![first, 0, 1, 4, 0, 0, 0, 0]; // PadN
                e.extend_from_slice(&exts);
                exts = e;
                first = ty;
            }
            let mut h = vec![0x60, 0, 0, 0, 0, 0, first, 64];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&exts);
            h
        }
        _ => unreachable!("one family"),
    };
    p.extend_from_slice(&l4);
    packet::fix_lengths(&mut p);
    Ok(p)
}
