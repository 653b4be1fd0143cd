//! The expressions of the rules tunsec adds to its input chain, as nft
//! 1.0.6 encodes the same text (`nft --debug=netlink` shows them; the
//! tests hold the bytes of `--debug=mnl`): a match loads a register
//! (`meta`, `payload`), masks it when a prefix is not whole bytes
//! (`bitwise`) and compares it (`cmp`); then a `counter` and the verdict
//! (`immediate`). Also the reading back of what a dump or an echo says of
//! a rule: its comment and what its counter dropped.

use super::wire::{
    NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM,
    NFTA_VERDICT_CODE, attr, attrs, be32, cstr, nested,
};

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
/// The second 32-bit register of `NFT_REG_1` (`NFT_REG32_01`).
const NFT_REG32_01: u32 = 9;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CMP_EQ: u32 = 0;
/// A rule's comment in its user data (`NFTNL_UDATA_RULE_COMMENT`).
const UDATA_COMMENT: u8 = 0;

/// What a rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
}

impl Verdict {
    pub(super) fn code(self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
        }
    }
}

fn expr(b: &mut Vec<u8>, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    nested(b, NFTA_LIST_ELEM, |b| {
        cstr(b, NFTA_EXPR_NAME, name);
        nested(b, NFTA_EXPR_DATA, f);
    })
}

/// The expressions of `ip saddr . ip daddr @set drop` (or `accept`) in an
/// inet table: the family check nft adds, both addresses loaded next to
/// each other, the lookup, the verdict.
pub(super) fn set_rule_exprs(
    b: &mut Vec<u8>,
    set: &str,
    v6: bool,
    set_id: Option<u32>,
    verdict: Verdict,
) {
    let (len, src, second) = if v6 {
        (16, 8, NFT_REG_2)
    } else {
        (4, 12, NFT_REG32_01)
    };
    Match::nfproto(v6).write(b);
    for (dreg, off) in [(NFT_REG_1, src), (second, src + len)] {
        expr(b, "payload", |b| {
            be32(b, 1, dreg); // NFTA_PAYLOAD_DREG
            be32(b, 2, NFT_PAYLOAD_NETWORK_HEADER); // NFTA_PAYLOAD_BASE
            be32(b, 3, off); // NFTA_PAYLOAD_OFFSET
            be32(b, 4, len); // NFTA_PAYLOAD_LEN
        });
    }
    expr(b, "lookup", |b| {
        be32(b, 2, NFT_REG_1); // NFTA_LOOKUP_SREG
        cstr(b, 1, set); // NFTA_LOOKUP_SET
        if let Some(id) = set_id {
            be32(b, 4, id); // NFTA_LOOKUP_SET_ID
        }
    });
    verdict.write(b);
}

/// What a match loads into the register it compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// `meta nfproto`: the family.
    Nfproto,
    /// `meta l4proto`: the upper-layer protocol (after IPv6's extension
    /// headers).
    L4proto,
    /// `len` bytes of the network header from `offset`.
    Network { offset: u32, len: u32 },
    /// `len` bytes of the transport header from `offset`.
    Transport { offset: u32, len: u32 },
}

/// One match of a rule: what is loaded, masked with `mask` if any, must
/// equal `value` (as long as the load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub load: Load,
    pub mask: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

impl Match {
    /// `meta nfproto ipv4` (or `ipv6`).
    pub fn nfproto(v6: bool) -> Match {
        let f = if v6 {
            libc::NFPROTO_IPV6
        } else {
            libc::NFPROTO_IPV4
        };
        Match {
            load: Load::Nfproto,
            mask: None,
            value: vec![f as u8],
        }
    }

    /// `meta l4proto P`.
    pub fn l4proto(p: u8) -> Match {
        Match {
            load: Load::L4proto,
            mask: None,
            value: vec![p],
        }
    }

