use std::net::{IpAddr, Ipv4Addr};

use tracer_common::{Owner, owner_flags};

use super::*;

#[test]
fn direction_from_owner_or_port() {
    let eph = 32768..=60999;
    let mut o = Owner {
        flags: owner_flags::KNOWN | owner_flags::INHERITED,
        ..Owner::default()
    };
    assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
    o.flags = owner_flags::KNOWN;
    assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
    o.flags = 0;
    assert_eq!(direction(&o, 40000, &eph), Direction::Outbound);
    assert_eq!(direction(&o, 3306, &eph), Direction::Inbound);
}

#[test]
fn peer_labels_are_bounded_by_construction() {
    let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 7).into();
    assert_eq!(peer_label(v4, 3306, Direction::Outbound), "10.0.0.7:3306");
    assert_eq!(peer_label(v4, 51234, Direction::Inbound), "10.0.0.7");
    let mapped: IpAddr = Ipv4Addr::LOCALHOST.to_ipv6_mapped().into();
    assert_eq!(
        peer_label(mapped, 6379, Direction::Outbound),
        "127.0.0.1:6379"
    );
    let v6: IpAddr = "fd00::1".parse().unwrap();
    assert_eq!(peer_label(v6, 80, Direction::Outbound), "[fd00::1]:80");
    assert_eq!(
        Endpoint::new(v6, 80).canonical().to_string(),
        "[fd00::1]:80"
    );
}

/// Tracker tests: kernel-exact records (see [`crate::testing`]), decoded
/// as the daemon decodes them.
mod tracker {
    use std::time::Duration;

    use tracer_common::{owner_flags, tcp_state};

    use super::super::{Direction, MeshEnd, Outcome, Tracker, chains::Origin};
    use crate::{
        config::Config,
        event::ConnEvent,
        owner::attribute::Attributor,
        testing::{
            self, NETNS, T0_NS, decoded,
            mesh::{DB_IP, MeshPod},
        },
    };

    const S: u64 = 1_000_000_000;

    fn host_tracker(cfg: &Config) -> Tracker {
        Tracker::new(cfg, Attributor::host_only())
    }

    fn closed(outcome: Outcome) -> Box<super::super::Closed> {
        match outcome {
            Outcome::Closed(c) => c,
            other => panic!("not a close: {other:?}"),
        }
    }

    #[test]
    fn accepted_sockets_inherit_the_owner_of_a_listener_older_than_the_daemon() {
        let mut t = host_tracker(&Config::default());
        // The listener on 8080 predates the daemon: the snapshot names its owner.
        let mut listener = testing::snapshot(T0_NS, false, 0);
        listener.info.sock.state = tcp_state::LISTEN;
        listener.info.owner.flags = owner_flags::KNOWN | owner_flags::LISTENER;
        listener.info.cookie = 10;
        assert_eq!(t.resync(&[decoded(&listener)], T0_NS).gone, 0);

        // An accept whose socket carries no owner: the kernel had none for
        // the listener. In the listener's netns it inherits; in another not.
        let mut accepted = testing::open(T0_NS + S, false, 40000);
        accepted.info.cookie = 11;
        accepted.info.owner = tracer_common::Owner::default();
        let mut elsewhere = accepted;
        elsewhere.info.cookie = 12;
        elsewhere.info.netns = NETNS + 1;
        t.handle(&decoded(&accepted));
        t.handle(&decoded(&elsewhere));

        let owner = t.table.get(11).expect("tracked").info.owner;
        assert_eq!((owner.pid, owner.comm_str().as_str()), (4343, "server"));
        assert!(owner.is_known() && owner.is_inherited());
        assert!(!t.table.get(12).expect("tracked").info.owner.is_known());
        let info = t.table.get(11).unwrap().info;
        assert_eq!(t.direction(&info), Direction::Inbound);
        assert_eq!(t.peer(&info, Direction::Inbound), "127.0.0.1");

        // Its close is attributed with the owner as at open, though the
        // close record has none either.
        let mut close = testing::close(T0_NS + 2 * S, false, 40000, false);
        close.info.cookie = 11;
        close.info.owner = tracer_common::Owner::default();
        let c = closed(t.handle(&decoded(&close)));
        assert_eq!((c.info.owner.pid, c.dir), (4343, Direction::Inbound));
        assert!(t.table.get(11).is_none());
    }

    #[test]
    fn sockets_the_kernel_saw_accepted_keep_their_inherited_owner() {
        let mut t = host_tracker(&Config::default());
        for (cookie, outbound) in [(1, true), (2, false)] {
            let mut open = testing::open(T0_NS, outbound, 40000);
            open.info.cookie = cookie;
            t.handle(&decoded(&open));
        }
        let client = t.table.get(1).unwrap().info;
        let server = t.table.get(2).unwrap().info;
        assert_eq!(t.direction(&client), Direction::Outbound);
        assert_eq!(t.peer(&client, Direction::Outbound), "127.0.0.1:8080");
        assert_eq!(t.direction(&server), Direction::Inbound);
        assert_eq!(
            (server.owner.pid, server.owner.is_inherited()),
            (4343, true)
        );
    }

