//! Process memory facts from Linux's `/proc` (peak resident set size, available memory);
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
