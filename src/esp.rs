//! ESP in transport mode (RFC 4303), in place on a [`PacketBuf`].
//!
//! ```text
//! | IP hdr | SPI | Seq | IV | payload ... | pad | pad len | next hdr | ICV |
//!                       \________ encrypted ______________________/
//! ```
//! CBC suites carry a random 16-byte IV and an HMAC ICV over header, IV and
//! ciphertext (plus the high half of an extended sequence number). AEAD
//! suites (RFC 4106, RFC 7634) carry the 64-bit sequence number as IV (a
//! counter nonce, never repeated under one key) and authenticate SPI and
//! sequence number as associated data.

use crate::buf::PacketBuf;
use crate::crypto::AEAD_TAG;
use crate::packet::{PROTO_ESP, be32, put32, set_next_header};
use crate::sad::Sa;
use rand::RngCore;

/// The monotonic padding bytes 1, 2, 3, ... of RFC 4303 section 2.4.
const PAD_BYTES: [u8; 255] = {
    let mut t = [0u8; 255];
    let mut i = 0;
    while i < 255 {
        t[i] = i as u8 + 1;
        i += 1;
    }
    t
};

/// ESP header: SPI and sequence number.
pub const HEADER: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    #[error("packet would exceed the maximum IP length")]
    TooBig,
    #[error("ESP packet too short or not block aligned")]
    Malformed,
    #[error("ICV check failed")]
    Icv,
    #[error("bad ESP padding")]
    Padding,
}

fn icv_len(sa: &Sa) -> usize {
    if sa.cipher.is_aead() {
        AEAD_TAG
    } else {
        sa.mac.icv_len()
    }
}

/// Bytes ESP adds to a payload of `plen` bytes with this SA.
pub fn overhead(sa: &Sa, plen: usize) -> usize {
    let block = sa.cipher.block();
    let pad = (block - (plen + 2) % block) % block;
    HEADER + sa.cipher.iv_len() + pad + 2 + icv_len(sa)
}

/// Protect the payload at `at` (whose protocol byte is at `nh_pos`) with
/// ESP under `sa`, using sequence number `seq`.
pub fn seal<R: RngCore>(
    buf: &mut PacketBuf,
    at: usize,
    nh_pos: usize,
    sa: &Sa,
    seq: u64,
    rng: &mut R,
) -> Result<(), EspError> {
    let len = buf.len();
    let plen = len - at;
    let block = sa.cipher.block();
    let iv_len = sa.cipher.iv_len();
    let icv = icv_len(sa);
    let pad = (block - (plen + 2) % block) % block;
    let add_front = HEADER + iv_len;
    let add_back = pad + 2 + icv;
    let max = if buf.data()[0] >> 4 == 4 {
        65535
    } else {
        65535 + 40
    };
    if len + add_front + add_back > max {
        return Err(EspError::TooBig);
    }
    let next = buf.data()[nh_pos];
    if !buf.extend(add_back) || !buf.insert_gap(at, add_front) {
        return Err(EspError::TooBig);
    }
    let d = buf.data_mut();
    let n = d.len();
    // Trailer: monotonic padding 1, 2, 3, ... (RFC 4303 section 2.4).
    let t = n - icv - pad - 2;
    d[t..t + pad].copy_from_slice(&PAD_BYTES[..pad]);
    d[t + pad] = pad as u8;
    d[t + pad + 1] = next;
    put32(d, at, sa.config.spi);
    put32(d, at + 4, seq as u32);
    set_next_header(d, nh_pos, PROTO_ESP);

    let d = buf.data_mut();
    let (head, rest) = d.split_at_mut(at + HEADER);
    let esp_hdr = &head[at..];
    let (ivb, rest) = rest.split_at_mut(iv_len);
    let (body, icv_out) = rest.split_at_mut(rest.len() - icv);
    let seq_hi = ((seq >> 32) as u32).to_be_bytes();
    if sa.cipher.is_aead() {
        let iv: [u8; 8] = seq.to_be_bytes();
        ivb.copy_from_slice(&iv);
        let tag = if sa.config.esn {
            let mut aad = [0u8; 12];
            aad[..4].copy_from_slice(&esp_hdr[..4]);
            aad[4..8].copy_from_slice(&seq_hi);
            aad[8..].copy_from_slice(&esp_hdr[4..8]);
            sa.cipher.aead_seal(&iv, &aad, body)
        } else {
            sa.cipher.aead_seal(&iv, esp_hdr, body)
        };
        icv_out.copy_from_slice(&tag);
    } else {
        if iv_len == 16 {
            let mut iv = [0u8; 16];
            rng.fill_bytes(&mut iv);
            ivb.copy_from_slice(&iv);
            sa.cipher.cbc_encrypt(&iv, body);
        }
        let esn: &[u8] = if sa.config.esn { &seq_hi } else { &[] };
        sa.mac.compute(&[esp_hdr, ivb, body, esn], icv_out);
    }
    Ok(())
}

