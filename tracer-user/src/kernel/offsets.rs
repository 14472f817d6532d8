//! Kernel struct field offsets, read from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the offsets the kernel programs
//! need are resolved here, checked for the size the programs read, and handed
//! over as the `OFFSETS` load-time global. Nothing is taken from one kernel.

use std::{collections::HashMap, path::Path};

use btf_rs::{Btf, Type};
use tracer_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub(crate) enum OffsetsError {
    #[error(
        "cannot read kernel BTF at {path}: {error}. conn-tracer reads the kernel's struct \
         layouts and tracepoint types from it: a kernel built with CONFIG_DEBUG_INFO_BTF=y (most \
         distribution kernels since 5.8) publishes it at /sys/kernel/btf/vmlinux; point --btf \
         (or `btf` in the config file) at that file, or run a kernel that has it"
    )]
    Read {
        path: String,
        // Not `source`: the message already says it, and a chain would
        // repeat it.
        error: btf_rs::Error,
    },
    #[error(
        "kernel BTF has no struct {0}, which conn-tracer needs to read sockets: if this file is \
         not the running kernel's complete BTF (a module's split BTF, a stripped or foreign \
         file), point --btf at /sys/kernel/btf/vmlinux; otherwise this kernel is not supported \
         (please report it)"
    )]
    NoStruct(String),
    #[error(
        "kernel BTF has no {typedef}: this kernel lacks the BTF tracepoint {tracepoint}, which \
         conn-tracer needs for {what}; if this file is not the running kernel's BTF, point --btf \
         at /sys/kernel/btf/vmlinux, else a newer kernel is needed (`conn-tracer check` lists \
         every requirement)"
    )]
    NoTracepoint {
        typedef: String,
        tracepoint: String,
        what: String,
    },
    #[error(
        "kernel BTF: struct {strukt} has no field {field}: this kernel is not supported (please report it)"
    )]
    NoField { strukt: String, field: String },
    #[error(
        "kernel BTF: {strukt}.{field} is {found} bytes, the tracer reads {want}: this kernel \
         layout is not supported (please report it)"
    )]
    Size {
        strukt: String,
        field: String,
        found: usize,
        want: usize,
    },
    #[error("kernel BTF: {strukt}.{field} is a bitfield, the tracer cannot read it")]
    Bitfield { strukt: String, field: String },
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// Reads the BTF file at `path`.
pub(crate) fn load_btf(path: &Path) -> Result<Btf, OffsetsError> {
    Btf::from_file(path).map_err(|error| OffsetsError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// A field found by [`field`]: its byte offset from the start of the outer
/// struct and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field {
    pub offset: u32,
    pub size: usize,
}

/// Strips typedefs and qualifiers.
fn resolve(btf: &Btf, mut ty: Type) -> Result<Type, OffsetsError> {
    // Bounded: BTF chains are short; a cycle would be malformed BTF.
    for _ in 0..32 {
        ty = match ty {
            Type::Typedef(ref t) => btf.resolve_chained_type(t)?,
            Type::Volatile(ref t) | Type::Const(ref t) | Type::Restrict(ref t) => {
                btf.resolve_chained_type(t)?
            }
            Type::TypeTag(ref t) => btf.resolve_chained_type(t)?,
            other => return Ok(other),
        };
    }
    Err(btf_rs::Error::Format("type chain too long".into()).into())
}

/// Size in bytes of a (resolved) type, where the tracer needs one.
fn size_of_type(btf: &Btf, ty: &Type) -> Result<usize, OffsetsError> {
    Ok(match resolve(btf, ty.clone())? {
        Type::Int(i) => i.size(),
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Enum(e) => e.size(),
        Type::Enum64(e) => e.size(),
        Type::Ptr(_) => 8,
        Type::Array(a) => {
            let elem = btf.resolve_chained_type(&a)?;
            a.len() * size_of_type(btf, &elem)?
        }
        _ => 0,
    })
}

/// Looks `name` up among the members of `s`, descending into anonymous
/// structs and unions. Returns the member's bit offset, bitfield size, type.
fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    name: &str,
    depth: u32,
) -> Result<Option<(u32, u32, Type)>, OffsetsError> {
    if depth > 8 {
        return Ok(None);
    }
    for m in &s.members {
        let mname = btf.resolve_name(m)?;
        let mty = btf.resolve_chained_type(m)?;
        let bitfield = m.bitfield_size().unwrap_or(0);
        if mname == name {
            return Ok(Some((m.bit_offset(), bitfield, mty)));
        }
        if mname.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = resolve(btf, mty)?
            && let Some((off, bf, t)) = find_member(btf, &inner, name, depth + 1)?
        {
            return Ok(Some((m.bit_offset() + off, bf, t)));
        }
    }
    Ok(None)
}

