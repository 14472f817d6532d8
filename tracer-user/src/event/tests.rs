//! The decoder on records laid out as the kernel writes them.

use tracer_common::{Owner, owner_flags};

use super::*;
use crate::{
    cmd::trace::TraceRecord,
    event::jiffies::HzTracker,
    testing::{bytes_of, client_info as info},
};

#[test]
fn decodes_a_state_change() {
    let ev = Event {
        info: info(kind::STATE),
        data: StateChange {
            old_state: 2,
            new_state: 1,
            pad: [0; 6],
        },
    };
    let got = decode(&bytes_of(&ev)).unwrap();
    assert_eq!(got.data, EventData::State { old: 2, new: 1 });
    assert_eq!(got.info, ev.info);
    assert_eq!(got.info.sock.local(), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(got.info.sock.remote(), Some("127.0.0.2".parse().unwrap()));
}

#[test]
fn decodes_resets_and_errors() {
    let sent = Event {
        info: info(kind::RESET_SENT),
        data: ResetData { reason: 7, pad: 0 },
    };
    assert_eq!(
        decode(&bytes_of(&sent)).unwrap().data,
        EventData::ResetSent { reason: 7 }
    );
    let recv = Event {
        info: info(kind::RESET_RECEIVED),
        data: ResetData::default(),
    };
    assert_eq!(
        decode(&bytes_of(&recv)).unwrap().data,
        EventData::ResetReceived
    );
    let err = Event {
        info: info(kind::SOCK_ERROR),
        data: SockError { errno: 104, pad: 0 },
    };
    let got = decode(&bytes_of(&err)).unwrap();
    assert_eq!(got.data, EventData::Error { errno: 104 });
    let rec = TraceRecord::new(
        &got,
        "t".into(),
        |_| String::new(),
        &mut HzTracker::new(Some(250)),
    );
    assert_eq!(rec.error, Some("ECONNRESET"));
}

#[test]
fn ring_buffer_padding_after_the_event_is_ignored() {
    let ev = Event {
        info: info(kind::STATE),
        data: StateChange::default(),
    };
    let mut b = bytes_of(&ev);
    b.extend_from_slice(&[0xff; 8]);
    assert!(decode(&b).is_ok());
}

#[test]
fn truncated_and_unknown_events_are_errors_not_panics() {
    let ev = Event {
        info: info(kind::STATE),
        data: StateChange::default(),
    };
    let b = bytes_of(&ev);
    for len in 0..b.len() {
        let err = decode(&b[..len]).unwrap_err();
        let need_header = size_of::<EventInfo>();
        if len < need_header {
            assert_eq!(
                err,
                DecodeError::ShortHeader {
                    len,
                    need: need_header
                }
            );
        } else {
            assert_eq!(
                err,
                DecodeError::Truncated {
                    name: "state",
                    len,
                    need: b.len()
                }
            );
        }
    }
    let unknown = Event {
        info: info(999),
        data: StateChange::default(),
    };
    let err = decode(&bytes_of(&unknown)).unwrap_err();
    assert_eq!(err, DecodeError::UnknownKind { kind: 999 });
    assert!(err.to_string().contains("999"));
}

#[test]
fn owner_kinds() {
    let mut o = Owner::default();
    assert_eq!(o.kind(), "unknown");
    o.flags = owner_flags::KNOWN;
    assert_eq!(o.kind(), "known");
    o.flags |= owner_flags::INHERITED;
    assert_eq!(o.kind(), "inherited");
    assert_eq!(tracer_common::comm_str(b"abc\0def"), "abc");
    assert_eq!(
        tracer_common::comm_str(b"sixteen-chars-xx"),
        "sixteen-chars-xx"
    );
}
