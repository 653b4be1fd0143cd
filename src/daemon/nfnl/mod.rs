//! tunsec's nftables changes over `NETLINK_NETFILTER`, from within
//! tunsec: the elements of its sets of peers, the sets that come and go
//! with their input-chain rules, and the rules of other inbound policies.
//! A policy change at 10,000 peers is one small netlink batch
//! (microseconds), not an `nft` process, which reads the table with all
//! its elements before it changes anything (tens of milliseconds at
//! 10,000 peers).
//!
//! The table itself is loaded from the ruleset text
//! (`nftables::ruleset`); here are only changes whose bytes are checked
//! against what `nft --debug=mnl` sends for the same text (nftables
//! 1.0.6): set elements, a set, the rules tunsec writes (`rule.rs`), and
//! deletions. The layouts are nf_tables'
//! (`linux/netfilter/nf_tables.h`), built by hand (no maintained crate
//! covers nf_tables): a batch is a `NFNL_MSG_BATCH_BEGIN`, the messages,
//! and a `NFNL_MSG_BATCH_END`, applied by the kernel all or nothing.
//! Building and parsing bytes is pure; [`Nfnl`] sends them and reads the
//! answers.

mod dump;
mod rule;
mod wire;

pub use dump::{Deleted, Rule};
use dump::{deleted, elements_request, parse_elements, parse_rules, rules_request};

pub use rule::{Load, Match, Verdict};
use rule::{comment_udata, match_rule_exprs, set_rule_exprs};
#[cfg(test)]
pub(crate) use wire::hex;
use wire::*;

use anyhow::{Result, bail};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

/// One element change: in set `set`, the pair `src . dst`, added or
/// deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub set: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub add: bool,
}

fn key(src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let mut k = Vec::with_capacity(32);
    for a in [src, dst] {
        match a {
            IpAddr::V4(a) => k.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => k.extend_from_slice(&a.octets()),
        }
    }
    k
}

/// One change in an nf_tables transaction on tunsec's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// An element added to or deleted from a set.
    Element(Op),
    /// A set of `src . dst` pairs of one family, with a counter per
    /// element, as `nftables::set_decl` declares it; `id` names it to the
    /// rules of the same batch, as nft does.
    NewSet {
        name: String,
        v6: bool,
        id: u32,
    },
    DelSet {
        name: String,
    },
    /// `ip saddr . ip daddr @SET drop comment "COMMENT"` (`ip6` for IPv6;
    /// `accept` for that verdict) in `chain`, before the rule whose handle
    /// is `before`, or last. `set_id`: the set's id when the batch adds
    /// it.
    NewSetRule {
        chain: String,
        set: String,
        v6: bool,
        set_id: Option<u32>,
        verdict: Verdict,
        comment: String,
        before: Option<u64>,
    },
    /// A rule of `chain` that matches all of `matches`, counts what it
    /// matched if `counter`, and gives `verdict`, with `comment`; before
    /// the rule whose handle is `before`, or last.
    NewRule {
        chain: String,
        matches: Vec<Match>,
        counter: bool,
        verdict: Verdict,
        comment: String,
        before: Option<u64>,
    },
    /// A rule deleted by its handle; the kernel echoes it back with its
    /// counter (read by `dump::deleted`).
    DelRule {
        chain: String,
        handle: u64,
    },
}

impl Msg {
    /// What this change does, for an error.
    pub fn describe(&self) -> String {
        match self {
            Msg::Element(op) => format!(
                "{} {} . {} in set {}",
                if op.add { "adding" } else { "deleting" },
                op.src,
                op.dst,
                op.set
            ),
            Msg::NewSet { name, .. } => format!("adding set {name}"),
            Msg::DelSet { name } => format!("deleting set {name}"),
            Msg::NewSetRule { chain, set, .. } => {
                format!("adding the rule of set {set} to chain {chain}")
            }
            Msg::NewRule { chain, comment, .. } => {
                format!("adding rule \"{comment}\" to chain {chain}")
            }
            Msg::DelRule { chain, handle } => {
                format!("deleting rule handle {handle} of chain {chain}")
            }
        }
    }
}

