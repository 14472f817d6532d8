//! Stage 1, event: ring buffer bytes -> typed events. Pure: no aya, no
//! tokio. Takes the records the kernel programs write (the layouts of
//! `tracer-common`) and gives [`ConnEvent`]s, or a [`DecodeError`] that
//! says what was wrong; with them the names of states, errnos and options
//! ([`names`]), addresses for people ([`addr`]) and the kernel's clocks
//! ([`clock`], [`jiffies`]). Address and owner helpers live on the shared
//! types themselves (`SockAddrs::local`, `Owner::kind`, ...).

pub(crate) mod addr;
pub(crate) mod clock;
#[cfg(test)]
mod fuzz;
pub(crate) mod jiffies;
pub(crate) mod names;
#[cfg(test)]
mod tests;

use std::ptr;

use tracer_common::{
    AcceptData, CloseData, Event, EventInfo, OpenData, ResetData, SnapshotData, SockError,
    SockoptData, StateChange, kind, tcp_state,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event of {len} bytes is shorter than the {need}-byte header")]
    ShortHeader { len: usize, need: usize },
    #[error(
        "event kind {kind} is unknown to this conn-tracer (kernel programs newer than the agent?)"
    )]
    UnknownKind { kind: u16 },
    #[error("{name} event of {len} bytes is truncated: needs {need}")]
    Truncated {
        name: &'static str,
        len: usize,
        need: usize,
    },
}

/// What happened, per event kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventData {
    State {
        old: u8,
        new: u8,
    },
    ResetReceived,
    ResetSent {
        reason: u32,
    },
    Error {
        errno: u32,
    },
    Open(OpenData),
    Close(CloseData),
    /// The peer closed an established connection (its FIN): the end facts
    /// at that moment; the socket's own `Close` comes when it is freed.
    End(CloseData),
    Sockopt(SockoptData),
    Snapshot(SnapshotData),
    /// A thread accepted a connection on a capture port: the header's
    /// owner is the thread, its addresses the accepted socket's.
    Accept(AcceptData),
}

/// One decoded kernel event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    pub info: EventInfo,
    pub data: EventData,
}

/// The connections of a TCP iterator snapshot: its records of sockets
/// other than listeners, with their snapshot data.
pub(crate) fn snapshot_connections(
    snapshot: &[ConnEvent],
) -> impl Iterator<Item = (&ConnEvent, SnapshotData)> {
    snapshot.iter().filter_map(|ev| match ev.data {
        EventData::Snapshot(s) if ev.info.sock.state != tcp_state::LISTEN => Some((ev, s)),
        _ => None,
    })
}

/// Reads a `T` from the front of `bytes`; the caller checked the length.
fn read<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked above; T is a plain repr(C) type valid for any
    // bit pattern; read_unaligned has no alignment requirement.
    unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn body<T: Copy>(bytes: &[u8], name: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<Event<T>>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            name,
            len: bytes.len(),
            need,
        });
    }
    Ok(read::<Event<T>>(bytes).data)
}

/// Decodes one ring buffer record. Never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<ConnEvent, DecodeError> {
    let need = size_of::<EventInfo>();
    if bytes.len() < need {
        return Err(DecodeError::ShortHeader {
            len: bytes.len(),
            need,
        });
    }
    let info: EventInfo = read(bytes);
    let data = match info.kind {
        kind::STATE => {
            let d: StateChange = body(bytes, "state")?;
            EventData::State {
                old: d.old_state,
                new: d.new_state,
            }
        }
        kind::RESET_RECEIVED => {
            body::<ResetData>(bytes, "reset_received")?;
            EventData::ResetReceived
        }
        kind::RESET_SENT => {
            let d: ResetData = body(bytes, "reset_sent")?;
            EventData::ResetSent { reason: d.reason }
        }
        kind::SOCK_ERROR => {
            let d: SockError = body(bytes, "error")?;
            EventData::Error { errno: d.errno }
        }
        kind::OPEN => EventData::Open(body(bytes, "open")?),
        kind::CLOSE => EventData::Close(body(bytes, "close")?),
        kind::END => EventData::End(body(bytes, "end")?),
        kind::SOCKOPT => EventData::Sockopt(body(bytes, "sockopt")?),
        kind::SNAPSHOT => EventData::Snapshot(body(bytes, "snapshot")?),
        kind::ACCEPT => EventData::Accept(body(bytes, "accept")?),
        other => return Err(DecodeError::UnknownKind { kind: other }),
    };
    Ok(ConnEvent { info, data })
}

impl ConnEvent {
    /// The event's name as `trace --json` prints it.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self.data {
            EventData::State { .. } => "state",
            EventData::ResetReceived => "reset_received",
            EventData::ResetSent { .. } => "reset_sent",
            EventData::Error { .. } => "error",
            EventData::Open(_) => "open",
            EventData::Close(_) => "close",
            EventData::End(_) => "end",
            EventData::Sockopt(_) => "sockopt",
            EventData::Snapshot(_) => "snapshot",
            EventData::Accept(_) => "accept",
        }
    }
}
