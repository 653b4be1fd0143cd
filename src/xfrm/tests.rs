//! The front end on bytes that real clients sent: strongSwan's charon
//! 5.9.8, libreswan's pluto 4.10 and iproute2's `ip` 6.1, recorded with
//! strace on this project's machine (`tests/fixtures/xfrm/README.md`).

use super::*;
use crate::crypto::{AuthAlg, EncAlg};
use crate::spd::{Action, Dir, Level};
use std::net::IpAddr;
use std::time::Duration;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/xfrm");

/// A recorded message: hex digits, white space ignored. `name` may be
/// the start of the file's name.
fn fixture(name: &str) -> Vec<u8> {
    let file = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(name.trim_end_matches(".hex")))
        .min()
        .unwrap_or_else(|| panic!("no fixture {name}"));
    let text = std::fs::read_to_string(format!("{DIR}/{file}")).unwrap();
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Every recorded request (file names `<client>-<n>-<type>-…hex`).
fn recorded() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".hex"))
        .map(|n| {
            let b = fixture(&n);
            (n, b)
        })
        .collect();
    v.sort();
    assert!(v.len() > 100, "{} fixtures", v.len());
    v
}

const CLOCK: Clock = Clock {
    now: Duration::from_secs(100),
    wall: 1_800_000_000,
};

const PID: u32 = 4242;

/// Send one message to `state` as the daemon does; the state changes when
/// the request's change is committed.
fn send(state: &mut State, bytes: &[u8]) -> (Vec<Vec<u8>>, Option<Refusal>) {
    let split = netlink::split(bytes);
    let (header, payload, whole) = split[0].clone().expect("one message");
    let req = Request {
        header,
        payload,
        bytes: whole,
        pid: PID,
    };
    let mut next = None;
    let cur = state.clone();
    let out = respond(&cur, &req, CLOCK, |n| {
        next = Some(n);
        Ok(())
    });
    if let Some(n) = next {
        *state = n;
    }
    out
}