/// One message of a batch on `table` (family inet).
fn msg(b: &mut Vec<u8>, table: &str, m: &Msg, seq: u32) {
    let subsys = NFNL_SUBSYS_NFTABLES;
    let req = NLM_F_REQUEST | NLM_F_ACK;
    let head = |b: &mut Vec<u8>, ty: u16, flags: u16, f: &mut dyn FnMut(&mut Vec<u8>)| {
        message(b, (subsys << 8) | ty, flags, seq, NFPROTO_INET, 0, |b| f(b))
    };
    match m {
        Msg::Element(op) => {
            let (ty, flags) = if op.add {
                (NFT_MSG_NEWSETELEM, req | NLM_F_CREATE)
            } else {
                // Echoed back with its counter (see [`deleted`]).
                (NFT_MSG_DELSETELEM, req | NLM_F_ECHO)
            };
            head(b, ty, flags, &mut |b| {
                cstr(b, NFTA_SET_ELEM_LIST_TABLE, table);
                cstr(b, NFTA_SET_ELEM_LIST_SET, &op.set);
                nested(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    nested(b, NFTA_LIST_ELEM, |b| {
                        nested(b, NFTA_SET_ELEM_KEY, |b| {
                            attr(b, NFTA_DATA_VALUE, |b| {
                                b.extend_from_slice(&key(op.src, op.dst))
                            })
                        });
                    })
                })
            })
        }
        Msg::NewSet { name, v6, id } => head(b, NFT_MSG_NEWSET, req | NLM_F_CREATE, &mut |b| {
            cstr(b, NFTA_SET_TABLE, table);
            cstr(b, NFTA_SET_NAME, name);
            be32(b, NFTA_SET_FLAGS, 0);
            let (ty, len) = if *v6 {
                (CONCAT_IPV6, 32)
            } else {
                (CONCAT_IPV4, 8)
            };
            be32(b, NFTA_SET_KEY_TYPE, ty);
            be32(b, NFTA_SET_KEY_LEN, len);
            be32(b, NFTA_SET_ID, *id);
            attr(b, NFTA_SET_USERDATA, |b| b.extend_from_slice(&SET_UDATA));
            nested(b, NFTA_SET_EXPR, |b| {
                cstr(b, NFTA_EXPR_NAME, "counter");
                nested(b, NFTA_EXPR_DATA, |_| {});
            });
        }),
        Msg::DelSet { name } => head(b, NFT_MSG_DELSET, req, &mut |b| {
            cstr(b, NFTA_SET_TABLE, table);
            cstr(b, NFTA_SET_NAME, name);
        }),
        Msg::NewSetRule {
            chain,
            set,
            v6,
            set_id,
            verdict,
            comment,
            before,
        } => new_rule(b, table, chain, *before, comment, seq, |b| {
            set_rule_exprs(b, set, *v6, *set_id, *verdict)
        }),
        Msg::NewRule {
            chain,
            matches,
            counter,
            verdict,
            comment,
            before,
        } => new_rule(b, table, chain, *before, comment, seq, |b| {
            match_rule_exprs(b, matches, *counter, *verdict)
        }),
        // Echoed back with its counter (see [`deleted`]).
        Msg::DelRule { chain, handle } => head(b, NFT_MSG_DELRULE, req | NLM_F_ECHO, &mut |b| {
            cstr(b, NFTA_RULE_TABLE, table);
            cstr(b, NFTA_RULE_CHAIN, chain);
            attr(b, NFTA_RULE_HANDLE, |b| {
                b.extend_from_slice(&handle.to_be_bytes())
            });
        }),
    }
}

/// A `NFT_MSG_NEWRULE` on `table` (family inet): in `chain`, before the
/// rule whose handle is `before` (its position, not appended) or last
/// (appended), with the expressions `exprs` writes and `comment`.
fn new_rule(
    b: &mut Vec<u8>,
    table: &str,
    chain: &str,
    before: Option<u64>,
    comment: &str,
    seq: u32,
    exprs: impl FnOnce(&mut Vec<u8>),
) {
    let append = if before.is_some() { 0 } else { NLM_F_APPEND };
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | append;
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
    message(b, ty, flags, seq, NFPROTO_INET, 0, |b| {
        cstr(b, NFTA_RULE_TABLE, table);
        cstr(b, NFTA_RULE_CHAIN, chain);
        if let Some(h) = before {
            attr(b, NFTA_RULE_POSITION, |b| {
                b.extend_from_slice(&h.to_be_bytes())
            });
        }
        nested(b, NFTA_RULE_EXPRESSIONS, exprs);
        attr(b, NFTA_RULE_USERDATA, |b| comment_udata(b, comment));
    })
}

