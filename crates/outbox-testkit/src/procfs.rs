//! What a process costs, read from `/proc`: CPU seconds and resident memory.
//! The benchmarks measure every server and publisher this way, from outside.

/// CPU time and memory of one process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds since the process started.
    pub cpu_seconds: f64,
    /// Resident set size now, in bytes.
    pub rss: u64,
    /// The peak resident set size (`VmHWM`), in bytes.
    pub peak_rss: u64,
}

/// Reads `pid`'s usage; a process that is gone reads as zero.
pub fn usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Usage {
        cpu_seconds: stat_ticks(&stat) as f64 / clock_ticks_per_second(),
        rss: status_kb(&status, "VmRSS:") * 1024,
        peak_rss: status_kb(&status, "VmHWM:") * 1024,
    }
}

/// CPU seconds of `pid` and every process below it (a PostgreSQL
/// postmaster's backends and walsenders), as they stand now; processes that
/// ended meanwhile are not counted.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let stats: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    Some((p, stat_parent(&stat)?, stat_ticks(&stat)))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![pid];
    let mut ticks = 0;
    while let Some(parent) = tree.pop() {
        for (p, pp, t) in &stats {
            if *p == parent {
                ticks += t;
            }
            if *pp == parent {
                tree.push(*p);
            }
        }
    }
    ticks as f64 / clock_ticks_per_second()
}

/// The parent pid (4th field) of a `/proc/<pid>/stat` line.
fn stat_parent(stat: &str) -> Option<u32> {
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`:
/// utime and stime are the 14th and 15th fields overall.
fn stat_ticks(stat: &str) -> u64 {
    let after = stat.rsplit(')').next().unwrap_or("");
    let field = |n: usize| -> u64 {
        after
            .split_whitespace()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn status_kb(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find(|line| line.starts_with(key))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The kernel's clock tick (`_SC_CLK_TCK`), the unit of `/proc/<pid>/stat` times.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Whether process `pid` holds the TCP socket whose local port is `port`
/// (IPv4, as loopback connections here are): its inode, from
/// `/proc/net/tcp`, among the process's file descriptors.
pub fn holds_local_port(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let wanted = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            fields
                .get(1)?
                .ends_with(&wanted)
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(Result::ok).any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
        })
    })
}

/// Sends SIGTERM to `pid` (a child of ours); a process that is gone is not an error.
pub fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_read_after_the_command_name() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(stat_ticks(line), 300);
        assert_eq!(stat_ticks(""), 0);
    }

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        let line = "42 (a (b) c) S 17 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(stat_parent(line), Some(17));
        assert!(tree_cpu_seconds(std::process::id()) >= 0.0);
    }

    #[test]
    fn a_socket_of_this_process_is_held_by_it_and_not_by_another() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(holds_local_port(std::process::id(), port));
        assert!(!holds_local_port(1, port));
    }

    #[test]
    fn this_process_uses_memory() {
        let me = usage(std::process::id());
        assert!(me.rss > 0 && me.peak_rss >= me.rss, "{me:?}");
    }
}
