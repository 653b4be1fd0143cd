//! systemd's readiness protocol (`sd_notify(3)`), without libsystemd: when
//! `NOTIFY_SOCKET` names a Unix datagram socket (a path, or `@name` for
//! an abstract one), state changes go to it as `KEY=VALUE` lines in one
//! datagram. Without `NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`) every call does nothing.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// Where the notifications go, read once from the environment.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; a value that cannot be used is an error
    /// (systemd would wait for a readiness that never comes).
    pub fn from_env() -> io::Result<Notifier> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(Notifier { target: None }),
            Some(v) => Notifier::to(v.as_encoded_bytes()),
        }
    }

    /// To the socket named `name` (`@…`: abstract; else a path).
    pub fn to(name: &[u8]) -> io::Result<Notifier> {
        let addr = match name {
            [] => return Err(io::Error::other("NOTIFY_SOCKET is empty")),
            [b'@', rest @ ..] => SocketAddr::from_abstract_name(rest)?,
            [b'/', ..] => SocketAddr::from_pathname(Path::new(
                std::str::from_utf8(name).map_err(io::Error::other)?,
            ))?,
            _ => {
                return Err(io::Error::other(format!(
                    "NOTIFY_SOCKET={:?} is neither a path nor @abstract",
                    String::from_utf8_lossy(name)
                )));
            }
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((sock, addr)),
        })
    }

    /// Is there a supervisor to tell?
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `lines` (`READY=1`, `STATUS=…`) as one datagram.
    pub fn send(&self, lines: &[&str]) -> io::Result<()> {
        let Some((sock, addr)) = &self.target else {
            return Ok(());
        };
        let mut msg = lines.join("\n");
        msg.push('\n');
        sock.send_to_addr(msg.as_bytes(), addr).map(|_| ())
    }

    /// [`Notifier::send`], logging a failure (the daemon goes on: a
    /// supervisor that went away is no reason to stop the data plane).
    pub fn tell(&self, lines: &[&str]) {
        if let Err(e) = self.send(lines) {
            tracing::warn!("sd_notify {:?}: {e}", lines.first().unwrap_or(&""));
        }
    }
}

/// `MONOTONIC_USEC=…`, which systemd 253+ wants beside `RELOADING=1`.
pub fn monotonic_usec() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    format!(
        "MONOTONIC_USEC={}",
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> String {
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_path_socket_gets_one_datagram_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(path.as_os_str().as_encoded_bytes()).unwrap();
        assert!(n.enabled());
        n.send(&["READY=1", "STATUS=up: 2 policies"]).unwrap();
        n.send(&["STOPPING=1"]).unwrap();
        assert_eq!(recv(&server), "READY=1\nSTATUS=up: 2 policies\n");
        assert_eq!(recv(&server), "STOPPING=1\n");
    }

    #[test]
    fn an_abstract_socket_is_named_with_an_at() {
        let name = format!("tunsec-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::to(format!("@{name}").as_bytes()).unwrap();
        n.send(&["RELOADING=1", &monotonic_usec()]).unwrap();
        let got = recv(&server);
        assert!(got.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{got}");
        assert!(
            got.trim_end()
                .rsplit('=')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
    }

    #[test]
    fn bad_names_are_errors_and_a_missing_socket_fails_the_send() {
        assert!(Notifier::to(b"").is_err());
        assert!(Notifier::to(b"relative/path").is_err());
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::to(dir.path().join("gone").as_os_str().as_encoded_bytes()).unwrap();
        assert!(n.send(&["READY=1"]).is_err());
        // Without a target nothing is sent and nothing fails.
        let none = Notifier { target: None };
        assert!(!none.enabled());
        none.send(&["READY=1"]).unwrap();
    }
}