/// The errno of a single NLMSG_ERROR reply (0 for an ack).
fn errno_of(msgs: &[Vec<u8>]) -> Option<i32> {
    let m = msgs.first()?;
    let h = Header::parse(m)?;
    (h.ty == netlink::NLMSG_ERROR).then(|| -i32::from_ne_bytes(m[16..20].try_into().unwrap()))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Reserve `spi` as ALLOCSPI would have (the recorded UPDSAs complete the
/// SPIs the kernel handed out then).
fn reserve(state: &mut State, src: &str, dst: &str, proto: &str, spi: u32) {
    let text = format!("getspi {src} {dst} {proto} {spi:#x}-{spi:#x};");
    let p = crate::setkey::parse(&text, "t").unwrap();
    *state = state.apply(&p.statements, "t", CLOCK.now).unwrap().0;
}

#[test]
fn every_recorded_request_is_understood() {
    for (name, bytes) in recorded() {
        let mut s = State::seeded(1);
        let (msgs, refused) = send(&mut s, &bytes);
        let h = Header::parse(&bytes).unwrap();
        let e = errno_of(&msgs);
        // What tunsec does not do is refused as unsupported; nothing that
        // a real client sent is malformed to it.
        let unsupported = name.contains("tunnel") || name.contains("mark-ifid");
        match (unsupported, e) {
            (true, Some(EOPNOTSUPP | EPROTONOSUPPORT | ENOENT)) => {}
            (true, e) => panic!("{name}: {e:?} {refused:?}"),
            (false, Some(EINVAL | ENOSYS | EOPNOTSUPP | EPROTONOSUPPORT)) => {
                panic!("{name}: refused: {refused:?}")
            }
            _ => {}
        }
        // Every answer echoes the request's sequence number and is
        // addressed to the requester.
        for m in &msgs {
            let r = Header::parse(m).unwrap();
            assert_eq!((r.seq, r.pid), (h.seq, PID), "{name}");
        }
    }
}

#[test]
fn charon_responder_session_installs_and_removes_what_it_negotiated() {
    let mut s = State::seeded(7);
    // charon's start-up: IKE port bypass policies (port_bypass = yes).
    for f in [
        "charon-007-newpolicy-in-bypass-udp500.hex",
        "charon-008-newpolicy-out-bypass-udp500.hex",
        "charon-009-newpolicy-in-bypass-udp4500.hex",
        "charon-010-newpolicy-out-bypass-udp4500.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
    }
    let p = s.spd.iter().find(|p| p.dir == Dir::Out).unwrap();
    assert_eq!(p.action, Action::Bypass);
    assert_eq!(p.selector.proto, Some(17));
    assert!(p.selector.sport == Some(500) || p.selector.sport == Some(4500));
    // The same policy again is EEXIST, as the kernel says.
    let again = send(
        &mut s,
        &fixture("charon-007-newpolicy-in-bypass-udp500.hex"),
    );
    assert_eq!(errno_of(&again.0), Some(EEXIST));

    // The CHILD_SA: inbound completes the SPI ALLOCSPI gave, outbound is new.
    let upd = fixture("charon-015-updsa-esp-aes-gcm-in.hex");
    assert_eq!(
        errno_of(&send(&mut s, &upd).0),
        Some(ESRCH),
        "no SPI was allocated"
    );
    reserve(&mut s, "10.99.0.1", "10.99.0.2", "esp", 0xc509_0308);
    assert_eq!(errno_of(&send(&mut s, &upd).0), Some(0));
    let out = fixture("charon-016-newsa-esp-aes-gcm-out.hex");
    assert_eq!(errno_of(&send(&mut s, &out).0), Some(0));
    assert_eq!(errno_of(&send(&mut s, &out).0), Some(EEXIST));
    let sa_in = s
        .sad
        .lookup_inbound(ip("10.99.0.2"), Proto::Esp, 0xc509_0308)
        .unwrap();
    assert_eq!(sa_in.config.enc, EncAlg::AesGcm16);
    assert_eq!(sa_in.config.enc_key.len(), 20, "AES-128 key and salt");
    assert_eq!(sa_in.config.reqid, 1);
    let sa_out = s
        .sad
        .lookup_flow(
            &crate::spd::Flow {
                src: ip("10.99.0.2"),
                dst: ip("10.99.0.1"),
                proto: 6,
                ports: Some((4000, 22)),
            },
            Proto::Esp,
            Some(1),
        )
        .unwrap();
    assert_eq!(sa_out.config.spi, 0xc7d7_7a02);
    assert!(sa_out.config.lifetime.hard_secs > sa_out.config.lifetime.soft_secs);

    // charon deletes both (DELSA names only the destination and SPI).
    for f in [
        "charon-017-delsa-esp-in.hex",
        "charon-018-delsa-esp-out.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
    }
    assert!(s.sad.is_empty());
    let gone = send(&mut s, &fixture("charon-019-delsa-esp-in.hex"));
    assert_eq!(errno_of(&gone.0), Some(ESRCH));
}

#[test]
fn recorded_sas_become_the_right_transforms() {
    let cases: [(&str, Proto, EncAlg, AuthAlg, bool); 6] = [
        (
            "charon-022-updsa-esp-aes-sha256-in.hex",
            Proto::Esp,
            EncAlg::AesCbc,
            AuthAlg::HmacSha256,
            false,
        ),
        (
            "charon-031-updsa-comp-deflate-in.hex",
            Proto::IpComp,
            EncAlg::Null,
            AuthAlg::Null,
            false,
        ),
        (
            "charon-043-updsa-ah-sha256-in.hex",
            Proto::Ah,
            EncAlg::Null,
            AuthAlg::HmacSha256,
            false,
        ),
        (
            "charon-050-updsa-esp-aes-gcm-esn-in.hex",
            Proto::Esp,
            EncAlg::AesGcm16,
            AuthAlg::Null,
            true,
        ),
        (
            "pluto-34-newsa-b-initiate-cbc-esp-31b46bd2-aes-hmacsha256.hex",
            Proto::Esp,
            EncAlg::AesCbc,
            AuthAlg::HmacSha256,
            true,
        ),
        (
            "ip-003-newsa-esp-aes-gcm-esn-out.hex",
            Proto::Esp,
            EncAlg::AesGcm16,
            AuthAlg::Null,
            true,
        ),
    ];
    for (f, proto, enc, auth, esn) in cases {
        let b = fixture(f);
        let info = UserSaInfo::parse(&b[16..]).unwrap();
        let attrs = attributes(&b[16 + USERSA_INFO..]).unwrap();
        let c = convert::sa_config(&info, &attrs).unwrap();
        assert_eq!(
            (c.proto, c.enc, c.auth, c.esn),
            (proto, enc, auth, esn),
            "{f}"
        );
        if esn {
            assert!(
                c.replay > 0,
                "{f}: the ESN window is taken from REPLAY_ESN_VAL"
            );
        }
        if proto == Proto::IpComp {
            assert!(c.raw_cpi && c.spi <= 0xffff, "{f}: the CPI is on the wire");
        }
        // Host-to-host children carry everything between the hosts: no
        // selector is kept.
        if f.starts_with("charon") {
            assert_eq!(c.selector, None, "{f}");
        }
        // Rendered back (GETSA), the same SA comes out.
        let sa = crate::sad::Sa::new(c.clone(), CLOCK.now, 1).unwrap();
        let (info2, attrs2) = convert::sa_info(&sa, CLOCK, true);
        assert_eq!(convert::sa_config(&info2, &attrs2).unwrap(), c, "{f}");
    }
}

#[test]
fn an_sa_keeps_a_selector_that_narrows_it_and_carries_only_that_traffic() {
    // pluto's conn with leftprotoport=tcp rightprotoport=tcp/5101 (or any
    // NEWSA whose selector names a protocol or ports).
    let b = fixture("ip-001-newsa-esp-aes-gcm-out.hex");
    let mut info = UserSaInfo::parse(&b[16..]).unwrap();
    let attrs = attributes(&b[16 + USERSA_INFO..]).unwrap();
    let (src, dst) = (ip("10.99.0.1"), ip("10.99.0.2"));
    info.selector = convert::host_selector(src, dst, Some(6), Some((0, 5101)));
    info.selector.sport_mask = 0;
    let c = convert::sa_config(&info, &attrs).unwrap();
    let sel = c.selector.expect("kept");
    assert_eq!(
        (sel.proto, sel.sport, sel.dport),
        (Some(6), None, Some(5101))
    );
    let mut s = State::seeded(4);
    let st = vec![Statement {
        line: 1,
        cmd: Command::Add(c),
    }];
    s = s.apply(&st, "t", CLOCK.now).unwrap().0;
    let flow = |dport| crate::spd::Flow {
        src,
        dst,
        proto: 6,
        ports: Some((40000, dport)),
    };
    assert!(s.sad.lookup_flow(&flow(5101), Proto::Esp, None).is_some());
    assert!(s.sad.lookup_flow(&flow(5102), Proto::Esp, None).is_none());
    // GETSA shows the selector as it came.
    let sa = s.sad.iter().next().unwrap();
    let (out, _) = convert::sa_info(sa, CLOCK, false);
    assert_eq!((out.selector.proto, out.selector.dport), (6, 5101));
}

#[test]
fn policies_templates_and_levels() {
    let mut s = State::seeded(3);
    for f in [
        "charon-062-newpolicy-in-transport.hex",
        "charon-063-newpolicy-out-transport.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
    }
    let out = s.spd.iter().find(|p| p.dir == Dir::Out).unwrap();
    assert_eq!(out.selector.src.to_string(), "10.99.0.1/32");
    assert_eq!(out.priority, 367_232);
    let Action::Ipsec(rules) = &out.action else {
        panic!("{out}")
    };
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].proto, Proto::Esp);
    assert!(matches!(rules[0].level, Level::Unique(Some(_))));
    // GETPOLICY by selector, then DELPOLICY; the second delete is ENOENT.
    let dump = send(&mut s, &fixture("ip-017-getpolicy-dump.hex")).0;
    let last = Header::parse(dump.last().unwrap()).unwrap();
    assert_eq!((dump.len(), last.ty), (3, netlink::NLMSG_DONE));
    for f in [
        "charon-074-delpolicy-out.hex",
        "charon-075-delpolicy-in.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(ENOENT), "{f}");
    }
    assert!(s.spd.is_empty());
    // pluto's ICMPv6 neighbour discovery bypasses (it stops without them).
    for f in [
        "pluto-01-updpolicy-a-startup-in-icmpv6-type136-allow.hex",
        "pluto-03-updpolicy-a-startup-out-icmpv6-type136-allow.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
    }
    let nd = s.spd.iter().next().unwrap();
    assert_eq!(
        (nd.action.clone(), nd.selector.proto, nd.selector.sport),
        (Action::Bypass, Some(58), Some(136))
    );
}

