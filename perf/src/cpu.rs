//! CPU time and memory of a process, read from `/proc` (Linux only; no libc).
//!
//! `/proc/<pid>/stat` fields 14 and 15 (utime, stime) count clock ticks for all threads of the
//! process. The tick rate comes from the `AT_CLKTCK` entry of `/proc/self/auxv`, which is what
//! `sysconf(_SC_CLK_TCK)` returns, so no C call is needed.

use std::{fs, io};

const AT_CLKTCK: u64 = 17;
const DEFAULT_HZ: u64 = 100;

/// Which process to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proc {
    /// This process.
    SelfProc,
    /// Another process by id.
    Pid(u32),
}

impl Proc {
    fn path(self, file: &str) -> String {
        match self {
            Proc::SelfProc => format!("/proc/self/{file}"),
            Proc::Pid(pid) => format!("/proc/{pid}/{file}"),
        }
    }
}

/// Clock ticks per second used by `/proc/*/stat`.
pub fn clock_ticks_per_sec() -> u64 {
    fs::read("/proc/self/auxv")
        .ok()
        .and_then(|b| parse_auxv_clktck(&b))
        .filter(|hz| *hz > 0)
        .unwrap_or(DEFAULT_HZ)
}

fn parse_auxv_clktck(auxv: &[u8]) -> Option<u64> {
    auxv.chunks_exact(16).find_map(|pair| {
        let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
        let val = u64::from_ne_bytes(pair[8..].try_into().ok()?);
        (key == AT_CLKTCK).then_some(val)
    })
}

/// utime + stime in clock ticks from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': split at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system) used so far, in nanoseconds.
pub fn cpu_time_ns(p: Proc, hz: u64) -> io::Result<u64> {
    let text = fs::read_to_string(p.path("stat"))?;
    let ticks = parse_stat_ticks(&text).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc stat format")
    })?;
    Ok(ticks.saturating_mul(1_000_000_000) / hz.max(1))
}

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`), if readable.
pub fn rss_kib(p: Proc) -> Option<u64> {
    let text = fs::read_to_string(p.path("status")).ok()?;
    parse_status_kib(&text, "VmRSS:")
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let s = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 1 0 100 200 300";
        assert_eq!(parse_stat_ticks(s), Some(281));
    }

    #[test]
    fn own_stat_reads() {
        let hz = clock_ticks_per_sec();
        assert!(hz >= 10);
        assert!(cpu_time_ns(Proc::SelfProc, hz).is_ok());
        assert!(rss_kib(Proc::SelfProc).unwrap_or(0) > 0);
    }

    #[test]
    fn auxv_pairs() {
        let mut b = Vec::new();
        for (k, v) in [(6u64, 4096u64), (17, 250), (0, 0)] {
            b.extend_from_slice(&k.to_ne_bytes());
            b.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv_clktck(&b), Some(250));
    }

    #[test]
    fn status_rss() {
        assert_eq!(
            parse_status_kib("Name: x\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
    }
}
