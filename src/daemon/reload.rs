//! Reloading `--config` (SIGHUP, `systemctl reload`).
//!
//! The file describes its share of the state: what `tunsec run` would hold
//! right after a fresh start with it (its statements applied to an empty
//! state). A reload makes the running state hold exactly that share,
//! beside whatever was keyed at run time (control socket, XFRM) that the
//! file does not name:
//!
//! - an SA (by destination, protocol and SPI) or a policy (by direction
//!   and selector) that the file names and that runs exactly as the file
//!   says is kept as it is: sequence numbers, replay window, counters and
//!   lifetimes go on, so a reload that changes nothing disturbs nothing;
//! - one the file names differently, or that is missing (deleted or
//!   expired meanwhile, or never there), is replaced or added as the file
//!   says: the file wins over a run-time change to what it names;
//! - one the previous file named and the new one does not is removed;
//! - everything else (SAs and policies keyed at run time, `getspi`
//!   reservations) is left alone.
//!
//! The changes are one batch, applied through the writers' commit that
//! the control socket uses: state and plumbing change together or not at
//! all. A file that does not parse, or a batch that cannot be applied,
//! changes nothing.

use crate::sad::Proto;
use crate::setkey::{self, Command, ConfigError, Statement, Warning};
use crate::spd::{Dir, Selector};
use crate::state::State;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

/// An SA's key in the SAD: destination, protocol, SPI (or wire CPI).
type SaKey = (IpAddr, Proto, u32);
/// A policy's key in the SPD.
type PolicyKey = (Dir, Selector);

/// What a configuration file named: the keys of its SAs and policies
/// (never the keys of the SAs, in the cryptographic sense).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owned {
    sas: HashSet<SaKey>,
    policies: HashSet<PolicyKey>,
}

impl Owned {
    /// The SAs and policies of `state` (a file applied to an empty state).
    pub fn of(state: &State) -> Owned {
        Owned {
            sas: state
                .sad
                .iter()
                .map(|sa| (sa.config.dst, sa.config.proto, sa.config.wire_spi()))
                .collect(),
            policies: state.spd.iter().map(|p| (p.dir, p.selector)).collect(),
        }
    }
}

/// A configuration file read for a reload.
pub struct FileState {
    /// The file applied to an empty state (a fresh start's state).
    pub state: State,
    pub warnings: Vec<Warning>,
    /// The line of the statement that last set each SA and policy.
    sa_lines: HashMap<SaKey, usize>,
    policy_lines: HashMap<PolicyKey, usize>,
}

impl FileState {
    /// Parse `text` (named `file` in errors) and apply it to an empty
    /// state, as a fresh start would.
    pub fn parse(text: &str, file: &str) -> Result<FileState, ConfigError> {
        let parsed = setkey::parse(text, file)?;
        let (state, _) = State::seeded(1).apply(&parsed.statements, file, Duration::ZERO)?;
        let mut sa_lines = HashMap::new();
        let mut policy_lines = HashMap::new();
        for st in &parsed.statements {
            match &st.cmd {
                Command::Add(c) | Command::Update(c) => {
                    sa_lines.insert((c.dst, c.proto, c.wire_spi()), st.line);
                }
                Command::SpdAdd { dir, selector, .. }
                | Command::SpdUpdate { dir, selector, .. } => {
                    policy_lines.insert((*dir, *selector), st.line);
                }
                _ => {}
            }
        }
        Ok(FileState {
            state,
            warnings: parsed.warnings,
            sa_lines,
            policy_lines,
        })
    }
}

/// What a reload changes, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub sas_added: usize,
    pub sas_replaced: usize,
    pub sas_removed: usize,
    pub sas_kept: usize,
    pub policies_added: usize,
    pub policies_replaced: usize,
    pub policies_removed: usize,
    pub policies_kept: usize,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        self.sas_added + self.sas_replaced + self.sas_removed == 0
            && self.policies_added + self.policies_replaced + self.policies_removed == 0
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SAs: {} added, {} replaced, {} removed, {} kept; policies: {} added, {} replaced, {} removed, {} kept",
            self.sas_added,
            self.sas_replaced,
            self.sas_removed,
            self.sas_kept,
            self.policies_added,
            self.policies_replaced,
            self.policies_removed,
            self.policies_kept
        )
    }
}

