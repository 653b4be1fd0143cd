//! Inbound runs: consecutive packets of one SA in a chunk, opened before
//! any of them is accepted, for workers that share SAs
//! ([`Worker::account_runs`]). Their numbers are checked against the SA's
//! replay window under one lock when the run starts, and accepted (and
//! counted) under one more when it ends, instead of the lock, and the
//! window's lines, passing between CPUs for every packet.
//!
//! In between, each packet is also checked against the numbers of the
//! run's packets opened before it, as the window would hold them had each
//! been accepted at once: a run decides as its packets would one by one.
//! Only numbers whose ICV was verified count there, so a forged packet
//! cannot make a genuine one of its run look replayed. A run goes only as
//! far from every lifetime limit as [`Sa::run_clear`] allows; nearer, the
//! packets go one at a time.

use super::outbound::{CHUNK, replay_drop};
use super::{DropReason, Worker};
use crate::replay::{self, ReplayError};
use crate::sad::{Expiry, Sa};
use std::time::Duration;

pub(super) struct InRun {
    /// The run's SA (its address; 0: no run in progress), and an SA whose
    /// run this chunk refused (near a limit: not looked at again).
    sa: usize,
    refused: usize,
    /// The window's top when the run started, and the highest number
    /// opened since (at least `top`).
    top: u64,
    max: u64,
    /// Per packet of the chunk: its check when the run started.
    pre: [Result<u64, ReplayError>; CHUNK],
    /// Numbers opened in this run, accepted or waiting.
    seen: [u64; CHUNK],
    nseen: usize,
    /// Waiting to be accepted: (number, bytes), and their packets.
    waiting: [(u64, u32); CHUNK],
    of: [u8; CHUNK],
    nwaiting: usize,
    /// Packets refused when accepted, and why.
    failed: [(u8, DropReason); CHUNK],
    nfailed: usize,
    // Working space of `start` and `flush`.
    los: [u32; CHUNK],
    checks: [Result<u64, ReplayError>; CHUNK],
    accepted: [Result<(Expiry, bool), ReplayError>; CHUNK],
}

fn addr(sa: &Sa) -> usize {
    sa as *const Sa as usize
}

impl InRun {
    pub(super) fn new() -> Box<InRun> {
        Box::new(InRun {
            sa: 0,
            refused: 0,
            top: 0,
            max: 0,
            pre: [Err(ReplayError::Zero); CHUNK],
            seen: [0; CHUNK],
            nseen: 0,
            waiting: [(0, 0); CHUNK],
            of: [0; CHUNK],
            nwaiting: 0,
            failed: [(0, DropReason::Replay); CHUNK],
            nfailed: 0,
            los: [0; CHUNK],
            checks: [Err(ReplayError::Zero); CHUNK],
            accepted: [Err(ReplayError::Zero); CHUNK],
        })
    }

    /// A new chunk: SAs refused in the last one may run again.
    pub(super) fn begin_chunk(&mut self) {
        debug_assert_eq!(self.sa, 0, "a run left open");
        self.refused = 0;
    }

    /// Is this the run's SA?
    pub(super) fn is(&self, sa: &Sa) -> bool {
        self.sa == addr(sa)
    }

    /// Was a run of this SA refused in this chunk?
    pub(super) fn refused(&self, sa: &Sa) -> bool {
        self.refused == addr(sa)
    }

    /// Start a run of `sa` with its packets (index in the chunk, low half
    /// of the number, bytes), in order, at `now`: check them all against
    /// the window. False (no run) if it would not stay clear of every
    /// lifetime limit.
    pub(super) fn start(
        &mut self,
        sa: &Sa,
        members: impl Iterator<Item = (usize, u32, usize)>,
        now: Duration,
    ) -> bool {
        let (mut n, mut bytes) = (0, 0u64);
        let mut idx = [0u8; CHUNK];
        for (i, lo, len) in members {
            idx[n] = i as u8;
            self.los[n] = lo;
            n += 1;
            bytes += len as u64;
        }
        if n == 0 || !sa.run_clear(n, bytes, now, false) {
            self.refused = addr(sa);
            return false;
        }
        self.top = sa.replay_check_run(&self.los[..n], &mut self.checks[..n]);
        for (i, c) in idx[..n].iter().zip(&self.checks[..n]) {
            self.pre[*i as usize] = *c;
        }
        self.max = self.top;
        self.sa = addr(sa);
        self.nseen = 0;
        self.nwaiting = 0;
        self.nfailed = 0;
        true
    }