/// SPI and low 32 bits of the sequence number of the ESP header at `at`.
pub fn peek(pkt: &[u8], at: usize) -> Option<(u32, u32)> {
    if pkt.len() < at + HEADER {
        return None;
    }
    Some((be32(pkt, at), be32(pkt, at + 4)))
}

/// Verify (in constant time, before decrypting) and remove the ESP header
/// at `at`. `seq_hi` is the inferred high half of the sequence number
/// (ESN SAs only). On success the packet is the payload with the original
/// protocol restored.
pub fn open(
    buf: &mut PacketBuf,
    at: usize,
    nh_pos: usize,
    sa: &Sa,
    seq_hi: u32,
) -> Result<(), EspError> {
    let iv_len = sa.cipher.iv_len();
    let icv = icv_len(sa);
    let block = sa.cipher.block();
    let len = buf.len();
    if len < at + HEADER + iv_len + icv + 2 {
        return Err(EspError::Malformed);
    }
    let ct_len = len - at - HEADER - iv_len - icv;
    if ct_len < 2 || !ct_len.is_multiple_of(block) {
        return Err(EspError::Malformed);
    }
    let d = buf.data_mut();
    let (head, rest) = d.split_at_mut(at + HEADER);
    let esp_hdr = &head[at..];
    let (ivb, rest) = rest.split_at_mut(iv_len);
    let (body, icv_in) = rest.split_at_mut(ct_len);
    let seq_hi = seq_hi.to_be_bytes();
    if sa.cipher.is_aead() {
        let iv: [u8; 8] = (&*ivb).try_into().unwrap();
        let ok = if sa.config.esn {
            let mut aad = [0u8; 12];
            aad[..4].copy_from_slice(&esp_hdr[..4]);
            aad[4..8].copy_from_slice(&seq_hi);
            aad[8..].copy_from_slice(&esp_hdr[4..8]);
            sa.cipher.aead_open(&iv, &aad, body, icv_in)
        } else {
            sa.cipher.aead_open(&iv, esp_hdr, body, icv_in)
        };
        if !ok {
            return Err(EspError::Icv);
        }
    } else {
        let esn: &[u8] = if sa.config.esn { &seq_hi } else { &[] };
        if icv > 0 && !sa.mac.verify(&[esp_hdr, ivb, body, esn], icv_in) {
            return Err(EspError::Icv);
        }
        if iv_len == 16 {
            let iv: [u8; 16] = (&*ivb).try_into().unwrap();
            if !sa.cipher.cbc_decrypt(&iv, body) {
                return Err(EspError::Malformed);
            }
        }
    }
    let pad = body[ct_len - 2] as usize;
    let next = body[ct_len - 1];
    if pad + 2 > ct_len {
        return Err(EspError::Padding);
    }
    let pad_start = ct_len - 2 - pad;
    // A short loop: pads are seldom longer than a block, and a memcmp call
    // costs more than the comparison.
    if !body[pad_start..ct_len - 2]
        .iter()
        .zip(1u8..)
        .all(|(&b, i)| b == i)
    {
        return Err(EspError::Padding);
    }
    let new_len = at + HEADER + iv_len + pad_start;
    buf.truncate(new_len);
    buf.remove_gap(at, HEADER + iv_len);
    set_next_header(buf.data_mut(), nh_pos, next);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AuthAlg, EncAlg};
    use crate::sad::{Lifetime, Proto, SaConfig};
    use std::time::Duration;
    use zeroize::Zeroizing;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    /// Hands out a fixed IV, as the RFC's example did.
    struct FixedIv(Vec<u8>);
    impl RngCore for FixedIv {
        fn next_u32(&mut self) -> u32 {
            unreachable!()
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!()
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.copy_from_slice(&self.0[..dst.len()]);
        }
    }

    fn sa(enc: EncAlg, key: &str, auth: AuthAlg, akey: &str, spi: u32) -> Sa {
        let cfg = SaConfig {
            src: "192.168.123.3".parse().unwrap(),
            dst: "192.168.123.100".parse().unwrap(),
            proto: Proto::Esp,
            spi,
            reqid: 0,
            replay: 0,
            esn: false,
            enc,
            enc_key: Zeroizing::new(h(key)),
            auth,
            auth_key: Zeroizing::new(h(akey)),
            raw_cpi: false,
            lifetime: Lifetime::default(),
        };
        Sa::new(cfg, Duration::ZERO, 1).unwrap()
    }

    // RFC 3602 section 4, case #5: transport-mode ESP, ping 192.168.123.100.
    const CASE5_PLAIN: &str = "45000054 08f20000 4001f9fe c0a87b03 c0a87b64
        08000ebd a70a0000 8e9c083d b95b0700 08090a0b 0c0d0e0f 10111213 14151617
        18191a1b 1c1d1e1f 20212223 24252627 28292a2b 2c2d2e2f 30313233 34353637";
    const CASE5_ESP: &str = "4500007c 08f20000 4032f9a5 c0a87b03 c0a87b64
        00004321 00000001
        e96e8c08 ab465763 fd098d45 dd3ff893
        f663c25d 325c18c6 a9453e19 4e120849 a4870b66 cc6b9965 330013b4 898dc856
        a4699e52 3a55db08 0b59ec3a 8e4b7e52 775b07d1 db34ed9c 538ab50c 551b874a
        a269add0 47ad2d59 13ac19b7 cfbad4a6";

    #[test]
    fn rfc3602_case5_packet_both_ways() {
        let sa = sa(
            EncAlg::AesCbc,
            "90d382b4 10eeba7a d938c46c ec1a82bf",
            AuthAlg::Null,
            "",
            0x4321,
        );
        let mut buf = PacketBuf::new();
        assert!(buf.load(&h(CASE5_PLAIN)));
        let mut iv = FixedIv(h("e96e8c08 ab465763 fd098d45 dd3ff893"));
        seal(&mut buf, 20, 9, &sa, 1, &mut iv).unwrap();
        assert_eq!(buf.data(), &h(CASE5_ESP)[..]);

        open(&mut buf, 20, 9, &sa, 0).unwrap();
        assert_eq!(buf.data(), &h(CASE5_PLAIN)[..]);
    }

    #[test]
    fn tampering_and_truncation_are_caught() {
        let s = sa(
            EncAlg::AesCbc,
            "90d382b4 10eeba7a d938c46c ec1a82bf",
            AuthAlg::HmacSha256,
            &"ab".repeat(32),
            0x4321,
        );
        let mut buf = PacketBuf::new();
        let mut rng = FixedIv(vec![7; 16]);
        assert!(buf.load(&h(CASE5_PLAIN)));
        seal(&mut buf, 20, 9, &s, 1, &mut rng).unwrap();
        let sealed = buf.data().to_vec();
        for i in 20..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(buf.load(&bad));
            assert_eq!(open(&mut buf, 20, 9, &s, 0), Err(EspError::Icv), "byte {i}");
        }
        for cut in [20, 27, 40, 60] {
            let mut short = sealed[..cut].to_vec();
            short[2..4].copy_from_slice(&(cut as u16).to_be_bytes());
            assert!(buf.load(&short));
            assert!(open(&mut buf, 20, 9, &s, 0).is_err());
        }
    }

    #[test]
    fn bad_padding_is_reported_after_a_good_icv() {
        // null encryption: the trailer is visible, so build one with wrong
        // padding bytes and a valid ICV.
        let s = sa(EncAlg::Null, "", AuthAlg::HmacSha1, &"11".repeat(20), 0x500);
        let mut buf = PacketBuf::new();
        assert!(buf.load(&h(CASE5_PLAIN)));
        let mut rng = FixedIv(vec![]);
        seal(&mut buf, 20, 9, &s, 1, &mut rng).unwrap();
        let mut p = buf.data().to_vec();
        let n = p.len();
        // 64-byte payload + 2 => 2 bytes of padding to align to 4.
        assert_eq!(&p[n - 12 - 4..n - 12], &[1, 2, 2, 1]);
        p[n - 12 - 4] = 9;
        let mut icv = [0u8; 12];
        s.mac.compute(&[&p[20..n - 12]], &mut icv);
        p[n - 12..].copy_from_slice(&icv);
        assert!(buf.load(&p));
        assert_eq!(open(&mut buf, 20, 9, &s, 0), Err(EspError::Padding));
    }

    // The GCM specification's test case 4 in RFC 4106 framing (key + salt,
    // 8-byte IV): checks the nonce construction and the AAD path.
    #[test]
    fn gcm_spec_case4_in_rfc4106_framing() {
        let s = sa(
            EncAlg::AesGcm16,
            "feffe9928665731c6d6a8f9467308308 cafebabe",
            AuthAlg::Null,
            "",
            1,
        );
        let iv: [u8; 8] = h("facedbaddecaf888").try_into().unwrap();
        let aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let mut data = h(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let tag = s.cipher.aead_seal(&iv, &aad, &mut data);
        assert_eq!(
            data,
            h(
                "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
            )
        );
        assert_eq!(tag.to_vec(), h("5bc94fbc3221a5db94fae95ae7121a47"));
        assert!(s.cipher.aead_open(&iv, &aad, &mut data, &tag));
        assert_eq!(&data[..4], &h("d9313225")[..]);
    }

    #[test]
    fn aead_iv_is_the_sequence_number() {
        let s = sa(EncAlg::AesGcm16, &"42".repeat(20), AuthAlg::Null, "", 0x77);
        let mut buf = PacketBuf::new();
        assert!(buf.load(&h(CASE5_PLAIN)));
        let mut rng = FixedIv(vec![]);
        seal(&mut buf, 20, 9, &s, 0x1_0000_0005, &mut rng).unwrap();
        assert_eq!(
            &buf.data()[20..36],
            &h("00000077 00000005 00000001 00000005")[..]
        );
        // 64 + 2 bytes pad to 68, + 16-byte tag
        assert_eq!(buf.len(), 20 + 8 + 8 + 68 + 16);
        assert_eq!(overhead(&s, 64), 8 + 8 + 4 + 16);
    }
}
