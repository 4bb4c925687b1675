//! The daemon's own readiness, told to systemd (a `Type=notify` unit):
//! `READY=1` once the enabled services are started, `STOPPING=1` when a
//! shutdown begins, and `WATCHDOG=1` pings when the unit sets WatchdogSec.
//! The protocol is one datagram per message to `$NOTIFY_SOCKET` (see
//! sd_notify(3)); the services' own sockets are in `notify.rs`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// Where the daemon's messages to systemd go; `None` of it when the daemon
/// was not started by systemd with a notify socket.
#[derive(Debug)]
pub struct SystemdNotifier {
    socket: UnixDatagram,
    target: SocketAddr,
}

impl SystemdNotifier {
    /// From `$NOTIFY_SOCKET` (`/path` or `@abstract`); `None` without it,
    /// or when it cannot be used (said once).
    pub fn from_env() -> Option<SystemdNotifier> {
        let address = std::env::var_os("NOTIFY_SOCKET")?;
        let text = address.to_string_lossy();
        let target = match text.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&*text),
        };
        let opened = target.and_then(|target| {
            let socket = UnixDatagram::unbound()?;
            // A full socket buffer at systemd's end must not stall the
            // runtime: a message that does not fit is dropped.
            socket.set_nonblocking(true)?;
            Ok(SystemdNotifier { socket, target })
        });
        match opened {
            Ok(notifier) => Some(notifier),
            Err(error) => {
                warn!(
                    "cannot use NOTIFY_SOCKET={text}: {error}; systemd will not hear that the daemon is ready (check the unit's Type= and NotifyAccess=)"
                );
                None
            }
        }
    }

    /// Send `message` (newline-separated assignments), best effort.
    pub fn send(&self, message: &str) {
        if let Err(error) = self.socket.send_to_addr(message.as_bytes(), &self.target) {
            debug!("cannot tell systemd {message:?}: {error}");
        }
    }

    /// How often to send WATCHDOG=1: half of `$WATCHDOG_USEC`, as
    /// sd_watchdog_enabled(3) advises; `None` when no watchdog is set, or
    /// it is meant for another process (`$WATCHDOG_PID`).
    pub fn watchdog_every() -> Option<Duration> {
        watchdog_every_from(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }
}

fn watchdog_every_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_period_and_only_for_us() {
        assert_eq!(
            watchdog_every_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_every_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_every_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_every_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_every_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_every_from(None, None, 7), None);
    }
}
