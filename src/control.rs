//! The control protocol, without the socket: what a request is and how
//! replies, dumps and events are rendered. See docs/control-protocol.md.
//!
//! One request is one message on a `SOCK_SEQPACKET` Unix socket: either
//! setkey statements (applied as one atomic batch) or one control command
//! (`stats;`, `monitor;`, `dump [proto] [-k];`, `spddump;`). Every reply is
//! one JSON object in one message.

use crate::engine::{Counters, DropReason, Event};
use crate::sad::{Expiry, Sa};
use crate::spd::{Action, Policy};
use serde_json::{Value, json};
use std::time::Duration;

/// What a message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// setkey statements, applied all or nothing.
    Setkey(String),
    /// SAD dump; with keys when `keys`.
    Dump {
        proto: Option<crate::sad::Proto>,
        keys: bool,
    },
    SpdDump,
    Stats,
    /// Register for events (ACQUIRE, EXPIRE); the connection then receives
    /// one message per event.
    Monitor,
}

/// Classify a message. Control commands stand alone in their message;
/// anything else is setkey text (and errors are the parser's).
pub fn parse_request(msg: &str) -> Result<Request, String> {
    // Strip comments and surrounding space to see the words.
    let body: String = msg
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let t = body.trim();
    let words: Vec<&str> = t
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let single = t.matches(';').count() <= 1;
    match (words.first().copied(), single) {
        (Some("stats"), true) if words.len() == 1 => Ok(Request::Stats),
        (Some("monitor" | "register"), true) if words.len() == 1 => Ok(Request::Monitor),
        (Some("spddump"), true) if words.len() == 1 => Ok(Request::SpdDump),
        (Some("dump"), true) => {
            let mut proto = None;
            let mut keys = false;
            for w in &words[1..] {
                match *w {
                    "-k" => keys = true,
                    p => {
                        proto = Some(crate::sad::Proto::from_name(p).ok_or_else(|| {
                            format!(
                                "dump: unknown protocol \"{p}\" (expected esp, ah, ipcomp or -k)"
                            )
                        })?)
                    }
                }
            }
            Ok(Request::Dump { proto, keys })
        }
        (Some("stats" | "monitor" | "register" | "spddump" | "dump"), false) => {
            Err(format!("{} must be alone in its request", words[0]))
        }
        (None, _) => Err("empty request".to_string()),
        _ => Ok(Request::Setkey(msg.to_string())),
    }
}

/// The largest reply sent as one message; larger ones are chunked (see
/// docs/control-protocol.md).
pub const CHUNK: usize = 1 << 20;

pub fn ok(output: &[String]) -> Value {
    json!({ "ok": true, "output": output })
}

pub fn error(message: &str) -> Value {
    json!({ "ok": false, "error": message })
}

fn state_name(sa: &Sa, now: Duration) -> &'static str {
    match sa.expiry(now).0 {
        _ if sa.is_dead() => "dead",
        Expiry::Hard => "dead",
        Expiry::Soft => "dying",
        Expiry::Alive => "mature",
    }
}

/// One SA as the control protocol lists it (keys only when `keys`).
/// The fields are in the order of their names, which is the order a JSON
/// object's keys come out of a `Value` (a sorted map): serialized
/// directly, a listing of 20,000 SAs is the same text without 20,000
/// maps built first (half a second at 10,000 peers, most of `stats`).
#[derive(serde::Serialize)]
pub struct SaJson {
    age_secs: u64,
    auth: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_key: Option<String>,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpi: Option<u16>,
    #[serde(serialize_with = "display")]
    dst: std::net::IpAddr,
    enc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    enc_key: Option<String>,
    encap: Option<EncapJson>,
    esn: bool,
    format_errors: u64,
    icv_failures: u64,
    lifetime: LifetimeJson,
    mode: &'static str,
    packets: u64,
    proto: &'static str,
    replay: u32,
    replay_drops: u64,
    reqid: u32,
    seq: u64,
    spi: u32,
    #[serde(serialize_with = "display")]
    src: std::net::IpAddr,
    state: &'static str,
}

/// An address as its text, without a `String` first.
fn display<S: serde::Serializer>(a: &std::net::IpAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(a)
}

