//! What the kernel answers tunsec's table: the dumps of a chain's rules
//! (handles, comments, what they dropped) and of a set's elements (what
//! their counters counted), and its echoes of deleted rules and elements.
//! Pure code over the bytes received, tested on bytes Linux 6.18 sent.

use super::rule;
use super::wire::*;

/// A dump request of message type `ty` for `name` in `table` (family
/// inet): a chain's rules and a set's elements are both asked for by the
/// table (attribute 1) and their name (attribute 2).
fn dump_request(ty: u16, table: &str, name: &str, seq: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let flags = NLM_F_REQUEST | NLM_F_DUMP;
    message(
        &mut b,
        (NFNL_SUBSYS_NFTABLES << 8) | ty,
        flags,
        seq,
        NFPROTO_INET,
        0,
        |b| {
            cstr(b, 1, table); // NFTA_RULE_TABLE, NFTA_SET_ELEM_LIST_TABLE
            cstr(b, 2, name); // NFTA_RULE_CHAIN, NFTA_SET_ELEM_LIST_SET
        },
    );
    b
}

/// Read a part of the answer to a dump request with sequence number `seq`,
/// handing each message of type `ty` to `each`: `Some(Ok)` at its end,
/// `Some(Err(errno))` if the kernel refused it, `None` if more is to come.
fn parse_dump(
    reply: &[u8],
    seq: u32,
    ty: u16,
    mut each: impl FnMut(&Message<'_>),
) -> Option<Result<(), i32>> {
    for m in messages(reply).filter(|m| m.seq == seq) {
        if let Some(e) = m.errno() {
            return Some(if e == 0 { Ok(()) } else { Err(e) });
        }
        match m.ty {
            // NLMSG_DONE
            3 => return Some(Ok(())),
            t if t == (NFNL_SUBSYS_NFTABLES << 8) | ty && m.body.len() >= 4 => each(&m),
            _ => {}
        }
    }
    None
}

/// The request for the rules of `chain` in `table` (family inet), as
/// `nft list chain` asks for them.
pub(super) fn rules_request(table: &str, chain: &str, seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETRULE, table, chain, seq)
}

/// A rule of a chain, as a dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub handle: u64,
    pub comment: Option<String>,
    /// What its counter counted, when it has one and its verdict is
    /// `drop` (0 otherwise).
    pub dropped: u64,
}

/// What a batch deleted, as the kernel echoes it (deletions are sent with
/// `NLM_F_ECHO`), with what its counter had counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// An element of `set`: the packets its counter counted.
    Element { set: String, packets: u64 },
    /// A rule: the packets its counter counted if its verdict was `drop`
    /// (0 otherwise).
    Rule {
        comment: Option<String>,
        dropped: u64,
    },
}

/// The elements and rules an answer to the batch of `n` messages after
/// sequence number `seq` says were deleted, into `out`.
pub(super) fn deleted(reply: &[u8], seq: u32, n: usize, out: &mut Vec<Deleted>) {
    // An echo carries its request's sequence number (a deleted rule's)
    // or none (a deleted element's, Linux 6.18).
    let ours = |s: u32| s == 0 || (s.wrapping_sub(seq).wrapping_sub(1) as usize) < n;
    for m in messages(reply) {
        if m.body.len() < 4 || !ours(m.seq) {
            continue;
        }
        if m.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE {
            let (mut comment, mut dropped) = (None, 0);
            for (ty, v) in m.attrs() {
                match ty {
                    NFTA_RULE_USERDATA => comment = rule::comment(v),
                    NFTA_RULE_EXPRESSIONS => dropped = rule::dropped(v),
                    _ => {}
                }
            }
            out.push(Deleted::Rule { comment, dropped });
            continue;
        }
        if m.ty != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM {
            continue;
        }
        let mut set = String::new();
        let mut packets = 0;
        for (ty, v) in m.attrs() {
            match ty {
                NFTA_SET_ELEM_LIST_SET => {
                    set = String::from_utf8_lossy(v.strip_suffix(&[0]).unwrap_or(v)).into_owned()
                }
                NFTA_SET_ELEM_LIST_ELEMENTS => packets += elements_counted(v),
                _ => {}
            }
        }
        out.push(Deleted::Element { set, packets });
    }
}

