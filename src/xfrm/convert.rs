//! XFRM structures to tunsec's SA and policy descriptions and back, as
//! `xfrm_user.c`'s `copy_from_user_*` / `copy_to_user_*` do for the
//! kernel. Anything tunsec does not do is refused with the errno the
//! kernel gives for it, and a message saying what.

use super::netlink::errno::*;
use crate::crypto::{AuthAlg, EncAlg};
use crate::sad::{Lifetime, Proto, Sa, SaConfig};
use crate::spd::{Action, Dir, Level, Policy, Prefix, Rule, Selector};
use crate::udp_encap::{ENCAP_ESPINUDP, Encap};
use netlink_packet_xfrm::{
    AF_INET, AF_INET6, Address, Alg, AlgAead, AlgAuth, EncapTmpl, Id, LifetimeConfig, Replay,
    ReplayEsn, Selector as XSelector, Stats, UserPolicyInfo, UserSaInfo, UserTemplate, XFRM_INF,
    XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_STATE_ESN, XfrmAttrs,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use zeroize::Zeroizing;

/// A refusal: the errno for the reply and what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: i32,
    pub why: String,
}

pub fn refuse<T>(errno: i32, why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal {
        errno,
        why: why.into(),
    })
}

pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_COMP: u8 = 108;

pub fn proto_of(p: u8) -> Option<Proto> {
    match p {
        IPPROTO_ESP => Some(Proto::Esp),
        IPPROTO_AH => Some(Proto::Ah),
        IPPROTO_COMP => Some(Proto::IpComp),
        _ => None,
    }
}

pub fn family_of(a: IpAddr) -> u16 {
    if a.is_ipv4() { AF_INET } else { AF_INET6 }
}

pub fn addr(family: u16, a: &Address) -> Result<IpAddr, Refusal> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            a.addr[0], a.addr[1], a.addr[2], a.addr[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(a.addr))),
        f => refuse(EAFNOSUPPORT, format!("address family {f}")),
    }
}

const EAFNOSUPPORT: i32 = 97;

pub fn xaddr(a: IpAddr) -> Address {
    Address::from_ip(&a)
}

/// A selector as a tunsec selector. Port masks other than none and all,
/// interfaces and users are refused: the SPD matches exact ports only.
pub fn selector(s: &XSelector) -> Result<Selector, Refusal> {
    let max = match s.family {
        AF_INET => 32,
        AF_INET6 => 128,
        f => return refuse(EINVAL, format!("selector of address family {f}")),
    };
    if s.prefixlen_s > max || s.prefixlen_d > max {
        return refuse(EINVAL, "selector prefix longer than the address");
    }
    if s.ifindex != 0 {
        return refuse(EOPNOTSUPP, "selectors on an interface are not supported");
    }
    let port = |p: u16, mask: u16, what: &str| match mask {
        0 => Ok(None),
        0xffff => Ok(Some(p)),
        m => refuse(
            EOPNOTSUPP,
            format!("{what} mask {m:#x}: only exact ports (or any) are supported"),
        ),
    };
    Ok(Selector {
        src: Prefix::new(addr(s.family, &s.saddr)?, s.prefixlen_s).expect("length checked"),
        dst: Prefix::new(addr(s.family, &s.daddr)?, s.prefixlen_d).expect("length checked"),
        proto: (s.proto != 0).then_some(s.proto),
        sport: port(s.sport, s.sport_mask, "source port")?,
        dport: port(s.dport, s.dport_mask, "destination port")?,
    })
}

pub fn xselector(s: &Selector) -> XSelector {
    let port = |p: Option<u16>| p.map_or((0, 0), |p| (p, 0xffff));
    let (sport, sport_mask) = port(s.sport);
    let (dport, dport_mask) = port(s.dport);
    XSelector {
        daddr: xaddr(s.dst.addr),
        saddr: xaddr(s.src.addr),
        dport,
        dport_mask,
        sport,
        sport_mask,
        family: family_of(s.src.addr),
        prefixlen_d: s.dst.len,
        prefixlen_s: s.src.len,
        proto: s.proto.unwrap_or(0),
        ifindex: 0,
        user: 0,
    }
}

