//! systemd's readiness protocol (`sd_notify(3)`), for units with `Type=notify`.
//!
//! systemd passes the address of a datagram socket in `NOTIFY_SOCKET`: a path, or an abstract
//! socket name written with a leading `@`. The service sends newline-separated `KEY=VALUE`
//! lines to it: `READY=1` once it is serving, `STOPPING=1` when it begins to shut down,
//! `STATUS=...` for `systemctl status`. observer sends `READY=1` once its programs are attached
//! and the `start` record is written, and `STOPPING=1` when the run ends; a start that fails
//! exits non-zero before `READY=1` (its reason on stderr, so in the journal).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or `Type=exec`) nothing is sent. A message
//! that cannot be sent is a warning, never a reason to stop: the daemon works the same without
//! a service manager. The variable is left set (observer's children, nft and iptables-save,
//! never use it).
use std::{
    ffi::OsStr,
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr, UnixDatagram},
        },
    },
    path::Path,
};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "{NOTIFY_SOCKET}=`{0}` is neither a socket path nor an abstract name (`@NAME`); readiness will not be reported"
    )]
    Unsupported(String),
    #[error("{NOTIFY_SOCKET}=`{value}`: {io_error}; readiness will not be reported")]
    Socket {
        value: String,
        #[source]
        io_error: io::Error,
    },
}

/// Sends notifications to the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for messages.
    value: String,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names; `None` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(value) if !value.is_empty() => Self::new(&value).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the address `value` (`/path` or `@abstract-name`).
    pub fn new(value: &OsStr) -> Result<Self, NotifyError> {
        let shown = value.to_string_lossy().into_owned();
        let socket_error = |io_error| NotifyError::Socket {
            value: shown.clone(),
            io_error,
        };
        let addr = match value.as_bytes() {
            [b'@', name @ ..] if !name.is_empty() => {
                SocketAddr::from_abstract_name(name).map_err(socket_error)?
            }
            [b'/', ..] => SocketAddr::from_pathname(Path::new(value)).map_err(socket_error)?,
            _ => return Err(NotifyError::Unsupported(shown)),
        };
        let socket = UnixDatagram::unbound().map_err(socket_error)?;
        Ok(Self {
            socket,
            addr,
            value: shown,
        })
    }

    /// Sends one message (newline-separated `KEY=VALUE` lines).
    pub fn notify(&self, message: &str) -> io::Result<()> {
        let sent = self.socket.send_to_addr(message.as_bytes(), &self.addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            ));
        }
        Ok(())
    }

    /// [`Self::notify`], a failure said on stderr.
    pub fn notify_or_warn(&self, message: &str) {
        if let Err(e) = self.notify(message) {
            let first = message.lines().next().unwrap_or_default();
            eprintln!(
                "observer: warning: telling the service manager `{first}` through {NOTIFY_SOCKET}={} failed: {e}",
                self.value
            );
        }
    }
}

/// `STATUS=` text: one line (systemd shows it in `systemctl status`).
pub fn status_line(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("observer-notify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_socket_path() {
        let dir = temp_dir("path");
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(path.as_os_str()).expect("notifier");
        notifier.notify("READY=1\nSTATUS=ok").expect("send");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=ok");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("observer-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind");
        let notifier = Notifier::new(OsStr::new(&format!("@{name}"))).expect("notifier");
        notifier.notify("STOPPING=1").expect("send");
        assert_eq!(receive(&socket), "STOPPING=1");
    }

    #[test]
    fn other_addresses_are_refused_with_a_reason() {
        for value in ["vsock:2:1234", "relative/path", "@"] {
            let err = Notifier::new(OsStr::new(value)).expect_err(value);
            assert!(err.to_string().contains(value), "{err}");
        }
        // A path nobody listens on: the notifier exists, sending fails (a warning at run time).
        let notifier = Notifier::new(OsStr::new("/nonexistent/observer-notify.sock"))
            .expect("a path is an address");
        assert!(notifier.notify("READY=1").is_err());
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(status_line("a\nb\tc"), "STATUS=a b c");
    }
}
