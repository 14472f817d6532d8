//! A network path with a stateful firewall in the middle, the way a NAT
//! gateway, a cloud firewall or a load balancer forgets idle flows:
//!
//! ```text
//!  client ns                 router ns                      server ns
//!  10.231.1.2/24 ── veth ── 10.231.1.1 | 10.231.2.1 ── veth ── 10.231.2.2/24
//! ```
//!
//! The router forwards between the two links and tracks every flow with
//! conntrack: an ESTABLISHED entry lives `nf_conntrack_tcp_timeout_established`
//! seconds after its last packet (a per-namespace sysctl, set short here),
//! and with `nf_conntrack_tcp_loose=0` a mid-stream packet of a forgotten
//! flow is not picked up again but is INVALID, which the FORWARD rule drops
//! ([`InvalidAction::Drop`]: the sender retransmits into a black hole) or
//! answers with a TCP reset ([`InvalidAction::Reject`]). Keepalive probes
//! sent more often than the timeout keep the entry alive.
//!
//! The 10.231.1.0/24 and 10.231.2.0/24 addresses exist only inside these
//! three namespaces; every packet stays on their veth pairs. Drop deletes
//! the namespaces (and the veths with them).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use crate::{
    NetNs,
    servers::{run_checked, run_in},
};

/// The client's address, on the client-side link.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 2);
/// The router's address on the client-side link (the client's gateway).
pub const ROUTER_CLIENT_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 1, 1);
/// The router's address on the server-side link (the server's gateway).
pub const ROUTER_SERVER_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 1);
/// The server's address, on the server-side link.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 231, 2, 2);

/// What the router does with a packet conntrack calls INVALID (such as the
/// next segment of a flow whose entry expired).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidAction {
    /// Silently drop it: the sender retransmits until its retransmission
    /// limit or TCP_USER_TIMEOUT, then gets ETIMEDOUT.
    Drop,
    /// `REJECT --reject-with tcp-reset`: the sender gets a RST (ECONNRESET).
    Reject,
}

impl InvalidAction {
    fn rule(self) -> Vec<&'static str> {
        let mut rule = vec!["-p", "tcp", "-m", "conntrack", "--ctstate", "INVALID", "-j"];
        match self {
            Self::Drop => rule.push("DROP"),
            Self::Reject => rule.extend(["REJECT", "--reject-with", "tcp-reset"]),
        }
        rule
    }
}

/// Three namespaces joined by two veth pairs, with a conntrack firewall in
/// the middle one. See the module docs.
pub struct NetLab {
    client: NetNs,
    router: NetNs,
    server: NetNs,
}

impl NetLab {
    /// Builds the lab with ESTABLISHED flows forgotten after
    /// `established_timeout_secs` of silence and INVALID packets handled by `action`.
    pub fn new(action: InvalidAction, established_timeout_secs: u32) -> Self {
        let lab = Self {
            client: NetNs::new(),
            router: NetNs::new(),
            server: NetNs::new(),
        };
        // From here on, drop deletes all three namespaces whatever fails next.
        lab.link(&lab.client, CLIENT_IP, ROUTER_CLIENT_SIDE_IP, "ct-c");
        lab.link(&lab.server, SERVER_IP, ROUTER_SERVER_SIDE_IP, "ct-s");
        lab.router.set_sysctl("net.ipv4.ip_forward", "1");
        // No mid-stream pickup: a packet of a forgotten flow is INVALID.
        lab.set_sysctl("net.netfilter.nf_conntrack_tcp_loose", "0");
        lab.set_established_timeout(established_timeout_secs);
        // The rule's conntrack match turns conntrack on in this namespace.
        let mut args = vec!["-w", "5", "-A", "FORWARD"];
        args.extend(action.rule());
        run_in(lab.router.name(), "iptables", &args);
        lab
    }

    /// A veth pair between `end` (as `eth0`, address `ip`/24, default route
    /// via `gateway`) and the router (as `router_if`, address `gateway`/24).
    fn link(&self, end: &NetNs, ip: Ipv4Addr, gateway: Ipv4Addr, router_if: &str) {
        let (e, r) = (end.name(), self.router.name());
        let ip_cmd = |ns: &str, args: &[&str]| {
            run_checked(Command::new("ip").args(["-n", ns]).args(args));
        };
        ip_cmd(
            e,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", router_if, "netns", r,
            ],
        );
        ip_cmd(e, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ip_cmd(e, &["link", "set", "eth0", "up"]);
        ip_cmd(
            r,
            &["addr", "add", &format!("{gateway}/24"), "dev", router_if],
        );
        ip_cmd(r, &["link", "set", router_if, "up"]);
        ip_cmd(e, &["route", "add", "default", "via", &gateway.to_string()]);
    }

    pub fn client(&self) -> &NetNs {
        &self.client
    }

    pub fn router(&self) -> &NetNs {
        &self.router
    }

    pub fn server(&self) -> &NetNs {
        &self.server
    }

    pub fn client_ip(&self) -> IpAddr {
        CLIENT_IP.into()
    }

    pub fn server_ip(&self) -> IpAddr {
        SERVER_IP.into()
    }

    /// Sets a sysctl in the router's namespace and checks it took.
    pub fn set_sysctl(&self, key: &str, value: &str) {
        self.router.set_sysctl(key, value);
        let got = self.sysctl(key);
        assert_eq!(got, value, "sysctl {key} in the router's namespace");
    }

    /// A sysctl's value in the router's namespace.
    pub fn sysctl(&self, key: &str) -> String {
        run_in(self.router.name(), "sysctl", &["-n", key])
            .trim()
            .to_owned()
    }

    /// Seconds an ESTABLISHED flow is remembered after its last packet.
    pub fn set_established_timeout(&self, secs: u32) {
        self.set_sysctl(
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            &secs.to_string(),
        );
    }

    /// Switches what happens to INVALID packets. The new rule goes in
    /// before the old one leaves, so conntrack stays on throughout.
    pub fn set_action(&self, action: InvalidAction) {
        let r = self.router.name();
        let mut args = vec!["-w", "5", "-I", "FORWARD", "1"];
        args.extend(action.rule());
        run_in(r, "iptables", &args);
        run_in(r, "iptables", &["-w", "5", "-D", "FORWARD", "2"]);
    }

    /// The router's conntrack table, one `conntrack -L` line per flow.
    pub fn conntrack_entries(&self) -> Vec<String> {
        run_in(self.router.name(), "conntrack", &["-L"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Packets the INVALID rule has dropped or rejected so far: the
    /// network's own count of what it killed.
    pub fn invalid_packets(&self) -> u64 {
        let out = run_in(
            self.router.name(),
            "iptables",
            &["-w", "5", "-L", "FORWARD", "-v", "-x", "-n"],
        );
        out.lines()
            .filter(|l| l.contains("ctstate INVALID"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}
