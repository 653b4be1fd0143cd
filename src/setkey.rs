//! The setkey(8) language (KAME / ipsec-tools): statements such as `add`,
//! `spdadd` and `flush`, parsed into [`Command`]s with their line numbers.
//!
//! Parsing is pure: applying the commands to the SPD/SAD is
//! [`crate::state::State::apply`]'s job, and a file with any error is
//! rejected whole with `FILE:LINE: message`.

use crate::crypto::{Auth, AuthAlg, Cipher, EncAlg};
use crate::sad::{Lifetime, Proto, SaConfig};
use crate::spd::{
    Action, Dir, Level, PRIORITY_DEFAULT, PRIORITY_HIGH, PRIORITY_LOW, Prefix, Rule, Selector,
};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;
use zeroize::Zeroizing;

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
    Get {
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        spi: u32,
    },
    /// `delete SRC DST PROTO SPI;`
    Delete {
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        spi: u32,
    },
    /// `deleteall SRC DST PROTO;`
    DeleteAll {
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
    },
    /// `spdadd ...;`
    SpdAdd {
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    },
    /// `spdupdate ...;`
    SpdUpdate {
        dir: Dir,
        selector: Selector,
        priority: u32,
        action: Action,
    },
    /// `spddelete SRC DST UPPER -P DIR;`
    SpdDelete { dir: Dir, selector: Selector },
    /// `dump [proto];`
    Dump(Option<Proto>),
    /// `spddump;`
    SpdDump,
    /// `getspi SRC DST PROTO [MIN-MAX];` (PF_KEY's SADB_GETSPI): reserve
    /// an unused SPI for an SA to be completed by `update`.
    GetSpi {
        src: IpAddr,
        dst: IpAddr,
        proto: Proto,
        range: Option<(u32, u32)>,
    },
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
///
/// The whole text is checked; the first error (in file order) is returned.
pub fn parse(text: &str, file: &str) -> Result<Parsed, ConfigError> {
    let (stmts, lex_error) = lex(text, file);
    let mut out = Parsed::default();
    for st in &stmts {
        let mut c = Cursor {
            file,
            toks: &st.toks,
            pos: 0,
            line: st.line,
        };
        let cmd = parse_statement(&mut c, &mut out.warnings)?;
        out.statements.push(Statement { line: st.line, cmd });
    }
    // A lexing error (unterminated string or statement) is always at the
    // end of the usable text, so errors in earlier statements come first.
    match lex_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Encryption algorithm names accepted by `-E` (see [`EncAlg::from_name`]).
const ENC_NAMES: &str = "null, aes-cbc, rijndael-cbc, aes-gcm-16, chacha20-poly1305";
/// Authentication algorithm names accepted by `-A` (see [`AuthAlg::from_name`]).
const AUTH_NAMES: &str = "null, hmac-sha1, hmac-sha256, hmac-sha2-256, hmac-sha384, hmac-sha2-384, hmac-sha512, hmac-sha2-512";

const TUNNEL_ERROR: &str = "tunnel mode is not supported: tunsec is a transport-mode data plane";

// ---------------------------------------------------------------------------
// Lexing

enum TokKind<'a> {
    /// A run of characters other than white space, `;`, `#` and `"`.
    Word(&'a str),
    /// A `"quoted string"`, its raw bytes (no escapes, as in ipsec-tools).
    Str(&'a str),
}

/// A token borrows the text it was read from: lexing allocates nothing
/// per token, and a key is copied once, into the key arena, when parsed.
struct Tok<'a> {
    kind: TokKind<'a>,
    line: usize,
}

impl<'a> Tok<'a> {
    fn word(&self) -> Option<&'a str> {
        match self.kind {
            TokKind::Word(w) => Some(w),
            TokKind::Str(_) => None,
        }
    }

    /// The token as quoted in error messages (never the contents of a
    /// quoted string, which is usually a key).
    fn show(&self) -> String {
        match self.kind {
            TokKind::Word(w) => quote(w),
            TokKind::Str(_) => "a quoted string".to_string(),
        }
    }
}

/// `s` in double quotes with control characters escaped, cut to a sane
/// length.
fn quote(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX).collect();
        format!("{:?}", cut + "...")
    } else {
        format!("{s:?}")
    }
}

/// The tokens of one `;`-terminated statement.
struct RawStmt<'a> {
    line: usize,
    toks: Vec<Tok<'a>>,
}

/// Split `text` into statements. Also returns the error that stopped
/// lexing, if any (it always concerns the end of the text).
fn lex<'a>(text: &'a str, file: &str) -> (Vec<RawStmt<'a>>, Option<ConfigError>) {
    let mut stmts = Vec::new();
    let mut toks: Vec<Tok<'a>> = Vec::new();
    let mut line = 1usize;
    let mut chars = text.char_indices().peekable();
    let err = |line: usize, message: &str| ConfigError {
        file: file.to_string(),
        line,
        message: message.to_string(),
    };
    while let Some((at, ch)) = chars.next() {
        match ch {
            '\n' => line += 1,
            '#' => {
                while chars.peek().is_some_and(|&(_, c)| c != '\n') {
                    chars.next();
                }
            }
            ';' => {
                if let Some(first) = toks.first() {
                    let l = first.line;
                    stmts.push(RawStmt {
                        line: l,
                        toks: std::mem::take(&mut toks),
                    });
                }
                // An empty statement (a lone `;`) is ignored.
            }
            '"' => {
                let start = line;
                let mut end = None;
                for (i, c) in chars.by_ref() {
                    if c == '"' {
                        end = Some(i);
                        break;
                    }
                    if c == '\n' {
                        line += 1;
                    }
                }
                let Some(end) = end else {
                    return (stmts, Some(err(start, "unterminated quoted string")));
                };
                toks.push(Tok {
                    kind: TokKind::Str(&text[at + 1..end]),
                    line: start,
                });
            }
            c if c.is_whitespace() => {}
            _ => {
                let mut end = text.len();
                while let Some(&(i, c)) = chars.peek() {
                    if c.is_whitespace() || c == ';' || c == '#' || c == '"' {
                        end = i;
                        break;
                    }
                    chars.next();
                }
                toks.push(Tok {
                    kind: TokKind::Word(&text[at..end]),
                    line,
                });
            }
        }
    }
    let tail = toks
        .first()
        .map(|t| err(t.line, "statement not terminated by ';'"));
    (stmts, tail)
}

// ---------------------------------------------------------------------------
// Parsing helpers

struct Cursor<'a> {
    file: &'a str,
    toks: &'a [Tok<'a>],
    pos: usize,
    /// The line the statement starts on.
    line: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, line: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            line,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<&'a Tok<'a>> {
        self.toks.get(self.pos)
    }

    fn peek_word(&self) -> Option<&'a str> {
        self.peek().and_then(Tok::word)
    }

    fn next(&mut self) -> Option<&'a Tok<'a>> {
        let t = self.toks.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    /// The next token, which must be a word; `what` describes it for
    /// errors.
    fn word(&mut self, what: &str) -> Result<(&'a str, usize), ConfigError> {
        match self.next() {
            None => Err(self.err(self.line, format!("missing {what} before ';'"))),
            Some(t) => match t.word() {
                Some(w) => Ok((w, t.line)),
                None => Err(self.err(t.line, format!("expected {what}, got a quoted string"))),
            },
        }
    }

    /// The statement must end here.
    fn end(&self, after: &str) -> Result<(), ConfigError> {
        match self.peek() {
            None => Ok(()),
            Some(t) => Err(self.err(
                t.line,
                format!("unexpected {} after {after} (missing ';'?)", t.show()),
            )),
        }
    }
}