/// The statements that take `cur` to the reloaded state: `old` is what
/// the previous file named, `new` the new file. Statements carry the
/// new file's line numbers (0 for removals), so an error in applying
/// them names the line that caused it.
pub fn plan(cur: &State, old: &Owned, new: &FileState) -> (Vec<Statement>, Summary) {
    let mut out = Vec::new();
    let mut sum = Summary::default();
    let want = Owned::of(&new.state);

    // Removals first: what the old file named and the new one does not.
    let mut gone: Vec<&SaKey> = old.sas.difference(&want.sas).collect();
    gone.sort();
    for &(dst, proto, wire) in gone {
        if let Some(sa) = cur.sad.lookup_inbound(dst, proto, wire) {
            let c = &sa.config;
            out.push(Statement {
                line: 0,
                cmd: Command::Delete {
                    src: c.src,
                    dst: c.dst,
                    proto: c.proto,
                    spi: c.spi,
                },
            });
            sum.sas_removed += 1;
        }
    }
    let mut gone: Vec<&PolicyKey> = old.policies.difference(&want.policies).collect();
    gone.sort_by_key(|(d, s)| (d.name(), format!("{s:?}")));
    for (dir, selector) in gone {
        if cur.spd.get(*dir, selector).is_some() {
            out.push(Statement {
                line: 0,
                cmd: Command::SpdDelete {
                    dir: *dir,
                    selector: *selector,
                },
            });
            sum.policies_removed += 1;
        }
    }

    // Then the file's SAs, in the order a fresh start adds them (oldest
    // first, so the newest is preferred among several, as it was).
    let mut sas: Vec<_> = new.state.sad.iter().collect();
    sas.sort_by_key(|sa| sa.serial);
    for sa in sas {
        let c = &sa.config;
        let key = (c.dst, c.proto, c.wire_spi());
        let line = new.sa_lines.get(&key).copied().unwrap_or(0);
        match cur.sad.lookup_inbound(c.dst, c.proto, c.wire_spi()) {
            Some(running) if running.config == *c => sum.sas_kept += 1,
            Some(running) => {
                let r = &running.config;
                out.push(Statement {
                    line,
                    cmd: Command::Delete {
                        src: r.src,
                        dst: r.dst,
                        proto: r.proto,
                        spi: r.spi,
                    },
                });
                out.push(Statement {
                    line,
                    cmd: Command::Add(c.clone()),
                });
                sum.sas_replaced += 1;
            }
            None => {
                out.push(Statement {
                    line,
                    cmd: Command::Add(c.clone()),
                });
                sum.sas_added += 1;
            }
        }
    }

    // And its policies, in the file's order.
    let mut ps: Vec<_> = new.state.spd.iter().collect();
    ps.sort_by_key(|p| p.id);
    for p in ps {
        let key = (p.dir, p.selector);
        let line = new.policy_lines.get(&key).copied().unwrap_or(0);
        match cur.spd.get(p.dir, &p.selector) {
            Some(running) if running.priority == p.priority && running.action == p.action => {
                sum.policies_kept += 1;
                continue;
            }
            Some(_) => sum.policies_replaced += 1,
            None => sum.policies_added += 1,
        }
        out.push(Statement {
            line,
            cmd: Command::SpdUpdate {
                dir: p.dir,
                selector: p.selector,
                priority: p.priority,
                action: p.action.clone(),
            },
        });
    }
    (out, sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const KEY_A: &str = "0x00112233445566778899aabbccddeeff";
    const KEY_B: &str = "0xffeeddccbbaa99887766554433221100";

    fn sa(spi: u32, key: &str) -> String {
        format!("add 10.0.0.1 10.0.0.2 esp {spi:#x} -r 64 -E aes-gcm-16 {key}00000000;\n")
    }

    fn pol(dport: u16, level: &str) -> String {
        format!("spdadd 10.0.0.1 10.0.0.2[{dport}] tcp -P out ipsec esp/transport//{level};\n")
    }

    fn file(text: &str) -> FileState {
        FileState::parse(text, "f.conf").unwrap()
    }

    /// Reload `cur` (started from `start`, or changed since) with `next`.
    fn reload(cur: &State, start: &str, next: &str) -> (State, Summary) {
        let old = Owned::of(&file(start).state);
        let new = file(next);
        let (stmts, sum) = plan(cur, &old, &new);
        let (s, _) = cur.apply(&stmts, "f.conf", Duration::ZERO).unwrap();
        (s, sum)
    }

    fn describe(s: &State) -> (Vec<String>, Vec<String>) {
        let mut sas: Vec<String> = s
            .sad
            .iter()
            .map(|sa| format!("{:?} key={:?}", sa.config, sa.config.enc_key.as_slice()))
            .collect();
        sas.sort();
        let mut ps: Vec<String> = s.spd.iter().map(|p| p.to_string()).collect();
        ps.sort();
        (sas, ps)
    }

    #[test]
    fn the_same_file_changes_nothing_and_keeps_the_running_sas() {
        let text = format!(
            "{}{}{}",
            sa(0x1000, KEY_A),
            sa(0x1001, KEY_A),
            pol(22, "require")
        );
        let cur = file(&text).state;
        let before: Vec<Arc<crate::sad::Sa>> = cur.sad.iter().cloned().collect();
        before[0].next_seq();
        let (stmts, sum) = plan(&cur, &Owned::of(&cur), &file(&text));
        assert!(stmts.is_empty(), "{stmts:?}");
        assert!(sum.is_empty());
        assert_eq!((sum.sas_kept, sum.policies_kept), (2, 1));
    }

    #[test]
    fn the_result_is_a_fresh_start_with_the_new_file() {
        let start = format!(
            "{}{}{}{}",
            sa(0x1000, KEY_A),
            sa(0x1001, KEY_A),
            pol(22, "require"),
            pol(80, "require")
        );
        // 0x1000 kept, 0x1001 rekeyed, 0x1002 new; policy 22 kept, 80
        // changed, 80 gone and 443 new.
        let next = format!(
            "{}{}{}{}{}",
            sa(0x1000, KEY_A),
            sa(0x1001, KEY_B),
            sa(0x1002, KEY_B),
            pol(22, "require"),
            pol(443, "use")
        );
        let cur = file(&start).state;
        let kept = cur
            .sad
            .lookup_inbound("10.0.0.2".parse().unwrap(), Proto::Esp, 0x1000);
        let kept = kept.unwrap().clone();
        kept.next_seq();
        kept.next_seq();
        let (got, sum) = reload(&cur, &start, &next);
        assert_eq!(describe(&got), describe(&file(&next).state));
        assert_eq!(
            sum,
            Summary {
                sas_added: 1,
                sas_replaced: 1,
                sas_removed: 0,
                sas_kept: 1,
                policies_added: 1,
                policies_replaced: 0,
                policies_removed: 1,
                policies_kept: 1,
            }
        );
        // The unchanged SA is the running one: its sequence numbers go on.
        let after = got
            .sad
            .lookup_inbound("10.0.0.2".parse().unwrap(), Proto::Esp, 0x1000)
            .unwrap();
        assert!(Arc::ptr_eq(after, &kept));
        assert_eq!(after.last_seq(), 2);
    }

    #[test]
    fn what_was_keyed_at_run_time_stays_unless_the_file_names_it() {
        let start = format!("{}{}", sa(0x1000, KEY_A), pol(22, "require"));
        let (cur, _) = file(&start)
            .state
            .apply_text(
                &format!(
                    "{}{}{}",
                    sa(0x2000, KEY_B),
                    sa(0x3000, KEY_B),
                    pol(8080, "require")
                ),
                "control",
                Duration::ZERO,
            )
            .map(|(s, a, _)| (s, a))
            .unwrap();
        // The new file drops 0x1000 and names 0x3000 (with its own key).
        let next = format!("{}{}", sa(0x3000, KEY_A), pol(22, "require"));
        let (got, sum) = reload(&cur, &start, &next);
        let spis: Vec<u32> = {
            let mut v: Vec<u32> = got.sad.iter().map(|s| s.config.spi).collect();
            v.sort();
            v
        };
        assert_eq!(spis, [0x2000, 0x3000]);
        let s3 = got
            .sad
            .lookup_inbound("10.0.0.2".parse().unwrap(), Proto::Esp, 0x3000)
            .unwrap();
        assert_eq!(
            s3.config.enc_key.as_slice()[..16],
            file(&next).state.sad.iter().next().unwrap().config.enc_key[..16]
        );
        assert_eq!(got.spd.len(), 2, "the run-time policy stays");
        assert_eq!((sum.sas_removed, sum.sas_replaced), (1, 1));
    }

    #[test]
    fn a_file_sa_deleted_at_run_time_comes_back() {
        let start = sa(0x1000, KEY_A);
        let (cur, _, _) = file(&start)
            .state
            .apply_text(
                "delete 10.0.0.1 10.0.0.2 esp 0x1000;",
                "control",
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(cur.sad.len(), 0);
        let (got, sum) = reload(&cur, &start, &start);
        assert_eq!(got.sad.len(), 1);
        assert_eq!(sum.sas_added, 1);
    }

    #[test]
    fn a_bad_file_is_an_error_at_its_line() {
        let e = FileState::parse(&format!("{}add 10.0.0.1;\n", sa(0x1000, KEY_A)), "f.conf")
            .err()
            .unwrap();
        assert_eq!((e.file.as_str(), e.line), ("f.conf", 2));
        // Consistent in itself but not with itself: two adds of one SA.
        let e = FileState::parse(
            &format!("{}\n{}", sa(0x1000, KEY_A), sa(0x1000, KEY_B)),
            "f.conf",
        )
        .err()
        .unwrap();
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn an_apply_error_names_the_new_files_line() {
        // A getspi reservation at run time blocks the file's add of that
        // SPI: the error names the file's line.
        let (cur, _, _) = State::default()
            .apply_text(
                "getspi 10.0.0.1 10.0.0.2 esp 0x1000-0x1000;",
                "control",
                Duration::ZERO,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let next = format!("# comment\n{}", sa(0x1000, KEY_A));
        let (stmts, _) = plan(&cur, &Owned::default(), &file(&next));
        let e = cur.apply(&stmts, "f.conf", Duration::ZERO).err().unwrap();
        assert_eq!((e.file.as_str(), e.line), ("f.conf", 2), "{e}");
    }
}
