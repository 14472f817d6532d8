//! Turning the kernel's CLOCK_MONOTONIC timestamps into wall-clock time.

use std::time::{Duration, SystemTime};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Current CLOCK_MONOTONIC in nanoseconds (what `bpf_ktime_get_ns` returns).
pub(crate) fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time of this whole process (every thread), in nanoseconds.
pub(crate) fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Maps monotonic timestamps to wall-clock time, with the offset measured once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallClock {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    pub(crate) fn now() -> Self {
        let mono = monotonic_ns();
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub(crate) fn system_time(&self, mono_ns: u64) -> SystemTime {
        let ns = (i128::from(mono_ns) + self.offset_ns).max(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// RFC 3339 UTC with nanoseconds.
    pub(crate) fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_nanos(self.system_time(mono_ns)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_maps_to_wall_clock() {
        let c = WallClock::with_offset(1_700_000_000_000_000_000);
        assert_eq!(c.rfc3339(123), "2023-11-14T22:13:20.000000123Z");
        // Never before the epoch, whatever the input.
        assert_eq!(
            WallClock::with_offset(-10).rfc3339(0),
            "1970-01-01T00:00:00.000000000Z"
        );
    }

    #[test]
    fn now_is_close_to_system_time() {
        let c = WallClock::now();
        let t = c.system_time(monotonic_ns());
        let d = t
            .duration_since(SystemTime::now())
            .unwrap_or_else(|e| e.duration());
        assert!(d < Duration::from_secs(1), "{d:?}");
    }
}