/// A decimal or `0x` hexadecimal number.
fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    } else {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

fn parse_u32(s: &str) -> Option<u32> {
    parse_u64(s).and_then(|n| u32::try_from(n).ok())
}

fn parse_statement(
    c: &mut Cursor<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<Command, ConfigError> {
    let Some(first) = c.next() else {
        // The lexer never produces empty statements.
        return Err(c.err(c.line, "empty statement"));
    };
    let Some(word) = first.word() else {
        return Err(c.err(first.line, format!("unknown command {} (expected add, update, get, getspi, delete, deleteall, flush, dump, spdadd, spdupdate, spddelete, spdflush or spddump)", first.show())));
    };
    let cmd = match word {
        "flush" | "dump" => {
            let proto = match c.next() {
                None => None,
                Some(t) => Some(proto_of(c, t)?),
            };
            c.end(word)?;
            if word == "flush" {
                Command::Flush(proto)
            } else {
                Command::Dump(proto)
            }
        }
        "spdflush" => {
            c.end(word)?;
            Command::SpdFlush
        }
        "spddump" => {
            c.end(word)?;
            Command::SpdDump
        }
        "add" => Command::Add(parse_sa(c, warnings)?),
        "update" => Command::Update(parse_sa(c, warnings)?),
        "get" | "delete" => {
            let (src, dst, ports) = sa_addresses(c)?;
            let proto = sa_proto(c, ports)?;
            let (s, l) = c.word("the SPI")?;
            let spi = parse_u32(s).ok_or_else(|| c.err(l, bad_spi(s)))?;
            c.end("the SPI")?;
            if word == "get" {
                Command::Get {
                    src,
                    dst,
                    proto,
                    spi,
                }
            } else {
                Command::Delete {
                    src,
                    dst,
                    proto,
                    spi,
                }
            }
        }
        "getspi" => {
            let (src, dst, ports) = sa_addresses(c)?;
            let proto = sa_proto(c, ports)?;
            let range = match c.next() {
                None => None,
                Some(t) => {
                    let bad = || {
                        c.err(
                            t.line,
                            format!(
                                "bad SPI range {} (expected MIN-MAX, e.g. 0x100-0xffffffff)",
                                t.show()
                            ),
                        )
                    };
                    let (lo, hi) = t.word().and_then(|w| w.split_once('-')).ok_or_else(bad)?;
                    let (lo, hi) = (
                        parse_u32(lo).ok_or_else(bad)?,
                        parse_u32(hi).ok_or_else(bad)?,
                    );
                    let floor = if proto == Proto::IpComp { 1 } else { 256 };
                    if lo > hi || lo < floor {
                        return Err(c.err(t.line, format!("bad SPI range {lo:#x}-{hi:#x}: MIN must be at least {floor:#x} and not above MAX")));
                    }
                    if proto == Proto::IpComp && hi > 0xffff {
                        return Err(c.err(t.line, "an IPComp CPI range must stay below 0x10000"));
                    }
                    Some((lo, hi))
                }
            };
            c.end("the SPI range")?;
            Command::GetSpi {
                src,
                dst,
                proto,
                range,
            }
        }
        "deleteall" => {
            let (src, dst, ports) = sa_addresses(c)?;
            let proto = sa_proto(c, ports)?;
            c.end("the protocol")?;
            Command::DeleteAll { src, dst, proto }
        }
        "spdadd" | "spdupdate" => {
            let (dir, selector) = parse_selector(c)?;
            let (priority, action) = parse_policy(c, dir)?;
            if word == "spdadd" {
                Command::SpdAdd {
                    dir,
                    selector,
                    priority,
                    action,
                }
            } else {
                Command::SpdUpdate {
                    dir,
                    selector,
                    priority,
                    action,
                }
            }
        }
        "spddelete" => {
            let (dir, selector) = parse_selector(c)?;
            // Like setkey, accept (and ignore) the rest of the policy.
            Command::SpdDelete { dir, selector }
        }
        _ => {
            return Err(c.err(first.line, format!("unknown command {} (expected add, update, get, getspi, delete, deleteall, flush, dump, spdadd, spdupdate, spddelete, spdflush or spddump)", first.show())));
        }
    };
    Ok(cmd)
}

fn bad_spi(s: &str) -> String {
    format!(
        "bad SPI {} (expected a decimal or 0x hexadecimal number below 2^32)",
        quote(s)
    )
}

fn proto_of(c: &Cursor<'_>, t: &Tok) -> Result<Proto, ConfigError> {
    t.word().and_then(Proto::from_name).ok_or_else(|| {
        c.err(
            t.line,
            format!("unknown protocol {} (expected esp, ah or ipcomp)", t.show()),
        )
    })
}

fn next_proto(c: &mut Cursor<'_>) -> Result<Proto, ConfigError> {
    match c.next() {
        None => Err(c.err(c.line, "missing protocol (esp, ah or ipcomp) before ';'")),
        Some(t) => proto_of(c, t),
    }
}

/// The protocol of an SA named by `get`, `delete`, `getspi` or
/// `deleteall`: `esp-udp` names the same SAs as `esp` (ports aside).
fn sa_proto(
    c: &mut Cursor<'_>,
    ports: Option<(Option<u16>, Option<u16>, usize)>,
) -> Result<Proto, ConfigError> {
    if c.peek_word() == Some("esp-udp") {
        c.next();
        return Ok(Proto::Esp);
    }
    if let Some((_, _, l)) = ports {
        return Err(c.err(
            l,
            "ports ([PORT]) on an SA's addresses go with esp-udp only (ESP in UDP, RFC 3948)",
        ));
    }
    next_proto(c)
}

/// An SA's source or destination: a plain address, or `ADDR[PORT]` (the
/// port of an `esp-udp` SA's UDP encapsulation).
fn sa_address(c: &mut Cursor<'_>, what: &str) -> Result<(IpAddr, Option<u16>, usize), ConfigError> {
    let (s, l) = c.word(what)?;
    let (a, port) = match s.split_once('[') {
        Some((a, rest)) => {
            let p = rest
                .strip_suffix(']')
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0);
            let Some(p) = p else {
                return Err(c.err(
                    l,
                    format!(
                        "bad port in {} (expected ADDRESS[PORT] with a port from 1 to 65535)",
                        quote(s)
                    ),
                ));
            };
            (a, Some(p))
        }
        None => (s, None),
    };
    match a.parse::<IpAddr>() {
        Ok(a) => Ok((a, port, l)),
        Err(_) if a.contains('/') => Err(c.err(
            l,
            format!(
                "bad address {} (an SA takes a plain address, without /prefix)",
                quote(s)
            ),
        )),
        Err(_) => Err(c.err(l, format!("bad address {}", quote(s)))),
    }
}

/// An SA's addresses, and their ports if either had one (line given).
type SaAddresses = (IpAddr, IpAddr, Option<(Option<u16>, Option<u16>, usize)>);

fn sa_addresses(c: &mut Cursor<'_>) -> Result<SaAddresses, ConfigError> {
    let (src, sport, _) = sa_address(c, "the source address")?;
    let (dst, dport, l) = sa_address(c, "the destination address")?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(c.err(
            l,
            format!("source {src} and destination {dst} are of different address families"),
        ));
    }
    let ports = (sport.is_some() || dport.is_some()).then_some((sport, dport, l));
    Ok((src, dst, ports))
}

// ---------------------------------------------------------------------------
// add / update

/// A key: `0x` and an even number of hex digits, or a quoted string.
fn parse_key(c: &Cursor<'_>, t: &Tok, alg: &str) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    match t.kind {
        // Copied into the key arena, as the hex key below.
        TokKind::Str(b) => Ok(crate::secret::within(|| {
            Zeroizing::new(b.as_bytes().to_vec())
        })),
        TokKind::Word(w) => {
            let Some(h) = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) else {
                return Err(c.err(t.line, format!("bad key for {alg}: expected 0x followed by hex digits, or a \"quoted string\"")));
            };
            if h.is_empty() {
                return Err(c.err(t.line, format!("bad key for {alg}: no hex digits after 0x")));
            }
            if let Some(bad) = h.chars().find(|ch| !ch.is_ascii_hexdigit()) {
                return Err(c.err(
                    t.line,
                    format!("bad key for {alg}: {bad:?} is not a hex digit"),
                ));
            }
            if !h.len().is_multiple_of(2) {
                return Err(c.err(
                    t.line,
                    format!("bad key for {alg}: odd number of hex digits ({})", h.len()),
                ));
            }
            let mut key = crate::secret::within(|| Zeroizing::new(Vec::with_capacity(h.len() / 2)));
            for pair in h.as_bytes().chunks(2) {
                let hi = hex_val(pair.first().copied());
                let lo = hex_val(pair.get(1).copied());
                key.push((hi << 4) | lo);
            }
            Ok(key)
        }
    }
}

fn hex_val(b: Option<u8>) -> u8 {
    match b {
        Some(b @ b'0'..=b'9') => b - b'0',
        Some(b @ b'a'..=b'f') => b - b'a' + 10,
        Some(b @ b'A'..=b'F') => b - b'A' + 10,
        _ => 0,
    }
}

/// Does this token look like a key (for the optional key of `null`)?
fn looks_like_key(t: &Tok) -> bool {
    match t.kind {
        TokKind::Str(_) => true,
        TokKind::Word(w) => w.starts_with("0x") || w.starts_with("0X"),
    }
}

