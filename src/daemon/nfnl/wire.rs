//! Netlink's bytes for nf_tables: attributes written and read, messages
//! with the `nfgenmsg` header, and the walk over an answer's messages.
//! Pure code over byte buffers, shared by the messages ([`super`]) and
//! the rules' expressions ([`super::rule`]).

pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const NLA_F_NESTED: u16 = 0x8000;
/// An element of a nested list (of expressions, of set elements).
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;

pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_GETSETELEM: u16 = 13;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NFPROTO_INET: u8 = 1;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_DELRULE: u16 = 8;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_DELSET: u16 = 11;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_APPEND: u16 = 0x800;
pub(super) const NLM_F_ECHO: u16 = 0x8;
pub(super) const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
pub(super) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(super) const NFTA_SET_KEY_LEN: u16 = 5;
pub(super) const NFTA_SET_ID: u16 = 10;
pub(super) const NFTA_SET_USERDATA: u16 = 13;
pub(super) const NFTA_SET_EXPR: u16 = 17;
/// nftables' data types `ipv4_addr` (7) and `ipv6_addr` (8), concatenated
/// as nft encodes them (six bits a type): `ipv4_addr . ipv4_addr`.
pub(super) const CONCAT_IPV4: u32 = (7 << 6) | 7;
pub(super) const CONCAT_IPV6: u32 = (8 << 6) | 8;
/// The set's user data nft 1.0.6 writes for such a set (its key's byte
/// order and concatenation, read back by `nft list`), verbatim.
pub(super) const SET_UDATA: [u8; 16] = [0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_HANDLE: u16 = 3;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_RULE_POSITION: u16 = 6;
pub(super) const NFTA_RULE_USERDATA: u16 = 7;

pub(super) fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// An attribute (padded to 4 bytes); `f` writes its payload.
pub(super) fn attr(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let at = b.len();
    b.extend_from_slice(&[0; 4]);
    f(b);
    let len = b.len() - at;
    b[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    b[at + 2..at + 4].copy_from_slice(&ty.to_ne_bytes());
    b.resize(at + align(len), 0);
}

pub(super) fn nested(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    attr(b, ty | NLA_F_NESTED, f)
}

pub(super) fn cstr(b: &mut Vec<u8>, ty: u16, s: &str) {
    attr(b, ty, |b| {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    })
}

/// A netlink message with the `nfgenmsg` header; `f` writes attributes.
pub(super) fn message(
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

/// The netlink attributes in `b`: (type without flags, payload).
pub(super) fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[align(len).min(b.len())..];
        Some((ty, payload))
    })
}

/// One netlink message of an answer: its type, sequence number and the
/// bytes after its header (the `nfgenmsg`, then attributes; an error's
/// errno first).
pub(super) struct Message<'a> {
    pub ty: u16,
    pub seq: u32,
    pub body: &'a [u8],
}

/// The whole messages in `reply`, in order; a truncated one ends it.
pub(super) fn messages(mut reply: &[u8]) -> impl Iterator<Item = Message<'_>> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(reply.get(..4)?.try_into().ok()?) as usize;
        if len < 16 || len > reply.len() {
            return None;
        }
        let m = &reply[..len];
        reply = &reply[align(len).min(reply.len())..];
        Some(Message {
            ty: u16::from_ne_bytes([m[4], m[5]]),
            seq: u32::from_ne_bytes([m[8], m[9], m[10], m[11]]),
            body: &m[16..],
        })
    })
}

impl Message<'_> {
    /// An `NLMSG_ERROR`'s errno (0: an ack).
    pub fn errno(&self) -> Option<i32> {
        let e = i32::from_ne_bytes(self.body.get(..4)?.try_into().ok()?);
        (self.ty == 2).then_some(-e)
    }

    /// The attributes after the `nfgenmsg` header.
    pub fn attrs(&self) -> impl Iterator<Item = (u16, &[u8])> {
        attrs(self.body.get(4..).unwrap_or_default())
    }
}

pub(super) fn be32(b: &mut Vec<u8>, ty: u16, v: u32) {
    attr(b, ty, |b| b.extend_from_slice(&v.to_be_bytes()))
}

/// Bytes from hex, for tests that hold what nft or the kernel sent.
#[cfg(test)]
pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
