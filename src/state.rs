//! The SPD and SAD together, and how setkey statements change them.
//!
//! [`State::apply`] is all-or-nothing: it works on a copy and returns the
//! new state only if every statement succeeded, so a file or control batch
//! with an error leaves the running state untouched.

use crate::sad::{Sa, Sad};
use crate::setkey::{self, Command, ConfigError, Statement, Warning};
use crate::spd::Spd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Everything the engine reads: an immutable snapshot (cheap to clone:
/// SAs and policies are shared).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub spd: Spd,
    pub sad: Sad,
    /// Distinct for every state [`State::apply`] produces that differs
    /// from the one it was applied to (statements that only read, `get`
    /// and `dump`, keep it): workers key their per-flow caches on it.
    pub generation: u64,
    /// State of the generator `getspi` draws SPIs from (xorshift). Seed it
    /// from the OS with [`State::seeded`] so that SPIs are unpredictable.
    spi_rng: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// What applying statements produced besides the new state.
#[derive(Debug, Default)]
pub struct Applied {
    /// Output of `get`, `dump` and `spddump`.
    pub output: Vec<String>,
    /// SAs removed (deleted, flushed, replaced): their owners may report
    /// or zeroize them.
    pub removed: Vec<Arc<Sa>>,
    /// SPIs reserved by `getspi`, in order.
    pub spis: Vec<u32>,
}

impl State {
    /// Parse `text` (named `file` in errors) and apply it to a copy of
    /// this state at time `now`.
    pub fn apply_text(
        &self,
        text: &str,
        file: &str,
        now: Duration,
    ) -> Result<(State, Applied, Vec<Warning>), ConfigError> {
        let parsed = setkey::parse(text, file)?;
        let (state, applied) = self.apply(&parsed.statements, file, now)?;
        Ok((state, applied, parsed.warnings))
    }

    /// An empty state whose `getspi` draws from `seed`.
    pub fn seeded(seed: u64) -> State {
        State {
            spi_rng: seed | 1,
            ..State::default()
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: enough to make SPIs unpredictable to a peer that
        // does not know the OS seed; not used for anything secret.
        let mut x = self.spi_rng | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.spi_rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// This state with a new generation: for a snapshot changed other than
    /// by [`State::apply`] (e.g. expired SAs reaped).
    pub fn renewed(mut self) -> State {
        self.generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        self
    }

    /// Apply statements to a copy of this state.
    pub fn apply(
        &self,
        statements: &[Statement],
        file: &str,
        now: Duration,
    ) -> Result<(State, Applied), ConfigError> {
        let mut s = self.clone();
        let expired = s.sad.expire_larval(now);
        // A new generation only for a change: workers drop their cached
        // per-flow decisions on each (at 10,000 peers, 10,000 lookups to
        // make again), which `get` or `dump` must not cost them.
        let reads_only = statements.iter().all(|st| {
            matches!(
                st.cmd,
                Command::Get { .. } | Command::Dump(_) | Command::SpdDump
            )
        });
        if !reads_only || expired > 0 {
            s.generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
        }
        let mut applied = Applied::default();
        for st in statements {
            let err = |message: String| ConfigError {
                file: file.to_string(),
                line: st.line,
                message,
            };
            match &st.cmd {
                Command::Flush(proto) => applied.removed.extend(s.sad.flush(*proto)),
                Command::SpdFlush => s.spd.flush(),
                Command::Add(cfg) => {
                    s.sad
                        .add(crate::secret::within(|| cfg.clone()), now)
                        .map_err(|e| err(e.to_string()))?;
                }
                Command::Update(cfg) => {
                    if s.sad.is_larval(cfg, now) {
                        s.sad
                            .complete(crate::secret::within(|| cfg.clone()), now)
                            .map_err(|e| err(e.to_string()))?;
                    } else {
                        let old = s
                            .sad
                            .delete(cfg.src, cfg.dst, cfg.proto, cfg.spi)
                            .ok_or_else(|| {
                                err(format!(
                                    "no SA or getspi reservation {} {} {} spi {:#x} to update",
                                    cfg.src, cfg.dst, cfg.proto, cfg.spi
                                ))
                            })?;
                        applied.removed.push(old);
                        s.sad
                            .add(crate::secret::within(|| cfg.clone()), now)
                            .map_err(|e| err(e.to_string()))?;
                    }
                }
                Command::GetSpi {
                    src,
                    dst,
                    proto,
                    range,
                } => {
                    let (lo, hi) = range.unwrap_or(match proto {
                        crate::sad::Proto::IpComp => (0x100, 0xffff),
                        _ => (0x100, u32::MAX),
                    });
                    let span = (hi - lo) as u64 + 1;
                    let mut spi = None;
                    for _ in 0..64 {
                        let c = lo + (s.next_random() % span) as u32;
                        if !s.sad.spi_in_use(*dst, *proto, c, now) {
                            spi = Some(c);
                            break;
                        }
                    }
                    // A nearly full range: look for any free value.
                    if spi.is_none() && span <= 1 << 20 {
                        spi = (lo..=hi).find(|c| !s.sad.spi_in_use(*dst, *proto, *c, now));
                    }
                    let spi = spi.ok_or_else(|| {
                        err(format!("no free SPI in {lo:#x}-{hi:#x} for {dst} {proto}"))
                    })?;
                    s.sad.reserve(*src, *dst, *proto, spi, now);
                    applied.spis.push(spi);
                    applied
                        .output
                        .push(format!("{src} {dst} {proto} spi={spi} ({spi:#010x})"));
                }
                Command::Get {
                    src,
                    dst,
                    proto,
                    spi,
                } => {
                    let sa = s
                        .sad
                        .get(*src, *dst, *proto, *spi)
                        .ok_or_else(|| err(format!("no SA {src} {dst} {proto} spi {spi:#x}")))?;
                    applied.output.push(describe_sa(sa, now));
                }
                Command::Delete {
                    src,
                    dst,
                    proto,
                    spi,
                } => {
                    // As PF_KEY's SADB_DELETE, a larval SA (getspi) goes too.
                    match s.sad.delete(*src, *dst, *proto, *spi) {
                        Some(sa) => applied.removed.push(sa),
                        None if s.sad.unreserve(*src, *dst, *proto, *spi) => {}
                        None => {
                            return Err(err(format!(
                                "no SA {src} {dst} {proto} spi {spi:#x} to delete"
                            )));
                        }
                    }
                }
                Command::DeleteAll { src, dst, proto } => {
                    applied.removed.extend(s.sad.delete_all(*src, *dst, *proto))
                }
                Command::SpdAdd {
                    dir,
                    selector,
                    priority,
                    action,
                } => {
                    s.spd
                        .add(*dir, *selector, *priority, action.clone())
                        .map_err(|e| err(e.to_string()))?;
                }
                Command::SpdUpdate {
                    dir,
                    selector,
                    priority,
                    action,
                } => {
                    s.spd.update(*dir, *selector, *priority, action.clone());
                }
                Command::SpdDelete { dir, selector } => {
                    s.spd
                        .delete(*dir, selector)
                        .map_err(|e| err(e.to_string()))?;
                }
                Command::Dump(proto) => {
                    for sa in s
                        .sad
                        .iter()
                        .filter(|sa| proto.is_none_or(|p| sa.config.proto == p))
                    {
                        applied.output.push(describe_sa(sa, now));
                    }
                }
                Command::SpdDump => {
                    for p in s.spd.iter() {
                        applied.output.push(p.to_string());
                    }
                }
            }
        }
        Ok((s, applied))
    }
}

/// A setkey -D style description of an SA (never the keys).
pub fn describe_sa(sa: &Sa, now: Duration) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &sa.config;
    let mut s = format!(
        "{}\n\t{} mode=transport spi={}({:#010x}) reqid={}\n",
        c.endpoints(),
        c.proto_name(),
        c.spi,
        c.spi,
        c.reqid
    );
    match c.proto {
        crate::sad::Proto::IpComp => s.push_str(&format!("\tC: deflate cpi={}\n", c.wire_cpi())),
        _ => {
            if c.enc != crate::crypto::EncAlg::Null || c.proto == crate::sad::Proto::Esp {
                s.push_str(&format!(
                    "\tE: {} ({} bits)\n",
                    c.enc.name(),
                    c.enc_key.len() * 8
                ));
            }
            if c.auth != crate::crypto::AuthAlg::Null {
                s.push_str(&format!(
                    "\tA: {} ({} bits)\n",
                    c.auth.name(),
                    c.auth_key.len() * 8
                ));
            }
        }
    }
    s.push_str(&format!(
        "\tseq={:#010x} replay={} esn={} state={}\n\tage={}s packets={} bytes={} replay_drops={} icv_failures={}",
        sa.last_seq(),
        c.replay,
        c.esn,
        if sa.is_dead() { "dead" } else { "mature" },
        now.saturating_sub(sa.added).as_secs(),
        sa.counters.packets.load(Relaxed),
        sa.counters.bytes.load(Relaxed),
        sa.counters.replay_drops.load(Relaxed),
        sa.counters.icv_failures.load(Relaxed),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sad::Proto;

    const K: &str = "-E aes-gcm-16 0x000102030405060708090a0b0c0d0e0f10111213";

    fn apply(s: &State, text: &str, secs: u64) -> Result<(State, Applied), ConfigError> {
        let p = crate::setkey::parse(text, "ctl").unwrap();
        s.apply(&p.statements, "ctl", Duration::from_secs(secs))
    }

    #[test]
    fn reads_keep_the_generation_and_changes_make_a_new_one() {
        let s = State::seeded(1);
        let (s, _) = apply(&s, &format!("add 10.0.0.1 10.0.0.2 esp 0x100 {K};"), 0).unwrap();
        let g = s.generation;
        let (r, a) = apply(&s, "get 10.0.0.1 10.0.0.2 esp 0x100; dump; spddump;", 0).unwrap();
        assert_eq!(r.generation, g);
        assert_eq!(a.output.len(), 2);
        let (c, _) = apply(
            &s,
            "get 10.0.0.1 10.0.0.2 esp 0x100; delete 10.0.0.1 10.0.0.2 esp 0x100;",
            0,
        )
        .unwrap();
        assert_ne!(c.generation, g);
        // A reservation that expired goes: that is a change too.
        let (l, _) = apply(&s, "getspi 10.0.0.2 10.0.0.1 esp 0x1000-0x1fff;", 0).unwrap();
        let (e, _) = apply(&l, "dump;", 100).unwrap();
        assert_ne!(e.generation, l.generation);
    }

    #[test]
    fn getspi_reserves_then_update_completes() {
        let s = State::seeded(42);
        let (s, a) = apply(&s, "getspi 10.0.0.2 10.0.0.1 esp 0x1000-0x1fff;", 0).unwrap();
        let spi = a.spis[0];
        assert!((0x1000..=0x1fff).contains(&spi));
        let dst = "10.0.0.1".parse().unwrap();
        assert!(
            s.sad
                .spi_in_use(dst, Proto::Esp, spi, Duration::from_secs(1))
        );
        assert!(
            s.sad.lookup_inbound(dst, Proto::Esp, spi).is_none(),
            "a larval SA carries no traffic"
        );
        // add is refused for a reserved SPI, update completes it
        let e = apply(&s, &format!("add 10.0.0.2 10.0.0.1 esp {spi:#x} {K};"), 1).unwrap_err();
        assert!(e.message.contains("reserved by getspi"), "{e}");
        let (s2, _) = apply(
            &s,
            &format!("update 10.0.0.2 10.0.0.1 esp {spi:#x} {K};"),
            1,
        )
        .unwrap();
        assert!(s2.sad.lookup_inbound(dst, Proto::Esp, spi).is_some());
        assert_eq!(s2.sad.larval().count(), 0);
        // a second getspi never hands out the same SPI
        let (s3, a3) = apply(&s2, "getspi 10.0.0.2 10.0.0.1 esp 0x1000-0x1001;", 2).unwrap();
        assert_ne!(a3.spis[0], spi);
        // reservations lapse after 30 s; update then fails
        let e = apply(
            &s3,
            &format!("update 10.0.0.2 10.0.0.1 esp {:#x} {K};", a3.spis[0]),
            40,
        )
        .unwrap_err();
        assert!(e.message.contains("no SA or getspi reservation"), "{e}");
        // a full range is an error naming it
        let (s4, _) = apply(&s3, "getspi 10.0.0.2 10.0.0.1 esp 0x1000-0x1001;", 3).unwrap();
        let e = apply(&s4, "getspi 10.0.0.2 10.0.0.1 esp 0x1000-0x1001;", 4).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ctl:1: no free SPI in 0x1000-0x1001 for 10.0.0.1 esp"
        );
    }

    #[test]
    fn a_failing_batch_changes_nothing() {
        let s = State::seeded(1);
        let text = format!(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 {K};\nspdadd 10.0.0.1 10.0.0.2 any -P out ipsec esp/transport//require;\ndelete 10.0.0.1 10.0.0.2 esp 0x9999;\n"
        );
        let e = apply(&s, &text, 0).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(s.sad.is_empty() && s.spd.is_empty());
    }
}
