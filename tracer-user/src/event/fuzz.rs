//! Property tests of the decoder (`cargo xtask fuzz event` runs them long):
//! whatever bytes the ring buffer holds, decoding never panics, and a valid
//! record of every kind decodes to what was encoded.

use proptest::{array, prelude::*};
use tracer_common::{
    AF_INET, AF_INET6, AcceptData, CloseData, Event, EventInfo, OpenData, Owner, ResetData,
    SnapshotData, SockAddrs, SockError, SockoptData, StateChange, kind,
};

use super::*;
use crate::{cmd::trace::TraceRecord, event::jiffies::HzTracker, testing::bytes_of};

/// Renders an event the ways `trace` and the daemon do; must not panic.
fn render(ev: &ConnEvent) {
    let rec = TraceRecord::new(
        ev,
        String::new(),
        |r| r.to_string(),
        &mut HzTracker::new(Some(250)),
    );
    let _ = rec.to_line();
    serde_json::to_string(&rec).expect("a trace record serialises");
}

prop_compose! {
    fn arb_info()(
        ts_ns in any::<u64>(),
        cookie in any::<u64>(),
        pad in any::<u16>(),
        netns in any::<u32>(),
        saddr in array::uniform16(any::<u8>()),
        daddr in array::uniform16(any::<u8>()),
        sport in any::<u16>(),
        dport in any::<u16>(),
        family in prop_oneof![Just(AF_INET), Just(AF_INET6), any::<u16>()],
        state in any::<u8>(),
        ids in array::uniform4(any::<u32>()),
        cgroup_id in any::<u64>(),
        comm in array::uniform16(any::<u8>()),
        flags in any::<u32>(),
    ) -> EventInfo {
        EventInfo {
            ts_ns, cookie, kind: 0, pad, netns,
            sock: SockAddrs { saddr, daddr, sport, dport, family, state, pad: 0 },
            owner: Owner {
                pid: ids[0], tid: ids[1], uid: ids[2], gid: ids[3],
                cgroup_id, comm, flags, pad: 0,
            },
        }
    }
}

prop_compose! {
    fn arb_keepalive()(
        t in array::uniform3(any::<u32>()),
        b in array::uniform4(any::<u8>()),
    ) -> tracer_common::Keepalive {
        tracer_common::Keepalive {
            time_j: t[0], intvl_j: t[1], user_timeout_ms: t[2],
            probes: b[0], enabled: b[1], from_socket: b[2], pad: b[3],
        }
    }
}

prop_compose! {
    fn arb_close()(
        ka in arb_keepalive(),
        ns in array::uniform2(any::<u64>()),
        j in array::uniform4(any::<u32>()),
        b in array::uniform4(any::<u8>()),
        jiffies in any::<u64>(),
        last in array::uniform3(any::<u32>()),
        tail in array::uniform3(any::<u64>()),
        burst in array::uniform2(any::<u64>()),
    ) -> CloseData {
        CloseData {
            ka, established_ns: ns[0], end_ns: ns[1],
            end_j: j[0], end_last_send_j: j[1], end_last_recv_j: j[2],
            first_close_state: b[0], flags: b[1], retransmits: b[2], probes_out: b[3],
            jiffies, last_send_j: last[0], last_recv_j: last[1], last_ack_j: last[2],
            errno: j[3], first_tx_us: tail[0], bytes_received: tail[1], bytes_acked: tail[2],
            soft_errno: last[0] ^ j[0], snd_wnd: last[1] ^ j[1],
            pre_burst_ns: burst[0], burst_start_ns: burst[1], burst_base: last[2] ^ j[2], pad: 0,
        }
    }
}

prop_compose! {
    fn arb_snapshot()(
        ka in arb_keepalive(),
        jiffies in any::<u64>(),
        last in array::uniform3(any::<u32>()),
        b in array::uniform2(any::<u8>()),
        pad in any::<u16>(),
        tail in array::uniform3(any::<u64>()),
    ) -> SnapshotData {
        SnapshotData {
            ka, jiffies, last_send_j: last[0], last_recv_j: last[1], last_ack_j: last[2],
            retransmits: b[0], probes_out: b[1], pad,
            bytes_received: tail[0], bytes_acked: tail[1], ino: tail[2],
        }
    }
}

