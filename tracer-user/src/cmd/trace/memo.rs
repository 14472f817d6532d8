//! The addresses `trace` remembers per socket.

use tracer_common::tcp_state;

use crate::event::{ConnEvent, EventData};

/// Remembers each socket's addresses, because the kernel clears some of them
/// as a socket closes (the local port is assigned only after
/// `CLOSE -> SYN_SENT`; `tcp_disconnect` zeroes the remote port and local
/// address before the events that follow an abortive close). Zeroed fields
/// are filled from earlier events of the same socket. Bounded: at most `cap`
/// sockets, and closed sockets are kept only for the `cap / 16` most recent.
#[derive(Debug)]
pub(crate) struct PortMemo {
    addrs: std::collections::HashMap<u64, Addrs>,
    closed: std::collections::VecDeque<u64>,
    cap: usize,
}

#[derive(Debug, Clone, Copy)]
struct Addrs {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
}

impl PortMemo {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            addrs: std::collections::HashMap::new(),
            closed: std::collections::VecDeque::new(),
            cap: cap.max(16),
        }
    }

    /// Fills zeroed address fields of `ev` from earlier events of its socket
    /// and remembers the non-zero ones.
    pub(crate) fn apply(&mut self, ev: &mut ConnEvent) {
        let cookie = ev.info.cookie;
        if cookie == 0 {
            return;
        }
        let s = &mut ev.info.sock;
        let known = self.addrs.get(&cookie).copied();
        if let Some(k) = known {
            if s.sport == 0 {
                s.sport = k.sport;
            }
            if s.saddr == [0; 16] {
                s.saddr = k.saddr;
            }
            if s.dport == 0 && s.daddr == [0; 16] {
                s.dport = k.dport;
                s.daddr = k.daddr;
            } else if s.dport == 0 && s.daddr == k.daddr {
                s.dport = k.dport;
            }
        } else if self.addrs.len() >= self.cap {
            // Over the bound: start over rather than grow (only `trace` output
            // of already-closed sockets can lose a port this way).
            self.addrs.clear();
            self.closed.clear();
        }
        self.addrs.insert(
            cookie,
            Addrs {
                saddr: s.saddr,
                daddr: s.daddr,
                sport: s.sport,
                dport: s.dport,
            },
        );
        if let EventData::State {
            new: tcp_state::CLOSE,
            ..
        } = ev.data
        {
            self.closed.push_back(cookie);
            if self.closed.len() > self.cap / 16
                && let Some(old) = self.closed.pop_front()
            {
                self.addrs.remove(&old);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.addrs.len()
    }
}
