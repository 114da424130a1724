//! Kernel ABI constants (stable UAPI numbering).

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86DD;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
/// The socket error of a connect answered by a RST (Linux errno ABI).
pub(crate) const ECONNREFUSED: i32 = 111;
/// TCP states (include/net/tcp_states.h, user-visible ABI).
pub(crate) const TCP_ESTABLISHED: i32 = 1;
pub(crate) const TCP_SYN_RECV: i32 = 3;
pub(crate) const TCP_CLOSE: i32 = 7;
pub(crate) const TCP_LISTEN: i32 = 10;
pub(crate) const TCP_NEW_SYN_RECV: i32 = 12;
/// TCP header flag bits (byte 13).
pub(crate) const TCP_FLAG_SYN: u8 = 0x02;
pub(crate) const TCP_FLAG_ACK: u8 = 0x10;