    /// An address of the network header at `offset` within the prefix of
    /// `len` bits of `addr` (its octets, 4 or 16), as nft matches
    /// `ip saddr 10.1.0.0/20`: a whole address, or a prefix of whole bytes,
    /// is that many bytes compared; any other prefix (/0 too) is the whole
    /// address masked, then compared.
    pub fn prefix(offset: u32, addr: &[u8], len: u8) -> Match {
        let bits = 8 * addr.len();
        let len = (len as usize).min(bits);
        let masked: Vec<u8> = (0..addr.len())
            .map(|i| {
                let keep = len.saturating_sub(8 * i).min(8);
                addr[i] & !(0xffu16 >> keep) as u8
            })
            .collect();
        if len > 0 && len.is_multiple_of(8) {
            Match {
                load: Load::Network {
                    offset,
                    len: len as u32 / 8,
                },
                mask: None,
                value: masked[..len / 8].to_vec(),
            }
        } else {
            let mask = (0..addr.len())
                .map(|i| !(0xffu16 >> len.saturating_sub(8 * i).min(8)) as u8)
                .collect();
            Match {
                load: Load::Network {
                    offset,
                    len: addr.len() as u32,
                },
                mask: Some(mask),
                value: masked,
            }
        }
    }

    /// `value` at `offset` of the transport header (ports, ICMP type and
    /// code; nft loads neighbours together, as `th sport 22 th dport 80`
    /// is four bytes from 0).
    pub fn transport(offset: u32, value: Vec<u8>) -> Match {
        Match {
            load: Load::Transport {
                offset,
                len: value.len() as u32,
            },
            mask: None,
            value,
        }
    }

    fn write(&self, b: &mut Vec<u8>) {
        let payload = |b: &mut Vec<u8>, base: u32, offset: u32, len: u32| {
            expr(b, "payload", |b| {
                be32(b, 1, NFT_REG_1); // NFTA_PAYLOAD_DREG
                be32(b, 2, base); // NFTA_PAYLOAD_BASE
                be32(b, 3, offset); // NFTA_PAYLOAD_OFFSET
                be32(b, 4, len); // NFTA_PAYLOAD_LEN
            })
        };
        match self.load {
            Load::Nfproto | Load::L4proto => expr(b, "meta", |b| {
                let key = if self.load == Load::Nfproto {
                    NFT_META_NFPROTO
                } else {
                    NFT_META_L4PROTO
                };
                be32(b, 2, key); // NFTA_META_KEY
                be32(b, 1, NFT_REG_1); // NFTA_META_DREG
            }),
            Load::Network { offset, len } => payload(b, NFT_PAYLOAD_NETWORK_HEADER, offset, len),
            Load::Transport { offset, len } => {
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, offset, len)
            }
        }
        let data = |b: &mut Vec<u8>, ty: u16, v: &[u8]| {
            nested(b, ty, |b| {
                attr(b, NFTA_DATA_VALUE, |b| b.extend_from_slice(v))
            })
        };
        if let Some(mask) = &self.mask {
            expr(b, "bitwise", |b| {
                be32(b, 1, NFT_REG_1); // NFTA_BITWISE_SREG
                be32(b, 2, NFT_REG_1); // NFTA_BITWISE_DREG
                be32(b, 3, mask.len() as u32); // NFTA_BITWISE_LEN
                data(b, 4, mask); // NFTA_BITWISE_MASK
                data(b, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
            });
        }
        expr(b, "cmp", |b| {
            be32(b, 1, NFT_REG_1); // NFTA_CMP_SREG
            be32(b, 2, NFT_CMP_EQ); // NFTA_CMP_OP
            data(b, 3, &self.value); // NFTA_CMP_DATA
        });
    }
}