/// The batch for `msgs` on table `table` (family inet), sequence numbers
/// from `seq`: the begin marker, the messages (each acknowledged), the
/// end marker. The kernel applies it all or nothing.
pub fn batch(table: &str, msgs: &[Msg], seq: u32) -> Vec<u8> {
    let mut b = Vec::new();
    let subsys = NFNL_SUBSYS_NFTABLES;
    message(
        &mut b,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        subsys,
        |_| {},
    );
    for (i, m) in msgs.iter().enumerate() {
        msg(&mut b, table, m, seq.wrapping_add(1 + i as u32));
    }
    let end = seq.wrapping_add(1 + msgs.len() as u32);
    message(
        &mut b,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end,
        0,
        subsys,
        |_| {},
    );
    b
}

/// Read the kernel's answers to a batch of `n` acknowledged messages with
/// sequence numbers `seq + 1 ..= seq + n` in `reply`: `Some(Ok)` once all
/// are acknowledged, `Some(Err(errno, index))` at the first error (index
/// `n`: the batch as a whole), `None` if more is to come.
pub fn acks(
    reply: &[u8],
    seq: u32,
    n: usize,
    acked: &mut usize,
) -> Option<Result<(), (i32, usize)>> {
    for m in messages(reply) {
        let idx = m.seq.wrapping_sub(seq).wrapping_sub(1) as usize;
        // An error for the batch's markers (no permission, no nf_tables)
        // fails the whole batch: index `n`.
        let marker = m.seq == seq || idx == n;
        match m.errno() {
            Some(e) if e != 0 && (idx < n || marker) => return Some(Err((e, idx.min(n)))),
            Some(_) if idx < n => *acked += 1,
            _ => {}
        }
    }
    (*acked >= n).then_some(Ok(()))
}

/// A `NETLINK_NETFILTER` socket for tunsec's table.
pub struct Nfnl {
    fd: OwnedFd,
    seq: u32,
    /// Answers: a dump's parts are up to a page or two each.
    buf: Vec<u8>,
    /// The largest batch one send takes: what the send buffer allows
    /// (netlink counts the skb's overhead against it too).
    sndbuf: usize,
}