#[test]
fn allocspi_answers_newsa_with_a_free_spi_in_the_range() {
    let mut s = State::seeded(9);
    let req = fixture("charon-013-allocspi-esp.hex");
    let (msgs, refused) = send(&mut s, &req);
    assert!(refused.is_none(), "{refused:?}");
    let h = Header::parse(&msgs[0]).unwrap();
    assert_eq!(h.ty, XFRM_MSG_NEWSA);
    let info = UserSaInfo::parse(&msgs[0][16..]).unwrap();
    assert!(
        (0xc000_0000..=0xcfff_ffff).contains(&info.id.spi),
        "{:#x}",
        info.id.spi
    );
    let (src, dst, proto, spi, _) = s.sad.larval().next().unwrap();
    assert_eq!(
        (src, dst, proto, spi),
        (ip("10.99.0.2"), ip("10.99.0.1"), Proto::Esp, info.id.spi)
    );
    // DELSA of a larval SA releases the SPI (charon does so when a
    // negotiation fails).
    let del = netlink_packet_xfrm::state::DelGetMessage {
        user_sa_id: UserSaId {
            daddr: convert::xaddr(dst),
            spi,
            family: consts::AF_INET,
            proto: 50,
        },
        nlas: vec![],
    };
    let d = netlink::emit(
        XFRM_MSG_DELSA,
        netlink::NLM_F_REQUEST | netlink::NLM_F_ACK,
        5,
        0,
        &del,
    );
    assert_eq!(errno_of(&send(&mut s, &d).0), Some(0));
    assert_eq!(s.sad.larval().count(), 0);
}