/// A valid record of one kind: its bytes and what it must decode to.
fn arb_record() -> impl Strategy<Value = (Vec<u8>, ConnEvent)> {
    fn rec<T: Copy>(
        mut info: EventInfo,
        kind: u16,
        data: T,
        want: EventData,
    ) -> (Vec<u8>, ConnEvent) {
        info.kind = kind;
        (
            bytes_of(&Event { info, data }),
            ConnEvent { info, data: want },
        )
    }
    let u32s = || array::uniform2(any::<u32>());
    prop_oneof![
        (
            arb_info(),
            any::<u8>(),
            any::<u8>(),
            array::uniform6(any::<u8>())
        )
            .prop_map(|(i, old_state, new_state, pad)| {
                let d = StateChange {
                    old_state,
                    new_state,
                    pad,
                };
                rec(
                    i,
                    kind::STATE,
                    d,
                    EventData::State {
                        old: old_state,
                        new: new_state,
                    },
                )
            }),
        (arb_info(), u32s()).prop_map(|(i, [reason, pad])| {
            rec(
                i,
                kind::RESET_RECEIVED,
                ResetData { reason, pad },
                EventData::ResetReceived,
            )
        }),
        (arb_info(), u32s()).prop_map(|(i, [reason, pad])| {
            rec(
                i,
                kind::RESET_SENT,
                ResetData { reason, pad },
                EventData::ResetSent { reason },
            )
        }),
        (arb_info(), u32s()).prop_map(|(i, [errno, pad])| {
            rec(
                i,
                kind::SOCK_ERROR,
                SockError { errno, pad },
                EventData::Error { errno },
            )
        }),
        (arb_info(), arb_keepalive(), any::<u64>()).prop_map(|(i, ka, jiffies)| {
            let d = OpenData { ka, jiffies };
            rec(i, kind::OPEN, d, EventData::Open(d))
        }),
        (arb_info(), arb_close()).prop_map(|(i, d)| rec(i, kind::CLOSE, d, EventData::Close(d))),
        (arb_info(), arb_close()).prop_map(|(i, d)| rec(i, kind::END, d, EventData::End(d))),
        (arb_info(), array::uniform4(any::<u32>())).prop_map(
            |(i, [level, optname, value, optlen])| {
                let d = SockoptData {
                    level,
                    optname,
                    value: value as i32,
                    optlen,
                };
                rec(i, kind::SOCKOPT, d, EventData::Sockopt(d))
            }
        ),
        (arb_info(), arb_snapshot())
            .prop_map(|(i, d)| { rec(i, kind::SNAPSHOT, d, EventData::Snapshot(d)) }),
        (arb_info(), u32s()).prop_map(|(i, [fd, pad])| {
            let d = AcceptData { fd, pad };
            rec(i, kind::ACCEPT, d, EventData::Accept(d))
        }),
    ]
}

/// The record size the decoder needs for `kind`, if it knows the kind.
fn need(kind: u16) -> Option<usize> {
    let header = size_of::<EventInfo>();
    Some(
        header
            + match kind {
                kind::STATE => size_of::<StateChange>(),
                kind::RESET_RECEIVED | kind::RESET_SENT => size_of::<ResetData>(),
                kind::SOCK_ERROR => size_of::<SockError>(),
                kind::OPEN => size_of::<OpenData>(),
                kind::CLOSE | kind::END => size_of::<CloseData>(),
                kind::SOCKOPT => size_of::<SockoptData>(),
                kind::SNAPSHOT => size_of::<SnapshotData>(),
                kind::ACCEPT => size_of::<AcceptData>(),
                _ => return None,
            },
    )
}

/// Byte offset of `EventInfo::kind`.
const KIND_AT: usize = std::mem::offset_of!(EventInfo, kind);

