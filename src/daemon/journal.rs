//! Logging to systemd's journal through stdout: each line prefixed with
//! its syslog priority (`<3>` for an error, sd-daemon(3)) and no
//! timestamp of its own (the journal stamps it).

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Compact, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whether stdout is the journal's stream: `$JOURNAL_STREAM` names its
/// device and inode (systemd.exec(5)), not merely inherited from a
/// parent whose stdout it was.
pub fn stdout_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|v| names_fd(&v, 1))
}

/// Whether `DEV:INO` names the file open on `fd`.
fn names_fd(v: &str, fd: libc::c_int) -> bool {
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    // SAFETY: fstat fills a zeroed stat for fd or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// The message alone, after its priority.
pub fn format() -> Priority<tracing_subscriber::fmt::format::Format<Compact, ()>> {
    Priority(
        tracing_subscriber::fmt::format()
            .compact()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false),
    )
}

/// syslog(3) priority of a level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Each event prefixed with its priority, `<3>` for an error.
pub struct Priority<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(w, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, w, event)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_their_priority_and_no_timestamp() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || w.clone())
            .event_format(super::format())
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::error!("reload failed, nothing changed: a.conf:3: x");
            tracing::warn!("careful");
            tracing::info!(n = 2, "up");
            tracing::debug!("detail");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            out,
            "<3>reload failed, nothing changed: a.conf:3: x\n<4>careful\n<6>up n=2\n<7>detail\n"
        );
    }

    #[test]
    fn journal_stream_must_name_the_open_file() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let m = f.metadata().unwrap();
        let fd = f.as_raw_fd();
        assert!(super::names_fd(&format!("{}:{}", m.dev(), m.ino()), fd));
        // Inherited from a parent whose stdout it was: another file.
        assert!(!super::names_fd(
            &format!("{}:{}", m.dev(), m.ino() + 1),
            fd
        ));
        assert!(!super::names_fd("", fd));
        assert!(!super::names_fd("x:y", fd));
    }
}