/// `add`/`update SRC DST PROTO SPI [options] ALGORITHMS`.
fn parse_sa(c: &mut Cursor<'_>, warnings: &mut Vec<Warning>) -> Result<SaConfig, ConfigError> {
    let (src, dst, ports) = sa_addresses(c)?;
    // `esp-udp` (NetBSD's name): ESP in UDP (RFC 3948), on the ports given
    // as SRC[PORT] DST[PORT], 4500 where none is.
    let encap = match c.peek_word() {
        Some("esp-udp") => {
            c.next();
            let (sport, dport) = ports.map_or((None, None), |(s, d, _)| (s, d));
            Some(crate::udp_encap::Encap {
                sport: sport.unwrap_or(crate::udp_encap::NAT_T_PORT),
                dport: dport.unwrap_or(crate::udp_encap::NAT_T_PORT),
            })
        }
        _ => {
            if let Some((_, _, l)) = ports {
                return Err(c.err(
                    l,
                    "ports ([PORT]) on an SA's addresses go with esp-udp only (ESP in UDP, RFC 3948)",
                ));
            }
            None
        }
    };
    let proto = if encap.is_some() {
        Proto::Esp
    } else {
        next_proto(c)?
    };
    let (s, spi_line) = c.word("the SPI")?;
    let spi = parse_u32(s).ok_or_else(|| c.err(spi_line, bad_spi(s)))?;
    if proto != Proto::IpComp && spi <= 255 {
        return Err(c.err(
            spi_line,
            format!("SPI {spi} is reserved (RFC 4303: 0 is for local use and 1-255 are reserved by IANA); use 256 or more"),
        ));
    }

    let mut seen: Vec<&str> = Vec::new();
    let mut reqid = 0u32;
    let mut replay: Option<(u32, usize)> = None;
    let mut esn: Option<usize> = None;
    let mut lifetime = Lifetime::default();
    let mut enc: Option<(EncAlg, Zeroizing<Vec<u8>>, usize)> = None;
    let mut auth: Option<(AuthAlg, Zeroizing<Vec<u8>>, usize)> = None;
    let mut comp: Option<usize> = None;
    let mut raw: Option<usize> = None;

    while let Some(t) = c.next() {
        let Some(opt) = t.word().filter(|w| w.starts_with('-')) else {
            return Err(c.err(
                t.line,
                format!("unexpected {} (expected an option such as -m, -r, -u, -f, -E, -A or -C, or ';')", t.show()),
            ));
        };
        let line = t.line;
        if opt != "-f" && seen.contains(&opt) {
            return Err(c.err(line, format!("{opt} given twice")));
        }
        seen.push(opt);
        match opt {
            "-m" => {
                let (m, l) = c.word("the mode after -m")?;
                match m {
                    "transport" | "any" => {}
                    "tunnel" => return Err(c.err(l, TUNNEL_ERROR)),
                    _ => {
                        return Err(c.err(
                            l,
                            format!("unknown mode {} (expected transport or any)", quote(m)),
                        ));
                    }
                }
            }
            "-r" => {
                let (n, l) = c.word("the replay window size after -r")?;
                let max = crate::replay::MAX_WINDOW;
                match parse_u32(n) {
                    Some(v) if v <= max => replay = Some((v, l)),
                    _ => {
                        return Err(c.err(l, format!("bad replay window {} (expected a number of packets from 0 to {max})", quote(n))));
                    }
                }
            }
            "-u" => {
                let (n, l) = c.word("the reqid after -u")?;
                reqid = parse_u32(n).ok_or_else(|| {
                    c.err(
                        l,
                        format!("bad reqid {} (expected a number below 2^32)", quote(n)),
                    )
                })?;
            }
            "-lh" | "-ls" | "-bh" | "-bs" | "-ph" | "-ps" => {
                let what = match opt {
                    "-lh" | "-ls" => "seconds",
                    "-bh" | "-bs" => "bytes",
                    _ => "packets",
                };
                let (n, l) = c.word(&format!("the number of {what} after {opt}"))?;
                let v = parse_u64(n).ok_or_else(|| {
                    c.err(
                        l,
                        format!(
                            "bad lifetime {} after {opt} (expected a number of {what})",
                            quote(n)
                        ),
                    )
                })?;
                let field = match opt {
                    "-lh" => &mut lifetime.hard_secs,
                    "-ls" => &mut lifetime.soft_secs,
                    "-bh" => &mut lifetime.hard_bytes,
                    "-bs" => &mut lifetime.soft_bytes,
                    "-ph" => &mut lifetime.hard_packets,
                    _ => &mut lifetime.soft_packets,
                };
                *field = v;
            }
            "-f" => {
                let (f, l) = c.word("a flag after -f")?;
                match f {
                    "nocyclic-seq" | "zero-pad" | "random-pad" | "seq-pad" => {}
                    "esn" => {
                        if esn.is_some() {
                            return Err(c.err(l, "-f esn given twice"));
                        }
                        esn = Some(l);
                    }
                    _ => {
                        return Err(c.err(
                            l,
                            format!("unknown flag {} after -f (expected nocyclic-seq, zero-pad, random-pad, seq-pad or esn)", quote(f)),
                        ));
                    }
                }
            }
            "-E" => {
                let (alg, key) = alg_and_key(c, &ENC, |a, k| {
                    Cipher::new(a, k).map(|_| ()).map_err(|e| e.to_string())
                })?;
                enc = Some((alg, key, line));
            }
            "-A" => {
                let (alg, key) = alg_and_key(c, &AUTH, |a, k| {
                    Auth::new(a, k).map(|_| ()).map_err(|e| e.to_string())
                })?;
                auth = Some((alg, key, line));
            }
            "-C" => {
                let (name, l) = c.word("a compression algorithm after -C")?;
                if name != "deflate" {
                    return Err(c.err(
                        l,
                        format!(
                            "unknown compression algorithm {} (supported: deflate)",
                            quote(name)
                        ),
                    ));
                }
                comp = Some(line);
            }
            "-R" => raw = Some(line),
            _ => {
                return Err(c.err(
                    line,
                    format!("unknown option {} (expected -m, -r, -u, -f, -lh, -ls, -bh, -bs, -ph, -ps, -E, -A, -C or -R)", quote(opt)),
                ));
            }
        }
    }

    // What goes with which protocol.
    let what = format!("{proto} SA {src} -> {dst} spi {spi:#x}");
    match proto {
        Proto::Esp => {
            if let Some(l) = comp {
                return Err(c.err(l, "-C applies to ipcomp only"));
            }
            let Some((e, _, _)) = &enc else {
                return Err(c.err(c.line, "esp needs an encryption algorithm (-E ALG KEY; -E null for authentication only)"));
            };
            if e.is_aead()
                && let Some((_, _, l)) = &auth
            {
                return Err(c.err(
                    *l,
                    format!(
                        "{} is an AEAD and authenticates by itself: give no -A",
                        e.name()
                    ),
                ));
            }
        }
        Proto::Ah => {
            if let Some((_, _, l)) = &enc {
                return Err(c.err(*l, "ah takes no encryption algorithm (-E)"));
            }
            if let Some(l) = comp {
                return Err(c.err(l, "-C applies to ipcomp only"));
            }
            match &auth {
                None => {
                    return Err(c.err(c.line, "ah needs an authentication algorithm (-A ALG KEY)"));
                }
                Some((AuthAlg::Null, _, l)) => {
                    return Err(c.err(*l, "ah needs a real authentication algorithm, not null"));
                }
                Some(_) => {}
            }
        }
        Proto::IpComp => {
            if let Some((_, _, l)) = &enc {
                return Err(c.err(*l, "ipcomp takes no encryption algorithm (-E)"));
            }
            if let Some((_, _, l)) = &auth {
                return Err(c.err(*l, "ipcomp takes no authentication algorithm (-A)"));
            }
            if comp.is_none() {
                return Err(c.err(c.line, "ipcomp needs a compression algorithm (-C deflate)"));
            }
            if raw.is_some() && spi > 0xffff {
                return Err(c.err(
                    spi_line,
                    format!(
                        "CPI {spi:#x} does not fit in 16 bits, as a CPI used on the wire (-R) must"
                    ),
                ));
            }
        }
    }
    if proto != Proto::IpComp
        && let Some(l) = raw
    {
        return Err(c.err(l, "-R applies to ipcomp only"));
    }

    let (enc, enc_key) = enc.map_or((EncAlg::Null, Zeroizing::new(Vec::new())), |(a, k, _)| {
        (a, k)
    });
    let (auth, auth_key) = auth.map_or((AuthAlg::Null, Zeroizing::new(Vec::new())), |(a, k, _)| {
        (a, k)
    });
    let config = SaConfig {
        src,
        dst,
        proto,
        spi,
        reqid,
        replay: replay.map_or(0, |(r, _)| r),
        esn: esn.is_some(),
        enc,
        enc_key,
        auth,
        auth_key,
        raw_cpi: raw.is_some(),
        encap,
        lifetime,
        selector: None,
    };
    if let Err(e) = crate::secret::within(|| crate::sad::Sa::new(config.clone(), Duration::ZERO, 0))
    {
        return Err(c.err(c.line, e.to_string()));
    }

    let mut warn = |line: usize, message: String| warnings.push(Warning { line, message });
    match proto {
        Proto::Esp | Proto::Ah => {
            if config.replay == 0 {
                warn(
                    replay.map_or(c.line, |(_, l)| l),
                    format!("{what} has no replay protection (no -r, or -r 0); add e.g. -r 64"),
                );
            }
        }
        Proto::IpComp => {
            if let Some((r, l)) = replay
                && r != 0
            {
                warn(
                    l,
                    format!("{what}: -r has no effect on ipcomp, which has no sequence numbers"),
                );
            }
            if let Some(l) = esn {
                warn(
                    l,
                    format!(
                        "{what}: -f esn has no effect on ipcomp, which has no sequence numbers"
                    ),
                );
            }
        }
    }
    if proto == Proto::Esp && !config.enc.is_aead() && config.auth == AuthAlg::Null {
        let how = if seen.contains(&"-A") {
            "with -A null"
        } else {
            "without -A"
        };
        warn(
            c.line,
            format!(
                "{what} uses {} {how}: no integrity protection, so packets can be forged or altered; add -A hmac-sha256 or use aes-gcm-16",
                config.enc.name()
            ),
        );
    }
    Ok(config)
}

/// What `-E` and `-A` have in common: the flag, the kind of algorithm,
/// the names accepted, and the one that takes no key.
struct AlgFlag<A> {
    flag: &'static str,
    kind: &'static str,
    names: &'static str,
    from_name: fn(&str) -> Option<A>,
    null: A,
}

const ENC: AlgFlag<EncAlg> = AlgFlag {
    flag: "-E",
    kind: "encryption",
    names: ENC_NAMES,
    from_name: EncAlg::from_name,
    null: EncAlg::Null,
};

const AUTH: AlgFlag<AuthAlg> = AlgFlag {
    flag: "-A",
    kind: "authentication",
    names: AUTH_NAMES,
    from_name: AuthAlg::from_name,
    null: AuthAlg::Null,
};

/// `NAME [KEY]` after `-E` or `-A`: the algorithm, then its key (none for
/// null), which `check` tries out (key lengths) so that the error points
/// at the key's line.
fn alg_and_key<A: Copy + PartialEq>(
    c: &mut Cursor<'_>,
    f: &AlgFlag<A>,
    check: impl Fn(A, &[u8]) -> Result<(), String>,
) -> Result<(A, Zeroizing<Vec<u8>>), ConfigError> {
    let (name, l) = c.word(&format!("an {} algorithm after {}", f.kind, f.flag))?;
    let alg = (f.from_name)(name).ok_or_else(|| {
        c.err(
            l,
            format!(
                "unknown {} algorithm {} (supported: {})",
                f.kind,
                quote(name),
                f.names
            ),
        )
    })?;
    let (key, key_line) = alg_key(c, alg == f.null, name, l)?;
    check(alg, &key).map_err(|e| c.err(key_line, e))?;
    Ok((alg, key))
}

/// The key after `-E ALG`/`-A ALG`: required, except for `null` where it
/// may be left out. Returns the key and the line to blame for it.
fn alg_key(
    c: &mut Cursor<'_>,
    optional: bool,
    alg: &str,
    alg_line: usize,
) -> Result<(Zeroizing<Vec<u8>>, usize), ConfigError> {
    match c.peek() {
        Some(t)
            if looks_like_key(t) || !optional && t.word().is_some_and(|w| !w.starts_with('-')) =>
        {
            c.next();
            Ok((parse_key(c, t, alg)?, t.line))
        }
        _ if optional => Ok((Zeroizing::new(Vec::new()), alg_line)),
        _ => Err(c.err(
            alg_line,
            format!("{alg} needs a key (0x followed by hex digits, or a \"quoted string\")"),
        )),
    }
}

// ---------------------------------------------------------------------------
// spdadd / spdupdate / spddelete

/// `ADDR[/PLEN][[PORT]]`: the prefix, the port (None for any, `[any]` or
/// `[0]`) and the token's line.
fn addr_range(c: &mut Cursor<'_>, what: &str) -> Result<(Prefix, Option<u16>, usize), ConfigError> {
    let (s, l) = c.word(what)?;
    let (body, port) = match s.find('[') {
        Some(i) => {
            let Some(p) = s.get(i + 1..).and_then(|r| r.strip_suffix(']')) else {
                return Err(c.err(
                    l,
                    format!(
                        "bad port in {} (expected ADDR[PORT], PORT a number or any)",
                        quote(s)
                    ),
                ));
            };
            (s.get(..i).unwrap_or(""), Some(p))
        }
        None => (s, None),
    };
    let port = match port {
        None | Some("any") => None,
        Some(p) => match parse_u64(p).and_then(|n| u16::try_from(n).ok()) {
            // Port 0 is PF_KEY's "any".
            Some(0) => None,
            Some(n) => Some(n),
            None => {
                return Err(c.err(
                    l,
                    format!(
                        "bad port {} in {} (expected a number 0-65535 or any)",
                        quote(p),
                        quote(s)
                    ),
                ));
            }
        },
    };
    let (a, plen) = match body.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (body, None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| c.err(l, format!("bad address {}", quote(a))))?;
    let prefix = match plen {
        None => Prefix::host(addr),
        Some(p) => {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(c.err(l, format!("bad prefix length {} in {}", quote(p), quote(s))));
            }
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            let too_long = || {
                c.err(
                    l,
                    format!("prefix length {p} is too long for an {family} address"),
                )
            };
            let n = p.parse::<u8>().map_err(|_| too_long())?;
            Prefix::new(addr, n).ok_or_else(too_long)?
        }
    };
    Ok((prefix, port, l))
}