#[test]
fn getsa_dump_flush_and_info() {
    let mut s = State::seeded(11);
    for f in [
        "ip-001-newsa-esp-aes-gcm-out.hex",
        "ip-004-newsa-ah-sha256-out.hex",
        "ip-006-newsa-esp-aes-gcm-out-v6.hex",
    ] {
        assert_eq!(errno_of(&send(&mut s, &fixture(f)).0), Some(0), "{f}");
    }
    let dump = send(&mut s, &fixture("ip-009-getsa-dump")).0;
    assert_eq!(dump.len(), 4);
    for m in &dump[..3] {
        let h = Header::parse(m).unwrap();
        assert_eq!(
            (h.ty, h.flags & netlink::NLM_F_MULTI),
            (XFRM_MSG_NEWSA, netlink::NLM_F_MULTI)
        );
    }
    let sad = send(&mut s, &fixture("ip-010-getsadinfo-query.hex")).0;
    let msg = netlink_packet_xfrm::state::NewSadInfoMessage::parse(&sad[0][16..]).unwrap();
    assert!(
        msg.nlas
            .contains(&netlink_packet_xfrm::state::SadInfoAttrs::SadCount(3))
    );
    let spd = send(&mut s, &fixture("charon-001-getspdinfo-query.hex")).0;
    assert_eq!(Header::parse(&spd[0]).unwrap().ty, XFRM_MSG_NEWSPDINFO);
    assert_eq!(
        errno_of(&send(&mut s, &fixture("ip-022-flushsa-all.hex")).0),
        Some(0)
    );
    assert!(s.sad.is_empty());
}

