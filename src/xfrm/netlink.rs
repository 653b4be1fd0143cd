//! Netlink framing (`linux/netlink.h`): message headers, acks, errors and
//! the end of a dump. Pure functions over bytes.

use netlink_packet_core::Emitable;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
/// Types below this are netlink's own (noop, error, done, overrun).
pub const NLMSG_MIN_TYPE: u16 = 0x10;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;

/// tunsec's own message, sent by the preload shim (never by the kernel's
/// clients themselves): "this connection is netlink port `pid` and
/// listens to multicast groups `groups`" (a `u32` each, native order).
/// It is the shim's `bind()`, `NETLINK_ADD_MEMBERSHIP` and
/// `NETLINK_DROP_MEMBERSHIP` passed on; it gets no reply.
pub const SHIM_BIND: u16 = 0x7453;

/// errno values as the kernel returns them (negated in `nlmsgerr`).
pub mod errno {
    pub const ENOENT: i32 = 2;
    pub const ESRCH: i32 = 3;
    pub const ENOMEM: i32 = 12;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const ENOSYS: i32 = 38;
    pub const ENOPROTOOPT: i32 = 92;
    pub const EPROTONOSUPPORT: i32 = 93;
    pub const EOPNOTSUPP: i32 = 95;
}

/// `struct nlmsghdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub len: u32,
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
        (b.len() >= NLMSG_HDRLEN).then(|| Header {
            len: u32_at(0),
            ty: u16::from_ne_bytes([b[4], b[5]]),
            flags: u16::from_ne_bytes([b[6], b[7]]),
            seq: u32_at(8),
            pid: u32_at(12),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.len.to_ne_bytes());
        out.extend_from_slice(&self.ty.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&self.seq.to_ne_bytes());
        out.extend_from_slice(&self.pid.to_ne_bytes());
    }

    pub fn is_dump(&self) -> bool {
        self.flags & NLM_F_DUMP == NLM_F_DUMP
    }
}

pub fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Why a datagram could not be split into messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("{0} bytes left over: shorter than a netlink header")]
    Short(usize),
    #[error("nlmsg_len {len} does not fit the {left} bytes left in the datagram")]
    BadLength { len: u32, left: usize },
}

/// The messages of one datagram: each header, its payload and its whole
/// bytes (header included, for error replies that quote the request).
/// One message of a datagram: header, payload, whole bytes.
pub type Message<'a> = (Header, &'a [u8], &'a [u8]);

pub fn split(mut buf: &[u8]) -> Vec<Result<Message<'_>, FramingError>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(h) = Header::parse(buf) else {
            out.push(Err(FramingError::Short(buf.len())));
            break;
        };
        let len = h.len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            out.push(Err(FramingError::BadLength {
                len: h.len,
                left: buf.len(),
            }));
            break;
        }
        out.push(Ok((h, &buf[NLMSG_HDRLEN..len], &buf[..len])));
        buf = &buf[align(len).min(buf.len())..];
    }
    out
}

/// A message with a fixed payload and attributes already laid out.
pub fn message(ty: u16, flags: u16, seq: u32, pid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDRLEN + payload.len());
    Header {
        len: (NLMSG_HDRLEN + payload.len()) as u32,
        ty,
        flags,
        seq,
        pid,
    }
    .write(&mut out);
    out.extend_from_slice(payload);
    out
}

/// A message whose payload the xfrm crate emits.
pub fn emit(ty: u16, flags: u16, seq: u32, pid: u32, payload: &dyn EmitDyn) -> Vec<u8> {
    let mut body = vec![0u8; payload.size()];
    payload.emit_into(&mut body);
    message(ty, flags, seq, pid, &body)
}

/// Object-safe [`Emitable`].
pub trait EmitDyn {
    fn size(&self) -> usize;
    fn emit_into(&self, buf: &mut [u8]);
}

impl<T: Emitable> EmitDyn for T {
    fn size(&self) -> usize {
        self.buffer_len()
    }
    fn emit_into(&self, buf: &mut [u8]) {
        self.emit(buf)
    }
}

/// `NLMSG_ERROR` answering `request` (its whole bytes): an ack when
/// `errno` is 0 (quoting the header only, as the kernel does), else the
/// error quoting the whole request.
pub fn error(request: &[u8], errno: i32, pid: u32) -> Vec<u8> {
    let h = Header::parse(request).unwrap_or_default();
    let quoted = if errno == 0 {
        &request[..NLMSG_HDRLEN.min(request.len())]
    } else {
        request
    };
    let mut body = Vec::with_capacity(4 + quoted.len());
    body.extend_from_slice(&(-errno).to_ne_bytes());
    body.extend_from_slice(quoted);
    body.resize(align(body.len()), 0);
    message(NLMSG_ERROR, 0, h.seq, pid, &body)
}

