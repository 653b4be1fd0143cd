//! Elements of tunsec's nftables verdict maps, added and deleted over
//! `NETLINK_NETFILTER` from within tunsec: a policy change at 10,000 peers
//! is one small netlink batch (microseconds), not an `nft` process that
//! reloads the whole table (hundreds of milliseconds).
//!
//! The maps are declared by the ruleset text (`nftables::ruleset`);
//! only their elements move here. The message layouts are nf_tables'
//! (`linux/netfilter/nf_tables.h`), built by hand: a batch is a
//! `NFNL_MSG_BATCH_BEGIN`, one `NFT_MSG_NEWSETELEM` or `NFT_MSG_DELSETELEM`
//! per element, and a `NFNL_MSG_BATCH_END`, applied by the kernel all or
//! nothing. Building the bytes is pure; [`Nfnl`] sends them and reads the
//! acks.

use anyhow::{Result, bail};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

/// A verdict of a map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
        }
    }
}

/// One element change: in map `set`, the key `src . dst`, added with a
/// verdict or (`None`) deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub set: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub verdict: Option<Verdict>,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// An attribute (padded to 4 bytes); `f` writes its payload.
fn attr(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let at = b.len();
    b.extend_from_slice(&[0; 4]);
    f(b);
    let len = b.len() - at;
    b[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    b[at + 2..at + 4].copy_from_slice(&ty.to_ne_bytes());
    b.resize(at + align(len), 0);
}

fn nested(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    attr(b, ty | NLA_F_NESTED, f)
}

fn cstr(b: &mut Vec<u8>, ty: u16, s: &str) {
    attr(b, ty, |b| {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    })
}

/// A netlink message with the `nfgenmsg` header; `f` writes attributes.
fn message(
    b: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let at = b.len();
    b.extend_from_slice(&[0; 16]);
    b[at + 4..at + 6].copy_from_slice(&ty.to_ne_bytes());
    b[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
    b[at + 8..at + 12].copy_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&[family, 0]);
    b.extend_from_slice(&res_id.to_be_bytes());
    f(b);
    let len = b.len() - at;
    b[at..at + 4].copy_from_slice(&(len as u32).to_ne_bytes());
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

/// The batch for `ops` on table `table` (family inet), sequence numbers
/// from `seq`: the begin marker, one message per element (acknowledged),
/// the end marker.
pub fn batch(table: &str, ops: &[Op], seq: u32) -> Vec<u8> {
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
    for (i, op) in ops.iter().enumerate() {
        let (ty, flags) = match op.verdict {
            Some(_) => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
            None => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        let seq = seq.wrapping_add(1 + i as u32);
        message(
            &mut b,
            (subsys << 8) | ty,
            flags,
            seq,
            NFPROTO_INET,
            0,
            |b| {
                cstr(b, NFTA_SET_ELEM_LIST_TABLE, table);
                cstr(b, NFTA_SET_ELEM_LIST_SET, &op.set);
                nested(b, NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    nested(b, NFTA_LIST_ELEM, |b| {
                        nested(b, NFTA_SET_ELEM_KEY, |b| {
                            attr(b, NFTA_DATA_VALUE, |b| {
                                b.extend_from_slice(&key(op.src, op.dst))
                            })
                        });
                        if let Some(v) = op.verdict {
                            nested(b, NFTA_SET_ELEM_DATA, |b| {
                                nested(b, NFTA_DATA_VERDICT, |b| {
                                    attr(b, NFTA_VERDICT_CODE, |b| {
                                        b.extend_from_slice(&v.code().to_be_bytes())
                                    })
                                })
                            });
                        }
                    })
                })
            },
        );
    }
    let end = seq.wrapping_add(1 + ops.len() as u32);
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
/// are acknowledged, `Some(Err(errno, index))` at the first error, `None`
/// if more is to come.
pub fn acks(
    reply: &[u8],
    seq: u32,
    n: usize,
    acked: &mut usize,
) -> Option<Result<(), (i32, usize)>> {
    let mut off = 0;
    while off + 16 <= reply.len() {
        let len = u32::from_ne_bytes(reply[off..off + 4].try_into().ok()?) as usize;
        if len < 16 || off + len > reply.len() {
            break;
        }
        let ty = u16::from_ne_bytes([reply[off + 4], reply[off + 5]]);
        let rseq = u32::from_ne_bytes(reply[off + 8..off + 12].try_into().ok()?);
        let idx = rseq.wrapping_sub(seq).wrapping_sub(1) as usize;
        if ty == 2 && len >= 20 && idx < n {
            let e = -i32::from_ne_bytes(reply[off + 16..off + 20].try_into().ok()?);
            if e != 0 {
                return Some(Err((e, idx)));
            }
            *acked += 1;
        }
        off += align(len);
    }
    (*acked >= n).then_some(Ok(()))
}

/// A `NETLINK_NETFILTER` socket for map elements.
pub struct Nfnl {
    fd: OwnedFd,
    seq: u32,
}

impl Nfnl {
    pub fn open() -> io::Result<Nfnl> {
        let fd = super::rtnl::netlink_socket(
            libc::NETLINK_NETFILTER,
            std::time::Duration::from_secs(5),
        )?;
        Ok(Nfnl { fd, seq: 1 })
    }

    /// Apply `ops` to `table`'s maps as one transaction.
    pub fn apply(&mut self, table: &str, ops: &[Op]) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(ops.len() as u32 + 2);
        let req = batch(table, ops, seq);
        // SAFETY: the buffer is valid for the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr() as *const _, req.len(), 0) };
        if n < 0 {
            bail!(
                "nftables: cannot send map elements: {}",
                io::Error::last_os_error()
            );
        }
        let mut buf = vec![0u8; 16384];
        let mut acked = 0;
        loop {
            // SAFETY: the buffer is valid for the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut _,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                bail!(
                    "nftables: no answer from the kernel: {}",
                    io::Error::last_os_error()
                );
            }
            match acks(&buf[..n as usize], seq, ops.len(), &mut acked) {
                Some(Ok(())) => return Ok(()),
                Some(Err((e, i))) => {
                    let op = &ops[i];
                    bail!(
                        "nftables: {} {} . {} in map {}: {}",
                        if op.verdict.is_some() {
                            "adding"
                        } else {
                            "deleting"
                        },
                        op.src,
                        op.dst,
                        op.set,
                        io::Error::from_raw_os_error(e)
                    )
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The element message `nft --debug=mnl add element inet t in4_0 '{
    /// 10.0.0.8 . 10.0.0.2 : drop }'` sends (nftables 1.0.6), without the
    /// set id nft adds for sets of its own batch.
    #[test]
    fn an_element_is_what_nft_sends() {
        let ops = [Op {
            set: "in4_0".into(),
            src: "10.0.0.8".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            verdict: Some(Verdict::Drop),
        }];
        let b = batch("t", &ops, 7);
        // begin (20) + element + end (20)
        let len = u32::from_ne_bytes(b[20..24].try_into().unwrap()) as usize;
        assert_eq!(b.len(), 20 + len + 20);
        let msg = &b[20..20 + len];
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x0a0c);
        assert_eq!(&msg[16..20], &[1, 0, 0, 0]);
        let attrs: Vec<u8> = [
            &[6, 0, 1, 0][..],
            b"t\0\0\0",
            &[10, 0, 2, 0],
            b"in4_0\0\0\0",
            &[40, 0, 3, 0x80, 36, 0, 1, 0x80, 16, 0, 1, 0x80, 12, 0, 1, 0],
            &[10, 0, 0, 8, 10, 0, 0, 2],
            &[16, 0, 2, 0x80, 12, 0, 2, 0x80, 8, 0, 1, 0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(&msg[20..], &attrs[..]);
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
        // Someone else's answer is not ours.
        let mut acked = 0;
        assert_eq!(acks(&ack(99, 0), 10, 1, &mut acked), None);
    }
}