#[test]
fn unsupported_requests_say_why_and_change_nothing() {
    let mut s = State::seeded(5);
    for (f, e, why) in [
        (
            "charon-064-newpolicy-in-tunnel.hex",
            EOPNOTSUPP,
            "transport mode only",
        ),
        (
            "charon-106-newpolicy-in-tunnel-mark-ifid.hex",
            EOPNOTSUPP,
            "",
        ),
    ] {
        let (msgs, refused) = send(&mut s, &fixture(f));
        assert_eq!(errno_of(&msgs), Some(e), "{f}: {refused:?}");
        assert!(refused.unwrap().why.contains(why), "{f}");
    }
    assert!(s.sad.is_empty() && s.spd.is_empty());
}

#[test]
fn udp_encapsulated_sas_from_charon_are_installed_and_render_back() {
    let mut s = State::seeded(5);
    reserve(&mut s, "10.99.0.1", "10.99.0.2", "esp", 0xcdc8_eb4c);
    for f in [
        "charon-095-updsa-esp-aes-gcm-encap-in.hex",
        "charon-096-newsa-esp-aes-gcm-encap-out.hex",
    ] {
        let (msgs, refused) = send(&mut s, &fixture(f));
        assert!(refused.is_none(), "{f}: {refused:?}");
        assert!(matches!(errno_of(&msgs), None | Some(0)), "{f}");
    }
    let sas: Vec<_> = s.sad.iter().collect();
    assert_eq!(sas.len(), 2);
    for sa in sas {
        let e = sa.config.encap.expect("charon asked for UDP encapsulation");
        assert_eq!((e.sport, e.dport), (4500, 4500));
        assert_eq!(sa.config.proto_name(), "esp-udp");
        let (_, attrs) = super::convert::sa_info(sa, CLOCK, false);
        assert!(attrs.iter().any(|a| matches!(
            a,
            XfrmAttrs::EncapsulationTemplate(t)
                if t.encap_type == 2 && t.encap_sport == 4500 && t.encap_dport == 4500
        )));
    }
}

#[test]
fn truncated_and_mutated_requests_are_refused_without_panic() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (name, bytes) in recorded() {
        // Every truncation, with the header's length made to agree.
        for cut in 16..bytes.len() {
            let mut b = bytes[..cut].to_vec();
            b[0..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            let mut s = State::seeded(1);
            let _ = send(&mut s, &b);
        }
        // Random bytes changed (the header's length kept).
        for _ in 0..50 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = 16 + (next() as usize) % (b.len() - 16).max(1);
                if i < b.len() {
                    b[i] = next() as u8;
                }
            }
            let mut s = State::seeded(1);
            let (msgs, _) = send(&mut s, &b);
            assert!(
                !msgs.is_empty() || Header::parse(&b).unwrap().flags & netlink::NLM_F_ACK == 0,
                "{name}"
            );
        }
    }
    // A fixed part cut short is EINVAL and changes nothing.
    let b = fixture("charon-016-newsa-esp-aes-gcm-out.hex");
    let mut short = b[..16 + 100].to_vec();
    short[0..4].copy_from_slice(&116u32.to_ne_bytes());
    let mut s = State::seeded(1);
    let (msgs, refused) = send(&mut s, &short);
    assert_eq!(errno_of(&msgs), Some(EINVAL), "{refused:?}");
    assert!(s.sad.is_empty());
}

