//! `PacketBuf`: one packet in a fixed allocation with headroom in front and
//! tailroom behind, so that adding AH/ESP headers and ESP trailers never
//! moves the payload: the (short) IP header moves towards the front instead.

/// Room kept in front of a freshly loaded packet: enough for AH (up to 48
/// bytes with HMAC-SHA-512) plus ESP header and IV (24 bytes) plus IPComp.
pub const HEADROOM: usize = 128;
/// Largest IP packet (IPv4 total length / IPv6 payload length + 40).
pub const MAX_PACKET: usize = 65535 + 40;
/// Room behind the packet for ESP padding, pad length, next header and ICV.
pub const TAILROOM: usize = 128;

/// A packet buffer. `data()` is the packet; the allocation around it is
/// reused from packet to packet (no allocation per packet).
pub struct PacketBuf {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
    /// The engine left the TCP checksum of this decapsulated packet stale
    /// on purpose ([`crate::engine::Worker::defer_tcp_checksum`]): whoever
    /// writes it on must not have it verified (Linux's
    /// `CHECKSUM_UNNECESSARY`; [`crate::gro::Csum::Trusted`]). Cleared
    /// whenever new contents are loaded.
    pub csum_stale: bool,
}

impl Default for PacketBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// The engine's batch functions take any slice of things holding a
/// buffer (the workers' receive slots) or of buffers themselves.
impl AsMut<PacketBuf> for PacketBuf {
    fn as_mut(&mut self) -> &mut PacketBuf {
        self
    }
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("start", &self.start)
            .field("len", &self.len())
            .finish()
    }
}

impl PacketBuf {
    /// A buffer large enough for any IP packet plus headers added to it.
    pub fn new() -> Self {
        Self::with_capacity(MAX_PACKET)
    }

    /// A buffer for packets of at most `max_packet` bytes (plus headroom and
    /// tailroom).
    pub fn with_capacity(max_packet: usize) -> Self {
        PacketBuf {
            mem: vec![0u8; HEADROOM + max_packet + TAILROOM].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
            csum_stale: false,
        }
    }

    /// Replace the contents with `pkt`, placed after the headroom.
    /// Returns false (and leaves the buffer empty) if it does not fit.
    #[inline]
    pub fn load(&mut self, pkt: &[u8]) -> bool {
        self.start = HEADROOM;
        self.csum_stale = false;
        if pkt.len() > self.mem.len() - HEADROOM - TAILROOM {
            self.end = HEADROOM;
            return false;
        }
        self.end = HEADROOM + pkt.len();
        self.mem[self.start..self.end].copy_from_slice(pkt);
        true
    }

    /// The space a reader (e.g. `read(2)` from a TUN device) may fill; call
    /// [`PacketBuf::set_loaded`] with the number of bytes written.
    pub fn load_area(&mut self) -> &mut [u8] {
        self.start = HEADROOM;
        self.csum_stale = false;
        let cap = self.mem.len() - TAILROOM;
        &mut self.mem[HEADROOM..cap]
    }

    /// The whole allocation but the tailroom, for batch readers that write
    /// a packet at offset [`HEADROOM`] themselves; then call
    /// [`PacketBuf::set_loaded`].
    pub fn raw_mut(&mut self) -> &mut [u8] {
        let cap = self.mem.len() - TAILROOM;
        &mut self.mem[..cap]
    }

    /// See [`PacketBuf::raw_mut`].
    pub fn raw(&self) -> &[u8] {
        &self.mem[..self.mem.len() - TAILROOM]
    }

    /// After writing `n` bytes into [`PacketBuf::load_area`].
    pub fn set_loaded(&mut self, n: usize) {
        self.start = HEADROOM;
        self.csum_stale = false;
        self.end = HEADROOM + n.min(self.mem.len() - HEADROOM - TAILROOM);
    }

    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.mem[self.start..self.end]
    }

    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.end]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Room available behind the packet.
    #[inline]
    pub fn tailroom(&self) -> usize {
        self.mem.len() - self.end
    }

    /// Open a gap of `n` bytes at offset `at` by moving the first `at`
    /// bytes of the packet `n` bytes towards the front. The gap's contents
    /// are unspecified. Returns false if there is not enough headroom.
    #[inline]
    #[must_use]
    pub fn insert_gap(&mut self, at: usize, n: usize) -> bool {
        if n > self.start || at > self.len() {
            return false;
        }
        let s = self.start;
        self.mem.copy_within(s..s + at, s - n);
        self.start -= n;
        true
    }

    /// Remove `n` bytes at offset `at` by moving the first `at` bytes `n`
    /// bytes towards the back.
    #[inline]
    pub fn remove_gap(&mut self, at: usize, n: usize) {
        debug_assert!(at + n <= self.len());
        let s = self.start;
        self.mem.copy_within(s..s + at, s + n);
        self.start += n;
    }

    /// Grow the packet by `n` bytes at the end (contents unspecified).
    #[inline]
    #[must_use]
    pub fn extend(&mut self, n: usize) -> bool {
        if n > self.tailroom() {
            return false;
        }
        self.end += n;
        true
    }

    /// Cut the packet to `len` bytes.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// Maximum length the packet may grow to at the back.
    #[inline]
    pub fn max_len(&self) -> usize {
        self.mem.len() - self.start
    }

    /// Replace the bytes from `at` to the end with `bytes` (which may be
    /// longer or shorter). Returns false if it does not fit.
    #[must_use]
    pub fn replace_tail(&mut self, at: usize, bytes: &[u8]) -> bool {
        if at > self.len() || at + bytes.len() > self.max_len() {
            return false;
        }
        let s = self.start + at;
        self.mem[s..s + bytes.len()].copy_from_slice(bytes);
        self.end = s + bytes.len();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_moves_only_the_head() {
        let mut b = PacketBuf::new();
        assert!(b.load(&[1, 2, 3, 4, 5, 6]));
        assert!(b.insert_gap(2, 3));
        b.data_mut()[2..5].copy_from_slice(&[9, 9, 9]);
        assert_eq!(b.data(), &[1, 2, 9, 9, 9, 3, 4, 5, 6]);
        b.remove_gap(2, 3);
        assert_eq!(b.data(), &[1, 2, 3, 4, 5, 6]);
        assert!(b.extend(2));
        assert_eq!(b.len(), 8);
        b.truncate(3);
        assert_eq!(b.data(), &[1, 2, 3]);
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let mut b = PacketBuf::with_capacity(10);
        assert!(!b.load(&[0u8; 11]));
        assert!(b.load(&[0u8; 10]));
        assert!(!b.insert_gap(0, HEADROOM + 1));
        assert!(!b.extend(TAILROOM + 1));
        assert!(b.extend(TAILROOM));
    }
}
