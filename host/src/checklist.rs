//! The ok / warn / fail checklist both daemons' `doctor` commands print.

use serde::Serialize;

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

/// Checks in the order they were made.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
pub struct Checklist(pub Vec<Check>);

impl Checklist {
    /// Records a check: `ok`, else a warning when `warn_only` (the host still works without
    /// it, e.g. no GPU), else a failure.
    pub fn add(
        &mut self,
        name: &'static str,
        ok: bool,
        warn_only: bool,
        detail: impl Into<String>,
    ) {
        let status = match (ok, warn_only) {
            (true, _) => Status::Ok,
            (false, true) => Status::Warn,
            (false, false) => Status::Fail,
        };
        self.0.push(Check {
            name,
            status,
            detail: detail.into(),
        });
    }

    /// The checks every zk0 host shares: CPU, memory and the disk holding the state dir, with
    /// the minimum memory and free disk (bytes) below which they warn.
    pub fn add_host_checks(
        &mut self,
        host: &crate::Host,
        memory: &crate::Memory,
        disk: Option<&crate::Disk>,
        min_memory: u64,
        min_free_disk: u64,
    ) {
        self.add(
            "cpu",
            true,
            false,
            format!("{} ({} cores, {})", host.cpu, host.cores, host.arch),
        );
        self.add(
            "memory",
            memory.total_bytes >= min_memory,
            true,
            format!(
                "{} total, {} available",
                gib(memory.total_bytes),
                gib(memory.available_bytes)
            ),
        );
        match disk {
            Some(d) => self.add(
                "disk",
                d.available_bytes >= min_free_disk,
                true,
                format!(
                    "{} free of {} at {}",
                    gib(d.available_bytes),
                    gib(d.total_bytes),
                    d.mount_point
                ),
            ),
            None => self.add("disk", false, true, "no filesystem found for the state dir"),
        }
    }

    pub fn any_failed(&self) -> bool {
        self.0.iter().any(|c| c.status == Status::Fail)
    }

    /// One line per check, for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.0 {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            out += &format!("  [{mark}] {:13} {}\n", c.name, c.detail);
        }
        out
    }
}

/// Writes to stdout; a reader that went away (`doctor --json | head`) is not an error.
pub fn emit(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Bytes as GiB with one decimal, for check details.
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_only_checks_do_not_fail_the_list() {
        let mut c = Checklist::default();
        c.add("gpu", false, true, "none");
        c.add("cpu", true, false, "x86_64");
        assert!(!c.any_failed());
        c.add("onnxruntime", false, false, "not found");
        assert!(c.any_failed());
        let text = c.render();
        assert!(
            text.contains("[warn] gpu")
                && text.contains("[FAIL] onnxruntime")
                && text.contains("[ok  ] cpu")
        );
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json[2]["status"], "fail");
        assert_eq!(gib(3 << 29), "1.5 GiB");
    }
}