    /// The replay check of packet `i` (its number's low half `lo`), as
    /// [`Sa::replay_check`] would make it had the run's packets opened
    /// before it been accepted. The full number.
    pub(super) fn check(&self, sa: &Sa, i: usize, lo: u32) -> Result<u64, ReplayError> {
        let size = sa.replay_size();
        let esn = sa.esn();
        let full = replay::infer(self.top, size, lo, esn);
        // The numbers opened moved the top the high half is inferred from.
        let moved = esn && self.max > self.top && replay::infer(self.max, size, lo, true) != full;
        let full = if moved {
            replay::infer(self.max, size, lo, true)
        } else {
            full
        };
        // In the window's order: zero, then left of the window (whose
        // right edge the numbers opened may have moved), then seen.
        if full == 0 {
            return Err(ReplayError::Zero);
        }
        let counts = size > 0 && full <= self.max;
        if counts && self.max - full >= size as u64 {
            return Err(ReplayError::TooOld);
        }
        let full = if moved {
            // Checked against the window again.
            sa.replay_check_from(self.max, lo)?
        } else {
            self.pre[i]?
        };
        if counts && self.seen[..self.nseen].contains(&full) {
            return Err(ReplayError::Duplicate);
        }
        Ok(full)
    }

    /// Packet `i` passed its ICV with number `seq`, `len` bytes: it waits
    /// to be accepted.
    pub(super) fn opened(&mut self, i: usize, seq: u64, len: usize) {
        self.seen[self.nseen] = seq;
        self.nseen += 1;
        self.max = self.max.max(seq);
        self.waiting[self.nwaiting] = (seq, len as u32);
        self.of[self.nwaiting] = i as u8;
        self.nwaiting += 1;
    }

    /// Accept what waits, in order, under one lock; a packet refused
    /// there (a number another worker took meanwhile, a hard expiry) is
    /// recorded as failed.
    pub(super) fn flush(&mut self, sa: &Sa, w: &mut Worker, now: Duration) {
        let n = self.nwaiting;
        if n == 0 {
            return;
        }
        sa.accept_inbound_run(&self.waiting[..n], now, &mut self.accepted[..n]);
        for k in 0..n {
            let r = match self.accepted[k] {
                Ok(e) => match w.expiry(sa, e) {
                    Ok(()) => continue,
                    Err(r) => r,
                },
                Err(e) => replay_drop(sa, e),
            };
            self.failed[self.nfailed] = (self.of[k], r);
            self.nfailed += 1;
        }
        self.nwaiting = 0;
    }

    /// Why packet `i` was refused when accepted, if it was.
    pub(super) fn failure(&self, i: usize) -> Option<DropReason> {
        self.failed[..self.nfailed]
            .iter()
            .find(|(j, _)| *j as usize == i)
            .map(|(_, r)| *r)
    }

    /// End the run: accept what waits. The packets refused in the run,
    /// and why.
    pub(super) fn end(&mut self, sa: &Sa, w: &mut Worker, now: Duration) -> &[(u8, DropReason)] {
        self.flush(sa, w, now);
        self.sa = 0;
        let n = std::mem::take(&mut self.nfailed);
        &self.failed[..n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sad::tests::esp_config;

    /// A run's checks against the same numbers checked and accepted one
    /// by one on a twin SA: zero, a duplicate of a number opened earlier
    /// in the run, one left of the window the run moved, one within it.
    #[test]
    fn a_run_checks_as_the_window_would_one_by_one() {
        let mut c = esp_config(0x400);
        c.replay = 8;
        let a = Sa::new(c.clone(), Duration::ZERO, 1).unwrap();
        let b = Sa::new(c, Duration::ZERO, 2).unwrap();
        for s in 1..=5 {
            a.accept_inbound(s, 100, Duration::ZERO).unwrap();
            b.accept_inbound(s, 100, Duration::ZERO).unwrap();
        }
        let los = [9u32, 0, 9, 3, 12, 6, 4];
        let mut run = InRun::new();
        run.begin_chunk();
        let members = los.iter().enumerate().map(|(i, lo)| (i, *lo, 100));
        assert!(run.start(&a, members, Duration::ZERO));
        for (i, lo) in los.iter().enumerate() {
            let one = b.replay_check(*lo);
            if let Ok(s) = one {
                b.accept_inbound(s, 100, Duration::ZERO).unwrap();
            }
            let r = run.check(&a, i, *lo);
            assert_eq!(r, one, "number {lo}");
            if let Ok(s) = r {
                run.opened(i, s, 100);
            }
        }
        // 9, 12 and 6 were taken; 3 is too old once 12 is in.
        assert_eq!(b.replay_check(3), Err(ReplayError::TooOld));
        let mut w = Worker::new([1; 32]);
        assert!(run.end(&a, &mut w, Duration::ZERO).is_empty());
        assert_eq!(a.replay_top(), 12);
        let c = |sa: &Sa| {
            (
                sa.counters
                    .packets
                    .load(std::sync::atomic::Ordering::Relaxed),
                sa.replay_top(),
            )
        };
        assert_eq!(c(&a), c(&b));
    }
}