/// `NLMSG_DONE`, the end of a dump.
pub fn done(seq: u32, pid: u32) -> Vec<u8> {
    message(NLMSG_DONE, NLM_F_MULTI, seq, pid, &0i32.to_ne_bytes())
}

/// Replies to one request are packed into datagrams of at most this size
/// (the kernel's `NLMSG_GOODSIZE` on 4 KiB pages is a little under it,
/// and charon's default receive buffer is 4096 bytes).
pub const DATAGRAM: usize = 4096;

/// Messages packed into datagrams of at most `max` bytes, each message
/// starting 4-byte aligned; a larger message goes alone.
pub fn pack(msgs: Vec<Vec<u8>>, max: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for m in msgs {
        match out.last_mut() {
            Some(d) if align(d.len()) + m.len() <= max => {
                d.resize(align(d.len()), 0);
                d.extend_from_slice(&m);
            }
            _ => out.push(m),
        }
    }
    out
}

/// Parse a [`SHIM_BIND`] payload: (port id, groups).
pub fn shim_bind(payload: &[u8]) -> Option<(u32, u32)> {
    (payload.len() >= 8).then(|| {
        (
            u32::from_ne_bytes(payload[0..4].try_into().unwrap()),
            u32::from_ne_bytes(payload[4..8].try_into().unwrap()),
        )
    })
}

/// Build a [`SHIM_BIND`] message (the shim and tests use it).
pub fn shim_bind_message(pid: u32, groups: u32) -> Vec<u8> {
    let mut p = pid.to_ne_bytes().to_vec();
    p.extend_from_slice(&groups.to_ne_bytes());
    message(SHIM_BIND, NLM_F_REQUEST, 0, pid, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_takes_aligned_messages_and_stops_at_bad_lengths() {
        let mut d = message(0x10, 1, 7, 0, &[1, 2, 3]);
        d.resize(align(d.len()), 0);
        d.extend(message(0x11, 1, 8, 0, &[]));
        let v = split(&d);
        assert_eq!(v.len(), 2);
        let (h, p, whole) = v[0].clone().unwrap();
        assert_eq!(
            (h.ty, h.seq, p, whole.len()),
            (0x10, 7, &[1u8, 2, 3][..], 19)
        );
        assert_eq!(v[1].clone().unwrap().0.seq, 8);
        // a length past the end, a length under the header, a short tail
        let mut bad = message(0x10, 1, 1, 0, &[0; 8]);
        bad[0] = 200;
        assert!(matches!(
            split(&bad)[0],
            Err(FramingError::BadLength { .. })
        ));
        bad[0] = 4;
        assert!(matches!(
            split(&bad)[0],
            Err(FramingError::BadLength { .. })
        ));
        assert_eq!(split(&[1, 2, 3]), vec![Err(FramingError::Short(3))]);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn replies_pack_into_datagrams_that_split_back_into_them() {
        let msgs: Vec<Vec<u8>> = (0..10u32)
            .map(|i| message(0x10, 2, i, 7, &[1; 1001]))
            .collect();
        let d = pack(msgs.clone(), DATAGRAM);
        assert!(
            d.iter().all(|x| x.len() <= DATAGRAM),
            "{:?}",
            d.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(
            d.len(),
            3,
            "four 1017-byte messages (three padded to 1020) a datagram"
        );
        let back: Vec<Vec<u8>> = d
            .iter()
            .flat_map(|x| split(x).into_iter().map(|m| m.unwrap().2.to_vec()))
            .collect();
        assert_eq!(back, msgs);
        // A message larger than a datagram goes alone.
        let big = message(0x10, 0, 1, 0, &[0; 5000]);
        assert_eq!(
            pack(vec![big.clone(), msgs[0].clone()], DATAGRAM),
            vec![big, msgs[0].clone()]
        );
    }

    #[test]
    fn errors_quote_the_request_and_acks_its_header() {
        let req = message(0x10, 5, 42, 99, &[9; 8]);
        let e = error(&req, errno::EEXIST, 99);
        let h = Header::parse(&e).unwrap();
        assert_eq!(
            (h.ty, h.seq, h.pid, h.len as usize),
            (NLMSG_ERROR, 42, 99, e.len())
        );
        assert_eq!(i32::from_ne_bytes(e[16..20].try_into().unwrap()), -17);
        assert_eq!(&e[20..], &req[..]);
        let ack = error(&req, 0, 99);
        assert_eq!(ack.len(), 16 + 4 + 16);
        assert_eq!(&ack[20..], &req[..16]);
    }
}