    /// A host tracker whose table holds 3 connections, after connections
    /// 1 to `n` opened (the oldest evicted past 3).
    fn three_after_opens(n: u64) -> Tracker {
        let mut t = host_tracker(&Config {
            max_connections: 3,
            ..Config::default()
        });
        for cookie in 1..=n {
            t.handle(&open(cookie, T0_NS));
        }
        t
    }

    /// The open of outbound connection `cookie` (local port 40000 + cookie).
    fn open(cookie: u64, ns: u64) -> ConnEvent {
        let mut open = testing::open(ns, true, 40000 + cookie as u16);
        open.info.cookie = cookie;
        decoded(&open)
    }

    #[test]
    fn resync_drops_missed_closes_and_re_adds_evicted_connections() {
        let mut t = three_after_opens(4);
        assert_eq!((t.table.len(), t.table.evicted), (3, 1));
        assert!(t.table.get(1).is_none(), "the oldest was evicted");
        let mut close4 = testing::close(T0_NS, true, 40004, false);
        close4.info.cookie = 4;
        t.handle(&decoded(&close4));

        // The kernel still has 1 and 2; 3's close was lost.
        let snap: Vec<_> = [1, 2]
            .map(|cookie| {
                let mut s = testing::snapshot(T0_NS + S, true, 40000 + cookie as u16);
                s.info.cookie = cookie;
                s.data.ka.enabled = 1;
                decoded(&s)
            })
            .into();
        assert_eq!(t.resync(&snap, T0_NS + S).gone, 1, "3 was gone");
        assert!(t.table.get(3).is_none());
        let readded = t.table.get(1).expect("re-added from the snapshot");
        assert!(!readded.opened);
        assert_eq!(readded.info.sock.sport, 40001);
        assert_eq!((readded.info.owner.pid, readded.ka.enabled), (4242, 1));
        let kept = t.table.get(2).expect("kept");
        assert!(kept.opened, "what the daemon saw open stays as it saw it");
        assert_eq!(kept.ka.enabled, 0);

        // 5 opens while the next snapshot is taken: it is not in it, and stays.
        t.handle(&open(5, T0_NS + 3 * S));
        assert_eq!(t.resync(&snap, T0_NS + 2 * S).gone, 0);
        assert!(t.table.get(5).is_some(), "opened after the snapshot began");
        assert_eq!(t.table.len(), 3);

        // 3's close arriving after all is still classified, from its own record.
        let mut close3 = testing::close(T0_NS + 3 * S, true, 40003, false);
        close3.info.cookie = 3;
        let c = closed(t.handle(&decoded(&close3)));
        assert_eq!((c.info.sock.sport, c.dir), (40003, Direction::Outbound));
    }

