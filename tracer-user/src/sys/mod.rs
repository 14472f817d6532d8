//! The system around the pipeline, which every stage may use: Linux
//! capabilities ([`caps`]: what a missing one costs, one table for `check`
//! and `run`), network namespaces ([`netns`]), the cgroup v2 mount and
//! cgroup namespace ([`cgroup`]), and a few facts of the running system.

pub(crate) mod caps;
pub(crate) mod cgroup;
pub(crate) mod netns;

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Checks a ring buffer size the way the kernel will: a power of two and a
/// multiple of the page size.
pub(crate) fn valid_ring_size(bytes: u32) -> bool {
    let page = page_size();
    bytes.is_power_of_two() && bytes >= page && bytes.is_multiple_of(page)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(p).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use tracer_common::DEFAULT_RING_BYTES;

    use super::*;

    #[test]
    fn ring_sizes_follow_kernel_rules() {
        assert!(valid_ring_size(DEFAULT_RING_BYTES));
        assert!(valid_ring_size(4096));
        assert!(!valid_ring_size(4097));
        assert!(!valid_ring_size(1024));
        assert!(!valid_ring_size(0));
        assert!(!valid_ring_size(3 * 4096));
    }
}