/// Byte offset and size of `path` (e.g. `["ns", "inum"]`) inside struct
/// `strukt`.
pub(crate) fn field(btf: &Btf, strukt: &str, path: &[&str]) -> Result<Field, OffsetsError> {
    let types = btf.resolve_types_by_name(strukt).unwrap_or_default();
    // Several types may share a name (a struct and a function, say); take
    // the first struct that has a body.
    let mut current = types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
        .ok_or_else(|| OffsetsError::NoStruct(strukt.to_string()))?;
    let mut bits = 0u32;
    let dotted = path.join(".");
    for (i, name) in path.iter().enumerate() {
        let no_field = || OffsetsError::NoField {
            strukt: strukt.to_string(),
            field: dotted.clone(),
        };
        let (off, bitfield, ty) = find_member(btf, &current, name, 0)?.ok_or_else(no_field)?;
        if bitfield != 0 {
            return Err(OffsetsError::Bitfield {
                strukt: strukt.to_string(),
                field: dotted,
            });
        }
        bits += off;
        if i + 1 == path.len() {
            if !bits.is_multiple_of(8) {
                return Err(OffsetsError::Bitfield {
                    strukt: strukt.to_string(),
                    field: dotted,
                });
            }
            let size = size_of_type(btf, &ty)?;
            return Ok(Field {
                offset: bits / 8,
                size,
            });
        }
        current = match resolve(btf, ty)? {
            Type::Struct(s) | Type::Union(s) => s,
            _ => return Err(no_field()),
        };
    }
    Err(OffsetsError::NoField {
        strukt: strukt.to_string(),
        field: dotted,
    })
}

fn size_error(strukt: &str, path: &[&str], found: usize, want: usize) -> OffsetsError {
    OffsetsError::Size {
        strukt: strukt.to_string(),
        field: path.join("."),
        found,
        want,
    }
}

/// Like [`field`], and checks that the field is `want` bytes wide.
fn sized(btf: &Btf, strukt: &str, path: &[&str], want: usize) -> Result<u32, OffsetsError> {
    let f = field(btf, strukt, path)?;
    if f.size != want {
        return Err(size_error(strukt, path, f.size, want));
    }
    Ok(f.offset)
}

/// Like [`sized`] for an integer the programs read only the low `want`
/// bytes of (little-endian): older kernels keep some per-namespace sysctls
/// as `int` where newer ones have `u8` (`sysctl_tcp_keepalive_probes`
/// before 5.15), and their values fit either way.
fn sized_low(btf: &Btf, strukt: &str, path: &[&str], want: usize) -> Result<u32, OffsetsError> {
    let f = field(btf, strukt, path)?;
    if f.size < want || !matches!(f.size, 1 | 2 | 4 | 8) {
        return Err(size_error(strukt, path, f.size, want));
    }
    Ok(f.offset)
}

/// One argument of a BTF tracepoint as its prototype declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TpArg {
    /// A pointer to the named struct (empty for `void *` or an unnamed type).
    Ptr(String),
    /// An integer of this many bytes.
    Int(usize),
    /// A value of the named enum.
    Enum(String),
    /// Anything else, described.
    Other(String),
}

impl std::fmt::Display for TpArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ptr(s) if s.is_empty() => write!(f, "void *"),
            Self::Ptr(s) => write!(f, "struct {s} *"),
            Self::Int(n) => write!(f, "int{}", n * 8),
            Self::Enum(e) => write!(f, "enum {e}"),
            Self::Other(o) => write!(f, "{o}"),
        }
    }
}

