//! Memory of a live process from Linux's /proc, for the benchmarks: the `kB` fields of
//! `/proc/<pid>/status` and `smaps_rollup`, and the resident set split by what is mapped
//! (`/proc/<pid>/smaps`), which says *why* a process is as large as it is.

use std::path::Path;

use anyhow::{Context, Result};

/// The value in KiB of a `Name:   123 kB` line (the format of `status`, `smaps` and
/// `smaps_rollup`), if `text` has the field.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(field)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// What one process holds, in KiB, read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// `VmRSS`: resident now.
    pub rss: u64,
    /// `VmHWM`: the peak resident set so far.
    pub hwm: u64,
    /// `Pss` of `smaps_rollup`: shared pages divided among the processes mapping them.
    pub pss: u64,
    /// `Private_Clean + Private_Dirty`: what this process alone holds (freed at its exit).
    pub private: u64,
    /// `Anonymous`: heap, thread stacks and other memory not backed by a file.
    pub anon: u64,
    pub threads: u64,
}

impl Footprint {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/smaps_rollup` (Linux 4.14+).
    pub fn read(pid: u32) -> Result<Footprint> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
        Self::parse(&status, &rollup)
    }

    /// From the text of `status` and `smaps_rollup`.
    pub fn parse(status: &str, rollup: &str) -> Result<Footprint> {
        let get = |text: &str, f: &str| {
            kib_field(text, f).with_context(|| format!("no {f} field in /proc/<pid>"))
        };
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no Threads field in /proc/<pid>/status")?;
        Ok(Footprint {
            rss: get(status, "VmRSS")?,
            hwm: get(status, "VmHWM")?,
            pss: get(rollup, "Pss")?,
            private: get(rollup, "Private_Clean")? + get(rollup, "Private_Dirty")?,
            anon: get(rollup, "Anonymous")?,
            threads,
        })
    }
}

/// The resident set (KiB) split by what is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breakdown {
    /// Pages of the executable itself (code, read-only data, relocated data).
    pub binary: u64,
    /// Shared libraries (`.so` files: libc, the dynamic loader, …).
    pub libraries: u64,
    /// The `[heap]` of brk (glibc's main malloc arena).
    pub heap: u64,
    /// Anonymous mappings: other malloc arenas, thread stacks, large allocations.
    pub anon: u64,
    /// The main thread's `[stack]`.
    pub stack: u64,
    /// Anything else (other files, `[vdso]`, …).
    pub other: u64,
}

impl Breakdown {
    /// Reads `/proc/<pid>/smaps`; `exe` names the binary's file (as its mappings show it).
    pub fn read(pid: u32, exe: &Path) -> Result<Breakdown> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("reading /proc/{pid}/smaps"))?;
        Ok(Self::parse(&smaps, exe))
    }

    /// From the text of `smaps`: each mapping's header line, then its `Rss:` line.
    pub fn parse(smaps: &str, exe: &Path) -> Breakdown {
        let exe = exe.to_string_lossy();
        let mut b = Breakdown::default();
        let mut slot: Option<&mut u64> = None;
        for line in smaps.lines() {
            if let Some(name) = mapping_name(line) {
                slot = Some(match name {
                    "" => &mut b.anon,
                    "[heap]" => &mut b.heap,
                    "[stack]" => &mut b.stack,
                    n if n == exe => &mut b.binary,
                    n if is_library(n) => &mut b.libraries,
                    _ => &mut b.other,
                });
            } else if let (Some(s), Some(kib)) = (slot.as_deref_mut(), kib_field(line, "Rss")) {
                *s += kib;
            }
        }
        b
    }

    pub fn total(&self) -> u64 {
        self.binary + self.libraries + self.heap + self.anon + self.stack + self.other
    }
}

/// The path (or `[heap]`, `""` for anonymous) of an smaps mapping header
/// (`start-end perms offset dev inode [name]`), or `None` for a field line.
fn mapping_name(line: &str) -> Option<&str> {
    let mut cols = line.splitn(6, ' ');
    let range = cols.next()?;
    let (lo, hi) = range.split_once('-')?;
    if lo.is_empty() || !lo.bytes().chain(hi.bytes()).all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    for _ in 0..4 {
        cols.next()?;
    }
    Some(cols.next().unwrap_or("").trim())
}

/// `libc.so.6`, `ld-linux-x86-64.so.2`, `libonnxruntime.so.1.32.0`: shared objects.
fn is_library(path: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.ends_with(".so") || file.contains(".so.")
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tzk0-agent\nVmPeak:\t  600000 kB\nVmHWM:\t   15820 kB\n\
                          VmRSS:\t   15504 kB\nThreads:\t3\n";
    const ROLLUP: &str = "55d0-7ffd ---p 00000000 00:00 0      [rollup]\nRss:  15504 kB\n\
                          Pss:               13672 kB\nPss_Anon:           2120 kB\n\
                          Private_Clean:     11268 kB\nPrivate_Dirty:      2120 kB\n\
                          Anonymous:          2120 kB\n";

    #[test]
    fn reads_kib_fields_by_exact_name() {
        assert_eq!(kib_field(STATUS, "VmRSS"), Some(15504));
        assert_eq!(kib_field(ROLLUP, "Pss"), Some(13672));
        assert_eq!(kib_field(ROLLUP, "Pss_Anon"), Some(2120));
        assert_eq!(kib_field(STATUS, "VmSwap"), None);
        assert_eq!(kib_field("Rss: lots kB\n", "Rss"), None);
    }

    #[test]
    fn footprint_from_status_and_rollup() {
        let f = Footprint::parse(STATUS, ROLLUP).unwrap();
        assert_eq!(
            f,
            Footprint {
                rss: 15504,
                hwm: 15820,
                pss: 13672,
                private: 13388,
                anon: 2120,
                threads: 3
            }
        );
        assert!(Footprint::parse("VmRSS: 1 kB\n", ROLLUP).is_err());
    }

    #[test]
    fn breakdown_sums_rss_per_kind_of_mapping() {
        let smaps = "\
5600aa000000-5600aa100000 r--p 00000000 fd:01 123   /opt/zk0/bin/zk0-agent
Size:               1024 kB
Rss:                 700 kB
Pss:                 700 kB
5600aa100000-5600aa900000 r-xp 00100000 fd:01 123   /opt/zk0/bin/zk0-agent
Rss:                5000 kB
5600ab000000-5600ab100000 rw-p 00000000 00:00 0     [heap]
Rss:                 200 kB
7f0000000000-7f0000800000 rw-p 00000000 00:00 0 
Rss:                  64 kB
7f0000800000-7f0001000000 rw-p 00000000 00:00 0
Rss:                  16 kB
7f1000000000-7f1000200000 r-xp 00000000 fd:01 9     /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1400 kB
7f1000400000-7f1000420000 r--p 00000000 fd:01 10    /usr/lib64/ld-linux-x86-64.so.2
Rss:                 200 kB
7f1000500000-7f1000501000 r--s 00000000 fd:01 11    /etc/zk0/data.bin
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
Rss:                 132 kB
7ffd00100000-7ffd00102000 r-xp 00000000 00:00 0     [vdso]
Rss:                   8 kB
";
        let b = Breakdown::parse(smaps, Path::new("/opt/zk0/bin/zk0-agent"));
        assert_eq!(
            b,
            Breakdown {
                binary: 5700,
                libraries: 1600,
                heap: 200,
                anon: 80,
                stack: 132,
                other: 12,
            }
        );
        assert_eq!(b.total(), 7724);
        // Another binary's pages are not this one's.
        assert_eq!(Breakdown::parse(smaps, Path::new("/x")).binary, 0);
    }
}
