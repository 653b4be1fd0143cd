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
    /// Distinct for every state [`State::apply`] produces: workers key
    /// their per-flow caches on it.
    pub generation: u64,
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
        s.generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
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
                        .add(cfg.clone(), now)
                        .map_err(|e| err(e.to_string()))?;
                }
                Command::Update(cfg) => {
                    let old = s
                        .sad
                        .delete(cfg.src, cfg.dst, cfg.proto, cfg.spi)
                        .ok_or_else(|| {
                            err(format!(
                                "no SA {} {} {} spi {:#x} to update",
                                cfg.src, cfg.dst, cfg.proto, cfg.spi
                            ))
                        })?;
                    applied.removed.push(old);
                    s.sad
                        .add(cfg.clone(), now)
                        .map_err(|e| err(e.to_string()))?;
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
                    let sa = s.sad.delete(*src, *dst, *proto, *spi).ok_or_else(|| {
                        err(format!("no SA {src} {dst} {proto} spi {spi:#x} to delete"))
                    })?;
                    applied.removed.push(sa);
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
        "{} {}\n\t{} mode=transport spi={}({:#010x}) reqid={}\n",
        c.src, c.dst, c.proto, c.spi, c.spi, c.reqid
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