fn describe_arg(btf: &Btf, ty: Type) -> Result<TpArg, OffsetsError> {
    Ok(match resolve(btf, ty)? {
        Type::Ptr(p) => match resolve(btf, btf.resolve_chained_type(&p)?)? {
            Type::Struct(s) => TpArg::Ptr(btf.resolve_name(&s)?),
            _ => TpArg::Ptr(String::new()),
        },
        Type::Int(i) => TpArg::Int(i.size()),
        Type::Enum(e) => TpArg::Enum(btf.resolve_name(&e)?),
        Type::Enum64(e) => TpArg::Enum(btf.resolve_name(&e)?),
        other => TpArg::Other(format!("{other:?}").chars().take(40).collect()),
    })
}

/// The arguments of BTF tracepoint `tp` (what a `tp_btf` program can read
/// as `ctx.arg(0..)`), from the prototype of `btf_trace_<tp>` minus its
/// leading `void *__data`. `None` when the kernel lacks the tracepoint.
pub(crate) fn tracepoint_args(btf: &Btf, tp: &str) -> Result<Option<Vec<TpArg>>, OffsetsError> {
    let typedef = format!("btf_trace_{tp}");
    let Some(ty) = btf
        .resolve_types_by_name(&typedef)
        .unwrap_or_default()
        .into_iter()
        .find(|t| matches!(t, Type::Typedef(_)))
    else {
        return Ok(None);
    };
    let malformed = || btf_rs::Error::Format(format!("{typedef} is not a function pointer"));
    let Type::Ptr(ptr) = resolve(btf, ty)? else {
        return Err(malformed().into());
    };
    let Type::FuncProto(proto) = resolve(btf, btf.resolve_chained_type(&ptr)?)? else {
        return Err(malformed().into());
    };
    let mut args = Vec::new();
    for p in proto.parameters.iter().skip(1) {
        if p.is_variadic() {
            break;
        }
        args.push(describe_arg(btf, btf.resolve_chained_type(p)?)?);
    }
    Ok(Some(args))
}