    #[test]
    fn resync_looks_in_proc_once_for_a_socket_no_process_holds() {
        let mut t = host_tracker(&Config::default());
        // An orphan (no process holds it): unknown owner, an inode no
        // descriptor links to.
        let orphan = |ino: u64| {
            let mut s = testing::snapshot(T0_NS + S, true, 40100);
            s.info.cookie = 77;
            s.info.owner = tracer_common::Owner::default();
            s.data.ino = ino;
            decoded(&s)
        };
        let ino = u64::from(u32::MAX) + 12_345;
        t.resync(&[orphan(ino)], T0_NS + S);
        assert_eq!(
            t.proc_seen.get(&ino),
            Some(&None),
            "remembered as held by no process"
        );
        t.resync(&[orphan(ino)], T0_NS + 2 * S);
        assert_eq!(
            t.proc_seen.get(&ino),
            Some(&None),
            "kept while the socket lives"
        );
        t.resync(&[], T0_NS + 3 * S);
        assert!(t.proc_seen.is_empty(), "forgotten with the socket");

        // A socket of this very process: found once, then kept (a listener
        // older than the daemon is not in the table to remember it).
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).expect("fd link");
        let ino = crate::owner::procfs::socket_inode(&link.to_string_lossy()).expect("socket");
        let listener = |ino: u64| {
            let mut ev = orphan(ino);
            ev.info.sock.state = tcp_state::LISTEN;
            ev
        };
        t.resync(&[listener(ino)], T0_NS + 4 * S);
        let found = t
            .proc_seen
            .get(&ino)
            .copied()
            .flatten()
            .expect("found in /proc");
        assert_eq!(found.pid, std::process::id());
        drop(l);
        t.resync(&[listener(ino)], T0_NS + 5 * S);
        let kept = t.proc_seen.get(&ino).copied().flatten();
        assert_eq!(kept.map(|o| o.pid), Some(found.pid), "not looked for again");
    }

    #[test]
    fn resync_into_a_full_table_does_not_evict_to_re_add() {
        let mut t = three_after_opens(5);
        assert_eq!((t.table.len(), t.table.evicted), (3, 2));
        // The kernel has all five: the two evicted stay out, resync after
        // resync, and nothing more is evicted.
        let snap: Vec<_> = (1..=5u64)
            .map(|cookie| {
                let mut s = testing::snapshot(T0_NS + S, true, 40000 + cookie as u16);
                s.info.cookie = cookie;
                decoded(&s)
            })
            .collect();
        for _ in 0..3 {
            let r = t.resync(&snap, T0_NS + S);
            assert_eq!((r.gone, r.not_added), (0, 2), "1 and 2 left out");
            assert_eq!((t.table.len(), t.table.evicted), (3, 2));
            assert!(t.table.get(1).is_none() && t.table.get(2).is_none());
        }
    }

    #[test]
    fn chain_links_the_app_sidecar_and_upstream_legs_and_labels_the_apps_pod() {
        let mesh = MeshPod::new("chain");
        let cfg = Config {
            idle_threshold: Duration::from_mins(1),
            ..Config::default()
        };
        let mut t = Tracker::new(&cfg, mesh.attributor());
        let [app, accept, upstream] = mesh.outbound_chain(0, 40000, DB_IP);
        for sock in [app, accept, upstream] {
            t.handle(&decoded(&sock.open(T0_NS)));
        }
        let chain = t.chains.chain_of(upstream.cookie).expect("linked").clone();
        assert_eq!(
            (chain.app, chain.sidecar_app_side, chain.sidecar_net_side),
            (1, Some(2), Some(3))
        );
        assert_eq!(chain.direction, Direction::Outbound);
        assert_eq!(
            t.chain_labels(&chain),
            Some(("shop".into(), "cart-1".into(), "db/redis-0".into()))
        );

        // The database closes the upstream leg first; the sidecar then
        // closes the app's connection.
        assert!(
            closed(t.handle(&decoded(&upstream.close(T0_NS + S, true))))
                .mesh_end
                .is_none()
        );
        assert!(
            closed(t.handle(&decoded(&accept.close(T0_NS + 2 * S, false))))
                .mesh_end
                .is_none()
        );
        let last = closed(t.handle(&decoded(&app.close(T0_NS + 3 * S, true))));
        let Some(MeshEnd::Chain(end)) = last.mesh_end else {
            panic!("the chain ended with its last leg");
        };
        assert_eq!(
            (end.origin, end.upstream_keepalive),
            (Origin::Upstream, false)
        );
        assert_eq!(
            (last.attr.pod.as_str(), last.attr.container.as_str()),
            ("cart-1", "app")
        );
        assert!(t.chains.is_empty() && t.table.is_empty());
    }

    /// A daemon restarted under an open chain finds it again from the
    /// kernel's sockets at its resync; a chain whose socket went away
    /// without a close is forgotten there too.
    #[test]
    fn resync_rebuilds_chains_from_the_kernels_sockets() {
        let mesh = MeshPod::new("resync-chain");
        let mut t = Tracker::new(&Config::default(), mesh.attributor());
        let legs = mesh.outbound_chain(0, 40000, DB_IP);
        // The iterator's order is not the creation order; inodes are.
        let snap: Vec<_> = [(2, 11), (3, 12), (1, 10)]
            .map(|(i, ino)| {
                let mut s = legs[i - 1].snapshot(T0_NS, ino);
                s.data.ka.enabled = u8::from(i == 1);
                decoded(&s)
            })
            .into();
        t.resync(&snap, T0_NS);
        let chain = t.chains.chain_of(1).expect("rebuilt").clone();
        assert_eq!(
            (chain.sidecar_app_side, chain.sidecar_net_side),
            (Some(2), Some(3))
        );
        assert_eq!(t.chains.len(), 1);
        // Again: nothing doubles.
        t.resync(&snap, T0_NS + S);
        assert_eq!((t.chains.len(), t.chains.pending()), (1, 0));
        // The upstream socket is gone, its close lost: no chain is left.
        t.resync(&snap[..1], T0_NS + 2 * S);
        assert!(t.chains.chain_of(1).is_none());
    }

    #[test]
    fn chains_to_an_address_outside_the_pods_are_labelled_with_it() {
        let mesh = MeshPod::new("chain-ip");
        let mut t = Tracker::new(&Config::default(), mesh.attributor());
        let far = std::net::Ipv4Addr::new(192, 0, 2, 9);
        for sock in mesh.outbound_chain(10, 40100, far) {
            t.handle(&decoded(&sock.open(T0_NS)));
        }
        let chain = t.chains.chain_of(11).expect("linked").clone();
        assert_eq!(
            t.chain_labels(&chain).map(|(_, _, peer)| peer).as_deref(),
            Some("192.0.2.9:6379")
        );

        // Without pods, the same sockets make no chain.
        let mut host = host_tracker(&Config::default());
        for sock in mesh.outbound_chain(10, 40100, far) {
            host.handle(&decoded(&sock.open(T0_NS)));
        }
        assert!(host.chains.is_empty());
        assert_eq!(host.table.len(), 3);
    }
}
