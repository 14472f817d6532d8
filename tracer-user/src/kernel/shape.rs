//! The shape of the running kernel: which tracepoints it has with the
//! arguments the programs read (from BTF), and which helpers tracing
//! programs may call there (from feature probes); what each gap costs.

use tracer_common::{
    DEFAULT_STATE_HASH_ENTRIES, NO_ARG, RESET_REASON_ARG, TracerConfig, state_store,
};

use super::offsets::{self, OffsetsError, TpArg};

/// What a tracepoint program reads of its tracepoint's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArgUse {
    /// Argument 0 is the socket (`struct sock *`).
    Sock,
    /// Argument 0 is the socket, 1 and 2 the old and new state (`int`).
    SockStates,
    /// Argument 0 is the socket, 1 the segment (`struct sk_buff *`).
    SockSkb,
}

/// One BTF tracepoint program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hook {
    pub program: &'static str,
    pub tracepoint: &'static str,
    pub what: &'static str,
    /// Without it the tracer cannot run; else the feature degrades.
    pub required: bool,
    pub args: ArgUse,
    /// What is lost where the kernel lacks the tracepoint.
    pub without: &'static str,
}

/// The BTF tracepoint programs.
pub(crate) const PROGRAMS: &[Hook] = &[
    Hook {
        program: "inet_sock_set_state",
        tracepoint: "inet_sock_set_state",
        what: "TCP state transitions and socket owners",
        required: true,
        args: ArgUse::SockStates,
        without: "",
    },
    Hook {
        program: "tcp_receive_reset",
        tracepoint: "tcp_receive_reset",
        what: "resets received",
        required: false,
        args: ArgUse::Sock,
        without: "resets received are not seen as they arrive: a connection ended by a reset \
                  is told from its error (ECONNRESET) at close",
    },
    Hook {
        program: "tcp_send_reset",
        tracepoint: "tcp_send_reset",
        what: "resets sent",
        required: false,
        args: ArgUse::Sock,
        without: "resets this host sends are not seen",
    },
    Hook {
        program: "inet_sk_error_report",
        tracepoint: "inet_sk_error_report",
        what: "socket errors",
        required: false,
        args: ArgUse::Sock,
        without: "`trace` shows no live socket-error events (the tracepoint is Linux 5.14+); \
                  each connection's close summary still carries its error (sk_err), but a \
                  connect whose ICMP error the application read and cleared (SO_ERROR) \
                  before giving up is not counted as a connect failure",
    },
    Hook {
        program: "tcp_probe",
        tracepoint: "tcp_probe",
        what: "received payload (the peer's last burst before its FIN)",
        required: false,
        args: ArgUse::SockSkb,
        without: "a goodbye message a server writes right before its FIN (MySQL 8 error 4031, \
                  PostgreSQL's idle-session FATAL, an HTTP/2 GOAWAY) ends the idle time: \
                  such idle kills are reported with the idle time after the message",
    },
];

/// Whether every name in `skip` is an optional program; else the message
/// that names the ones that may be skipped.
pub(crate) fn check_skippable(skip: &[String]) -> Result<(), String> {
    let optional: Vec<&str> = PROGRAMS
        .iter()
        .filter(|h| !h.required)
        .map(|h| h.program)
        .collect();
    match skip.iter().find(|p| !optional.contains(&p.as_str())) {
        None => Ok(()),
        Some(p) => Err(format!(
            "{p} is not an optional kernel program (those are: {})",
            optional.join(", ")
        )),
    }
}

/// Set to 1, the programs use what kernels before 5.11 offer (no socket
/// storage or cookies in tracing programs) on any kernel: for tests of
/// those fallbacks on a newer kernel.
pub(crate) const OLD_HELPERS_ENV: &str = "CONN_TRACER_OLD_HELPERS";

/// Set to 1, every program is loaded and attached but disarmed: each
/// returns at once (the socket-option programs after the fix-ups every call
/// needs), so nothing is traced. For the benchmark's floor: what the hooks
/// cost any tracer that uses them, before it does any work.
pub(crate) const DISARMED_ENV: &str = "CONN_TRACER_DISARMED";

/// Whether test switch `name` ([`OLD_HELPERS_ENV`], [`DISARMED_ENV`]) is set to 1.
pub(crate) fn switch_on(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// What the running kernel offers the programs, from its BTF and from
/// feature probes. The programs branch on it (the `CONFIG` global).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KernelShape {
    /// Hooks whose tracepoint exists with the arguments the program reads.
    pub hooks: Vec<Hook>,
    /// Hooks left out, with why.
    pub missing_hooks: Vec<(Hook, String)>,
    /// Position of `tcp_send_reset`'s `enum sk_rst_reason` argument (6.10+).
    pub reset_reason_arg: Option<u32>,
    /// `bpf_sk_storage_get` works in tracing programs (5.11+).
    pub sk_storage: bool,
    /// `bpf_get_socket_cookie` works in tracing programs (5.12+).
    pub socket_cookie: bool,
    /// The setsockopt program may ask for the task's pid and name (5.11+).
    pub sockopt_task: bool,
}

/// One way this kernel makes the tracer see less, and what is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Degradation {
    pub feature: String,
    pub lost: String,
}