#[test]
fn events_and_notifications_read_as_the_kernel_writes_them() {
    let mut s = State::seeded(2);
    send(&mut s, &fixture("charon-063-newpolicy-out-transport.hex"));
    let p = s.spd.iter().next().unwrap().clone();
    let e = Event::Acquire {
        policy: p.id,
        src: ip("10.99.0.1"),
        dst: ip("10.99.0.2"),
        proto: Proto::Esp,
        reqid: Some(1),
        upper: 17,
        ports: Some((4000, 9999)),
    };
    let (g, m) = event(&s, &e, 7, CLOCK).unwrap();
    assert_eq!(g, XFRMNLGRP_ACQUIRE);
    let a = netlink_packet_xfrm::AcquireMessage::parse(&m[16..]).unwrap();
    assert_eq!(a.acquire.selector.dport, 9999);
    assert_eq!(a.acquire.selector.proto, 17);
    // charon takes the reqid from the template to find its trap policy.
    let Some(XfrmAttrs::Template(t)) = a.nlas.first() else {
        panic!("{a:?}")
    };
    assert_eq!(
        (t[0].reqid, t[0].id.proto),
        (
            match &p.action {
                Action::Ipsec(r) => r[0].level.reqid().unwrap(),
                _ => unreachable!(),
            },
            50
        )
    );

    let old = s.clone();
    reserve(&mut s, "10.99.0.1", "10.99.0.2", "esp", 0xc509_0308);
    send(&mut s, &fixture("charon-015-updsa-esp-aes-gcm-in.hex"));
    let n = notifications(&old, &s, CLOCK);
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].0, XFRMNLGRP_SA);
    let sa = s.sad.iter().next().unwrap().clone();
    let x = Event::SoftExpire(crate::engine::SaId::of(&sa));
    let (g, m) = event(&s, &x, 0, CLOCK).unwrap();
    assert_eq!(g, XFRMNLGRP_EXPIRE);
    let ex = netlink_packet_xfrm::ExpireMessage::parse(&m[16..]).unwrap();
    assert_eq!(
        (
            ex.expire.hard,
            ex.expire.state.id.spi,
            ex.expire.state.id.proto
        ),
        (0, 0xc509_0308, 50)
    );
    let mut comp = x;
    if let Event::SoftExpire(id) = &mut comp {
        id.proto = Proto::IpComp;
    }
    assert!(event(&s, &comp, 0, CLOCK).is_none(), "no EXPIRE for IPComp");
    // Keys never travel in notifications.
    assert!(!n[0].1.windows(16).any(|w| w == &sa.config.enc_key[..16]));
}

/// The message with the replay window of its XFRMA_REPLAY_ESN_VAL set.
fn with_esn_window(mut b: Vec<u8>, window: u32) -> Vec<u8> {
    let mut at = 16 + netlink::align(USERSA_INFO);
    while at + 4 <= b.len() {
        let len = u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([b[at + 2], b[at + 3]]);
        if ty == 23 {
            // nla header, bmp_len, oseq, seq, oseq_hi, seq_hi, replay_window
            b[at + 24..at + 28].copy_from_slice(&window.to_ne_bytes());
            return b;
        }
        at += netlink::align(len.max(4));
    }
    panic!("no XFRMA_REPLAY_ESN_VAL");
}