/// `SRC DST UPPERSPEC -P DIR`.
fn parse_selector(c: &mut Cursor<'_>) -> Result<(Dir, Selector), ConfigError> {
    let (src, sport, _) = addr_range(c, "the source address")?;
    let (dst, dport, dst_line) = addr_range(c, "the destination address")?;
    if src.addr.is_ipv4() != dst.addr.is_ipv4() {
        return Err(c.err(
            dst_line,
            format!("source {src} and destination {dst} are of different address families"),
        ));
    }
    let (u, ul) = c.word("the upper-layer protocol (any, tcp, udp, icmp, ... or a number)")?;
    let proto: Option<u8> = match u {
        "any" => None,
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" => Some(1),
        "icmp6" | "ipv6-icmp" => Some(58),
        "esp" => Some(50),
        "ah" => Some(51),
        "ipcomp" => Some(108),
        "gre" => Some(47),
        "sctp" => Some(132),
        "ip4" | "ipencap" => Some(4),
        "ipv6" => Some(41),
        _ => match parse_u64(u).filter(|_| u.bytes().all(|b| b.is_ascii_digit())) {
            // 0 and 255 (PF_KEY's IPSEC_ULPROTO_ANY) mean any, as on Linux.
            Some(0 | 255) => None,
            Some(n) if n < 255 => Some(n as u8),
            _ => {
                return Err(c.err(
                    ul,
                    format!(
                        "unknown upper-layer protocol {} (expected any, tcp, udp, icmp, icmp6, esp, ah, ipcomp, gre, sctp, ip4 or a number 0-255)",
                        quote(u)
                    ),
                ));
            }
        },
    };
    let mut selector = Selector {
        src,
        dst,
        proto,
        sport,
        dport,
    };
    match proto {
        Some(6 | 17 | 132) => {}
        Some(1 | 58) => {
            if sport.is_some() || dport.is_some() {
                return Err(c.err(
                    ul,
                    format!("ports cannot be used with {u}; give the ICMP type and code after it instead ({u} TYPE[,CODE])"),
                ));
            }
            if let Some(tc) = c
                .peek_word()
                .filter(|w| w.starts_with(|ch: char| ch.is_ascii_digit()))
            {
                let l = c.next().map_or(ul, |t| t.line);
                let (ty, code) = match tc.split_once(',') {
                    Some((t, cd)) => (t, Some(cd)),
                    None => (tc, None),
                };
                let num = |s: &str| {
                    s.parse::<u8>()
                        .ok()
                        .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
                };
                let bad = || {
                    c.err(
                        l,
                        format!(
                            "bad ICMP type/code {} (expected TYPE or TYPE,CODE, each 0-255)",
                            quote(tc)
                        ),
                    )
                };
                selector.sport = Some(num(ty).ok_or_else(bad)? as u16);
                selector.dport = match code {
                    None => None,
                    Some(cd) => Some(num(cd).ok_or_else(bad)? as u16),
                };
            }
        }
        _ => {
            if sport.is_some() || dport.is_some() {
                return Err(c.err(
                    ul,
                    format!(
                        "ports need tcp, udp or sctp as the upper-layer protocol, not {}",
                        quote(u)
                    ),
                ));
            }
        }
    }
    match c.next() {
        Some(t) if t.word() == Some("-P") => {}
        Some(t) => {
            return Err(c.err(
                t.line,
                format!(
                    "expected -P after the upper-layer protocol, got {}",
                    t.show()
                ),
            ));
        }
        None => return Err(c.err(c.line, "expected -P after the upper-layer protocol")),
    }
    let (d, dl) = c.word("the direction (in, out or fwd) after -P")?;
    let dir = match d {
        "in" => Dir::In,
        "out" => Dir::Out,
        "fwd" => Dir::Fwd,
        _ => {
            return Err(c.err(
                dl,
                format!("unknown direction {} (expected in, out or fwd)", quote(d)),
            ));
        }
    };
    Ok((dir, selector))
}

/// `[priority P] none|discard|ipsec RULES`.
fn parse_policy(c: &mut Cursor<'_>, dir: Dir) -> Result<(u32, Action), ConfigError> {
    let mut priority = PRIORITY_DEFAULT;
    if let Some(p) = c.peek_word().filter(|w| *w == "priority" || *w == "prio") {
        c.next();
        priority = parse_priority(c, p)?;
    }
    let (a, al) = c.word(&format!(
        "the action (none, discard or ipsec) after -P {}",
        dir.name()
    ))?;
    let action = match a {
        "none" => Action::Bypass,
        "discard" => Action::Discard,
        "ipsec" => {
            let mut rules = Vec::new();
            while let Some(t) = c.next() {
                rules.push(parse_rule(c, t)?);
            }
            if rules.is_empty() {
                return Err(c.err(
                    al,
                    "ipsec needs at least one rule, such as esp/transport//require",
                ));
            }
            return Ok((priority, Action::Ipsec(rules)));
        }
        _ => {
            return Err(c.err(
                al,
                format!(
                    "unknown action {} (expected none, discard or ipsec)",
                    quote(a)
                ),
            ));
        }
    };
    if let Some(t) = c.peek() {
        return Err(c.err(t.line, format!("{a} takes no rules, got {}", t.show())));
    }
    Ok((priority, action))
}

/// After `priority`: a number (absolute), or `default|low|high` optionally
/// followed by `+N` or `-N` (with or without spaces).
fn parse_priority(c: &mut Cursor<'_>, kw: &str) -> Result<u32, ConfigError> {
    fn bad(c: &Cursor<'_>, s: &str, l: usize) -> ConfigError {
        c.err(
            l,
            format!(
                "bad priority {} (expected a number 0-4294967295, or default, low or high optionally followed by +N or -N)",
                quote(s)
            ),
        )
    }
    let (w, l) = c.word(&format!("a value after {kw}"))?;
    if w.starts_with(|ch: char| ch.is_ascii_digit()) {
        return parse_u32(w).ok_or_else(|| bad(c, w, l));
    }
    let split = w.find(['+', '-']).unwrap_or(w.len());
    let (name, rest) = (w.get(..split).unwrap_or(w), w.get(split..).unwrap_or(""));
    let base = match name {
        "default" | "def" => PRIORITY_DEFAULT,
        "low" => PRIORITY_LOW,
        "high" => PRIORITY_HIGH,
        _ => return Err(bad(c, w, l)),
    };
    // The offset: in this word, in the next one, or in the two next ones.
    let (offset, ol): (String, usize) = if !rest.is_empty() {
        (rest.to_string(), l)
    } else {
        match c.peek_word() {
            Some(s @ ("+" | "-")) => {
                c.next();
                let (n, nl) = c.word(&format!("a number after {name} {s}"))?;
                (format!("{s}{n}"), nl)
            }
            Some(s) if s.starts_with(['+', '-']) => {
                let ol = c.next().map_or(l, |t| t.line);
                (s.to_string(), ol)
            }
            _ => return Ok(base),
        }
    };
    let (neg, digits) = match offset.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, offset.strip_prefix('+').unwrap_or(&offset)),
    };
    let n = parse_u32(digits).ok_or_else(|| bad(c, &offset, ol))?;
    let v = if neg {
        base.checked_sub(n)
    } else {
        base.checked_add(n)
    };
    v.ok_or_else(|| {
        c.err(
            ol,
            format!("priority {name}{offset} is out of range (0-4294967295)"),
        )
    })
}

