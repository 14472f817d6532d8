//! Names of the kernel's numbers: TCP states, errnos, socket options.

use tracer_common::{sockopt, tcp_state};

/// Name of a watched socket option.
pub(crate) fn sockopt_name(level: u32, optname: u32) -> &'static str {
    match (level, optname) {
        (sockopt::SOL_SOCKET, sockopt::SO_KEEPALIVE) => "SO_KEEPALIVE",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPIDLE) => "TCP_KEEPIDLE",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPINTVL) => "TCP_KEEPINTVL",
        (sockopt::SOL_TCP, sockopt::TCP_KEEPCNT) => "TCP_KEEPCNT",
        (sockopt::SOL_TCP, sockopt::TCP_USER_TIMEOUT) => "TCP_USER_TIMEOUT",
        _ => "other",
    }
}

/// The kernel's name of a TCP state.
pub(crate) fn state_name(state: u8) -> &'static str {
    match state {
        tcp_state::ESTABLISHED => "ESTABLISHED",
        tcp_state::SYN_SENT => "SYN_SENT",
        tcp_state::SYN_RECV => "SYN_RECV",
        tcp_state::FIN_WAIT1 => "FIN_WAIT1",
        tcp_state::FIN_WAIT2 => "FIN_WAIT2",
        tcp_state::TIME_WAIT => "TIME_WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
        tcp_state::LAST_ACK => "LAST_ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
        tcp_state::BOUND_INACTIVE => "BOUND_INACTIVE",
        _ => "UNKNOWN",
    }
}

/// Symbolic name of the errno values a TCP socket reports.
pub(crate) fn errno_name(errno: u32) -> &'static str {
    match errno as i32 {
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EHOSTDOWN => "EHOSTDOWN",
        libc::ENETDOWN => "ENETDOWN",
        _ => "",
    }
}