impl KernelShape {
    /// Reads the tracepoints' prototypes from BTF. Fails when a required
    /// one is missing or has other arguments than the program reads.
    /// `skip`: optional programs left out on purpose (the `skip_programs`
    /// setting, checked by [`check_skippable`]).
    pub(crate) fn from_btf(btf: &btf_rs::Btf, skip: &[String]) -> Result<Self, OffsetsError> {
        let mut shape = Self {
            hooks: Vec::new(),
            missing_hooks: Vec::new(),
            reset_reason_arg: None,
            sk_storage: true,
            socket_cookie: true,
            sockopt_task: true,
        };
        for hook in PROGRAMS {
            if !hook.required && skip.iter().any(|p| p == hook.program) {
                let why = "left out by the skip_programs setting".to_string();
                shape.missing_hooks.push((*hook, why));
                continue;
            }
            let why = match offsets::tracepoint_args(btf, hook.tracepoint)? {
                None => format!(
                    "this kernel has no tracepoint {} (no btf_trace_{0} in BTF)",
                    hook.tracepoint
                ),
                Some(args) => match args_fit(hook.args, &args) {
                    Ok(()) => {
                        if hook.program == "tcp_send_reset" {
                            // Read from one position only (see the program).
                            shape.reset_reason_arg = args
                                .iter()
                                .position(|a| *a == TpArg::Enum("sk_rst_reason".into()))
                                .and_then(|i| u32::try_from(i).ok())
                                .filter(|&i| i == RESET_REASON_ARG);
                        }
                        shape.hooks.push(*hook);
                        continue;
                    }
                    Err(why) => why,
                },
            };
            if hook.required {
                return Err(OffsetsError::NoTracepoint {
                    typedef: format!("btf_trace_{}", hook.tracepoint),
                    tracepoint: hook.tracepoint.to_string(),
                    what: format!("{} ({why})", hook.what),
                });
            }
            shape.missing_hooks.push((*hook, why));
        }
        Ok(shape)
    }

    /// The load-time switches for this shape.
    /// `capture_ports`: (outbound, inbound) of the mesh, for the accept
    /// program. `wake_bytes`: see [`TracerConfig::wake_bytes`].
    pub(super) fn config(
        &self,
        verbose: bool,
        id_secret: u64,
        capture_ports: (u16, u16),
        wake_bytes: u32,
    ) -> TracerConfig {
        TracerConfig {
            verbose: u32::from(verbose),
            state_store: if self.sk_storage {
                state_store::SK_STORAGE
            } else {
                state_store::HASH
            },
            cookie_helper: u32::from(self.socket_cookie),
            reset_reason_arg: self.reset_reason_arg.unwrap_or(NO_ARG),
            id_secret,
            sockopt_task: u32::from(self.sockopt_task),
            outbound_capture_port: capture_ports.0,
            inbound_capture_port: capture_ports.1,
            // The programs need a power of two (they compare bits).
            wake_bytes: wake_bytes.checked_ilog2().map_or(0, |bits| 1 << bits),
            pad: 0,
        }
    }

    /// What this kernel costs the tracer, feature by feature.
    pub(crate) fn degradations(&self) -> Vec<Degradation> {
        let mut out = Vec::new();
        for (hook, why) in &self.missing_hooks {
            out.push(Degradation {
                feature: format!("tracepoint {}", hook.tracepoint),
                lost: format!("{why}: {}", hook.without),
            });
        }
        if self.hooks.iter().any(|h| h.program == "tcp_send_reset")
            && self.reset_reason_arg.is_none()
        {
            out.push(Degradation {
                feature: "reset reasons".into(),
                lost: "tcp_send_reset has no reason argument before Linux 6.10: resets sent \
                       carry no reason"
                    .into(),
            });
        }
        if !self.sk_storage {
            out.push(Degradation {
                feature: "socket storage in tracing programs".into(),
                lost: format!(
                    "not before Linux 5.11: socket owners and lifecycle facts are kept in a map \
                     keyed by the socket's address instead (at most {DEFAULT_STATE_HASH_ENTRIES} \
                     sockets at once; more are counted in conntracer_events_lost_total and \
                     reported without owner); accepted sockets take the owner of the listener \
                     on their namespace and port (with SO_REUSEPORT listeners of different \
                     processes on one port, the newest one's); keepalive options set with \
                     setsockopt are counted but not tied to their connection (its close \
                     summary reads them from the socket either way)"
                ),
            });
        }
        if !self.sockopt_task {
            out.push(Degradation {
                feature: "task of setsockopt calls".into(),
                lost: "cgroup programs cannot ask for the calling task before Linux 5.11: \
                       keepalive options set with setsockopt are attributed by cgroup (pod, \
                       container) and uid, with no pid or process name"
                    .into(),
            });
        }
        if !self.socket_cookie {
            out.push(Degradation {
                feature: "socket cookies in tracing programs".into(),
                lost: "not before Linux 5.12: connection ids are made from the socket's \
                       address and creation time (mixed with a random key), not the kernel's \
                       cookie; a socket older than the tracer has one from its address alone, \
                       which a later socket at the same address can repeat"
                    .into(),
            });
        }
        out
    }
}

/// Whether a tracepoint's arguments are what a program reads.
fn args_fit(uses: ArgUse, args: &[TpArg]) -> Result<(), String> {
    let sock = TpArg::Ptr("sock".into());
    let ok = match uses {
        ArgUse::Sock => args.first() == Some(&sock),
        ArgUse::SockSkb => {
            args.len() >= 2 && args[0] == sock && args[1] == TpArg::Ptr("sk_buff".into())
        }
        ArgUse::SockStates => {
            args.len() >= 3
                && args[0] == sock
                && args[1] == TpArg::Int(4)
                && args[2] == TpArg::Int(4)
        }
    };
    if ok {
        Ok(())
    } else {
        let want = match uses {
            ArgUse::Sock => "(struct sock *, ...)",
            ArgUse::SockSkb => "(struct sock *, struct sk_buff *, ...)",
            ArgUse::SockStates => "(struct sock *, int32, int32, ...)",
        };
        let have: Vec<String> = args.iter().map(ToString::to_string).collect();
        Err(format!(
            "its arguments are ({}), the program reads {want}",
            have.join(", ")
        ))
    }
}