#[test]
fn a_replay_window_beyond_tunsecs_is_refused_and_dumps_stay_small() {
    // Found by the xfrm fuzz target: a NEWSA with a window of 2^32 - 1
    // was taken, and dumping the SA then built a bitmap of 2^27 words
    // that overflowed the attribute's 16-bit length (a panic).
    let b = fixture("ip-003-newsa-esp-aes-gcm-esn-out");
    let mut s = State::seeded(1);
    let (msgs, refused) = send(&mut s, &with_esn_window(b.clone(), u32::MAX));
    assert_eq!(errno_of(&msgs), Some(EINVAL), "{refused:?}");
    assert!(refused.unwrap().why.contains("replay window"));
    assert_eq!(s.sad.len(), 0);
    // The largest window tunsec keeps is taken, and its SA dumps.
    let max = crate::replay::MAX_WINDOW;
    let (msgs, refused) = send(&mut s, &with_esn_window(b, max));
    assert!(refused.is_none(), "{refused:?} {:?}", errno_of(&msgs));
    let sa = s.sad.iter().next().expect("the SA");
    assert_eq!(sa.config.replay, max);
    let (info, attrs) = convert::sa_info(sa, CLOCK, false);
    let m = sa_message(sa, XFRM_MSG_NEWSA, 0, 1, PID, CLOCK, false);
    assert!(m.len() < 65536 && info.replay_window > 0 && !attrs.is_empty());
}

/// What [`notifications`] said when it scanned both states whole: the
/// reference the change-sized version must agree with.
fn notifications_by_scan(old: &State, new: &State, clock: Clock) -> Vec<(u32, Vec<u8>)> {
    use std::collections::HashSet;
    let mut out = Vec::new();
    let old_sas: HashSet<u64> = old.sad.iter().map(|sa| sa.serial).collect();
    let new_sas: HashSet<u64> = new.sad.iter().map(|sa| sa.serial).collect();
    for sa in old.sad.iter().filter(|sa| !new_sas.contains(&sa.serial)) {
        let (info, _) = convert::sa_info(sa, clock, false);
        let msg = netlink_packet_xfrm::state::DelGetMessage {
            user_sa_id: UserSaId {
                daddr: info.id.daddr,
                spi: info.id.spi,
                family: info.family,
                proto: info.id.proto,
            },
            nlas: vec![XfrmAttrs::SaInfo(info)],
        };
        out.push((XFRMNLGRP_SA, netlink::emit(XFRM_MSG_DELSA, 0, 0, 0, &msg)));
    }
    for sa in new.sad.iter().filter(|sa| !old_sas.contains(&sa.serial)) {
        out.push((
            XFRMNLGRP_SA,
            sa_message(sa, XFRM_MSG_NEWSA, 0, 0, 0, clock, false),
        ));
    }
    let old_ps: HashSet<u64> = old.spd.iter().map(|p| p.id).collect();
    let new_ps: HashSet<u64> = new.spd.iter().map(|p| p.id).collect();
    for p in old.spd.iter().filter(|p| !new_ps.contains(&p.id)) {
        let (info, _) = convert::policy_info(p, clock);
        let msg = netlink_packet_xfrm::policy::DelGetMessage {
            user_policy_id: UserPolicyId {
                selector: info.selector,
                index: info.index,
                direction: info.direction,
            },
            nlas: vec![XfrmAttrs::PolicyInfo(info)],
        };
        out.push((
            XFRMNLGRP_POLICY,
            netlink::emit(XFRM_MSG_DELPOLICY, 0, 0, 0, &msg),
        ));
    }
    for p in new.spd.iter().filter(|p| !old_ps.contains(&p.id)) {
        out.push((
            XFRMNLGRP_POLICY,
            policy_message(p, XFRM_MSG_NEWPOLICY, 0, 0, 0, clock),
        ));
    }
    out
}

