use super::*;
use crate::sys::VMLINUX_BTF;

/// Builds a little-endian BTF blob from (kind, name, info-extra) records.
/// Just enough of the format (include/uapi/linux/btf.h) for these tests.
#[derive(Default)]
struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

const KIND_INT: u32 = 1;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;

impl BtfBuilder {
    fn new() -> Self {
        Self {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }
    fn name(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        off
    }
    fn header(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_or_type: u32) -> u32 {
        let n = self.name(name);
        let info = (u32::from(kflag) << 31) | (kind << 24) | vlen;
        for w in [n, info, size_or_type] {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }
    fn int(&mut self, name: &str, size: u32) -> u32 {
        let id = self.header(name, KIND_INT, 0, false, size);
        self.types.extend_from_slice(&(size * 8).to_le_bytes());
        id
    }
    fn typedef(&mut self, name: &str, ty: u32) -> u32 {
        self.header(name, KIND_TYPEDEF, 0, false, ty)
    }
    fn volatile(&mut self, ty: u32) -> u32 {
        self.header("", KIND_VOLATILE, 0, false, ty)
    }
    /// members: (name, type, bit offset, bitfield size)
    fn composite(
        &mut self,
        kind: u32,
        name: &str,
        size: u32,
        members: &[(&str, u32, u32, u32)],
    ) -> u32 {
        let kflag = members.iter().any(|m| m.3 != 0);
        let id = self.header(name, kind, members.len() as u32, kflag, size);
        for &(mname, ty, bit_off, bf) in members {
            let n = self.name(mname);
            let off = if kflag { (bf << 24) | bit_off } else { bit_off };
            for w in [n, ty, off] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        id
    }
    fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
        let id = self.header(name, KIND_ENUM, values.len() as u32, false, 4);
        for &(vname, v) in values {
            let n = self.name(vname);
            self.types.extend_from_slice(&n.to_le_bytes());
            self.types.extend_from_slice(&v.to_le_bytes());
        }
        id
    }
    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
        out.extend_from_slice(&0u32.to_le_bytes()); // type_off
        out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
        out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A miniature of the kernel's sock_common/sock/net with the same shapes
/// (anonymous unions, typedefs, volatile, nested structs), at offsets
/// that differ from any real kernel.
#[expect(
    clippy::too_many_lines,
    reason = "a fake kernel layout, one struct after another"
)]
fn fake_kernel() -> Btf {
    let mut b = BtfBuilder::new();
    let u8t = b.int("unsigned char", 1);
    let u16t = b.int("short unsigned int", 2);
    let u32t = b.int("unsigned int", 4);
    let u64t = b.int("long long unsigned int", 8);
    let be16 = b.typedef("__be16", u16t);
    let be32 = b.typedef("__be32", u32t);
    let vol_u8 = b.volatile(u8t);
    let in6 = b.composite(
        KIND_STRUCT,
        "in6_addr",
        16,
        &[("u6_addr32", u64t, 0, 0), ("x", u64t, 64, 0)],
    );
    let possible_net = b.composite(KIND_STRUCT, "possible_net_t_s", 8, &[("net", u64t, 0, 0)]);
    let possible_net_t = b.typedef("possible_net_t", possible_net);
    let addrs = b.composite(
        KIND_STRUCT,
        "",
        8,
        &[("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)],
    );
    let addr_union = b.composite(
        KIND_UNION,
        "",
        8,
        &[("skc_addrpair", u64t, 0, 0), ("", addrs, 0, 0)],
    );
    let ports = b.composite(
        KIND_STRUCT,
        "",
        4,
        &[("skc_dport", be16, 0, 0), ("skc_num", u16t, 16, 0)],
    );
    let port_union = b.composite(
        KIND_UNION,
        "",
        4,
        &[("skc_portpair", u32t, 0, 0), ("", ports, 0, 0)],
    );
    let common = b.composite(
        KIND_STRUCT,
        "sock_common",
        72,
        &[
            ("", addr_union, 0, 0),
            ("skc_hash", u32t, 64, 0),
            ("", port_union, 96, 0),
            ("skc_family", u16t, 128, 0),
            ("skc_state", vol_u8, 144, 0),
            ("skc_net", possible_net_t, 192, 0),
            ("skc_v6_daddr", in6, 256, 0),
            ("skc_v6_rcv_saddr", in6, 384, 0),
            ("skc_flags", u64t, 512, 0),
        ],
    );
    let skb_head = b.composite(
        KIND_STRUCT,
        "sk_buff_head",
        24,
        &[("next", u64t, 0, 0), ("qlen", u32t, 128, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "sock",
        200,
        &[
            ("pad", u64t, 0, 0),
            ("__sk_common", common, 64, 0),
            ("sk_protocol", u16t, 1024, 0),
            ("sk_bits", u8t, 1040, 3),
            ("sk_err", u32t, 1056, 0),
            ("sk_err_soft", u32t, 1088, 0),
            ("sk_socket", u64t, 1152, 0),
            ("sk_error_queue", skb_head, 1216, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "sk_buff",
        232,
        &[
            ("next", u64t, 0, 0),
            ("cb", u64t, 320, 0),
            ("len", u32t, 896, 0),
            ("data_len", u32t, 928, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "socket",
        32,
        &[
            ("state", u32t, 0, 0),
            ("file", u64t, 128, 0),
            ("sk", u64t, 192, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "file",
        64,
        &[
            ("f_mode", u32t, 0, 0),
            ("f_inode", u64t, 256, 0),
            ("private_data", u64t, 320, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "task_struct",
        128,
        &[("pid", u32t, 0, 0), ("files", u64t, 512, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "files_struct",
        64,
        &[("count", u32t, 0, 0), ("fdt", u64t, 256, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "fdtable",
        32,
        &[("max_fds", u32t, 0, 0), ("fd", u64t, 64, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "inode",
        96,
        &[("i_mode", u16t, 0, 0), ("i_ino", u64t, 512, 0)],
    );
    b.composite(
        KIND_STRUCT,
        "inet_sock",
        240,
        &[("sk", u64t, 0, 0), ("inet_sport", be16, 1600, 0)],
    );
    let ns_common = b.composite(
        KIND_STRUCT,
        "ns_common",
        16,
        &[("stashed", u64t, 0, 0), ("inum", u32t, 64, 0)],
    );
    let netns_ipv4 = b.composite(
        KIND_STRUCT,
        "netns_ipv4",
        16,
        &[
            ("sysctl_tcp_keepalive_time", u32t, 0, 0),
            ("sysctl_tcp_keepalive_probes", u8t, 32, 0),
            ("sysctl_tcp_keepalive_intvl", u32t, 64, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "net",
        64,
        &[
            ("passive", u32t, 0, 0),
            ("ns", ns_common, 128, 0),
            ("ipv4", netns_ipv4, 256, 0),
        ],
    );
    let ack = b.composite(
        KIND_STRUCT,
        "",
        8,
        &[("pending", u32t, 0, 0), ("lrcvtime", u32t, 32, 0)],
    );
    let icsk = b.composite(
        KIND_STRUCT,
        "inet_connection_sock",
        64,
        &[
            ("icsk_inet", u64t, 0, 0),
            ("icsk_retransmits", u8t, 64, 0),
            ("icsk_probes_out", u8t, 72, 0),
            ("icsk_ack", ack, 128, 0),
            ("icsk_user_timeout", u32t, 192, 0),
        ],
    );
    b.composite(
        KIND_STRUCT,
        "tcp_sock",
        200,
        &[
            ("inet_conn", icsk, 0, 0),
            ("bytes_received", u64t, 512, 0),
            ("bytes_acked", u64t, 576, 0),
            ("lsndtime", u32t, 640, 0),
            ("rcv_tstamp", u32t, 672, 0),
            ("snd_una", u32t, 704, 0),
            ("snd_nxt", u32t, 736, 0),
            ("write_seq", u32t, 928, 0),
            ("snd_wnd", u32t, 960, 0),
            ("first_tx_mstamp", u64t, 768, 0),
            ("keepalive_time", u32t, 832, 0),
            ("keepalive_intvl", u32t, 864, 0),
            ("keepalive_probes", u8t, 896, 0),
            ("tcp_header_len", u16t, 992, 0),
        ],
    );
    b.enumeration("sock_flags", &[("SOCK_DEAD", 0), ("SOCK_KEEPOPEN", 3)]);
    b.enumeration(
        "sk_rst_reason",
        &[
            ("SK_RST_REASON_NOT_SPECIFIED", 0),
            ("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 7),
        ],
    );
    Btf::from_bytes(&b.build()).expect("synthetic BTF parses")
}

#[test]
fn offsets_descend_into_anonymous_unions_and_nested_structs() {
    let btf = fake_kernel();
    let off = kernel_offsets(&btf).expect("all fields resolve");
    // sock_common sits at byte 8 of sock in the fake layout.
    assert_eq!(off.skc_daddr, 8);
    assert_eq!(off.skc_rcv_saddr, 8 + 4);
    assert_eq!(off.skc_dport, 8 + 12);
    assert_eq!(off.skc_num, 8 + 14);
    assert_eq!(off.skc_family, 8 + 16);
    assert_eq!(off.skc_state, 8 + 18);
    assert_eq!(off.skc_net, 8 + 24);
    assert_eq!(off.skc_v6_daddr, 8 + 32);
    assert_eq!(off.skc_v6_rcv_saddr, 8 + 48);
    assert_eq!(off.sk_protocol, 128);
    assert_eq!(off.sk_err, 132);
    assert_eq!(off.net_ns_inum, 16 + 8);
    assert_eq!(off.inet_sport, 200);
    assert_eq!(
        (
            off.sk_socket,
            off.socket_file,
            off.file_inode,
            off.inode_ino
        ),
        (144, 16, 32, 64)
    );
    assert_eq!(
        (
            off.task_files,
            off.files_fdt,
            off.fdt_max_fds,
            off.fdt_fd,
            off.file_private_data,
            off.socket_sk
        ),
        (64, 32, 0, 8, 40, 24)
    );
    assert_eq!(off.skc_flags, 8 + 64);
    assert_eq!(off.sock_keepopen_bit, 3);
    assert_eq!(off.sk_err_soft, 136);
    assert_eq!(off.sk_error_queue_len, 152 + 16);
    assert_eq!(off.icsk_retransmits, 8);
    assert_eq!(off.icsk_probes_out, 9);
    assert_eq!(off.icsk_lrcvtime, 16 + 4);
    assert_eq!(off.icsk_user_timeout, 24);
    assert_eq!(off.tp_bytes_received, 64);
    assert_eq!(off.tp_first_tx_mstamp, 96);
    assert_eq!(off.tp_keepalive_probes, 112);
    assert_eq!(off.net_keepalive_time, 32);
    assert_eq!(off.net_keepalive_probes, 36);
    assert_eq!(off.net_keepalive_intvl, 40);
    assert_eq!((off.skb_len, off.tp_tcp_header_len), (112, 124));
    assert_eq!(off.ready, 1);
}

#[test]
fn missing_struct_and_field_are_named() {
    let btf = fake_kernel();
    let err = field(&btf, "udp_sock", &["pending"]).unwrap_err();
    assert!(err.to_string().contains("no struct udp_sock"), "{err}");
    let err = field(&btf, "tcp_sock", &["srtt_us"]).unwrap_err();
    assert!(err.to_string().contains("has no field srtt_us"), "{err}");
    let err = field(&btf, "sock", &["sk_nope"]).unwrap_err();
    assert!(err.to_string().contains("has no field sk_nope"), "{err}");
    let err = field(&btf, "net", &["ns", "nope"]).unwrap_err();
    assert!(err.to_string().contains("ns.nope"), "{err}");
}

#[test]
fn bitfields_and_wrong_sizes_are_refused() {
    let btf = fake_kernel();
    let err = field(&btf, "sock", &["sk_bits"]).unwrap_err();
    assert!(matches!(err, OffsetsError::Bitfield { .. }), "{err}");
    let err = sized(&btf, "sock", &["sk_err"], 8).unwrap_err();
    assert!(
        matches!(
            err,
            OffsetsError::Size {
                found: 4,
                want: 8,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn reset_reason_names_come_from_the_enum() {
    let btf = fake_kernel();
    let names = reset_reasons(&btf);
    assert_eq!(
        names.get(&7).map(String::as_str),
        Some("TCP_ABORT_ON_CLOSE")
    );
    assert_eq!(names.get(&0).map(String::as_str), Some("NOT_SPECIFIED"));
}

#[test]
fn missing_btf_file_says_what_to_do() {
    let err = load_btf(Path::new("/nonexistent/vmlinux"))
        .err()
        .expect("missing file");
    assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
}

/// On a machine with kernel BTF, the real layout resolves and looks sane.
#[test]
fn running_kernel_offsets_resolve_when_btf_is_present() {
    let path = Path::new(VMLINUX_BTF);
    if !path.exists() {
        eprintln!("skipping: no {VMLINUX_BTF}");
        return;
    }
    let btf = load_btf(path).expect("kernel BTF parses");
    let off = kernel_offsets(&btf).expect("kernel offsets resolve");
    // In every kernel since 2.6 the v4 address pair opens sock_common.
    assert_eq!(off.skc_daddr, 0);
    assert_eq!(off.skc_rcv_saddr, 4);
    assert!(off.sk_protocol > off.skc_v6_rcv_saddr);
}