impl Verdict {
    /// The verdict's expression: `immediate` into the verdict register.
    fn write(self, b: &mut Vec<u8>) {
        expr(b, "immediate", |b| {
            be32(b, 1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
            nested(b, 2, |b| {
                // NFTA_IMMEDIATE_DATA
                nested(b, NFTA_DATA_VERDICT, |b| {
                    be32(b, NFTA_VERDICT_CODE, self.code())
                })
            });
        });
    }
}

/// The expressions of a rule that matches all of `matches`, counts what
/// it matched if `counter`, and gives `verdict`.
pub(super) fn match_rule_exprs(
    b: &mut Vec<u8>,
    matches: &[Match],
    counter: bool,
    verdict: Verdict,
) {
    for m in matches {
        m.write(b);
    }
    if counter {
        expr(b, "counter", |_| {});
    }
    verdict.write(b);
}

/// A rule's user data with its comment. The kernel takes 256 bytes of it:
/// a comment of at most 253, its NUL and the type and length bytes.
pub(super) fn comment_udata(b: &mut Vec<u8>, comment: &str) {
    let c = &comment.as_bytes()[..comment.len().min(253)];
    b.push(UDATA_COMMENT);
    b.push(c.len() as u8 + 1);
    b.extend_from_slice(c);
    b.push(0);
}

/// The packets a rule's expressions count when its verdict is `drop`:
/// its `counter`'s, if an `immediate` sets the verdict drop.
pub(super) fn dropped(exprs: &[u8]) -> u64 {
    let (mut packets, mut drop) = (0, false);
    for (_, e) in attrs(exprs) {
        let mut name: &[u8] = &[];
        let mut data: &[u8] = &[];
        for (ty, v) in attrs(e) {
            match ty {
                NFTA_EXPR_NAME => name = v.strip_suffix(&[0]).unwrap_or(v),
                NFTA_EXPR_DATA => data = v,
                _ => {}
            }
        }
        match name {
            b"counter" => packets = counter_packets(data).unwrap_or(0),
            b"immediate" => {
                drop = attrs(data)
                    .filter(|(ty, _)| *ty == 2) // NFTA_IMMEDIATE_DATA
                    .flat_map(|(_, d)| attrs(d))
                    .filter(|(ty, _)| *ty == NFTA_DATA_VERDICT)
                    .flat_map(|(_, v)| attrs(v))
                    .any(|(ty, c)| {
                        ty == NFTA_VERDICT_CODE && c == Verdict::Drop.code().to_be_bytes()
                    })
            }
            _ => {}
        }
    }
    if drop { packets } else { 0 }
}

/// The packets expression `e` (a list element: its name and data) counted,
/// if it is a counter.
pub(super) fn counted(e: &[u8]) -> Option<u64> {
    let mut counter = false;
    for (ty, d) in attrs(e) {
        match ty {
            NFTA_EXPR_NAME => counter = d.starts_with(b"counter\0"),
            NFTA_EXPR_DATA if counter => return counter_packets(d),
            _ => {}
        }
    }
    None
}

/// `NFTA_COUNTER_PACKETS` in a counter's data.
fn counter_packets(data: &[u8]) -> Option<u64> {
    attrs(data)
        .find(|(ty, v)| *ty == 2 && v.len() == 8)
        .map(|(_, v)| u64::from_be_bytes(v.try_into().unwrap_or_default()))
}

/// The comment in a rule's user data.
pub(super) fn comment(udata: &[u8]) -> Option<String> {
    let mut u = udata;
    while u.len() >= 2 {
        let (ty, len) = (u[0], u[1] as usize);
        let v = u.get(2..2 + len)?;
        if ty == UDATA_COMMENT {
            let v = v.strip_suffix(&[0]).unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        u = &u[2 + len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes `nft --debug=netlink` shows for `ip saddr` with each kind
    /// of prefix (nftables 1.0.6).
    #[test]
    fn a_prefix_is_loaded_as_nft_loads_it() {
        let net = |offset, len| Load::Network { offset, len };
        // 10.0.0.7: four bytes compared.
        let m = Match::prefix(12, &[10, 0, 0, 7], 32);
        assert_eq!(
            (m.load, m.mask, m.value),
            (net(12, 4), None, vec![10, 0, 0, 7])
        );
        // 10.0.0.0/16: two bytes.
        let m = Match::prefix(12, &[10, 0, 0, 0], 16);
        assert_eq!((m.load, m.mask, m.value), (net(12, 2), None, vec![10, 0]));
        // 10.1.0.0/20: four bytes masked, host bits of the value cleared.
        let m = Match::prefix(16, &[10, 1, 15, 9], 20);
        let want = (net(16, 4), Some(vec![255, 255, 240, 0]), vec![10, 1, 0, 0]);
        assert_eq!((m.load, m.mask, m.value), want);
        // /0 (`ip daddr 0.0.0.0/0`): masked to nothing.
        let m = Match::prefix(16, &[10, 1, 2, 3], 0);
        let want = (net(16, 4), Some(vec![0; 4]), vec![0; 4]);
        assert_eq!((m.load, m.mask, m.value), want);
        // fd00::/61: sixteen bytes masked.
        let mut a = [0u8; 16];
        a[0] = 0xfd;
        a[7] = 0xff;
        let m = Match::prefix(8, &a, 61);
        let mut mask = vec![0xff; 7];
        mask.push(0xf8);
        mask.extend([0; 8]);
        let mut value = vec![0u8; 16];
        value[0] = 0xfd;
        value[7] = 0xf8;
        assert_eq!((m.load, m.mask, m.value), (net(8, 16), Some(mask), value));
    }
}