/// The selector of one host-to-host flow (SAs, ACQUIRE).
pub fn host_selector(
    src: IpAddr,
    dst: IpAddr,
    proto: Option<u8>,
    ports: Option<(u16, u16)>,
) -> XSelector {
    xselector(&Selector {
        src: Prefix::host(src),
        dst: Prefix::host(dst),
        proto,
        sport: ports.map(|p| p.0),
        dport: ports.map(|p| p.1),
    })
}

fn name(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn set_name<const N: usize>(s: &str) -> [u8; N] {
    let mut a = [0u8; N];
    a[..s.len()].copy_from_slice(s.as_bytes());
    a
}

/// The first `bits` of `key`, which must hold them.
fn key(bits: u32, key: &[u8], alg: &str) -> Result<Zeroizing<Vec<u8>>, Refusal> {
    if !bits.is_multiple_of(8) || bits as usize / 8 > key.len() {
        return refuse(
            EINVAL,
            format!("{alg}: key length {bits} bits, {} bytes given", key.len()),
        );
    }
    Ok(crate::secret::within(|| {
        Zeroizing::new(key[..bits as usize / 8].to_vec())
    }))
}

fn aead(a: &AlgAead) -> Result<(EncAlg, Zeroizing<Vec<u8>>), Refusal> {
    let n = name(&a.alg_name);
    let alg = match n.as_str() {
        "rfc4106(gcm(aes))" => EncAlg::AesGcm16,
        "rfc7539esp(chacha20,poly1305)" => EncAlg::ChaCha20Poly1305,
        _ => return refuse(ENOSYS, format!("AEAD {n:?} is not supported")),
    };
    if a.alg_icv_len != 128 {
        return refuse(
            EINVAL,
            format!("{n} with a {}-bit ICV: only 128 bits", a.alg_icv_len),
        );
    }
    Ok((alg, key(a.alg_key_len, &a.alg_key, &n)?))
}

fn crypt(a: &Alg) -> Result<(EncAlg, Zeroizing<Vec<u8>>), Refusal> {
    let n = name(&a.alg_name);
    let alg = match n.as_str() {
        "cbc(aes)" | "aes" => EncAlg::AesCbc,
        "ecb(cipher_null)" | "cipher_null" => EncAlg::Null,
        _ => return refuse(ENOSYS, format!("cipher {n:?} is not supported")),
    };
    Ok((alg, key(a.alg_key_len, &a.alg_key, &n)?))
}

fn auth_alg(n: &str) -> Result<AuthAlg, Refusal> {
    Ok(match n {
        "hmac(sha1)" | "sha1" => AuthAlg::HmacSha1,
        "hmac(sha256)" | "sha256" => AuthAlg::HmacSha256,
        "hmac(sha384)" | "sha384" => AuthAlg::HmacSha384,
        "hmac(sha512)" | "sha512" => AuthAlg::HmacSha512,
        "digest_null" => AuthAlg::Null,
        _ => return refuse(ENOSYS, format!("authentication {n:?} is not supported")),
    })
}

/// ICV bits of each authentication algorithm as tunsec does it (RFC 2404,
/// RFC 4868).
pub fn icv_bits(a: AuthAlg) -> u32 {
    match a {
        AuthAlg::Null => 0,
        AuthAlg::HmacSha1 => 96,
        AuthAlg::HmacSha256 => 128,
        AuthAlg::HmacSha384 => 192,
        AuthAlg::HmacSha512 => 256,
    }
}

/// The kernel's default truncation for `XFRMA_ALG_AUTH` (no length given).
fn default_trunc(a: AuthAlg) -> u32 {
    match a {
        AuthAlg::HmacSha256 => 96,
        a => icv_bits(a),
    }
}

fn auth(
    n: &str,
    bits: u32,
    k: &[u8],
    trunc: u32,
) -> Result<(AuthAlg, Zeroizing<Vec<u8>>), Refusal> {
    let alg = auth_alg(n)?;
    if trunc != icv_bits(alg) {
        return refuse(
            EINVAL,
            format!(
                "{n} truncated to {trunc} bits: tunsec does {} (RFC 2404/4868)",
                icv_bits(alg)
            ),
        );
    }
    Ok((alg, key(bits, k, n)?))
}

fn limit(v: u64) -> u64 {
    if v == XFRM_INF { 0 } else { v }
}

fn unlimited(v: u64) -> u64 {
    if v == 0 { XFRM_INF } else { v }
}

/// `NEWSA`/`UPDSA`: the SA an `xfrm_usersa_info` and its attributes
/// describe.
pub fn sa_config(info: &UserSaInfo, attrs: &[XfrmAttrs]) -> Result<SaConfig, Refusal> {
    let Some(proto) = proto_of(info.id.proto) else {
        return refuse(
            EPROTONOSUPPORT,
            format!("IPsec protocol {} (esp 50, ah 51, comp 108)", info.id.proto),
        );
    };
    if info.mode != 0 {
        return refuse(
            EPROTONOSUPPORT,
            format!("mode {}: tunsec does transport mode only", info.mode),
        );
    }
    let dst = addr(info.family, &info.id.daddr)?;
    let src = addr(info.family, &info.saddr)?;
    let mut enc = (EncAlg::Null, Zeroizing::new(Vec::new()));
    let mut mac = (AuthAlg::Null, Zeroizing::new(Vec::new()));
    let mut comp = false;
    let mut esn_window = None;
    let mut encap = None;
    for a in attrs {
        match a {
            XfrmAttrs::EncryptionAlgAead(a) => enc = aead(a)?,
            XfrmAttrs::EncryptionAlg(a) => enc = crypt(a)?,
            XfrmAttrs::AuthenticationAlg(a) => {
                let n = name(&a.alg_name);
                let alg = auth_alg(&n)?;
                mac = auth(&n, a.alg_key_len, &a.alg_key, default_trunc(alg))?;
            }
            XfrmAttrs::AuthenticationAlgTrunc(a) => {
                mac = auth(
                    &name(&a.alg_name),
                    a.alg_key_len,
                    &a.alg_key,
                    a.alg_trunc_len,
                )?
            }
            XfrmAttrs::CompressionAlg(a) => {
                let n = name(&a.alg_name);
                if n != "deflate" {
                    return refuse(ENOSYS, format!("compression {n:?}: only deflate"));
                }
                comp = true;
            }
            XfrmAttrs::ReplayStateEsn(r) => esn_window = Some(r.replay_window),
            XfrmAttrs::EncapsulationTemplate(e) => encap = Some(encapsulation(e)?),
            XfrmAttrs::OffloadDevice(_) => {
                return refuse(EOPNOTSUPP, "hardware offload is not supported");
            }
            XfrmAttrs::CareOfAddr(_) => {
                return refuse(EOPNOTSUPP, "care-of addresses are not supported");
            }
            XfrmAttrs::SecurityContext(_) => {
                return refuse(EOPNOTSUPP, "security contexts are not supported");
            }
            XfrmAttrs::Mark(m) if m.mask != 0 => {
                return refuse(EOPNOTSUPP, "marks on SAs are not supported");
            }
            XfrmAttrs::IfId(i) if *i != 0 => {
                return refuse(EOPNOTSUPP, "XFRM interfaces (if_id) are not supported");
            }
            XfrmAttrs::MarkVal(m) if *m != 0 => {
                return refuse(EOPNOTSUPP, "output marks are not supported");
            }
            // Replay and lifetime state, event thresholds, TFC padding
            // (optional by RFC 4303), extra flags: nothing to configure.
            _ => {}
        }
    }
    let lt = &info.lifetime_cfg;
    if limit(lt.soft_use_expires_seconds) != 0 || limit(lt.hard_use_expires_seconds) != 0 {
        return refuse(
            EOPNOTSUPP,
            "lifetimes counted from first use are not supported",
        );
    }
    let esn = info.flags & XFRM_STATE_ESN != 0;
    if esn && esn_window.is_none() {
        return refuse(EINVAL, "ESN flag without XFRMA_REPLAY_ESN_VAL");
    }
    match proto {
        Proto::IpComp if !comp => return refuse(EINVAL, "comp SA without XFRMA_ALG_COMP"),
        Proto::Esp if enc.0 == EncAlg::Null && mac.0 == AuthAlg::Null && !has_crypt(attrs) => {
            return refuse(EINVAL, "esp SA without an encryption algorithm");
        }
        Proto::Ah if mac.0 == AuthAlg::Null => {
            return refuse(EINVAL, "ah SA without an authentication algorithm");
        }
        _ => {}
    }
    if proto != Proto::Esp && (enc.0 != EncAlg::Null || !enc.1.is_empty()) {
        return refuse(EINVAL, format!("{proto} SA with an encryption algorithm"));
    }
    if comp && proto != Proto::IpComp {
        return refuse(EINVAL, format!("{proto} SA with a compression algorithm"));
    }
    if encap.is_some() && proto != Proto::Esp {
        return refuse(EINVAL, format!("{proto} SA with UDP encapsulation"));
    }
    let spi = if proto == Proto::IpComp {
        if info.id.spi > 0xffff {
            return refuse(
                EINVAL,
                format!("comp SA with CPI {:#x} over 16 bits", info.id.spi),
            );
        }
        info.id.spi
    } else {
        info.id.spi
    };
    // The SA's selector, kept when it narrows what the SA may carry (it is
    // neither the wildcard nor all traffic between the SA's two hosts).
    let sel = selector(&info.selector).ok().filter(|s| {
        let wildcard = s.src.len == 0
            && s.dst.len == 0
            && s.proto.is_none()
            && s.sport.is_none()
            && s.dport.is_none();
        !wildcard && *s != host_pair(src, dst)
    });
    let replay = esn_window.unwrap_or(info.replay_window as u32);
    if replay > crate::replay::MAX_WINDOW {
        // (The kernel refuses windows beyond its ESN bitmap's bound, too.)
        return refuse(
            EINVAL,
            format!(
                "replay window {replay}: tunsec keeps at most {}",
                crate::replay::MAX_WINDOW
            ),
        );
    }
    Ok(SaConfig {
        src,
        dst,
        proto,
        spi,
        reqid: info.reqid,
        replay,
        esn,
        enc: enc.0,
        enc_key: enc.1,
        auth: mac.0,
        auth_key: mac.1,
        raw_cpi: proto == Proto::IpComp,
        lifetime: Lifetime {
            soft_secs: limit(lt.soft_add_expires_seconds),
            hard_secs: limit(lt.hard_add_expires_seconds),
            soft_bytes: limit(lt.soft_byte_limit),
            hard_bytes: limit(lt.hard_byte_limit),
            soft_packets: limit(lt.soft_packet_limit),
            hard_packets: limit(lt.hard_packet_limit),
        },
        selector: sel,
        encap,
    })
}

/// `XFRMA_ENCAP`: ESP in UDP (RFC 3948), `UDP_ENCAP_ESPINUDP` only. The
/// NAT-OA address is not needed: tunsec recomputes transport checksums
/// after decapsulation (see [`crate::udp_encap`]).
fn encapsulation(e: &EncapTmpl) -> Result<Encap, Refusal> {
    match e.encap_type {
        ENCAP_ESPINUDP => {}
        TCP_ENCAP_ESPINTCP => {
            return refuse(EOPNOTSUPP, "ESP in TCP (RFC 8229) is not supported");
        }
        t => {
            return refuse(
                EINVAL,
                format!("encapsulation type {t}: only UDP_ENCAP_ESPINUDP (2)"),
            );
        }
    }
    if e.encap_sport == 0 || e.encap_dport == 0 {
        return refuse(EINVAL, "UDP encapsulation with port 0");
    }
    Ok(Encap {
        sport: e.encap_sport,
        dport: e.encap_dport,
    })
}

/// `TCP_ENCAP_ESPINTCP` in Linux's `xfrm_encap_tmpl.encap_type`.
const TCP_ENCAP_ESPINTCP: u16 = 7;

fn host_pair(src: IpAddr, dst: IpAddr) -> Selector {
    Selector {
        src: Prefix::host(src),
        dst: Prefix::host(dst),
        proto: None,
        sport: None,
        dport: None,
    }
}

fn has_crypt(attrs: &[XfrmAttrs]) -> bool {
    attrs.iter().any(|a| {
        matches!(
            a,
            XfrmAttrs::EncryptionAlg(_) | XfrmAttrs::EncryptionAlgAead(_)
        )
    })
}

/// Wipe the keys a parsed message carries (the crate keeps them in plain
/// vectors).
pub fn wipe(attrs: &mut [XfrmAttrs]) {
    use zeroize::Zeroize;
    for a in attrs {
        match a {
            XfrmAttrs::EncryptionAlgAead(a) => a.alg_key.zeroize(),
            XfrmAttrs::EncryptionAlg(a)
            | XfrmAttrs::AuthenticationAlg(a)
            | XfrmAttrs::CompressionAlg(a) => a.alg_key.zeroize(),
            XfrmAttrs::AuthenticationAlgTrunc(a) => a.alg_key.zeroize(),
            _ => {}
        }
    }
}

/// Seconds of wall-clock time (the kernel's `curlft` clock) for an engine
/// time, given both clocks now.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Engine time now.
    pub now: std::time::Duration,
    /// Wall-clock seconds (Unix time) now.
    pub wall: u64,
}