/// What the counters of the elements in a `NFTA_SET_ELEM_LIST_ELEMENTS`
/// counted, together.
fn elements_counted(list: &[u8]) -> u64 {
    let mut packets = 0;
    for (_, el) in attrs(list) {
        for (ty, x) in attrs(el) {
            // NFTA_SET_ELEM_EXPR (one) or _EXPRESSIONS (a list)
            let exprs: Vec<&[u8]> = match ty {
                7 => vec![x],
                11 => attrs(x).map(|(_, e)| e).collect(),
                _ => continue,
            };
            packets += exprs.into_iter().filter_map(rule::counted).sum::<u64>();
        }
    }
    packets
}

/// The request for the elements of set `set` in `table` (family inet),
/// as `nft list set` asks for them.
pub(super) fn elements_request(table: &str, set: &str, seq: u32) -> Vec<u8> {
    dump_request(NFT_MSG_GETSETELEM, table, set, seq)
}

/// Read a part of the answer to [`elements_request`] with sequence number
/// `seq`, adding what its elements' counters counted to `packets` (see
/// [`parse_dump`]).
pub(super) fn parse_elements(reply: &[u8], seq: u32, packets: &mut u64) -> Option<Result<(), i32>> {
    parse_dump(reply, seq, NFT_MSG_NEWSETELEM, |m| {
        *packets += m
            .attrs()
            .filter(|(ty, _)| *ty == NFTA_SET_ELEM_LIST_ELEMENTS)
            .map(|(_, v)| elements_counted(v))
            .sum::<u64>();
    })
}

/// Read a part of the answer to [`rules_request`] with sequence number
/// `seq` into `out` (see [`parse_dump`]).
pub(super) fn parse_rules(reply: &[u8], seq: u32, out: &mut Vec<Rule>) -> Option<Result<(), i32>> {
    parse_dump(reply, seq, NFT_MSG_NEWRULE, |m| {
        let mut rule = Rule {
            handle: 0,
            comment: None,
            dropped: 0,
        };
        for (ty, v) in m.attrs() {
            match ty {
                NFTA_RULE_HANDLE => {
                    if let Ok(h) = v.try_into() {
                        rule.handle = u64::from_be_bytes(h)
                    }
                }
                NFTA_RULE_USERDATA => rule.comment = rule::comment(v),
                NFTA_RULE_EXPRESSIONS => rule.dropped = rule::dropped(v),
                _ => {}
            }
        }
        out.push(rule);
    })
}

#[cfg(test)]
mod tests {
    use super::super::acks;
    use super::super::wire::hex;
    use super::*;

