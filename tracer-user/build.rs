//! Builds the kernel programs (tracer-ebpf) for the bpf target with the
//! nightly toolchain and bpf-linker, the aya-template way; `main` embeds the
//! object with `include_bytes_aligned!`. `cargo xtask setup` installs what
//! this needs.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tracer-user sits inside the workspace")
        .join("tracer-ebpf");
    let root = root.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