impl Clock {
    pub fn wall_of(&self, t: std::time::Duration) -> u64 {
        self.wall
            .saturating_sub(self.now.saturating_sub(t).as_secs())
    }
}

/// The `xfrm_usersa_info` of an SA, with its attributes (keys only when
/// `keys`).
pub fn sa_info(sa: &Sa, clock: Clock, keys: bool) -> (UserSaInfo, Vec<XfrmAttrs>) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &sa.config;
    let lt = &c.lifetime;
    let info = UserSaInfo {
        selector: c
            .selector
            .as_ref()
            .map_or_else(|| host_selector(c.src, c.dst, None, None), xselector),
        id: Id {
            daddr: xaddr(c.dst),
            spi: c.wire_spi(),
            proto: c.proto.ip_proto(),
        },
        saddr: xaddr(c.src),
        lifetime_cfg: LifetimeConfig {
            soft_byte_limit: unlimited(lt.soft_bytes),
            hard_byte_limit: unlimited(lt.hard_bytes),
            soft_packet_limit: unlimited(lt.soft_packets),
            hard_packet_limit: unlimited(lt.hard_packets),
            soft_add_expires_seconds: lt.soft_secs,
            hard_add_expires_seconds: lt.hard_secs,
            soft_use_expires_seconds: 0,
            hard_use_expires_seconds: 0,
        },
        lifetime_cur: netlink_packet_xfrm::Lifetime {
            bytes: sa.counters.bytes.load(Relaxed),
            packets: sa.counters.packets.load(Relaxed),
            add_time: clock.wall_of(sa.added),
            use_time: sa.used.get().map_or(0, |t| clock.wall_of(t)),
        },
        stats: Stats {
            replay_window: 0,
            replay: sa.counters.replay_drops.load(Relaxed) as u32,
            integrity_failed: sa.counters.icv_failures.load(Relaxed) as u32,
        },
        seq: 0,
        reqid: c.reqid,
        family: family_of(c.dst),
        mode: 0,
        replay_window: c.replay.min(255) as u8,
        flags: if c.esn { XFRM_STATE_ESN } else { 0 },
    };
    let mut attrs = Vec::new();
    let k = |v: &[u8]| if keys { v.to_vec() } else { vec![0; v.len()] };
    match c.proto {
        Proto::IpComp => attrs.push(XfrmAttrs::CompressionAlg(Alg {
            alg_name: set_name("deflate"),
            alg_key_len: 0,
            alg_key: vec![],
        })),
        _ => {
            if c.enc.is_aead() {
                let n = match c.enc {
                    EncAlg::ChaCha20Poly1305 => "rfc7539esp(chacha20,poly1305)",
                    _ => "rfc4106(gcm(aes))",
                };
                attrs.push(XfrmAttrs::EncryptionAlgAead(AlgAead {
                    alg_name: set_name(n),
                    alg_key_len: c.enc_key.len() as u32 * 8,
                    alg_icv_len: 128,
                    alg_key: k(&c.enc_key),
                }));
            } else if c.proto == Proto::Esp {
                let n = match c.enc {
                    EncAlg::AesCbc => "cbc(aes)",
                    _ => "ecb(cipher_null)",
                };
                attrs.push(XfrmAttrs::EncryptionAlg(Alg {
                    alg_name: set_name(n),
                    alg_key_len: c.enc_key.len() as u32 * 8,
                    alg_key: k(&c.enc_key),
                }));
            }
            if c.auth != AuthAlg::Null {
                let n = match c.auth {
                    AuthAlg::HmacSha1 => "hmac(sha1)",
                    AuthAlg::HmacSha256 => "hmac(sha256)",
                    AuthAlg::HmacSha384 => "hmac(sha384)",
                    _ => "hmac(sha512)",
                };
                attrs.push(XfrmAttrs::AuthenticationAlgTrunc(AlgAuth {
                    alg_name: set_name(n),
                    alg_key_len: c.auth_key.len() as u32 * 8,
                    alg_trunc_len: icv_bits(c.auth),
                    alg_key: k(&c.auth_key),
                }));
            }
        }
    }
    let top = sa.replay_top();
    if c.esn || c.replay > 32 {
        let words = c.replay.div_ceil(32).max(1);
        attrs.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len: words,
            oseq: sa.last_seq() as u32,
            seq: top as u32,
            oseq_hi: (sa.last_seq() >> 32) as u32,
            seq_hi: (top >> 32) as u32,
            replay_window: c.replay,
            bmp: vec![0; words as usize],
        }));
    } else if c.proto != Proto::IpComp {
        attrs.push(XfrmAttrs::ReplayState(Replay {
            oseq: sa.last_seq() as u32,
            seq: top as u32,
            bitmap: 0,
        }));
    }
    if let Some(e) = c.encap {
        attrs.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
            encap_type: ENCAP_ESPINUDP,
            encap_sport: e.sport,
            encap_dport: e.dport,
            encap_oa: Address::default(),
        }));
    }
    (info, attrs)
}