    /// A dump of chain `input` of table `t` (family inet) as the kernel
    /// answered `rules_request` (Linux 6.18): three rules, then the end.
    #[test]
    fn a_chain_dump_gives_handles_and_comments_in_order() {
        let dump = hex(concat!(
            "e4000000060a02082a000000f71b00000100000b06000100740000000a000200696e7075740000000c00030000000000000000029000040024000100090001006d6574610000000014000200080002000000000608000100000000013800010008000100",
            "636d70002c00020008000100000000010800020000000000180003001400010078000000000000000000000000000000300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c00020008000100000000011d000700",
            "0017646563617073756c617465642062792074756e7365630000000064010000060a02082a000000f71b00000100000b06000100740000000a000200696e7075740000000c00030000000000000000050c0006000000000000000002f400040024000100",
            "090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100",
            "000000010800020000000001080003000000000c0800040000000004340001000c0001007061796c6f616400240002000800010000000009080002000000000108000300000000100800040000000004380001000b0001006c6f6f6b7570000028000200",
            "0a000100696e345f350000000800020000000001080003000000000008000500000000002f0007000029706f6c69636965732066726f6d20686f737420746f20686f7374206174207072696f72697479203500003c010000060a02082a000000f71b0000",
            "0100000b06000100740000000a000200696e7075740000000c00030000000000000000070c0006000000000000000005f400040024000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d7000",
            "20000200080001000000000108000200000000000c000300050001000a000000340001000c0001007061796c6f616400240002000800010000000001080002000000000108000300000000080800040000000010340001000c0001007061796c6f616400",
            "240002000800010000000002080002000000000108000300000000180800040000000010380001000b0001006c6f6f6b75700000280002000a000100696e365f350000000800020000000001080003000000000008000500000000000800070000027800",
            "14000000030002002a000000f71b000000000000"
        ));
        let want = [
            (2, "decapsulated by tunsec"),
            (5, "policies from host to host at priority 5"),
            (7, "x"),
        ];
        let mut out = Vec::new();
        assert_eq!(parse_rules(&dump, 42, &mut out), Some(Ok(())));
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.handle, r.comment.as_deref().unwrap()))
            .collect();
        assert_eq!(got, want);
        // In two parts, the first cut after its second rule.
        let cut = 228 + 356;
        let mut out = Vec::new();
        assert_eq!(parse_rules(&dump[..cut], 42, &mut out), None);
        assert_eq!(parse_rules(&dump[cut..], 42, &mut out), Some(Ok(())));
        assert_eq!(out.len(), 3);
        // Another request's answer is not this one's; an error is named.
        let mut out = Vec::new();
        assert_eq!(parse_rules(&dump, 41, &mut out), None);
        assert!(out.is_empty());
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&2u16.to_ne_bytes());
        err[8..12].copy_from_slice(&42u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_rules(&err, 42, &mut out), Some(Err(libc::ENOENT)));
        // Truncated or garbled bytes are not a rule and not a panic.
        for n in 0..dump.len() {
            let mut out = Vec::new();
            let _ = parse_rules(&dump[..n], 42, &mut out);
            assert!(out.len() <= 3);
        }
    }

    /// A dump of two rules the kernel gave (Linux 6.18): `ip saddr
    /// 10.0.0.1 counter packets 5 bytes 300 drop comment "p"` and the same
    /// for 10.0.0.2 with 9 packets and `accept`.
    #[test]
    fn a_dropping_rules_counter_is_read_from_the_dump() {
        let dump = hex(concat!(
            "4c010000060a02082a000000084700000100001406000100740000000a000200696e7075740000000c000300000000000000000f1001040024000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001080003000000000c08000400000000042c00010008000100636d700020000200080001000000000108000200000000000c000300080001000a0000012c0001000c000100636f756e746572001c0002000c000100000000000000012c0c0002000000000000000005300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c0002000800010000000000080007000002700058010000060a02082a00000008470000",
            "0100001406000100740000000a000200696e7075740000000c00030000000000000000100c000600000000000000000f1001040024000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001080003000000000c08000400000000042c00010008000100636d700020000200080001000000000108000200000000000c000300080001000a0000022c0001000c000100636f756e746572001c0002000c000100000000000000012c0c0002000000000000000009300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c0002000800010000000001080007000002710014000000030002002a0000000847000000000000",
        ));
        let mut out = Vec::new();
        assert_eq!(parse_rules(&dump, 42, &mut out), Some(Ok(())));
        let got: Vec<_> = out
            .iter()
            .map(|r| (r.comment.as_deref().unwrap(), r.dropped))
            .collect();
        assert_eq!(got, [("p", 5), ("q", 0)]);
    }

    /// What the kernel echoed (Linux 6.18) for a `NFT_MSG_DELSETELEM` with
    /// `NLM_F_ECHO` in a batch: the element of set `e4` with its counter
    /// (7 packets, 420 bytes), then the batch's generation message and the
    /// ack.
    #[test]
    fn a_deleted_element_is_echoed_with_its_counter() {
        let reply = hex(concat!(
            "680000000e0a000000000000a645000001000012060001007400000007000200653400004400030040000100100001000c0001000a0000080a0000022c0007000c000100636f756e746572001c0002000c00010000000000000001a40c0002000000000000000007",
            "300000000f0a000002000000a645000000000012080001000000001208000200000045a60c000300707974686f6e3300",
            "240000000200000102000000a6450000000000003c0000000e0a0d000200000000000000",
        ));
        let mut out = Vec::new();
        deleted(&reply, 1, 1, &mut out);
        let e4 = |packets| Deleted::Element {
            set: "e4".into(),
            packets,
        };
        assert_eq!(out, [e4(7)]);
        // Cut anywhere: no panic, nothing invented.
        for n in 0..reply.len() {
            let mut out = Vec::new();
            deleted(&reply[..n], 1, 1, &mut out);
            assert!(out.iter().all(|d| (0..=7).any(|p| *d == e4(p))));
        }
    }

    /// What the kernel echoed (Linux 6.18) for a `NFT_MSG_DELRULE` with
    /// `NLM_F_ECHO` in a batch: the rule `ip saddr 127.0.0.1 meta l4proto
    /// icmp counter packets 3 bytes 252 drop comment "p"`, then the
    /// generation message and the ack.
    #[test]
    fn a_deleted_rule_is_echoed_with_its_counter() {
        let reply = hex(concat!(
            "9c010000080a000002000000836200000100001906000100740000000a000200696e7075740000000c00030000000000000000156001040024000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c6f6164002400020008000100000000010800020000000001080003000000000c08000400000000042c00010008000100636d700020000200080001000000000108000200000000000c000300080001007f00000124000100090001006d6574610000000014000200080002000000001008000100000000012c00010008000100636d700020000200080001000000000108000200000000000c00030005000100010000002c0001000c000100636f756e746572001c0002000c00010000000000000000fc0c0002000000000000000003300001000e000100696d6d6564696174650000001c0002000800010000000000100002000c00020008000100000000000800070000027000",
            "300000000f0a0000020000008362000000000019080001000000001908000200000062830c000300707974686f6e3300",
            "240000000200000102000000836200000000000034000000080a0d000200000000000000",
        ));
        let mut out = Vec::new();
        deleted(&reply, 1, 1, &mut out);
        let p = |dropped| Deleted::Rule {
            comment: Some("p".into()),
            dropped,
        };
        assert_eq!(out, [p(3)]);
        // Left over from another batch: not this one's.
        out.clear();
        deleted(&reply, 10, 1, &mut out);
        assert!(out.is_empty(), "{out:?}");
        let mut out = Vec::new();
        acks(&reply, 1, 1, &mut 0).unwrap().unwrap();
        for n in 0..reply.len() {
            out.clear();
            deleted(&reply[..n], 1, 1, &mut out);
            assert!(out.len() <= 1, "{out:?}");
        }
    }
    /// A dump of set `e4` of table `t` as the kernel answered
    /// `elements_request` (Linux 6.18): `127.0.0.1 . 127.0.0.1 counter
    /// packets 2` and `10.0.0.1 . 10.0.0.2 counter packets 0`, an empty
    /// part, then the end.
    #[test]
    fn a_sets_elements_are_counted_from_its_dump() {
        let first = hex(
            "a80000000c0a02002a0000007b7e00000100001b060001007400000007000200653400008400030040000100100001000c0001007f0000017f0000012c0007000c000100636f756e746572001c0002000c00010000000000000000a80c000200000000000000000240000100100001000c0001000a0000010a0000022c0007000c000100636f756e746572001c0002000c00010000000000000000000c0002000000000000000000",
        );
        let last = hex(
            "280000000c0a02002a0000007b7e00000100001b060001007400000007000200653400000400030014000000030002002a0000007b7e000000000000",
        );
        let mut packets = 0;
        assert_eq!(parse_elements(&first, 42, &mut packets), None);
        assert_eq!(parse_elements(&last, 42, &mut packets), Some(Ok(())));
        assert_eq!(packets, 2);
        // Another request's answer is not this one's.
        let mut packets = 0;
        assert_eq!(parse_elements(&first, 41, &mut packets), None);
        assert_eq!(packets, 0);
        // Cut anywhere: no panic, nothing invented.
        for n in 0..first.len() {
            let mut packets = 0;
            assert_eq!(parse_elements(&first[..n], 42, &mut packets), None);
            assert!(packets <= 2);
        }
        // The request names the table and the set, as a dump.
        let req = elements_request("t", "e4", 42);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), 0x0a0d);
        assert_eq!(
            u16::from_ne_bytes([req[6], req[7]]),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(
            &req[20..],
            &hex("06000100740000000700020065340000")[..] as &[u8]
        );
    }
}