/// `proto/mode/src-dst/level`, `proto/mode//` or `proto/mode`.
fn parse_rule(c: &Cursor<'_>, t: &Tok) -> Result<Rule, ConfigError> {
    let Some(w) = t.word() else {
        return Err(c.err(
            t.line,
            "expected a rule such as esp/transport//require, got a quoted string",
        ));
    };
    let l = t.line;
    let shape = || {
        c.err(
            l,
            format!(
                "bad rule {} (expected PROTO/MODE/SRC-DST/LEVEL, e.g. esp/transport//require)",
                quote(w)
            ),
        )
    };
    let parts: Vec<&str> = w.split('/').collect();
    if parts.len() < 2 || parts.len() > 4 {
        return Err(shape());
    }
    let p = parts.first().copied().unwrap_or("");
    let proto = Proto::from_name(p).ok_or_else(|| {
        c.err(
            l,
            format!(
                "unknown protocol {} in rule {} (expected esp, ah or ipcomp)",
                quote(p),
                quote(w)
            ),
        )
    })?;
    match parts.get(1).copied().unwrap_or("") {
        "transport" | "any" => {}
        "tunnel" => return Err(c.err(l, TUNNEL_ERROR)),
        m => {
            return Err(c.err(
                l,
                format!(
                    "unknown mode {} in rule {} (expected transport)",
                    quote(m),
                    quote(w)
                ),
            ));
        }
    }
    if let Some(ends) = parts.get(2).filter(|e| !e.is_empty()) {
        return Err(c.err(
            l,
            format!(
                "transport mode takes no endpoints, got {} in rule {} (write {}/transport//LEVEL)",
                quote(ends),
                quote(w),
                p
            ),
        ));
    }
    let level = match parts.get(3).copied().unwrap_or("") {
        "" | "default" => Level::Default,
        "use" => Level::Use,
        "require" => Level::Require,
        "unique" => Level::Unique(None),
        lv => match lv.strip_prefix("unique:") {
            Some(id) => match parse_u32(id) {
                Some(n) if n > 0 => Level::Unique(Some(n)),
                _ => {
                    return Err(c.err(l, format!("bad reqid {} in rule {} (expected unique:N with N from 1 to 4294967295)", quote(id), quote(w))));
                }
            },
            None => {
                return Err(c.err(
                    l,
                    format!("unknown level {} in rule {} (expected default, use, require, unique or unique:N)", quote(lv), quote(w)),
                ));
            }
        },
    };
    Ok(Rule { proto, level })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first policy file of the seed (Linux-to-Windows), verbatim.
    const SEED1: &str = r#"#!/usr/sbin/setkey -f
flush;
spdflush;

# Don't require encryption for ICMP
spdadd ::/0 ::/0 icmp6 -P out priority 10 none;
spdadd ::/0 ::/0 icmp6 -P in priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none;
   
spdadd 172.17.207.12 172.17.207.66 any -P out ipsec esp/transport//require ah/transport//require;
spdadd 172.17.207.66 172.17.207.12 any -P in ipsec esp/transport//require ah/transport//require;

spdadd 2001:470:1f09:11ed::c 2001:470:1f09:11ed::42 any -P out ipsec esp/transport//require ah/transport//require;
spdadd 2001:470:1f09:11ed::42 2001:470:1f09:11ed::c any -P in ipsec esp/transport//require ah/transport//require;
"#;

    /// The second policy file of the seed (Linux-to-Linux), verbatim.
    const SEED2: &str = r#"#!/usr/sbin/setkey -f
flush;
spdflush;

# Don't require encryption for ICMP
spdadd ::/0 ::/0 icmp6 -P out priority 10 none;
spdadd ::/0 ::/0 icmp6 -P in priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P out priority 10 none;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp -P in priority 10 none;
   
spdadd 172.17.207.12 172.17.207.1 any -P out ipsec esp/transport//require ah/transport//require;
spdadd 172.17.207.1 172.17.207.12 any -P in ipsec esp/transport//require ah/transport//require;
"#;

    fn ok(text: &str) -> Parsed {
        match parse(text, "t.conf") {
            Ok(p) => p,
            Err(e) => panic!("unexpected error: {e}\n--- input:\n{text}"),
        }
    }

    fn err(text: &str) -> String {
        match parse(text, "t.conf") {
            Ok(p) => panic!(
                "expected an error, got {:?}\n--- input:\n{text}",
                p.statements
            ),
            Err(e) => e.to_string(),
        }
    }

    fn assert_err(text: &str, prefix_and_message: &str) {
        let e = err(text);
        let (prefix, msg) = prefix_and_message.split_once(": ").unwrap();
        assert!(
            e.starts_with(&format!("{prefix}: ")),
            "wrong location in {e:?}, want {prefix:?}"
        );
        assert!(e.contains(msg), "{e:?} does not contain {msg:?}");
    }

    fn one(text: &str) -> Command {
        let p = ok(text);
        assert_eq!(p.statements.len(), 1, "{:?}", p.statements);
        p.statements.into_iter().next().unwrap().cmd
    }

    fn sa(text: &str) -> SaConfig {
        match one(text) {
            Command::Add(c) | Command::Update(c) => c,
            c => panic!("not an SA: {c:?}"),
        }
    }

    fn key(bytes: usize) -> String {
        let mut s = "0x".to_string();
        for i in 0..bytes {
            s.push_str(&format!("{:02x}", (i * 7 + 1) as u8));
        }
        s
    }

    fn pfx(s: &str) -> Prefix {
        let (a, l) = s.split_once('/').unwrap();
        Prefix::new(a.parse().unwrap(), l.parse().unwrap()).unwrap()
    }

    fn host(s: &str) -> Prefix {
        Prefix::host(s.parse().unwrap())
    }

    fn policy(cmd: &Command) -> (Dir, Selector, u32, Action) {
        match cmd {
            Command::SpdAdd {
                dir,
                selector,
                priority,
                action,
            } => (*dir, *selector, *priority, action.clone()),
            c => panic!("not spdadd: {c:?}"),
        }
    }

    fn esp_ah() -> Action {
        Action::Ipsec(vec![
            Rule {
                proto: Proto::Esp,
                level: Level::Require,
            },
            Rule {
                proto: Proto::Ah,
                level: Level::Require,
            },
        ])
    }

    fn check_icmp_bypass(p: &Parsed) {
        let want = [
            (6, Dir::Out, "::/0", Some(58)),
            (7, Dir::In, "::/0", Some(58)),
            (8, Dir::Out, "0.0.0.0/0", Some(1)),
            (9, Dir::In, "0.0.0.0/0", Some(1)),
        ];
        for (i, (line, dir, net, proto)) in want.into_iter().enumerate() {
            let st = &p.statements[i + 2];
            assert_eq!(st.line, line);
            let (d, sel, prio, action) = policy(&st.cmd);
            assert_eq!(d, dir);
            assert_eq!(
                sel,
                Selector {
                    src: pfx(net),
                    dst: pfx(net),
                    proto,
                    sport: None,
                    dport: None
                }
            );
            assert_eq!(prio, 10);
            assert!(prio < PRIORITY_DEFAULT);
            assert_eq!(action, Action::Bypass);
        }
    }

    #[test]
    fn seed_linux_to_windows() {
        let p = ok(SEED1);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(p.statements.len(), 10);
        assert_eq!(
            p.statements[0],
            Statement {
                line: 2,
                cmd: Command::Flush(None)
            }
        );
        assert_eq!(
            p.statements[1],
            Statement {
                line: 3,
                cmd: Command::SpdFlush
            }
        );
        let spdadds = p
            .statements
            .iter()
            .filter(|s| matches!(s.cmd, Command::SpdAdd { .. }))
            .count();
        assert_eq!(spdadds, 8);
        check_icmp_bypass(&p);
        let want = [
            (11, Dir::Out, "172.17.207.12", "172.17.207.66"),
            (12, Dir::In, "172.17.207.66", "172.17.207.12"),
            (
                14,
                Dir::Out,
                "2001:470:1f09:11ed::c",
                "2001:470:1f09:11ed::42",
            ),
            (
                15,
                Dir::In,
                "2001:470:1f09:11ed::42",
                "2001:470:1f09:11ed::c",
            ),
        ];
        for (i, (line, dir, src, dst)) in want.into_iter().enumerate() {
            let st = &p.statements[i + 6];
            assert_eq!(st.line, line);
            let (d, sel, prio, action) = policy(&st.cmd);
            assert_eq!(d, dir);
            assert_eq!(
                sel,
                Selector {
                    src: host(src),
                    dst: host(dst),
                    proto: None,
                    sport: None,
                    dport: None
                }
            );
            assert_eq!(prio, PRIORITY_DEFAULT);
            assert_eq!(action, esp_ah());
        }
        assert_eq!(policy(&p.statements[8].cmd).1.src.len, 128);
    }

    #[test]
    fn seed_linux_to_linux() {
        let p = ok(SEED2);
        assert!(p.warnings.is_empty());
        assert_eq!(p.statements.len(), 8);
        assert_eq!(p.statements[0].cmd, Command::Flush(None));
        assert_eq!(p.statements[1].cmd, Command::SpdFlush);
        check_icmp_bypass(&p);
        let (d, sel, prio, action) = policy(&p.statements[6].cmd);
        assert_eq!((d, prio), (Dir::Out, PRIORITY_DEFAULT));
        assert_eq!(sel.src, host("172.17.207.12"));
        assert_eq!(sel.dst, host("172.17.207.1"));
        assert_eq!(sel.proto, None);
        assert_eq!(action, esp_ah());
        let (d, sel, _, action) = policy(&p.statements[7].cmd);
        assert_eq!(d, Dir::In);
        assert_eq!(sel.src, host("172.17.207.1"));
        assert_eq!(sel.src.len, 32);
        assert_eq!(action, esp_ah());
        assert_eq!(p.statements[7].line, 12);
    }

    #[test]
    fn add_every_algorithm() {
        for (ebits, alg) in [(128, "aes-cbc"), (192, "rijndael-cbc"), (256, "aes-cbc")] {
            for (abits, a, aalg) in [
                (160, "hmac-sha1", AuthAlg::HmacSha1),
                (256, "hmac-sha256", AuthAlg::HmacSha256),
                (384, "hmac-sha384", AuthAlg::HmacSha384),
                (512, "hmac-sha512", AuthAlg::HmacSha512),
                (256, "hmac-sha2-256", AuthAlg::HmacSha256),
            ] {
                let text = format!(
                    "add 10.0.0.1 10.0.0.2 esp 0x1000 -m transport -r 64 -u 7 -E {alg} {} -A {a} {};",
                    key(ebits / 8),
                    key(abits / 8)
                );
                let p = ok(&text);
                assert!(p.warnings.is_empty(), "{:?}", p.warnings);
                let Command::Add(c) = &p.statements[0].cmd else {
                    panic!()
                };
                assert_eq!(c.enc, EncAlg::AesCbc);
                assert_eq!(c.enc_key.len(), ebits / 8);
                assert_eq!(*c.enc_key, hex::decode(&key(ebits / 8)[2..]).unwrap());
                assert_eq!(c.auth, aalg);
                assert_eq!(c.auth_key.len(), abits / 8);
                assert_eq!(
                    (c.spi, c.reqid, c.replay, c.esn, c.raw_cpi),
                    (0x1000, 7, 64, false, false)
                );
                assert_eq!(c.proto, Proto::Esp);
                assert_eq!(c.src, "10.0.0.1".parse::<IpAddr>().unwrap());
                assert_eq!(c.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
                assert_eq!(c.lifetime, Lifetime::default());
            }
        }
        for (bits, alg, e) in [
            (160, "aes-gcm-16", EncAlg::AesGcm16),
            (288, "aes-gcm-16", EncAlg::AesGcm16),
            (288, "chacha20-poly1305", EncAlg::ChaCha20Poly1305),
        ] {
            let c = sa(&format!(
                "add 2001:db8::1 2001:db8::2 esp 4097 -r 128 -f esn -E {alg} {};",
                key(bits / 8)
            ));
            assert_eq!(
                (c.enc, c.enc_key.len() * 8, c.auth, c.spi, c.esn),
                (e, bits, AuthAlg::Null, 4097, true)
            );
            assert!(c.auth_key.is_empty());
        }
        // null encryption with integrity: no warning about integrity.
        let p = ok(&format!(
            "add 10.0.0.1 10.0.0.2 esp 0x1001 -r 32 -E null -A hmac-sha256 {};",
            key(32)
        ));
        assert!(p.warnings.is_empty());
        let p = ok(&format!(
            "add 10.0.0.1 10.0.0.2 esp 0x1001 -r 32 -E null \"\" -A hmac-sha256 {};",
            key(32)
        ));
        assert!(p.warnings.is_empty());
        let Command::Add(c) = &p.statements[0].cmd else {
            panic!()
        };
        assert_eq!((c.enc, c.auth), (EncAlg::Null, AuthAlg::HmacSha256));
        // ah
        let c = sa(&format!(
            "add 10.0.0.1 10.0.0.2 ah 0x2000 -r 64 -A hmac-sha256 {};",
            key(32)
        ));
        assert_eq!(
            (c.proto, c.enc, c.auth),
            (Proto::Ah, EncAlg::Null, AuthAlg::HmacSha256)
        );
        assert!(c.enc_key.is_empty());
        // ipcomp, with and without -R; any CPI without -R
        let c = sa("add 10.0.0.1 10.0.0.2 ipcomp 0x3000 -C deflate -R;");
        assert_eq!(
            (c.proto, c.spi, c.raw_cpi, c.wire_cpi()),
            (Proto::IpComp, 0x3000, true, 0x3000)
        );
        let c = sa("add 10.0.0.1 10.0.0.2 ipcomp 0x123456 -C deflate;");
        assert_eq!((c.raw_cpi, c.wire_cpi()), (false, 2));
        let c = sa("add 10.0.0.1 10.0.0.2 ipcomp 2 -C deflate;");
        assert_eq!(c.spi, 2);
        // update has the same syntax
        let cmd = one(&format!(
            "update 10.0.0.1 10.0.0.2 ah 0x2000 -r 64 -A hmac-sha1 {};",
            key(20)
        ));
        assert!(matches!(cmd, Command::Update(c) if c.auth == AuthAlg::HmacSha1));
    }

    #[test]
    fn options_and_lifetimes() {
        let c = sa(&format!(
            "add 10.0.0.1 10.0.0.2 esp 0xdeadbeef -m any -r 65536 -u 0x10 -lh 3600 -ls 3000 -bh 1000000 -bs 900000 \
             -ph 1000 -ps 900 -f nocyclic-seq -f random-pad -f esn -E aes-gcm-16 {};",
            key(36)
        ));
        assert_eq!(
            (c.spi, c.replay, c.reqid, c.esn),
            (0xdeadbeef, 65536, 16, true)
        );
        assert_eq!(
            c.lifetime,
            Lifetime {
                soft_secs: 3000,
                hard_secs: 3600,
                soft_bytes: 900000,
                hard_bytes: 1000000,
                soft_packets: 900,
                hard_packets: 1000,
            }
        );
    }

    #[test]
    fn quoted_keys() {
        let c = sa(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -r 64 -E aes-cbc \"0123456789abcdef\" -A hmac-sha1 \"abcdefghijklmnopqrst\";",
        );
        assert_eq!(&c.enc_key[..], b"0123456789abcdef");
        assert_eq!(&c.auth_key[..], b"abcdefghijklmnopqrst");
        // A quoted key may contain ';', '#' and spaces.
        let c = sa("add 10.0.0.1 10.0.0.2 ah 0x1000 -r 64 -A hmac-sha1 \"abc;efg#ijk mnopqrst\";");
        assert_eq!(&c.auth_key[..], b"abc;efg#ijk mnopqrst");
        // Upper-case hex.
        let c = sa(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -r 64 -A hmac-sha1 0XABCDEF0123456789ABCDEF0123456789abcdef01;",
        );
        assert_eq!(c.auth_key[0], 0xab);
        assert_eq!(c.auth_key[19], 0x01);
    }

    #[test]
    fn statements_span_lines_and_share_them() {
        let text = format!(
            "# comment\nflush; spdflush; dump esp;\nadd 10.0.0.1\n  10.0.0.2 # the peer\n  esp 0x1000\n  -r 64\n  -E aes-gcm-16\n  {}\n  ;spddump;\nflush ah ;dump;",
            key(20)
        );
        let p = ok(&text);
        let cmds: Vec<(usize, &Command)> = p.statements.iter().map(|s| (s.line, &s.cmd)).collect();
        assert_eq!(cmds.len(), 7);
        assert_eq!(cmds[0], (2, &Command::Flush(None)));
        assert_eq!(cmds[1], (2, &Command::SpdFlush));
        assert_eq!(cmds[2], (2, &Command::Dump(Some(Proto::Esp))));
        assert_eq!(cmds[3].0, 3);
        assert!(
            matches!(cmds[3].1, Command::Add(c) if c.enc == EncAlg::AesGcm16 && c.replay == 64)
        );
        assert_eq!(cmds[4], (9, &Command::SpdDump));
        assert_eq!(cmds[5], (10, &Command::Flush(Some(Proto::Ah))));
        assert_eq!(cmds[6], (10, &Command::Dump(None)));
        // Empty statements and comment-only files.
        assert!(ok("").statements.is_empty());
        assert!(ok("# nothing\n\n  ;;\n").statements.is_empty());
        assert_eq!(
            ok("#!/usr/sbin/setkey -f\nflush;#x\n").statements,
            vec![Statement {
                line: 2,
                cmd: Command::Flush(None)
            }]
        );
    }

    #[test]
    fn sa_lookups() {
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            one("get 10.0.0.1 10.0.0.2 esp 0x1000;"),
            Command::Get {
                src,
                dst,
                proto: Proto::Esp,
                spi: 0x1000
            }
        );
        assert_eq!(
            one("delete 10.0.0.1 10.0.0.2 ah 4096;"),
            Command::Delete {
                src,
                dst,
                proto: Proto::Ah,
                spi: 4096
            }
        );
        assert_eq!(
            one("deleteall 10.0.0.1 10.0.0.2 ipcomp;"),
            Command::DeleteAll {
                src,
                dst,
                proto: Proto::IpComp
            }
        );
        assert_err("get 10.0.0.1 10.0.0.2 esp;", "t.conf:1: missing the SPI");
        assert_err(
            "deleteall 10.0.0.1 10.0.0.2 esp 0x1000;",
            "t.conf:1: unexpected \"0x1000\"",
        );
        assert_err("flush esp ah;", "t.conf:1: unexpected \"ah\" after flush");
        assert_err("flush tcp;", "t.conf:1: unknown protocol \"tcp\"");
        assert_err(
            "spdflush esp;",
            "t.conf:1: unexpected \"esp\" after spdflush",
        );
    }

    #[test]
    fn policies() {
        let (dir, sel, prio, action) = policy(&one(
            "spdadd 10.0.0.0/8[any] 192.168.1.7/24[443] tcp -P out ipsec esp/transport//use;",
        ));
        assert_eq!(dir, Dir::Out);
        assert_eq!(
            sel,
            Selector {
                src: pfx("10.0.0.0/8"),
                dst: pfx("192.168.1.0/24"),
                proto: Some(6),
                sport: None,
                dport: Some(443)
            }
        );
        assert_eq!(prio, PRIORITY_DEFAULT);
        assert_eq!(
            action,
            Action::Ipsec(vec![Rule {
                proto: Proto::Esp,
                level: Level::Use
            }])
        );

        let (_, sel, _, _) = policy(&one("spdadd 10.0.0.1[53] 10.0.0.2[0] udp -P in discard;"));
        assert_eq!(
            (sel.proto, sel.sport, sel.dport),
            (Some(17), Some(53), None)
        );
        let (_, sel, _, _) = policy(&one("spdadd ::1[1234] ::2[5678] sctp -P fwd none;"));
        assert_eq!(
            (sel.proto, sel.sport, sel.dport),
            (Some(132), Some(1234), Some(5678))
        );

        // ICMP type and code.
        let (_, sel, _, _) = policy(&one("spdadd 0.0.0.0/0 0.0.0.0/0 icmp 8,0 -P out none;"));
        assert_eq!(
            (sel.proto, sel.sport, sel.dport),
            (Some(1), Some(8), Some(0))
        );
        let (_, sel, _, _) = policy(&one("spdadd ::/0 ::/0 ipv6-icmp 135 -P in none;"));
        assert_eq!(
            (sel.proto, sel.sport, sel.dport),
            (Some(58), Some(135), None)
        );
        let (_, sel, _, _) = policy(&one("spdadd ::/0 ::/0 58 136,0 -P in none;"));
        assert_eq!(
            (sel.proto, sel.sport, sel.dport),
            (Some(58), Some(136), Some(0))
        );

        // Upper-layer protocols.
        for (u, want) in [
            ("any", None),
            ("tcp", Some(6)),
            ("udp", Some(17)),
            ("icmp", Some(1)),
            ("icmp6", Some(58)),
            ("esp", Some(50)),
            ("ah", Some(51)),
            ("ipcomp", Some(108)),
            ("gre", Some(47)),
            ("sctp", Some(132)),
            ("ip4", Some(4)),
            ("ipencap", Some(4)),
            ("89", Some(89)),
            ("0", None),
            ("255", None),
        ] {
            let (_, sel, _, _) =
                policy(&one(&format!("spdadd 10.0.0.1 10.0.0.2 {u} -P out none;")));
            assert_eq!(sel.proto, want, "{u}");
        }

        // Rules: order kept, levels, short forms.
        let (_, _, _, action) = policy(&one(
            "spdadd 10.0.0.1 10.0.0.2 any -P out ipsec ipcomp/transport//use esp/transport//unique:7 ah/transport// esp/transport ah/any//unique;",
        ));
        assert_eq!(
            action,
            Action::Ipsec(vec![
                Rule {
                    proto: Proto::IpComp,
                    level: Level::Use
                },
                Rule {
                    proto: Proto::Esp,
                    level: Level::Unique(Some(7))
                },
                Rule {
                    proto: Proto::Ah,
                    level: Level::Default
                },
                Rule {
                    proto: Proto::Esp,
                    level: Level::Default
                },
                Rule {
                    proto: Proto::Ah,
                    level: Level::Unique(None)
                },
            ])
        );

        // spdupdate and spddelete.
        let cmd = one("spdupdate 10.0.0.1 10.0.0.2 any -P in priority 5 discard;");
        assert!(matches!(
            cmd,
            Command::SpdUpdate {
                dir: Dir::In,
                priority: 5,
                action: Action::Discard,
                ..
            }
        ));
        let want = Selector {
            src: host("10.0.0.1"),
            dst: host("10.0.0.2"),
            proto: None,
            sport: None,
            dport: None,
        };
        assert_eq!(
            one("spddelete 10.0.0.1 10.0.0.2 any -P out;"),
            Command::SpdDelete {
                dir: Dir::Out,
                selector: want
            }
        );
        assert_eq!(
            one("spddelete 10.0.0.1 10.0.0.2 any -P out priority 3 ipsec esp/transport//require;"),
            Command::SpdDelete {
                dir: Dir::Out,
                selector: want
            }
        );
        // Host bits are cleared.
        let (_, sel, _, _) = policy(&one("spdadd 10.1.2.3/16 ::/0 any -P out none;"
            .replace("::/0", "0.0.0.0/0")
            .as_str()));
        assert_eq!(sel.src.addr, "10.1.0.0".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn priorities() {
        let prio = |p: &str| {
            policy(&one(&format!(
                "spdadd 10.0.0.1 10.0.0.2 any -P out {p} none;"
            )))
            .2
        };
        assert_eq!(prio(""), PRIORITY_DEFAULT);
        assert_eq!(prio("priority 10"), 10);
        assert_eq!(prio("priority 0"), 0);
        assert_eq!(prio("prio 4294967295"), u32::MAX);
        assert_eq!(prio("priority default"), PRIORITY_DEFAULT);
        assert_eq!(prio("priority def"), PRIORITY_DEFAULT);
        assert_eq!(prio("priority low"), PRIORITY_LOW);
        assert_eq!(prio("priority high"), PRIORITY_HIGH);
        assert_eq!(prio("priority default +5"), PRIORITY_DEFAULT + 5);
        assert_eq!(prio("priority default + 5"), PRIORITY_DEFAULT + 5);
        assert_eq!(prio("priority default+5"), PRIORITY_DEFAULT + 5);
        assert_eq!(prio("priority high -3"), PRIORITY_HIGH - 3);
        assert_eq!(prio("priority low - 3"), PRIORITY_LOW - 3);
        assert_eq!(prio("priority low-3"), PRIORITY_LOW - 3);
        let bad = |p: &str, m: &str| {
            assert_err(
                &format!("\nspdadd 10.0.0.1 10.0.0.2 any -P out {p} none;"),
                m,
            )
        };
        bad("priority -5", "t.conf:2: bad priority \"-5\"");
        bad(
            "priority 4294967296",
            "t.conf:2: bad priority \"4294967296\"",
        );
        bad("priority medium", "t.conf:2: bad priority \"medium\"");
        bad(
            "priority low +1073741824",
            "t.conf:2: priority low+1073741824 is out of range",
        );
        bad("priority high -x", "t.conf:2: bad priority \"-x\"");
        bad("priority", "t.conf:2: bad priority \"none\"");
    }

    #[test]
    fn warnings() {
        let p = ok(&format!(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc {};",
            key(16)
        ));
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(
            p.warnings
                .iter()
                .any(|w| w.message.contains("no replay protection"))
        );
        assert!(
            p.warnings
                .iter()
                .any(|w| w.message.contains("no integrity protection")
                    && w.message.contains("without -A"))
        );
        let p = ok(&format!(
            "\nadd 10.0.0.1 10.0.0.2 esp 0x1000 -r 0 -E aes-cbc {} -A null;",
            key(16)
        ));
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings.iter().all(|w| w.line == 2));
        assert!(p.warnings.iter().any(
            |w| w.message.contains("no integrity protection") && w.message.contains("-A null")
        ));
        let p = ok(&format!(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -A hmac-sha1 {};",
            key(20)
        ));
        assert_eq!(p.warnings.len(), 1);
        assert!(p.warnings[0].message.contains("no replay protection"));
        let p = ok(&format!(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -r 1 -E aes-gcm-16 {};",
            key(20)
        ));
        assert!(p.warnings.is_empty());
        // ipcomp needs no replay window
        assert!(
            ok("add 10.0.0.1 10.0.0.2 ipcomp 0x1000 -C deflate;")
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn sa_errors() {
        let k16 = key(16);
        let k20 = key(20);
        assert_err(
            &format!("flush;\nadd 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-ctr {k16};"),
            "t.conf:2: unknown encryption algorithm \"aes-ctr\" (supported: null, aes-cbc, rijndael-cbc, aes-gcm-16, chacha20-poly1305)",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc {k16} -A hmac-md5 {k16};"),
            "t.conf:1: unknown authentication algorithm \"hmac-md5\" (supported: null, hmac-sha1,",
        );
        assert_err(
            &format!(
                "add 10.0.0.1 10.0.0.2 esp 0x1000\n -E aes-cbc {k16}\n -A hmac-sha256\n {k20};"
            ),
            "t.conf:4: hmac-sha256 needs a key of 256 bits, got 160 bits",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc {k20};"),
            "t.conf:1: aes-cbc needs a key of 128 or 192 or 256 bits, got 160 bits",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-gcm-16 {k16};"),
            "t.conf:1: aes-gcm-16 needs a key of 160 or 288 bits, got 128 bits",
        );
        assert_err(
            &format!(
                "add 10.0.0.1 10.0.0.2 esp 0x1000 -E chacha20-poly1305 {};",
                key(32)
            ),
            "t.conf:1: chacha20-poly1305 needs a key of 288 bits, got 256 bits",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -A hmac-sha512 \"short\";",
            "t.conf:1: hmac-sha512 needs a key of 512 bits, got 40 bits",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E null 0x00 -A null;",
            "t.conf:1: null needs a key of 0 bits",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc;",
            "t.conf:1: aes-cbc needs a key",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc -A hmac-sha1 0x00;",
            "t.conf:1: aes-cbc needs a key",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc 0x123;",
            "t.conf:1: bad key for aes-cbc: odd number of hex digits",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc 0xzz;",
            "t.conf:1: bad key for aes-cbc: 'z' is not a hex digit",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc 0x;",
            "t.conf:1: bad key for aes-cbc: no hex digits",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc secret;",
            "t.conf:1: bad key for aes-cbc: expected 0x",
        );
        // Tunnel mode.
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000\n-m tunnel -E aes-gcm-16 {k20};"),
            "t.conf:2: tunnel mode is not supported: tunsec is a transport-mode data plane",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -m bogus -E aes-gcm-16 {k20};"),
            "t.conf:1: unknown mode \"bogus\"",
        );
        // Protocol/algorithm combinations.
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -A hmac-sha1 {k20};"),
            "t.conf:1: esp needs an encryption algorithm",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-gcm-16 {k20}\n -A hmac-sha1 {k20};"),
            "t.conf:2: aes-gcm-16 is an AEAD",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E chacha20-poly1305 0x000000000000000000000000000000000000000000000000000000000000000000000000 -A null;",
            "t.conf:1: chacha20-poly1305 is an AEAD",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E null -A null;",
            "t.conf:1: esp with null encryption and null authentication protects nothing",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -E null;",
            "t.conf:1: esp with null encryption",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 ah 0x1000 -E aes-cbc {k16} -A hmac-sha1 {k20};"),
            "t.conf:1: ah takes no encryption",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -A null;",
            "t.conf:1: ah needs a real authentication algorithm",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -r 4;",
            "t.conf:1: ah needs an authentication algorithm",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ah 0x1000 -C deflate;",
            "t.conf:1: -C applies to ipcomp only",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 ipcomp 0x1000 -C deflate -A hmac-sha1 {k20};"),
            "t.conf:1: ipcomp takes no authentication",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 ipcomp 0x1000 -E aes-cbc {k16};"),
            "t.conf:1: ipcomp takes no encryption",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ipcomp 0x1000;",
            "t.conf:1: ipcomp needs a compression algorithm (-C deflate)",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ipcomp 0x1000 -C lzs;",
            "t.conf:1: unknown compression algorithm \"lzs\" (supported: deflate)",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 ipcomp 0x10000 -C deflate -R;",
            "t.conf:1: CPI 0x10000 does not fit in 16 bits",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -R -E aes-gcm-16 {k20};"),
            "t.conf:1: -R applies to ipcomp only",
        );
        // Options.
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -r 65537 -E aes-gcm-16 {k20};"),
            "t.conf:1: bad replay window \"65537\"",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -r -1 -E aes-gcm-16 {k20};"),
            "t.conf:1: bad replay window \"-1\"",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -r 4 -r 8 -E aes-gcm-16 {k20};"),
            "t.conf:1: -r given twice",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -u x -E aes-gcm-16 {k20};"),
            "t.conf:1: bad reqid \"x\"",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -lh 1h -E aes-gcm-16 {k20};"),
            "t.conf:1: bad lifetime \"1h\" after -lh",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -f cyclic -E aes-gcm-16 {k20};"),
            "t.conf:1: unknown flag \"cyclic\"",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 -x -E aes-gcm-16 {k20};"),
            "t.conf:1: unknown option \"-x\"",
        );
        assert_err(
            &format!("add 10.0.0.1 10.0.0.2 esp 0x1000 transport -E aes-gcm-16 {k20};"),
            "t.conf:1: unexpected \"transport\"",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -r",
            "t.conf:1: statement not terminated by ';'",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x1000 -r;",
            "t.conf:1: missing the replay window size after -r",
        );
        // Addresses, protocol, SPI.
        assert_err(
            "add 10.0.0.300 10.0.0.2 esp 0x1000;",
            "t.conf:1: bad address \"10.0.0.300\"",
        );
        assert_err(
            "add 10.0.0.1/32 10.0.0.2 esp 0x1000;",
            "t.conf:1: bad address \"10.0.0.1/32\" (an SA takes a plain address",
        );
        assert_err(
            "add 10.0.0.1\n::1 esp 0x1000;",
            "t.conf:2: source 10.0.0.1 and destination ::1 are of different address families",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 tcp 0x1000;",
            "t.conf:1: unknown protocol \"tcp\" (expected esp, ah or ipcomp)",
        );
        // ESP in UDP: ports go with esp-udp only.
        assert_err(
            "add 10.0.0.1[4500] 10.0.0.2 esp 0x1000 -E aes-gcm-16 0x00;",
            "t.conf:1: ports ([PORT]) on an SA's addresses go with esp-udp only",
        );
        assert_err(
            "add 10.0.0.1[0] 10.0.0.2 esp-udp 0x1000;",
            "t.conf:1: bad port in \"10.0.0.1[0]\"",
        );
        assert_err(
            "add 10.0.0.1[4500 10.0.0.2 esp-udp 0x1000;",
            "t.conf:1: bad port in \"10.0.0.1[4500\"",
        );
        assert_err(
            "delete 10.0.0.1[4500] 10.0.0.2 ah 0x1000;",
            "t.conf:1: ports ([PORT]) on an SA's addresses go with esp-udp only",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 0x100000000;",
            "t.conf:1: bad SPI \"0x100000000\"",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp 4294967296;",
            "t.conf:1: bad SPI \"4294967296\"",
        );
        assert_err(
            "add 10.0.0.1 10.0.0.2 esp spi;",
            "t.conf:1: bad SPI \"spi\"",
        );
        assert_err("add 10.0.0.1 10.0.0.2 esp;", "t.conf:1: missing the SPI");
        assert_err(
            "add \"10.0.0.1\" 10.0.0.2 esp;",
            "t.conf:1: expected the source address, got a quoted string",
        );
    }

    #[test]
    fn reserved_spis() {
        for proto in ["esp", "ah"] {
            for spi in [0u32, 1, 17, 255] {
                for written in [spi.to_string(), format!("{spi:#x}")] {
                    let text = format!(
                        "\n\nadd 10.0.0.1 10.0.0.2 {proto} {written} -r 64 -E aes-gcm-16 {} -A hmac-sha1 {};",
                        key(20),
                        key(20)
                    );
                    let e = err(&text);
                    assert!(
                        e.starts_with(&format!("t.conf:3: SPI {spi} is reserved")),
                        "{e}"
                    );
                }
            }
        }
        assert_eq!(
            sa(&format!(
                "add 10.0.0.1 10.0.0.2 esp 256 -r 64 -E aes-gcm-16 {};",
                key(20)
            ))
            .spi,
            256
        );
        assert_eq!(
            sa(&format!(
                "add 10.0.0.1 10.0.0.2 ah 4294967295 -r 64 -A hmac-sha1 {};",
                key(20)
            ))
            .spi,
            u32::MAX
        );
        for spi in [0u32, 1, 255] {
            assert_eq!(
                sa(&format!(
                    "add 10.0.0.1 10.0.0.2 ipcomp {spi} -C deflate -R;"
                ))
                .spi,
                spi
            );
        }
    }

    #[test]
    fn policy_errors() {
        assert_err(
            "flush;\nspdad 10.0.0.1 10.0.0.2 any -P out none;",
            "t.conf:2: unknown command \"spdad\"",
        );
        assert_err("\"flush\";", "t.conf:1: unknown command a quoted string");
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any out none;",
            "t.conf:1: expected -P after the upper-layer protocol, got \"out\"",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any;",
            "t.conf:1: expected -P after the upper-layer protocol",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 tcp 80 -P out none;",
            "t.conf:1: expected -P after the upper-layer protocol",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any -P up none;",
            "t.conf:1: unknown direction \"up\"",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any -P out;",
            "t.conf:1: missing the action",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any -P out allow;",
            "t.conf:1: unknown action \"allow\"",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any -P out ipsec;",
            "t.conf:1: ipsec needs at least one rule",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 any -P out none\n esp/transport//require;",
            "t.conf:2: none takes no rules",
        );
        assert_err(
            "spdadd 10.0.0.1/33 10.0.0.2 any -P out none;",
            "t.conf:1: prefix length 33 is too long for an IPv4 address",
        );
        assert_err(
            "spdadd ::/129 ::/0 any -P out none;",
            "t.conf:1: prefix length 129 is too long for an IPv6 address",
        );
        assert_err(
            "spdadd 10.0.0.1/300 10.0.0.2 any -P out none;",
            "t.conf:1: prefix length 300 is too long",
        );
        assert_err(
            "spdadd 10.0.0.1/x 10.0.0.2 any -P out none;",
            "t.conf:1: bad prefix length \"x\"",
        );
        assert_err(
            "spdadd 10.0.0.1/ 10.0.0.2 any -P out none;",
            "t.conf:1: bad prefix length \"\"",
        );
        assert_err(
            "spdadd 10.0.0.300/8 10.0.0.2 any -P out none;",
            "t.conf:1: bad address \"10.0.0.300\"",
        );
        assert_err(
            "spdadd 10.0.0.1 host.example any -P out none;",
            "t.conf:1: bad address \"host.example\"",
        );
        assert_err(
            "spdadd 10.0.0.1[80 10.0.0.2 tcp -P out none;",
            "t.conf:1: bad port in \"10.0.0.1[80\"",
        );
        assert_err(
            "spdadd 10.0.0.1[65536] 10.0.0.2 tcp -P out none;",
            "t.conf:1: bad port \"65536\"",
        );
        assert_err(
            "spdadd 10.0.0.1[80] 10.0.0.2 any -P out none;",
            "t.conf:1: ports need tcp, udp or sctp",
        );
        assert_err(
            "spdadd 10.0.0.1[80] 10.0.0.2 icmp -P out none;",
            "t.conf:1: ports cannot be used with icmp",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 icmp 8,300 -P out none;",
            "t.conf:1: bad ICMP type/code \"8,300\"",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 icmp 8, -P out none;",
            "t.conf:1: bad ICMP type/code \"8,\"",
        );
        assert_err(
            "spdadd 10.0.0.1 ::1 any -P out none;",
            "t.conf:1: source 10.0.0.1/32 and destination ::1/128 are of different address families",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 tcpx -P out none;",
            "t.conf:1: unknown upper-layer protocol \"tcpx\"",
        );
        assert_err(
            "spdadd 10.0.0.1 10.0.0.2 256 -P out none;",
            "t.conf:1: unknown upper-layer protocol \"256\"",
        );
        // Rules.
        let rule = |r: &str, m: &str| {
            assert_err(
                &format!("spdadd 10.0.0.1 10.0.0.2 any -P out ipsec\n  {r};"),
                m,
            )
        };
        rule(
            "esp/tunnel/10.0.0.1-10.0.0.2/require",
            "t.conf:2: tunnel mode is not supported: tunsec is a transport-mode data plane",
        );
        rule(
            "esp/transport/10.0.0.1-10.0.0.2/require",
            "t.conf:2: transport mode takes no endpoints",
        );
        rule("esp", "t.conf:2: bad rule \"esp\"");
        rule("esp/transport//require/x", "t.conf:2: bad rule");
        rule(
            "tcp/transport//require",
            "t.conf:2: unknown protocol \"tcp\" in rule",
        );
        rule("esp/beet//require", "t.conf:2: unknown mode \"beet\"");
        rule("esp/transport//must", "t.conf:2: unknown level \"must\"");
        rule("esp/transport//unique:0", "t.conf:2: bad reqid \"0\"");
        rule("esp/transport//unique:", "t.conf:2: bad reqid \"\"");
        rule("\"esp/transport//require\"", "t.conf:2: expected a rule");
        // End of file.
        assert_err(
            "flush;\n\nspdadd 10.0.0.1 10.0.0.2 any\n -P out none",
            "t.conf:3: statement not terminated by ';'",
        );
        assert_err(
            "flush;\n\nadd 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc \"abc",
            "t.conf:3: unterminated quoted string",
        );
        // The first error in file order wins over the unterminated end.
        assert_err(
            "flush;\nbogus;\nspdflush",
            "t.conf:2: unknown command \"bogus\"",
        );
        // Statement line when the error has no token: the line of the statement.
        assert_err(
            "\n\nspdadd\n10.0.0.1\n10.0.0.2\nany\n;",
            "t.conf:3: expected -P after the upper-layer protocol",
        );
    }

    #[test]
    fn messages_quote_long_tokens_briefly() {
        let long = "x".repeat(10_000);
        let e = err(&format!("{long};"));
        assert!(e.len() < 300, "{e}");
        assert!(e.starts_with("t.conf:1: unknown command \"xxxx"));
        // Keys never appear in messages.
        let e = err("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc \"topsecretkey\";");
        assert!(!e.contains("topsecret"), "{e}");
        let e = err("add 10.0.0.1 10.0.0.2 esp 0x1000 -E aes-cbc 0xdeadbeefcafe;");
        assert!(!e.contains("deadbeef"), "{e}");
    }

    #[test]
    fn algorithm_lists_match_the_crypto_module() {
        for n in ENC_NAMES.split(", ") {
            assert!(EncAlg::from_name(n).is_some(), "{n}");
        }
        for n in AUTH_NAMES.split(", ") {
            assert!(AuthAlg::from_name(n).is_some(), "{n}");
        }
    }

    #[test]
    fn display_is_file_line_message() {
        let e = parse("\nflush esp-old;", "/etc/setkey.conf").unwrap_err();
        assert_eq!(e.file, "/etc/setkey.conf");
        assert_eq!(e.line, 2);
        assert_eq!(e.to_string(), format!("/etc/setkey.conf:2: {}", e.message));
    }

    /// A tiny deterministic generator for the fuzz-ish tests.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        fn below(&mut self, n: usize) -> usize {
            self.next() as usize % n
        }
    }

    fn valid_file() -> String {
        format!(
            "{SEED1}\nadd 10.0.0.1 10.0.0.2 esp 0x1000 -m transport -r 64 -u 3 -lh 60 -f esn -E aes-cbc {} -A hmac-sha256 {};\n\
             add 10.0.0.2 10.0.0.1 esp 0x1001 -E aes-gcm-16 \"0123456789abcdefghij\";\n\
             add 10.0.0.1 10.0.0.2 ah 0x2000 -r 64 -A hmac-sha1 {};\n\
             add 10.0.0.1 10.0.0.2 ipcomp 0x3000 -C deflate -R;\n\
             spdadd 10.0.0.0/8[any] 10.1.0.0/16[80] tcp -P out priority high + 3 ipsec ipcomp/transport//use esp/transport//unique:3;\n\
             spdadd ::/0 ::/0 icmp6 135,0 -P in priority default-1 none;\n\
             spdupdate 10.0.0.1 10.0.0.2 udp -P fwd discard;\n\
             spddelete 10.0.0.1 10.0.0.2 udp -P fwd;\n\
             get 10.0.0.1 10.0.0.2 esp 0x1000; delete 10.0.0.1 10.0.0.2 esp 0x1000; deleteall 10.0.0.1 10.0.0.2 ah;\n\
             dump; dump ipcomp; spddump; flush esp; spdflush;\n",
            key(16),
            key(32),
            key(20)
        )
    }

    #[test]
    fn valid_file_parses() {
        let p = ok(&valid_file());
        assert_eq!(p.statements.len(), 10 + 4 + 4 + 3 + 5);
    }

    #[test]
    fn no_panic_on_prefixes_and_garbage() {
        let text = valid_file();
        for (i, _) in text.char_indices() {
            let _ = parse(&text[..i], "f");
            let _ = parse(&text[i..], "f");
        }
        let mut rng = Lcg(0x5eed);
        // Random bytes.
        for _ in 0..3000 {
            let len = rng.below(200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes), "f");
        }
        // Random sequences of plausible tokens, to get past the first word.
        let vocab: Vec<&str> = text
            .split(|c: char| c.is_whitespace())
            .chain([
                ";",
                "\"",
                "#",
                "[",
                "]",
                "/",
                "-",
                "+",
                ",",
                "0x",
                "0",
                "255",
                "256",
                "4294967296",
                "::",
                "\n",
                "[any]",
                "unique:",
                "-P",
                "priority",
                "esp/tunnel//",
                "///",
                "10.0.0.1[",
                "icmp",
                "8,",
                "-E",
                "-A",
                "-C",
                "null",
            ])
            .collect();
        for _ in 0..20000 {
            let n = rng.below(30);
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(vocab[rng.below(vocab.len())]);
                if rng.below(4) != 0 {
                    s.push(' ');
                }
            }
            let _ = parse(&s, "f");
        }
    }

    #[test]
    fn esp_udp_sas_carry_their_ports() {
        let k = key(20);
        let c = sa(&format!(
            "add 192.0.2.1[4500] 192.0.2.2[31000] esp-udp 0x1000 -E aes-gcm-16 {k};"
        ));
        assert_eq!(c.proto, Proto::Esp);
        let e = c.encap.unwrap();
        assert_eq!((e.sport, e.dport), (4500, 31000));
        assert_eq!(c.endpoints(), "192.0.2.1[4500] 192.0.2.2[31000]");
        assert_eq!(c.proto_name(), "esp-udp");
        // Without ports: the NAT-T port both ways.
        let c = sa(&format!(
            "add 2001:db8::1 2001:db8::2 esp-udp 0x1000 -E aes-gcm-16 {k};"
        ));
        assert_eq!(c.encap, Some(crate::udp_encap::Encap::default()));
        // esp-udp names the same SAs as esp in get and delete.
        assert!(matches!(
            one("delete 192.0.2.1[4500] 192.0.2.2[4500] esp-udp 0x1000;"),
            Command::Delete {
                proto: Proto::Esp,
                spi: 0x1000,
                ..
            }
        ));
    }
}