proptest! {
    #![proptest_config(crate::fuzzing::config(512))]

    /// Any bytes at all: an error or an event, never a panic; an event
    /// only from a record long enough for its kind.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        match decode(&bytes) {
            Ok(ev) => {
                prop_assert!(bytes.len() >= need(ev.info.kind).expect("a known kind"));
                render(&ev);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Header-sized garbage with a known kind in it reaches every
    /// branch of the decoder, not only the short-header one.
    #[test]
    fn garbage_with_a_known_kind_never_panics(
        mut bytes in prop::collection::vec(any::<u8>(), size_of::<EventInfo>()..400),
        kind in 0u16..=kind::SLOTS as u16,
    ) {
        bytes[KIND_AT..KIND_AT + 2].copy_from_slice(&kind.to_ne_bytes());
        match (decode(&bytes), need(kind)) {
            (Ok(ev), Some(n)) => {
                prop_assert!(bytes.len() >= n);
                prop_assert_eq!(ev.info.kind, kind);
                render(&ev);
            }
            (Err(DecodeError::Truncated { len, need: n, .. }), Some(want)) => {
                prop_assert_eq!((len, n), (bytes.len(), want));
                prop_assert!(bytes.len() < want);
            }
            (Err(DecodeError::UnknownKind { kind: k }), None) => prop_assert_eq!(k, kind),
            (other, need) => prop_assert!(false, "kind {kind}, need {need:?}: {other:?}"),
        }
    }

    /// Every kind, with every field random: decodes to what was encoded,
    /// with ring buffer padding after it or not.
    #[test]
    fn valid_records_decode_to_what_was_encoded(
        (bytes, want) in arb_record(),
        trailer in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        prop_assert_eq!(decode(&bytes), Ok(want));
        let mut padded = bytes.clone();
        padded.extend_from_slice(&trailer);
        prop_assert_eq!(decode(&padded), Ok(want));
        render(&want);
    }

    /// A valid record cut short is an error that says how many bytes the
    /// kind needs, never a partial event.
    #[test]
    fn truncated_records_are_errors((bytes, want) in arb_record(), cut in any::<prop::sample::Index>()) {
        let len = cut.index(bytes.len());
        let header = size_of::<EventInfo>();
        let expected = if len < header {
            DecodeError::ShortHeader { len, need: header }
        } else {
            let DecodeError::Truncated { name, .. } = decode(&bytes[..header]).unwrap_err() else {
                unreachable!("a header alone is truncated for every kind");
            };
            DecodeError::Truncated { name, len, need: bytes.len() }
        };
        prop_assert_eq!(decode(&bytes[..len]), Err(expected));
        prop_assert_eq!(need(want.info.kind), Some(bytes.len()));
    }

    /// A record whose kind was changed (a newer or older kernel program)
    /// is another kind's event, a truncated one, or an unknown kind.
    #[test]
    fn records_with_a_changed_kind_never_panic((mut bytes, want) in arb_record(), kind in any::<u16>()) {
        bytes[KIND_AT..KIND_AT + 2].copy_from_slice(&kind.to_ne_bytes());
        match decode(&bytes) {
            Ok(ev) => {
                prop_assert_eq!(ev.info.kind, kind);
                prop_assert_eq!(ev.info.sock, want.info.sock);
                prop_assert_eq!(ev.info.owner, want.info.owner);
                prop_assert!(bytes.len() >= need(kind).expect("known"));
                render(&ev);
            }
            Err(DecodeError::UnknownKind { kind: k }) => {
                prop_assert_eq!(k, kind);
                prop_assert!(need(kind).is_none());
            }
            Err(DecodeError::Truncated { need: n, .. }) => {
                prop_assert_eq!(Some(n), need(kind));
                prop_assert!(bytes.len() < n);
            }
            Err(e @ DecodeError::ShortHeader { .. }) => prop_assert!(false, "{e}"),
        }
    }

    /// Corrupted fields (any byte but the kind) still decode: every bit
    /// pattern is a valid field value, and the rest is unchanged.
    #[test]
    fn records_with_corrupted_fields_still_decode(
        (mut bytes, want) in arb_record(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let at = at.index(bytes.len());
        prop_assume!(!(KIND_AT..KIND_AT + 2).contains(&at));
        bytes[at] ^= xor;
        let ev = decode(&bytes).expect("still a valid record");
        prop_assert_eq!(ev.info.kind, want.info.kind);
        prop_assert_eq!(ev.kind_name(), want.kind_name());
        if at >= size_of::<EventInfo>() {
            prop_assert_eq!(ev.info, want.info);
        }
        render(&ev);
    }
}