/// Resolves every offset the kernel programs use.
pub(crate) fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, OffsetsError> {
    // struct sock begins with its sock_common, but do not assume where.
    let common = field(btf, "sock", &["__sk_common"])?.offset;
    let skc = |name: &str, want: usize| -> Result<u32, OffsetsError> {
        Ok(common + sized(btf, "sock_common", &[name], want)?)
    };
    // tcp_sock begins with its inet_connection_sock; again, do not assume.
    let conn = field(btf, "tcp_sock", &["inet_conn"])?.offset;
    let icsk = |dotted: &str, want: usize| -> Result<u32, OffsetsError> {
        let path: Vec<&str> = dotted.split('.').collect();
        Ok(conn + sized(btf, "inet_connection_sock", &path, want)?)
    };
    Ok(KernelOffsets {
        ready: 1,
        skc_daddr: skc("skc_daddr", 4)?,
        skc_rcv_saddr: skc("skc_rcv_saddr", 4)?,
        skc_dport: skc("skc_dport", 2)?,
        skc_num: skc("skc_num", 2)?,
        skc_family: skc("skc_family", 2)?,
        skc_state: skc("skc_state", 1)?,
        skc_v6_daddr: skc("skc_v6_daddr", 16)?,
        skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr", 16)?,
        // possible_net_t is { struct net *net; } with CONFIG_NET_NS.
        skc_net: skc("skc_net", 8)?,
        sk_protocol: sized(btf, "sock", &["sk_protocol"], 2)?,
        sk_err: sized(btf, "sock", &["sk_err"], 4)?,
        net_ns_inum: sized(btf, "net", &["ns", "inum"], 4)?,
        inet_sport: sized(btf, "inet_sock", &["inet_sport"], 2)?,
        skc_flags: skc("skc_flags", 8)?,
        sock_keepopen_bit: enum_value(btf, "sock_flags", "SOCK_KEEPOPEN")?,
        sk_err_soft: sized(btf, "sock", &["sk_err_soft"], 4)?,
        sk_error_queue_len: sized(btf, "sock", &["sk_error_queue", "qlen"], 4)?,
        tp_bytes_received: sized(btf, "tcp_sock", &["bytes_received"], 8)?,
        tp_bytes_acked: sized(btf, "tcp_sock", &["bytes_acked"], 8)?,
        tp_lsndtime: sized(btf, "tcp_sock", &["lsndtime"], 4)?,
        tp_rcv_tstamp: sized(btf, "tcp_sock", &["rcv_tstamp"], 4)?,
        tp_snd_una: sized(btf, "tcp_sock", &["snd_una"], 4)?,
        tp_snd_nxt: sized(btf, "tcp_sock", &["snd_nxt"], 4)?,
        tp_write_seq: sized(btf, "tcp_sock", &["write_seq"], 4)?,
        tp_snd_wnd: sized(btf, "tcp_sock", &["snd_wnd"], 4)?,
        tp_first_tx_mstamp: sized(btf, "tcp_sock", &["first_tx_mstamp"], 8)?,
        tp_keepalive_time: sized(btf, "tcp_sock", &["keepalive_time"], 4)?,
        tp_keepalive_intvl: sized(btf, "tcp_sock", &["keepalive_intvl"], 4)?,
        tp_keepalive_probes: sized(btf, "tcp_sock", &["keepalive_probes"], 1)?,
        icsk_lrcvtime: icsk("icsk_ack.lrcvtime", 4)?,
        icsk_user_timeout: icsk("icsk_user_timeout", 4)?,
        icsk_probes_out: icsk("icsk_probes_out", 1)?,
        icsk_retransmits: icsk("icsk_retransmits", 1)?,
        skb_len: sized(btf, "sk_buff", &["len"], 4)?,
        tp_tcp_header_len: sized(btf, "tcp_sock", &["tcp_header_len"], 2)?,
        net_keepalive_time: sized(btf, "net", &["ipv4", "sysctl_tcp_keepalive_time"], 4)?,
        net_keepalive_intvl: sized(btf, "net", &["ipv4", "sysctl_tcp_keepalive_intvl"], 4)?,
        // u8 from 5.15, int before.
        net_keepalive_probes: sized_low(btf, "net", &["ipv4", "sysctl_tcp_keepalive_probes"], 1)?,
        sk_socket: sized(btf, "sock", &["sk_socket"], 8)?,
        socket_file: sized(btf, "socket", &["file"], 8)?,
        file_inode: sized(btf, "file", &["f_inode"], 8)?,
        inode_ino: sized(btf, "inode", &["i_ino"], 8)?,
        task_files: sized(btf, "task_struct", &["files"], 8)?,
        files_fdt: sized(btf, "files_struct", &["fdt"], 8)?,
        fdt_max_fds: sized(btf, "fdtable", &["max_fds"], 4)?,
        fdt_fd: sized(btf, "fdtable", &["fd"], 8)?,
        file_private_data: sized(btf, "file", &["private_data"], 8)?,
        socket_sk: sized(btf, "socket", &["sk"], 8)?,
    })
}

/// The value of enumerator `name` of `enum enum_name`.
pub(crate) fn enum_value(btf: &Btf, enum_name: &str, name: &str) -> Result<u32, OffsetsError> {
    for ty in btf.resolve_types_by_name(enum_name).unwrap_or_default() {
        if let Type::Enum(e) = ty {
            for m in &e.members {
                if btf.resolve_name(m)? == name {
                    return Ok(m.val());
                }
            }
        }
    }
    Err(OffsetsError::NoField {
        strukt: format!("enum {enum_name}"),
        field: name.to_string(),
    })
}

/// Names of `enum sk_rst_reason` values (why the kernel sent a reset), by
/// value. Empty when the kernel has no such enum (before 6.10).
pub(crate) fn reset_reasons(btf: &Btf) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for ty in btf
        .resolve_types_by_name("sk_rst_reason")
        .unwrap_or_default()
    {
        if let Type::Enum(e) = ty {
            for m in &e.members {
                if let Ok(name) = btf.resolve_name(m) {
                    let short = name.strip_prefix("SK_RST_REASON_").unwrap_or(&name);
                    names.insert(m.val(), short.to_string());
                }
            }
        }
    }
    names
}

#[cfg(test)]
mod tests;