/// `NEWPOLICY`/`UPDPOLICY`: direction, selector, priority and action.
pub fn policy(
    info: &UserPolicyInfo,
    attrs: &[XfrmAttrs],
) -> Result<(Dir, Selector, u32, Action), Refusal> {
    let dir = dir_of(info.direction)?;
    let sel = selector(&info.selector)?;
    let lt = &info.lifetime_cfg;
    if [
        lt.soft_byte_limit,
        lt.hard_byte_limit,
        lt.soft_packet_limit,
        lt.hard_packet_limit,
        lt.soft_add_expires_seconds,
        lt.hard_add_expires_seconds,
        lt.soft_use_expires_seconds,
        lt.hard_use_expires_seconds,
    ]
    .iter()
    .any(|v| limit(*v) != 0)
    {
        return refuse(EOPNOTSUPP, "policy lifetimes are not supported");
    }
    let mut tmpls: &[UserTemplate] = &[];
    for a in attrs {
        match a {
            XfrmAttrs::Template(t) => tmpls = t,
            XfrmAttrs::PolicyType(t) if t.ptype != 0 => {
                return refuse(EOPNOTSUPP, "sub policies are not supported");
            }
            XfrmAttrs::SecurityContext(_) => {
                return refuse(EOPNOTSUPP, "security contexts are not supported");
            }
            XfrmAttrs::Mark(m) if m.mask != 0 => {
                return refuse(EOPNOTSUPP, "marks on policies are not supported");
            }
            XfrmAttrs::IfId(i) if *i != 0 => {
                return refuse(EOPNOTSUPP, "XFRM interfaces (if_id) are not supported");
            }
            _ => {}
        }
    }
    let action = match info.action {
        XFRM_POLICY_BLOCK => Action::Discard,
        XFRM_POLICY_ALLOW if tmpls.is_empty() => Action::Bypass,
        XFRM_POLICY_ALLOW => {
            if tmpls.len() > 3 {
                return refuse(EOPNOTSUPP, "more than three transforms in a bundle");
            }
            let mut rules = Vec::new();
            for t in tmpls {
                if t.mode != 0 {
                    return refuse(
                        EOPNOTSUPP,
                        format!("template mode {}: tunsec does transport mode only", t.mode),
                    );
                }
                let Some(proto) = proto_of(t.id.proto) else {
                    return refuse(EINVAL, format!("template protocol {}", t.id.proto));
                };
                if rules.iter().any(|r: &Rule| r.proto == proto) {
                    return refuse(EINVAL, format!("{proto} twice in one bundle"));
                }
                let level = if t.optional != 0 {
                    Level::Use
                } else if t.reqid != 0 {
                    Level::Unique(Some(t.reqid))
                } else {
                    Level::Require
                };
                rules.push(Rule { proto, level });
            }
            Action::Ipsec(rules)
        }
        a => return refuse(EINVAL, format!("policy action {a}")),
    };
    Ok((dir, sel, info.priority, action))
}

