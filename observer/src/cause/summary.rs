//! The plain sentences of causes: names of namespaces, endpoints and RST reasons.
use std::net::IpAddr;

use super::Surroundings;

/// `netns NAME` where the namespace has a name, else `netns INODE`.
pub(crate) fn netns_label(netns: u32, around: &dyn Surroundings) -> String {
    match around.netns_name(netns) {
        Some(name) => format!("netns {name}"),
        None => format!("netns {netns}"),
    }
}

/// `10.0.0.2:8080`, `[fd00::2]:8080`, or the bare address without a port.
pub(crate) fn endpoint(addr: IpAddr, port: Option<u16>) -> String {
    match (addr, port) {
        (IpAddr::V6(v6), Some(port)) => format!("[{v6}]:{port}"),
        (addr, Some(port)) => format!("{addr}:{port}"),
        (addr, None) => addr.to_string(),
    }
}

/// The port when a tally saw exactly one.
pub(crate) fn single_port(ports: &[u16]) -> Option<u16> {
    match ports {
        [port] => Some(*port),
        _ => None,
    }
}

/// `pid 1234 (nginx)`, or `pid 1234`.
pub(crate) fn process(pid: u32, comm: Option<&str>) -> String {
    match comm {
        Some(comm) => format!("pid {pid} ({comm})"),
        None => format!("pid {pid}"),
    }
}

/// What an RST reason means, in words an operator knows.
pub(crate) fn reset_meaning(reason: &str) -> &'static str {
    match reason {
        "TCP_ABORT_ON_LINGER" => "an abortive close: the process closed with SO_LINGER 0",
        "TCP_ABORT_ON_CLOSE" => "an abortive close: the process closed with unread data",
        "TCP_DISCONNECT_WITH_DATA" => "the process disconnected with data unsent",
        "TCP_ABORT_ON_MEMORY" => "the kernel ran out of socket memory",
        "TCP_ABORT_ON_DATA" => "data arrived after the process shut the socket",
        "TCP_KEEPALIVE_TIMEOUT" => "the keepalive timed out",
        "TCP_TIMEWAIT_SOCKET" => "a packet hit a connection in TIME_WAIT",
        "NO_SOCKET" => "no socket for the packet: nothing listens on the port",
        "TCP_STATE" => "a packet unexpected in the connection's state",
        "NOT_SPECIFIED" => "the kernel gives no reason",
        _ => "see the RST reason",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_bracket_ipv6() {
        assert_eq!(
            endpoint([10, 0, 0, 2].into(), Some(80)),
            "10.0.0.2:80".to_owned()
        );
        assert_eq!(
            endpoint("fd00::2".parse().unwrap_or(IpAddr::from([0; 16])), Some(80)),
            "[fd00::2]:80".to_owned()
        );
        assert_eq!(endpoint([10, 0, 0, 2].into(), None), "10.0.0.2".to_owned());
        assert_eq!(single_port(&[80]), Some(80));
        assert_eq!(single_port(&[80, 81]), None);
    }
}
