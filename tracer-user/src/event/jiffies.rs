//! The kernel's jiffies clock, in which TCP keeps its per-socket timestamps
//! (last send, last receive, keepalive settings), converted to real time.
//!
//! HZ (ticks per second) is a kernel build option and not in BTF. It is
//! found from one (jiffies_64, CLOCK_MONOTONIC) pair taken together in the
//! kernel: jiffies_64 starts at INITIAL_JIFFIES = 2^32 - 300*HZ at boot, so
//! jiffies_64 - INITIAL_JIFFIES = uptime * HZ, and uptime is CLOCK_MONOTONIC.

/// HZ values Linux can be built with.
const CANDIDATES: [u32; 4] = [100, 250, 300, 1000];

/// The HZ that best explains `jiffies_64` at monotonic time `mono_ns`, if
/// one does to within 1 %.
#[expect(
    clippy::cast_precision_loss,
    reason = "uptimes and tick counts stay far below 2^52"
)]
pub(crate) fn detect_hz(jiffies_64: u64, mono_ns: u64) -> Option<u32> {
    let uptime = mono_ns as f64 / 1e9;
    if uptime < 1.0 {
        return None;
    }
    CANDIDATES
        .iter()
        .map(|&hz| {
            let initial = (1u64 << 32).wrapping_sub(300 * u64::from(hz));
            let ticks = jiffies_64.wrapping_sub(initial) as f64;
            let err = (ticks / uptime - f64::from(hz)).abs() / f64::from(hz);
            (hz, err)
        })
        .filter(|&(_, err)| err < 0.01)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(hz, _)| hz)
}

/// Converts jiffies to time, once HZ is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hz(pub u32);

impl Hz {
    /// Seconds in `ticks` jiffies.
    pub(crate) fn secs(self, ticks: u32) -> f64 {
        f64::from(ticks) / f64::from(self.0)
    }

    /// Nanoseconds in `ticks` jiffies.
    pub(crate) fn ns(self, ticks: u32) -> u64 {
        u64::from(ticks) * 1_000_000_000 / u64::from(self.0)
    }
}

/// `now - then` for 32-bit jiffies stamps as TCP keeps them, wrap-safe;
/// 0 when `then` is after `now` (a stamp written after our snapshot).
pub(crate) fn elapsed(now: u32, then: u32) -> u32 {
    let d = now.wrapping_sub(then);
    if d > u32::MAX / 2 { 0 } else { d }
}

/// The later of two 32-bit jiffies stamps, wrap-safe.
pub(crate) fn later(a: u32, b: u32) -> u32 {
    if b.wrapping_sub(a) < u32::MAX / 2 {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jiffies_at(hz: u32, uptime_s: f64) -> u64 {
        (1u64 << 32).wrapping_sub(300 * u64::from(hz)) + (uptime_s * f64::from(hz)) as u64
    }

    #[test]
    fn detects_every_common_hz() {
        for hz in CANDIDATES {
            for uptime in [5.0, 600.0, 86_400.0 * 30.0] {
                let got = detect_hz(jiffies_at(hz, uptime), (uptime * 1e9) as u64);
                assert_eq!(got, Some(hz), "hz {hz} uptime {uptime}");
            }
        }
    }

    #[test]
    fn refuses_to_guess() {
        assert_eq!(
            detect_hz(jiffies_at(250, 0.5), 500_000_000),
            None,
            "too early"
        );
        assert_eq!(detect_hz(12345, 600_000_000_000), None, "nonsense");
    }

    #[test]
    fn wrap_safe_arithmetic() {
        assert_eq!(elapsed(10, 5), 5);
        assert_eq!(elapsed(3, u32::MAX - 1), 5);
        assert_eq!(elapsed(5, 10), 0);
        assert_eq!(later(5, 10), 10);
        assert_eq!(later(u32::MAX - 1, 3), 3);
        assert!((Hz(250).secs(500) - 2.0).abs() < 1e-12);
        assert_eq!(Hz(250).ns(1), 4_000_000);
    }

    /// On this machine the live pair must give a valid HZ.
    #[test]
    fn running_kernel_hz_is_plausible_from_proc() {
        // /proc/timer_list shows jiffies, but needs root; skip quietly.
        let Ok(text) = std::fs::read_to_string("/proc/timer_list") else {
            return;
        };
        // `jiffies:` (printed with each tick device) is the count when the
        // file was read, and `now at N nsecs` the CLOCK_MONOTONIC time of
        // that read. (`.last_jiffies` is not: an idle tickless CPU's stays
        // behind by seconds.)
        let find = |prefix: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let (Some(j), Some(now_ns)) = (find("jiffies:"), find("now at")) else {
            return;
        };
        let hz = detect_hz(j, now_ns);
        assert!(hz.is_some(), "jiffies {j} at {now_ns} ns");
    }
}

/// Tracks the kernel's HZ: an override from configuration, else detected
/// from the first (jiffies, time) pair an event brings, else the kernel's
/// build config, else 250 (the most common distribution setting) with a
/// warning.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HzTracker {
    hz: Option<Hz>,
    fallback: Option<Hz>,
    fixed: bool,
}

impl HzTracker {
    pub(crate) fn new(override_hz: Option<u32>) -> Self {
        Self {
            hz: override_hz.map(Hz),
            fallback: None,
            fixed: override_hz.is_some(),
        }
    }

    /// Learns HZ from a kernel (jiffies_64, CLOCK_MONOTONIC ns) pair.
    pub(crate) fn observe(&mut self, jiffies_64: u64, mono_ns: u64) {
        if self.hz.is_none()
            && !self.fixed
            && let Some(hz) = detect_hz(jiffies_64, mono_ns)
        {
            log::debug!("kernel HZ is {hz}");
            self.hz = Some(Hz(hz));
        }
    }

    pub(crate) fn get(&mut self) -> Hz {
        if let Some(hz) = self.hz {
            return hz;
        }
        // Not learnt yet: use the build config (or 250) until an event teaches it.
        *self.fallback.get_or_insert_with(|| {
            Hz(config_hz().unwrap_or_else(|| {
                log::warn!("cannot tell the kernel's HZ yet; assuming 250 until an event shows it");
                250
            }))
        })
    }
}

/// CONFIG_HZ from /boot/config-<release>, if readable.
fn config_hz() -> Option<u32> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}