/// An SA's UDP encapsulation, as [`SaJson`] lists it.
#[derive(serde::Serialize)]
struct EncapJson {
    dport: u16,
    sport: u16,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// An SA's lifetimes, as [`SaJson`] lists them.
#[derive(serde::Serialize)]
struct LifetimeJson {
    hard_bytes: u64,
    hard_packets: u64,
    hard_secs: u64,
    soft_bytes: u64,
    soft_packets: u64,
    soft_secs: u64,
}

impl SaJson {
    pub fn of(sa: &Sa, now: Duration, keys: bool) -> SaJson {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &sa.config;
        let lt = &c.lifetime;
        SaJson {
            age_secs: now.saturating_sub(sa.added).as_secs(),
            auth: c.auth.name(),
            auth_key: keys.then(|| hex_of(&c.auth_key)),
            bytes: sa.counters.bytes.load(Relaxed),
            cpi: (c.proto == crate::sad::Proto::IpComp).then(|| c.wire_cpi()),
            dst: c.dst,
            enc: c.enc.name(),
            enc_key: keys.then(|| hex_of(&c.enc_key)),
            encap: c.encap.map(|e| EncapJson {
                dport: e.dport,
                sport: e.sport,
                kind: "espinudp",
            }),
            esn: c.esn,
            format_errors: sa.counters.format_errors.load(Relaxed),
            icv_failures: sa.counters.icv_failures.load(Relaxed),
            lifetime: LifetimeJson {
                hard_bytes: lt.hard_bytes,
                hard_packets: lt.hard_packets,
                hard_secs: lt.hard_secs,
                soft_bytes: lt.soft_bytes,
                soft_packets: lt.soft_packets,
                soft_secs: lt.soft_secs,
            },
            mode: "transport",
            packets: sa.counters.packets.load(Relaxed),
            proto: c.proto.name(),
            replay: c.replay,
            replay_drops: sa.counters.replay_drops.load(Relaxed),
            reqid: c.reqid,
            seq: sa.last_seq(),
            spi: c.spi,
            src: c.src,
            state: state_name(sa, now),
        }
    }
}

/// One SA as JSON (keys only when `keys`).
pub fn sa_json(sa: &Sa, now: Duration, keys: bool) -> Value {
    serde_json::to_value(SaJson::of(sa, now, keys)).unwrap_or(Value::Null)
}

fn hex_of(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

pub fn policy_json(p: &Policy) -> Value {
    let s = &p.selector;
    let (action, rules) = match &p.action {
        Action::Bypass => ("none", vec![]),
        Action::Discard => ("discard", vec![]),
        Action::Ipsec(r) => (
            "ipsec",
            r.iter()
                .map(|r| format!("{}/transport//{}", r.proto, r.level))
                .collect(),
        ),
    };
    json!({
        "id": p.id,
        "dir": p.dir.name(),
        "src": s.src.to_string(),
        "dst": s.dst.to_string(),
        "proto": s.proto,
        "sport": s.sport,
        "dport": s.dport,
        "priority": p.priority,
        "action": action,
        "rules": rules,
        "text": p.to_string(),
    })
}

pub fn counters_json(c: &Counters) -> Value {
    let drops: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .map(|r| (r.name().to_string(), json!(c.drop_count(*r))))
        .collect();
    json!({
        "out_packets": c.out_packets,
        "out_bytes": c.out_bytes,
        "in_packets": c.in_packets,
        "in_bytes": c.in_bytes,
        "bypassed": c.bypassed,
        "fragments": c.fragments,
        "reassembled": c.reassembled,
        "dropped": c.total_drops(),
        "drops": drops,
    })
}

/// An event as sent to monitors: `{"event": "ACQUIRE", ...}`.
pub fn event_json(e: &Event) -> Value {
    match e {
        Event::Acquire {
            policy,
            src,
            dst,
            proto,
            reqid,
            ..
        } => json!({
            "event": "ACQUIRE", "policy": policy, "src": src.to_string(), "dst": dst.to_string(),
            "proto": proto.name(), "reqid": reqid,
        }),
        Event::SoftExpire(id) | Event::HardExpire(id) => json!({
            "event": "EXPIRE",
            "kind": if matches!(e, Event::SoftExpire(_)) { "soft" } else { "hard" },
            "src": id.src.to_string(), "dst": id.dst.to_string(), "proto": id.proto.name(), "spi": id.spi,
        }),
    }
}

/// The `setkey -x` style line for an event.
pub fn event_line(v: &Value) -> String {
    let g = |k: &str| {
        v.get(k)
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .unwrap_or_default()
    };
    match v.get("event").and_then(Value::as_str) {
        Some("ACQUIRE") => format!(
            "ACQUIRE {} {} {} policy {}{}",
            g("src"),
            g("dst"),
            g("proto"),
            g("policy"),
            v.get("reqid")
                .and_then(Value::as_u64)
                .map(|r| format!(" reqid {r}"))
                .unwrap_or_default()
        ),
        Some("EXPIRE") => format!(
            "EXPIRE {} {} {} {} spi {:#x}",
            g("kind"),
            g("src"),
            g("dst"),
            g("proto"),
            v.get("spi").and_then(Value::as_u64).unwrap_or(0)
        ),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SA listed directly is the text its `Value` gives (the fields in
    /// the order of their names), with the keys the protocol has always
    /// had (docs/control-protocol.md), for each kind of SA.
    #[test]
    fn an_sa_serialized_directly_is_its_value_text() {
        let (state, _, _) = crate::state::State::default()
            .apply_text(
                "add 10.0.0.1 10.0.0.2 esp 0x100 -E aes-gcm-16 0x1111111111111111111111111111111111111111;
                 add 10.0.0.1[4500] 10.0.0.3[4500] esp-udp 0x101 -E aes-cbc 0x22222222222222222222222222222222 -A hmac-sha256 0x3333333333333333333333333333333333333333333333333333333333333333;
                 add 10.0.0.1 10.0.0.4 ipcomp 0x4001 -C deflate;",
                "t",
                Duration::ZERO,
            )
            .unwrap();
        let base = [
            "age_secs",
            "auth",
            "bytes",
            "dst",
            "enc",
            "encap",
            "esn",
            "format_errors",
            "icv_failures",
            "lifetime",
            "mode",
            "packets",
            "proto",
            "replay",
            "replay_drops",
            "reqid",
            "seq",
            "spi",
            "src",
            "state",
        ];
        let mut n = 0;
        for sa in state.sad.iter() {
            for keys in [false, true] {
                let direct =
                    serde_json::to_string(&SaJson::of(sa, Duration::from_secs(5), keys)).unwrap();
                let v = sa_json(sa, Duration::from_secs(5), keys);
                assert_eq!(direct, v.to_string());
                let mut want: Vec<&str> = base.to_vec();
                if sa.config.proto == crate::sad::Proto::IpComp {
                    want.push("cpi");
                }
                if keys {
                    want.extend(["auth_key", "enc_key"]);
                }
                want.sort();
                let got: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
                assert_eq!(got, want);
                n += 1;
            }
            let v = sa_json(sa, Duration::from_secs(5), false);
            let lt: Vec<&str> = v["lifetime"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(lt.len(), 6);
            if sa.config.encap.is_some() {
                assert_eq!(
                    v["encap"],
                    json!({"type": "espinudp", "sport": 4500, "dport": 4500})
                );
            } else {
                assert!(v["encap"].is_null());
            }
        }
        assert_eq!(n, 6);
        // The text of one, as the protocol has always written it.
        let sa = state.sad.iter().find(|sa| sa.config.spi == 0x100).unwrap();
        let text = serde_json::to_string(&SaJson::of(sa, Duration::from_secs(5), false)).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"age_secs":5,"auth":"null","bytes":0,"dst":"10.0.0.2","enc":"aes-gcm-16","encap":null,"#,
                r#""esn":false,"format_errors":0,"icv_failures":0,"lifetime":{"hard_bytes":0,"hard_packets":0,"#,
                r#""hard_secs":0,"soft_bytes":0,"soft_packets":0,"soft_secs":0},"mode":"transport","packets":0,"#,
                r#""proto":"esp","replay":0,"replay_drops":0,"reqid":0,"seq":0,"spi":256,"src":"10.0.0.1","#,
                r#""state":"mature"}"#
            )
        );
    }

    #[test]
    fn requests_are_classified() {
        assert_eq!(parse_request("stats;"), Ok(Request::Stats));
        assert_eq!(parse_request("  monitor ;\n"), Ok(Request::Monitor));
        assert_eq!(parse_request("spddump;"), Ok(Request::SpdDump));
        assert_eq!(
            parse_request("dump esp -k;"),
            Ok(Request::Dump {
                proto: Some(crate::sad::Proto::Esp),
                keys: true
            })
        );
        assert_eq!(
            parse_request("# hello\ndump;"),
            Ok(Request::Dump {
                proto: None,
                keys: false
            })
        );
        assert!(
            parse_request("dump bogus;")
                .unwrap_err()
                .contains("unknown protocol")
        );
        assert!(
            parse_request("stats; flush;")
                .unwrap_err()
                .contains("alone")
        );
        assert!(parse_request("  \n# only a comment\n").is_err());
        let t = "flush;\nadd 1.1.1.1 2.2.2.2 esp 0x1000 -E null -A hmac-sha1 0x00;";
        assert_eq!(parse_request(t), Ok(Request::Setkey(t.to_string())));
    }

    #[test]
    fn event_lines_read_like_setkey_x() {
        let e = Event::Acquire {
            policy: 3,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: crate::sad::Proto::Esp,
            reqid: None,
            upper: 6,
            ports: None,
        };
        assert_eq!(
            event_line(&event_json(&e)),
            "ACQUIRE 10.0.0.1 10.0.0.2 esp policy 3"
        );
        let x = Event::SoftExpire(crate::engine::SaId {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: crate::sad::Proto::Ah,
            spi: 0x1234,
        });
        assert_eq!(
            event_line(&event_json(&x)),
            "EXPIRE soft 10.0.0.1 10.0.0.2 ah spi 0x1234"
        );
    }
}