/// Notifications cost the change, and say what a scan of both states
/// says: after each of many random batches (adds, updates, deletes,
/// flushes of SAs and policies, several changes a batch).
#[test]
fn notifications_of_a_change_are_those_of_a_full_scan() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let key = "-E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213";
    let mut s = State::seeded(3);
    let mut seen = 0;
    for step in 0..400 {
        let mut text = String::new();
        for _ in 0..1 + next() % 3 {
            let n = next();
            let peer = format!("10.9.{}.{}", n % 4, (n >> 8) % 50);
            let spi = 0x1000 + (n >> 16) % 64;
            let line = match (n >> 24) % 10 {
                0..=2 => format!("add 10.8.0.1 {peer} esp {spi:#x} {key};"),
                3 => format!("update 10.8.0.1 {peer} esp {spi:#x} {key};"),
                4 => format!("delete 10.8.0.1 {peer} esp {spi:#x};"),
                5 | 6 => format!(
                    "spdupdate 10.8.0.1 {peer} any -P {} priority {} ipsec esp/transport//require;",
                    if n >> 32 & 1 == 0 { "out" } else { "in" },
                    (n >> 33) % 3
                ),
                7 => format!("spddelete 10.8.0.1 {peer} any -P out;"),
                8 if step % 97 == 0 => "flush;".to_string(),
                8 if step % 89 == 0 => "spdflush;".to_string(),
                _ => format!("get 10.8.0.1 {peer} esp {spi:#x};"),
            };
            text.push_str(&line);
            text.push('\n');
        }
        // Each statement alone, so that failing ones do not void the batch.
        for line in text.lines() {
            let Ok((n, _, _)) = s.apply_text(line, "t", Duration::ZERO) else {
                continue;
            };
            let got = notifications(&s, &n, CLOCK);
            assert_eq!(got, notifications_by_scan(&s, &n, CLOCK), "after {line}");
            seen += got.len();
            s = n;
        }
        // And the batch as one change.
        if let Ok((n, _, _)) = s.apply_text(&text, "t", Duration::ZERO) {
            let got = notifications(&s, &n, CLOCK);
            assert_eq!(got, notifications_by_scan(&s, &n, CLOCK), "after {text}");
            seen += got.len();
            s = n;
        }
    }
    assert!(seen > 300, "only {seen} notifications");
    assert!(s.sad.len() > 10 && s.spd.len() > 10);
}

/// GETPOLICY and DELPOLICY by index (`ip xfrm policy get|delete index N`)
/// find the policy with that index, whatever the selector says.
#[test]
fn policies_are_found_by_index() {
    let mut s = State::seeded(5);
    let text = "spdadd 10.1.0.1 10.1.0.2 any -P out ipsec esp/transport//require;\n\
                spdadd 10.1.0.2 10.1.0.1 any -P in ipsec esp/transport//require;\n\
                spdadd 10.1.0.1 10.1.0.3 any -P out priority 7 none;\n";
    s = s.apply_text(text, "t", CLOCK.now).unwrap().0;
    let by_index = |ty: u16, p: &Policy| {
        // xfrm_userpolicy_id: a selector of zeroes, the index, the direction.
        let mut body = vec![0u8; USERPOLICY_ID];
        body[56..60].copy_from_slice(&convert::index_of(p).to_ne_bytes());
        body[60] = if p.dir == Dir::Out { 1 } else { 0 };
        netlink::message(
            ty,
            netlink::NLM_F_REQUEST | netlink::NLM_F_ACK,
            9,
            PID,
            &body,
        )
    };
    let want = s
        .spd
        .iter()
        .find(|p| p.selector.dst.addr == ip("10.1.0.3"))
        .unwrap()
        .clone();
    let (msgs, refused) = send(&mut s, &by_index(XFRM_MSG_GETPOLICY, &want));
    assert!(refused.is_none(), "{refused:?}");
    let got = netlink_packet_xfrm::policy::ModifyMessage::parse(&msgs[0][16..]).unwrap();
    assert_eq!(got.user_policy_info.index, convert::index_of(&want));
    assert_eq!(got.user_policy_info.priority, 7);
    let (msgs, _) = send(&mut s, &by_index(XFRM_MSG_DELPOLICY, &want));
    assert_eq!(errno_of(&msgs), Some(0));
    assert_eq!(s.spd.len(), 2);
    assert!(s.spd.iter().all(|p| p.id != want.id));
    let (msgs, _) = send(&mut s, &by_index(XFRM_MSG_DELPOLICY, &want));
    assert_eq!(errno_of(&msgs), Some(ENOENT));
}
