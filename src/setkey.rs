//! The setkey(8) language (KAME / ipsec-tools): statements such as `add`,
//! `spdadd` and `flush`, parsed into [`Command`]s with their line numbers.
//!
//! Parsing is pure: applying the commands to the SPD/SAD is
//! [`crate::state::State::apply`]'s job, and a file with any error is
//! rejected whole with `FILE:LINE: message`.

use crate::sad::{Proto, SaConfig};
use crate::spd::{Action, Dir, Selector};
use std::fmt;
use std::net::IpAddr;

/// One statement of a setkey file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `flush [esp|ah|ipcomp];`
    Flush(Option<Proto>),
    /// `spdflush;`
    SpdFlush,
    /// `add ...;`
    Add(SaConfig),
    /// `update ...;` (replace an existing SA's keys and lifetimes, or
    /// complete a larval one)
    Update(SaConfig),
    /// `get SRC DST PROTO SPI;`
    Get { src: IpAddr, dst: IpAddr, proto: Proto, spi: u32 },
    /// `delete SRC DST PROTO SPI;`
    Delete { src: IpAddr, dst: IpAddr, proto: Proto, spi: u32 },
    /// `deleteall SRC DST PROTO;`
    DeleteAll { src: IpAddr, dst: IpAddr, proto: Proto },
    /// `spdadd ...;`
    SpdAdd { dir: Dir, selector: Selector, priority: u32, action: Action },
    /// `spdupdate ...;`
    SpdUpdate { dir: Dir, selector: Selector, priority: u32, action: Action },
    /// `spddelete SRC DST UPPER -P DIR;`
    SpdDelete { dir: Dir, selector: Selector },
    /// `dump [proto];`
    Dump(Option<Proto>),
    /// `spddump;`
    SpdDump,
}

/// A command and the line it starts on (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub line: usize,
    pub cmd: Command,
}

/// Something legal but worth a word to the user (e.g. `-A null`, or an SA
/// without a replay window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub line: usize,
    pub message: String,
}

/// An error at `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// The result of parsing a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub statements: Vec<Statement>,
    pub warnings: Vec<Warning>,
}

/// Parse setkey statements. `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<Parsed, ConfigError> {
    let _ = (text, file);
    todo!("setkey parser")
}
