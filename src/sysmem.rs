//! Process and machine facts from Linux's `/proc` (peak resident set size, available memory,
//! the process's CPU time, the machine's stolen CPU time); `None` where they cannot be read
//! (other systems).

/// Resets the kernel's peak-RSS counter of this process (Linux ≥ 4.0), so that
/// [`peak_rss_bytes`] measures from here on.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// Peak resident set size of this process in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("/proc/self/status", "VmHWM:")
}

/// Memory the system can still give without swapping, in bytes (`MemAvailable`).
pub fn available_bytes() -> Option<u64> {
    status_kib("/proc/meminfo", "MemAvailable:")
}

/// CPU seconds (user + system, every thread) this process has used so far, from
/// `/proc/self/stat`, in Linux's fixed user-visible clock of 100 ticks per second.
///
/// Unlike wall-clock time it does not grow while other processes hold the cores, so it
/// compares runs made on a busy machine (it does grow with the threads' own spinning).
pub fn process_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The whole machine's CPU time so far, in ticks of `/proc/stat`'s `cpu` line: how much the
/// hypervisor gave to other guests (`steal`) out of everything accounted (`total`: user, nice,
/// system, idle, iowait, irq, softirq and steal; guest time is already inside user and nice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTicks {
    /// Ticks stolen by the hypervisor, every core.
    pub steal: u64,
    /// Every accounted tick, every core.
    pub total: u64,
}

impl CpuTicks {
    /// The share of the machine's CPU time stolen between `before` and `self` (0..=1);
    /// `None` when no tick passed.
    pub fn steal_since(&self, before: &CpuTicks) -> Option<f64> {
        let total = self.total.checked_sub(before.total)?;
        let steal = self.steal.checked_sub(before.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

/// Parses the aggregate `cpu  user nice system idle iowait irq softirq steal ...` line of
/// `/proc/stat` (older kernels end before `steal`: none stolen).
pub fn parse_cpu_line(line: &str) -> Option<CpuTicks> {
    let mut fields = line.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    (ticks.len() >= 4).then_some(())?;
    Some(CpuTicks {
        steal: ticks.get(7).copied().unwrap_or(0),
        total: ticks.iter().sum(),
    })
}

/// The machine's CPU ticks now ([`CpuTicks`]; Linux).
pub fn machine_cpu_ticks() -> Option<CpuTicks> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(text.lines().next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_read_from_the_cpu_line() {
        let before = parse_cpu_line("cpu  100 0 50 800 10 0 5 35 0 0").unwrap();
        assert_eq!(
            before,
            CpuTicks {
                steal: 35,
                total: 1000
            }
        );
        let after = parse_cpu_line("cpu  150 0 60 830 10 0 5 45 7 0").unwrap();
        assert_eq!(after.steal_since(&before), Some(10.0 / 100.0));
        assert_eq!(after.steal_since(&after), None, "no tick passed");
        // A kernel without the steal column, a per-core line and garbage.
        assert_eq!(parse_cpu_line("cpu 1 2 3 4").unwrap().steal, 0);
        assert!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse_cpu_line("cpu 1 x 3 4").is_none());
        if let Some(now) = machine_cpu_ticks() {
            assert!(now.total > 0 && now.steal <= now.total);
        }
    }

    #[test]
    fn cpu_seconds_grow_with_work() {
        let Some(before) = process_cpu_seconds() else {
            return; // not Linux
        };
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = process_cpu_seconds().unwrap();
        assert!(after - before >= 0.1, "{before} -> {after}");
    }
}
