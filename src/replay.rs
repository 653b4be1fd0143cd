//! The anti-replay sliding window of RFC 4303 section 3.4.3, with the
//! extended-sequence-number inference of its Appendix A.
//!
//! The window is sized in packets, as Linux reads setkey's `-r`. Checking
//! and updating are separate steps so that the window moves only after the
//! ICV has been verified.

/// The largest window tunsec accepts (packets).
pub const MAX_WINDOW: u32 = 65536;

/// The full sequence number a received low half stands for, given the
/// highest number accepted so far (`top`) and the window size (RFC 4303
/// Appendix A2.2). Without ESN it is the low half itself.
#[inline]
pub fn infer(top: u64, size: u32, seq_lo: u32, esn: bool) -> u64 {
    if !esn {
        return seq_lo as u64;
    }
    let w = size.max(1) as u64;
    let tl = top & 0xffff_ffff;
    let th = top >> 32;
    let seq_lo = seq_lo as u64;
    let seqh = if tl >= w - 1 {
        if seq_lo + w > tl { th } else { th + 1 }
    } else {
        let bottom = (tl + (1 << 32) - w + 1) & 0xffff_ffff;
        if seq_lo >= bottom {
            th.wrapping_sub(1)
        } else {
            th
        }
    };
    (seqh << 32) | seq_lo
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("sequence number already seen")]
    Duplicate,
    #[error("sequence number left of the replay window")]
    TooOld,
    #[error("sequence number zero is never sent")]
    Zero,
}

#[derive(Debug, Clone)]
pub struct ReplayWindow {
    size: u32,
    /// Highest sequence number accepted so far (0: none yet).
    top: u64,
    /// Ring of bits, bit (s mod ring) set when s was accepted.
    bits: Box<[u64]>,
}

impl ReplayWindow {
    /// A window of `size` packets; 0 disables the check (setkey's default).
    pub fn new(size: u32) -> Self {
        let size = size.min(MAX_WINDOW);
        let words = (size as usize).div_ceil(64) + 1;
        ReplayWindow {
            size,
            top: 0,
            bits: vec![0u64; if size == 0 { 0 } else { words }].into_boxed_slice(),
        }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Highest sequence number accepted.
    pub fn top(&self) -> u64 {
        self.top
    }

    fn ring(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    fn bit(&self, s: u64) -> bool {
        let i = s % self.ring();
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, s: u64, v: bool) {
        let i = s % self.ring();
        let w = &mut self.bits[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// The full 64-bit sequence number a received low half stands for
    /// (RFC 4303 Appendix A2.2). Without ESN it is the low half itself.
    pub fn infer(&self, seq_lo: u32, esn: bool) -> u64 {
        infer(self.top, self.size, seq_lo, esn)
    }

    /// Would `seq` be accepted? Does not change the window.
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Zero);
        }
        if self.size == 0 || seq > self.top {
            return Ok(());
        }
        if self.top - seq >= self.size as u64 {
            return Err(ReplayError::TooOld);
        }
        if self.bit(seq) {
            return Err(ReplayError::Duplicate);
        }
        Ok(())
    }

    /// Record `seq` as received (after its ICV was verified). Checks again,
    /// since another packet may have taken the number meanwhile.
    pub fn accept(&mut self, seq: u64) -> Result<(), ReplayError> {
        self.check(seq)?;
        if self.size == 0 {
            self.top = self.top.max(seq);
            return Ok(());
        }
        if seq > self.top {
            let diff = seq - self.top;
            if diff >= self.ring() {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.top + 1..seq {
                    self.set(s, false);
                }
            }
            self.top = seq;
        }
        self.set(seq, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_duplicate_and_old() {
        let mut w = ReplayWindow::new(64);
        for s in 1..=100 {
            w.accept(s).unwrap();
        }
        assert_eq!(w.check(100), Err(ReplayError::Duplicate));
        assert_eq!(w.check(37), Err(ReplayError::Duplicate));
        assert_eq!(w.check(36), Err(ReplayError::TooOld));
        assert_eq!(w.check(0), Err(ReplayError::Zero));
        assert_eq!(w.check(101), Ok(()));
    }

    #[test]
    fn out_of_order_within_window() {
        let mut w = ReplayWindow::new(32);
        w.accept(10).unwrap();
        w.accept(5).unwrap();
        assert_eq!(w.accept(5), Err(ReplayError::Duplicate));
        w.accept(7).unwrap();
        w.accept(40).unwrap(); // slides: 9..=40 now in the window
        assert_eq!(w.check(8), Err(ReplayError::TooOld));
        assert_eq!(w.check(10), Err(ReplayError::Duplicate));
        assert_eq!(w.check(11), Ok(()));
        // a jump further than the ring clears it
        w.accept(10_000).unwrap();
        assert_eq!(w.check(9_990), Ok(()));
        assert_eq!(w.check(9_968), Err(ReplayError::TooOld));
    }

    #[test]
    fn large_window_counts_packets() {
        let mut w = ReplayWindow::new(4096);
        w.accept(5000).unwrap();
        assert_eq!(w.check(905), Ok(()));
        assert_eq!(w.check(904), Err(ReplayError::TooOld));
    }

    #[test]
    fn disabled_window_accepts_repeats() {
        let mut w = ReplayWindow::new(0);
        w.accept(3).unwrap();
        w.accept(3).unwrap();
        assert_eq!(w.check(0), Err(ReplayError::Zero));
    }

    #[test]
    fn esn_inference_across_the_32_bit_boundary() {
        let mut w = ReplayWindow::new(64);
        w.accept(0xffff_fff0).unwrap();
        // just past the wrap: the high half is one more
        assert_eq!(w.infer(5, true), 0x1_0000_0005);
        w.accept(0x1_0000_0005).unwrap();
        // a late packet from before the wrap: high half one less (case B)
        assert_eq!(w.infer(0xffff_fff8, true), 0xffff_fff8);
        assert_eq!(w.check(0xffff_fff8), Ok(()));
        assert_eq!(w.infer(7, true), 0x1_0000_0007);
        assert_eq!(w.infer(7, false), 7);
    }
}
