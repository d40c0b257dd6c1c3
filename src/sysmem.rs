//! Process facts from Linux's `/proc` (peak resident set size, available memory, CPU time);
//! `None` where they cannot be read (other systems).

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

#[cfg(test)]
mod tests {
    use super::*;

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