pub fn dir_of(d: u8) -> Result<Dir, Refusal> {
    Ok(match d {
        0 => Dir::In,
        1 => Dir::Out,
        2 => Dir::Fwd,
        d => return refuse(EINVAL, format!("policy direction {d}")),
    })
}

pub fn dir_num(d: Dir) -> u8 {
    match d {
        Dir::In => 0,
        Dir::Out => 1,
        Dir::Fwd => 2,
    }
}

/// The kernel's policy index: an id with the direction in the low bits.
pub fn index_of(p: &Policy) -> u32 {
    ((p.id as u32) << 3) | dir_num(p.dir) as u32
}

/// The templates of a policy's bundle, for `src`/`dst` when known.
pub fn templates(p: &Policy, ends: Option<(IpAddr, IpAddr)>) -> Vec<UserTemplate> {
    let Action::Ipsec(rules) = &p.action else {
        return vec![];
    };
    let family = family_of(p.selector.src.addr);
    rules
        .iter()
        .map(|r| {
            let (s, d) = ends.map_or((Address::default(), Address::default()), |(s, d)| {
                (xaddr(s), xaddr(d))
            });
            UserTemplate {
                id: Id {
                    daddr: d,
                    spi: 0,
                    proto: r.proto.ip_proto(),
                },
                family,
                saddr: s,
                reqid: match r.level {
                    Level::Unique(Some(id)) => id,
                    _ => 0,
                },
                mode: 0,
                share: 0,
                optional: (r.level == Level::Use) as u8,
                aalgos: u32::MAX,
                ealgos: u32::MAX,
                calgos: u32::MAX,
            }
        })
        .collect()
}

/// The `xfrm_userpolicy_info` of a policy and its attributes.
pub fn policy_info(p: &Policy, clock: Clock) -> (UserPolicyInfo, Vec<XfrmAttrs>) {
    let info = UserPolicyInfo {
        selector: xselector(&p.selector),
        lifetime_cfg: LifetimeConfig::default(),
        lifetime_cur: netlink_packet_xfrm::Lifetime {
            bytes: 0,
            packets: 0,
            add_time: 0,
            use_time: p.used.get().map_or(0, |t| clock.wall_of(t)),
        },
        priority: p.priority,
        index: index_of(p),
        direction: dir_num(p.dir),
        action: if p.action == Action::Discard {
            XFRM_POLICY_BLOCK
        } else {
            XFRM_POLICY_ALLOW
        },
        flags: 0,
        share: 0,
    };
    let t = templates(p, None);
    let attrs = if t.is_empty() {
        vec![]
    } else {
        vec![XfrmAttrs::Template(t)]
    };
    (info, attrs)
}