impl Nfnl {
    pub fn open() -> io::Result<Nfnl> {
        let fd = super::rtnl::netlink_socket(
            libc::NETLINK_NETFILTER,
            std::time::Duration::from_secs(5),
        )?;
        // The kernel answers a whole batch at once, an ack a message, each
        // counted at about a kilobyte against the receive buffer (nft sizes
        // it so too): room for the largest batch tunsec sends. Acks without
        // the request they answer (NETLINK_CAP_ACK) are smaller.
        // Deleted elements are echoed too: on kernels before 5.13 each in
        // an skb of its own (a page or more).
        // A batch goes in one send, which must fit the send buffer: up to
        // a thousand messages of rules (about 700 bytes each) or elements.
        let rcvbuf: libc::c_int = 8 << 20;
        let sndbuf: libc::c_int = 1 << 20;
        let one: libc::c_int = 1;
        // SAFETY: options on our own socket, with valid pointers and sizes.
        unsafe {
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            for (force, plain, v) in [
                (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, &rcvbuf),
                (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, &sndbuf),
            ] {
                let p = v as *const _ as *const libc::c_void;
                if libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, force, p, size) != 0 {
                    libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, plain, p, size);
                }
            }
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_CAP_ACK,
                &one as *const _ as *const libc::c_void,
                size,
            );
        }
        // What the kernel granted (twice what was asked, or twice
        // `wmem_max` without CAP_NET_ADMIN), less room for the skb.
        let mut got: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads an int option of our own socket into `got`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                &mut got as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        let granted = if r == 0 { got.max(0) as usize } else { 212_992 };
        Ok(Nfnl {
            fd,
            seq: 1,
            buf: vec![0; 65536],
            sndbuf: granted.saturating_sub(4096),
        })
    }

    /// Apply `msgs` to `table` as one transaction. What it deleted, each
    /// with what its counter had counted, goes to `gone` as the kernel
    /// echoes it, also when the answer then fails (echoes come only from
    /// a batch the kernel committed).
    pub fn apply(&mut self, table: &str, msgs: &[Msg], gone: &mut Vec<Deleted>) -> Result<()> {
        if msgs.is_empty() {
            return Ok(());
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(msgs.len() as u32 + 2);
        let b = batch(table, msgs, seq);
        if b.len() > self.sndbuf {
            bail!(
                "nftables: a batch of {} bytes ({} messages) does not fit the socket's send buffer of {} bytes",
                b.len(),
                msgs.len(),
                self.sndbuf
            );
        }
        self.send(&b)?;
        let mut acked = 0;
        loop {
            let n = self.recv()?;
            deleted(&self.buf[..n], seq, msgs.len(), gone);
            match acks(&self.buf[..n], seq, msgs.len(), &mut acked) {
                Some(Ok(())) => return Ok(()),
                Some(Err((e, i))) => bail!(
                    "nftables: {}: {}",
                    msgs.get(i)
                        .map_or_else(|| "the batch".to_string(), Msg::describe),
                    io::Error::from_raw_os_error(e)
                ),
                None => {}
            }
        }
    }

    /// The rules of `chain` in `table`, in order.
    pub fn rules(&mut self, table: &str, chain: &str) -> Result<Vec<Rule>> {
        let mut out = Vec::new();
        let what = format!("chain {chain} of table {table}");
        self.dump(
            |seq| rules_request(table, chain, seq),
            &what,
            |part, seq| parse_rules(part, seq, &mut out),
        )?;
        Ok(out)
    }

    /// What the counters of set `set`'s elements in `table` counted,
    /// together.
    pub fn counted(&mut self, table: &str, set: &str) -> Result<u64> {
        let mut packets = 0;
        let what = format!("set {set} of table {table}");
        self.dump(
            |seq| elements_request(table, set, seq),
            &what,
            |part, seq| parse_elements(part, seq, &mut packets),
        )?;
        Ok(packets)
    }

    /// Send the dump request `request` makes for a sequence number and
    /// hand each part of the answer to `part` until it says the dump ended
    /// (`what` names it in an error).
    fn dump(
        &mut self,
        request: impl FnOnce(u32) -> Vec<u8>,
        what: &str,
        mut part: impl FnMut(&[u8], u32) -> Option<Result<(), i32>>,
    ) -> Result<()> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.send(&request(seq))?;
        loop {
            let n = self.recv()?;
            match part(&self.buf[..n], seq) {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) => bail!(
                    "nftables: listing {what}: {}",
                    io::Error::from_raw_os_error(e)
                ),
                None => {}
            }
        }
    }

    fn send(&self, req: &[u8]) -> Result<()> {
        // SAFETY: the buffer is valid for the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr() as *const _, req.len(), 0) };
        if n < 0 {
            bail!(
                "nftables: cannot send to the kernel: {}",
                io::Error::last_os_error()
            );
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<usize> {
        // SAFETY: the buffer is valid for the call.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                self.buf.as_mut_ptr() as *mut _,
                self.buf.len(),
                0,
            )
        };
        if n < 0 {
            bail!(
                "nftables: no answer from the kernel: {}",
                io::Error::last_os_error()
            );
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::wire::hex;
    use super::*;

    /// The element message `nft --debug=mnl add element inet t d4_9 '{
    /// 10.0.0.8 . 10.0.0.2 }'` sends (nftables 1.0.6), without the set id
    /// nft adds (an attribute `08 00 04 00 ...` before the elements).
    #[test]
    fn an_element_is_what_nft_sends() {
        let ops = [Op {
            set: "d4_9".into(),
            src: "10.0.0.8".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            add: true,
        }];
        let msgs: Vec<Msg> = ops.into_iter().map(Msg::Element).collect();
        let b = batch("t", &msgs, 7);
        // begin (20) + element + end (20)
        let len = u32::from_ne_bytes(b[20..24].try_into().unwrap()) as usize;
        assert_eq!(b.len(), 20 + len + 20);
        let msg = &b[20..20 + len];
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x0a0c);
        assert_eq!(&msg[16..20], &[1, 0, 0, 0]);
        let nft = "06000100740000000900020064345f3900000000\
                   1800038014000180100001800c0001000a0000080a000002";
        assert_eq!(&msg[20..], &hex(nft)[..]);
        // Deleted: the same attributes in a NFT_MSG_DELSETELEM.
        let del = Msg::Element(Op {
            add: false,
            ..msgs[0].clone().op()
        });
        let b = batch("t", &[del], 7);
        let (ty, flags, attrs) = only(&b);
        assert_eq!(ty, 0x0a0e);
        // Echoed back with its counter.
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO);
        assert_eq!(attrs, &hex(nft)[..]);
        // The batch markers name the nf_tables subsystem.
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 0x10);
        assert_eq!(&b[16..20], &[0, 0, 0, 10]);
        assert_eq!(u16::from_ne_bytes([b[b.len() - 16], b[b.len() - 15]]), 0x11);
    }

    #[test]
    fn acks_are_counted_and_errors_named() {
        let ack = |seq: u32, errno: i32| {
            let mut m = vec![0u8; 36];
            m[0..4].copy_from_slice(&36u32.to_ne_bytes());
            m[4..6].copy_from_slice(&2u16.to_ne_bytes());
            m[8..12].copy_from_slice(&seq.to_ne_bytes());
            m[16..20].copy_from_slice(&(-errno).to_ne_bytes());
            m
        };
        let mut acked = 0;
        assert_eq!(acks(&ack(11, 0), 10, 2, &mut acked), None);
        assert_eq!(acks(&ack(12, 0), 10, 2, &mut acked), Some(Ok(())));
        let mut acked = 0;
        let two = [ack(11, 0), ack(12, libc::ENOENT)].concat();
        assert_eq!(acks(&two, 10, 2, &mut acked), Some(Err((libc::ENOENT, 1))));
        // An error for the batch's begin marker fails the batch.
        let mut acked = 0;
        assert_eq!(
            acks(&ack(10, libc::EPERM), 10, 2, &mut acked),
            Some(Err((libc::EPERM, 2)))
        );
        // Someone else's answer is not ours.
        let mut acked = 0;
        assert_eq!(acks(&ack(99, 0), 10, 1, &mut acked), None);
    }

    impl Msg {
        fn op(self) -> Op {
            match self {
                Msg::Element(op) => op,
                m => panic!("not an element: {m:?}"),
            }
        }
    }

    /// The one message of a batch of one: (type, flags, attributes).
    fn only(b: &[u8]) -> (u16, u16, &[u8]) {
        let len = u32::from_ne_bytes(b[20..24].try_into().unwrap()) as usize;
        assert_eq!(b.len(), 20 + len + 20);
        let m = &b[20..20 + len];
        (
            u16::from_ne_bytes([m[4], m[5]]),
            u16::from_ne_bytes([m[6], m[7]]),
            &m[20..],
        )
    }

    /// `nft --debug=mnl 'add set inet t d4_9 { type ipv4_addr .
    /// ipv4_addr; counter; }'` (and the same for IPv6), nftables 1.0.6:
    /// the attributes of its `NFT_MSG_NEWSET`.
    #[test]
    fn a_set_is_what_nft_sends() {
        let nft4 = "06000100740000000900020064345f3900000000080003000000000008000400000001c7080005000000000808000a000000000114000d00000400000000030800040d0000000100140011800c000100636f756e7465720004000280";
        let nft6 = "06000100740000000900020064365f390000000008000300000000000800040000000208080005000000002008000a000000000114000d00000400000000030800040d0000000100140011800c000100636f756e7465720004000280";
        for (v6, nft) in [(false, nft4), (true, nft6)] {
            let m = Msg::NewSet {
                name: format!("d{}_9", if v6 { 6 } else { 4 }),
                v6,
                id: 1,
            };
            let b = batch("t", &[m], 1);
            let (ty, flags, attrs) = only(&b);
            assert_eq!(ty, 0x0a09);
            assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
            assert_eq!(attrs, &hex(nft)[..], "IPv6: {v6}");
        }
    }

    /// `nft --debug=mnl add rule inet t input ip saddr . ip daddr @d4_9
    /// drop comment "x"` and `... ip6 saddr . ip6 daddr @d6_9 accept
    /// comment "y"` (nft names the sets by their ids in its cache too, 5
    /// and 6 there).
    #[test]
    fn a_set_rule_is_what_nft_sends() {
        let nft4 = "06000100740000000a000200696e7075740000001c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c0800040000000004340001800c0001007061796c6f616400240002800800010000000009080002000000000108000300000000100800040000000004300001800b0001006c6f6f6b757000002000028008000200000000010900010064345f39000000000800040000000005300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000800070000027800";
        let nft6 = "06000100740000000a000200696e7075740000001c01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f616400240002800800010000000001080002000000000108000300000000080800040000000010340001800c0001007061796c6f616400240002800800010000000002080002000000000108000300000000180800040000000010300001800b0001006c6f6f6b757000002000028008000200000000010900010064365f39000000000800040000000006300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000010800070000027900";
        let rule = |v6: bool, before: Option<u64>| Msg::NewSetRule {
            chain: "input".into(),
            set: format!("d{}_9", if v6 { 6 } else { 4 }),
            v6,
            set_id: Some(if v6 { 6 } else { 5 }),
            verdict: if v6 { Verdict::Accept } else { Verdict::Drop },
            comment: (if v6 { "y" } else { "x" }).into(),
            before,
        };
        let b = batch("t", &[rule(false, None)], 1);
        let (ty, flags, attrs) = only(&b);
        assert_eq!(ty, 0x0a06);
        // Last in the chain: appended.
        assert_eq!(
            flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
        );
        assert_eq!(attrs, &hex(nft4)[..]);
        let b = batch("t", &[rule(true, None)], 1);
        assert_eq!(only(&b).2, &hex(nft6)[..]);
        // Before the rule with handle 5: its position, not appended.
        let b = batch("t", &[rule(true, Some(5))], 1);
        let (_, flags, attrs) = only(&b);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE);
        let n6 = hex(nft6);
        assert_eq!(&attrs[..20], &n6[..20]);
        assert_eq!(&attrs[20..32], &[12, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&attrs[32..], &n6[20..]);
    }

    #[test]
    fn deletions_name_the_rule_by_handle_and_the_map_by_name() {
        let b = batch(
            "t",
            &[
                Msg::DelRule {
                    chain: "input".into(),
                    handle: 0x0102,
                },
                Msg::DelSet {
                    name: "in4_5".into(),
                },
            ],
            1,
        );
        let rule = &b[20..20 + 52];
        assert_eq!(u16::from_ne_bytes([rule[4], rule[5]]), 0x0a08);
        // Echoed back with its counter.
        assert_eq!(
            u16::from_ne_bytes([rule[6], rule[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO
        );
        assert_eq!(
            &rule[20..],
            &hex("06000100740000000a000200696e7075740000000c0003000000000000000102")[..]
        );
        let set = &b[72..72 + 40];
        assert_eq!(u16::from_ne_bytes([set[4], set[5]]), 0x0a0b);
        assert_eq!(
            &set[20..],
            &hex("06000100740000000a000200696e345f35000000")[..]
        );
    }

    /// `nft --debug=mnl add rule inet t input RULE` (nftables 1.0.6): a
    /// rule of matches, a counter and a verdict, appended (the shapes
    /// tunsec writes are checked from setkey text in `nftables`' tests).
    #[test]
    fn a_policy_rule_is_what_nft_sends() {
        let v4 = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec();
        let cases = [(
            // meta nfproto ipv4 ip saddr 10.0.0.1 ip daddr 10.0.0.0/24
            // meta l4proto 6 th sport 22 th dport 80 counter drop
            // comment "policy 7"
            vec![
                Match::nfproto(false),
                Match::prefix(12, &v4("10.0.0.1"), 32),
                Match::prefix(16, &v4("10.0.0.0"), 24),
                Match::l4proto(6),
                Match::transport(0, vec![0, 22, 0, 80]),
            ],
            true,
            Verdict::Drop,
            "policy 7",
            "06000100740000000a000200696e7075740000000802048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000c08000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a000001340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000032c00018008000100636d700020000280080001000000000108000200000000000c000380070001000a00000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c0003800800010000160050140001800c000100636f756e7465720004000280300001800e000100696d6d6564696174650000001c0002800800010000000000100002800c00028008000100000000000f0007000009706f6c69637920370000",
        )];
        for (matches, counter, verdict, comment, nft) in cases {
            let m = Msg::NewRule {
                chain: "input".into(),
                matches,
                counter,
                verdict,
                comment: comment.into(),
                before: None,
            };
            let b = batch("t", &[m], 1);
            let (ty, flags, attrs) = only(&b);
            assert_eq!(ty, 0x0a06);
            assert_eq!(
                flags,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
            );
            assert_eq!(attrs, &hex(nft)[..], "{comment}");
        }
    }
}
