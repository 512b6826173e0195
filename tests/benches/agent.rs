//! `cargo xtask bench agent` (= `cargo bench -p zk0-e2e --bench agent -- [opts]`).
//!
//! The footprint of the REAL `zk0-agent run` daemon on a robot host, started as systemd starts
//! it (systemd/zk0-agent.service: `Type=notify`, `WatchdogSec=60s`, so `NOTIFY_SOCKET` and
//! `WATCHDOG_USEC` in its environment) and connected to a real `zk0-aggregator serve`'s
//! embedded broker on loopback, enrolled and idle: online, waiting for a round that never
//! comes (the aggregator wants more clients than there are).
//!
//! - **start-up**: spawn → the `READY=1` datagram on the notify socket (what systemd waits
//!   for), and spawn → its signed `online` status of this session seen on the broker; median
//!   of `--reps` starts (each one stopped with SIGTERM, as systemd does, and required to exit
//!   cleanly).
//! - **idle memory**: `--idle-s` seconds (default 5) after it is online: `VmRSS` and `VmHWM`
//!   (/proc/<pid>/status), `Pss`, private and anonymous (/proc/<pid>/smaps_rollup), and the
//!   resident set split by mapping (/proc/<pid>/smaps: the binary's pages, shared libraries,
//!   heap, other anonymous memory such as thread stacks).
//! - **binary size**: file size and `strip`ped size.
//!
//! Baselines in the same run: the goal (idle RSS ≤ 30 MB on x86_64), the aggregator's own
//! idle footprint (serving that broker to the one agent, measured the same way) and, when
//! installed, mosquitto's (the agent connected to it instead).
//!
//! aarch64: when `<target>/aarch64-unknown-linux-gnu/release/zk0-agent` exists (built by
//! `cargo xtask cross --release`; `cargo xtask bench agent --aarch64` runs that first and
//! makes it required here) the same start-up and idle figures are taken under
//! `qemu-aarch64-static`, against the x86_64 aggregator. qemu-user's figures include the
//! emulator and its translated code: indicative only.
//!
//! Options: `--idle-s S`, `--reps N`, `--aarch64` (fail when the aarch64 binary is missing).
//! Release binaries (`cargo build --release -p edge-agent -p aggregator` first, unless
//! `ZK0_BENCH_NO_BUILD` is set); an unoptimised build (`cargo test --benches`) only
//! smoke-tests the debug binaries: one start, 1 s idle.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use rumqttc_ring::{Client, Event, MqttOptions, Packet, QoS};
use shared_proto::message::{self, ClientStatus};
use shared_proto::tensor::{write_safetensors, Tensor, TensorSet};
use shared_proto::topic::Topics;
use zk0_e2e::federation::find_mosquitto;
use zk0_e2e::procmem::{Breakdown, Footprint};
use zk0_e2e::{
    bench_args, bench_build, bench_main, free_port, run_ok, target_dir, wait_for, ChildGuard,
};

const FEDERATION: &str = "bench";
const CLIENT: &str = "robot-1";
/// The figure issue 14 sets for an idle agent on x86_64.
const GOAL_MB: f64 = 30.0;
const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// The unit's `WatchdogSec=60s`, as systemd passes it.
const WATCHDOG_USEC: &str = "60000000";

struct Opts {
    idle: Duration,
    reps: usize,
    require_aarch64: bool,
}

fn parse_args() -> Result<Opts> {
    let debug = cfg!(debug_assertions);
    let mut o = Opts {
        idle: Duration::from_secs(if debug { 1 } else { 5 }),
        reps: if debug { 1 } else { 5 },
        require_aarch64: false,
    };
    let mut args = bench_args();
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--idle-s" => o.idle = Duration::from_secs_f64(val()?.parse().context("--idle-s")?),
            "--reps" => o.reps = val()?.parse::<usize>().context("--reps")?.clamp(1, 100),
            "--aarch64" => o.require_aarch64 = true,
            "-h" | "--help" => anyhow::bail!("usage: agent [--idle-s S] [--reps N] [--aarch64]"),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    anyhow::ensure!(o.idle <= Duration::from_secs(600), "--idle-s at most 600");
    Ok(o)
}

/// The binaries measured: release ones (built first unless `ZK0_BENCH_NO_BUILD`), or the
/// debug ones in a smoke run.
struct Bins {
    profile: &'static str,
    agent: PathBuf,
    aggregator: PathBuf,
}

fn binaries() -> Result<Bins> {
    let release = !cfg!(debug_assertions);
    let dir = bench_build(&["edge-agent", "aggregator"], release)?;
    let bins = Bins {
        profile: if release { "release" } else { "debug" },
        agent: dir.join("zk0-agent"),
        aggregator: dir.join("zk0-aggregator"),
    };
    for b in [&bins.agent, &bins.aggregator] {
        anyhow::ensure!(b.is_file(), "{} is not built", b.display());
    }
    Ok(bins)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// The tail of a log file, for error messages.
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The files of one federation: the aggregator's state dir with the agent's key enrolled,
/// the agent's key, dataset and config.
struct Setup {
    dir: tempfile::TempDir,
    state: PathBuf,
}

impl Setup {
    fn new(bins: &Bins) -> Result<Setup> {
        let dir = tempfile::Builder::new()
            .prefix("zk0-bench-agent-")
            .tempdir()?;
        let d = dir.path();
        // A tiny model: nobody trains here.
        let mut m = TensorSet::new();
        m.insert(
            "layer.weight".into(),
            Tensor {
                shape: vec![64, 64],
                data: (0..64 * 64).map(|i| (i as f32 * 1e-3).sin()).collect(),
            },
        );
        let model = d.join("model.safetensors");
        std::fs::write(&model, write_safetensors(&m, &BTreeMap::new()))?;
        let state = d.join("aggregator");
        let aggregator = |args: &[&str], file: &Path| {
            run_ok(
                Command::new(&bins.aggregator)
                    .arg("--state-dir")
                    .arg(&state)
                    .args(args)
                    .arg(file),
            )
        };
        aggregator(&["init", "--model"], &model)?;
        run_ok(
            Command::new(&bins.agent)
                .args(["keys", "init", "--key"])
                .arg(d.join("agent.key")),
        )?;
        aggregator(
            &["keys", "enroll", "--client-id", CLIENT],
            &d.join("agent.key.pub"),
        )?;
        std::fs::create_dir_all(d.join("dataset"))?;
        Ok(Setup { dir, state })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An agent config (systemd/agent.example.toml's keys) for the broker on `port`; the
    /// worker never runs (no round starts).
    fn agent_config(&self, port: u16) -> Result<PathBuf> {
        let d = self.path();
        let cfg = format!(
            "client_id = {CLIENT:?}\nfederation = {FEDERATION:?}\n\
             broker = \"mqtt://127.0.0.1:{port}\"\ninsecure = true\nkey_file = {key:?}\n\
             aggregator_key = {agg:?}\ndataset = {ds:?}\ncache_dir = {cache:?}\n\
             work_dir = {work:?}\ncodec = \"int8\"\nworker = [\"zk0-train\", \"train\"]\n",
            key = d.join("agent.key"),
            agg = self.state.join("aggregator.pub"),
            ds = d.join("dataset"),
            cache = d.join("cache"),
            work = d.join("work"),
        );
        let path = d.join(format!("agent-{port}.toml"));
        std::fs::write(&path, cfg)?;
        Ok(path)
    }
}

/// A systemd notify socket: collects the datagrams a `Type=notify` service sends.
struct Notify {
    path: PathBuf,
    sock: UnixDatagram,
}

impl Notify {
    fn bind(path: PathBuf) -> Result<Notify> {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path)
            .with_context(|| format!("binding the notify socket {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(Notify { path, sock })
    }

    /// The environment systemd gives the unit's main process.
    fn env(&self) -> [(&'static str, String); 2] {
        [
            ("NOTIFY_SOCKET", self.path.display().to_string()),
            ("WATCHDOG_USEC", WATCHDOG_USEC.to_string()),
        ]
    }

    /// Waits (bounded) for `READY=1`; fails early when `child` exits first.
    fn wait_ready(&self, child: &mut ChildGuard, log: &Path, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
            if let Some(st) = child.child.try_wait()? {
                anyhow::bail!(
                    "{} exited ({st}) before READY=1:\n{}",
                    child.name,
                    tail(log)
                );
            }
            anyhow::ensure!(
                t0.elapsed() < timeout,
                "{}: no READY=1 after {timeout:?}:\n{}",
                child.name,
                tail(log)
            );
        }
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Watches the agent's status topic on a broker: (arrival, session, online) of each message.
struct Watcher {
    rx: mpsc::Receiver<(Instant, u64, bool)>,
    client: Client,
    stop: Arc<AtomicBool>,
}

impl Watcher {
    fn start(port: u16) -> Result<Watcher> {
        let topic = Topics::new(FEDERATION)?.client_status(CLIENT);
        let mut opts = MqttOptions::new(format!("zk0-bench-watch-{port}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 16);
        let (tx, rx) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, halt) = (client.clone(), stop.clone());
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                        if let Ok(s) = message::decode::<ClientStatus>(
                            &p.payload,
                            message::DEFAULT_MAX_MESSAGE_LEN,
                        ) {
                            let _ = tx.send((Instant::now(), s.session, s.online));
                        }
                    }
                    Ok(_) => {}
                    Err(_) if halt.load(Ordering::SeqCst) => return,
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        sub_rx
            .recv_timeout(Duration::from_secs(20))
            .context("the status watcher never subscribed")?;
        Ok(Watcher { rx, client, stop })
    }

    /// When the `online` status of a session that began at or after `since_ms` arrived.
    fn wait_online(&self, since_ms: u64, timeout: Duration) -> Result<Instant> {
        let t0 = Instant::now();
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            let (at, session, online) = self
                .rx
                .recv_timeout(left)
                .with_context(|| format!("no online status after {timeout:?}"))?;
            if online && session >= since_ms {
                return Ok(at);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
    }
}

/// How to run the agent binary: natively, or under qemu-user.
#[derive(Clone, Copy, PartialEq)]
enum Arch {
    X86_64,
    Aarch64Qemu,
}

impl Arch {
    fn label(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64Qemu => "aarch64 (qemu-user)",
        }
    }

    fn command(self, bin: &Path) -> Command {
        match self {
            Arch::X86_64 => Command::new(bin),
            Arch::Aarch64Qemu => {
                let mut c = Command::new("qemu-aarch64-static");
                c.args(["-L", "/usr/aarch64-linux-gnu"]).arg(bin);
                c
            }
        }
    }

    /// Bounds on READY and on the online status: qemu translates every block first.
    fn timeout(self) -> Duration {
        match self {
            Arch::X86_64 => Duration::from_secs(30),
            Arch::Aarch64Qemu => Duration::from_secs(180),
        }
    }
}

/// What one start of the agent measured (milliseconds), and the idle figures of the last.
struct Starts {
    ready_ms: Vec<f64>,
    online_ms: Vec<f64>,
    idle: Footprint,
    breakdown: Breakdown,
}

/// A started daemon, already READY.
struct Started {
    child: ChildGuard,
    log: PathBuf,
    ready: Duration,
    t0: Instant,
}

/// Spawns `cmd` as systemd would (notify socket + watchdog in its environment) and waits for
/// READY=1.
fn start_notify(
    name: &str,
    mut cmd: Command,
    dir: &Path,
    tag: &str,
    timeout: Duration,
) -> Result<Started> {
    let notify = Notify::bind(dir.join(format!("{tag}.notify")))?;
    let log = dir.join(format!("{tag}.log"));
    cmd.envs(notify.env());
    let t0 = Instant::now();
    let mut child = ChildGuard::spawn(name, cmd, &log)?;
    notify.wait_ready(&mut child, &log, timeout)?;
    Ok(Started {
        ready: t0.elapsed(),
        child,
        log,
        t0,
    })
}

/// SIGTERM (systemd's stop) and a clean exit within the unit's `TimeoutStopSec=30s`.
fn stop(mut s: Started) -> Result<()> {
    s.child.signal("TERM");
    let st = s.child.wait_timeout(Duration::from_secs(30))?;
    anyhow::ensure!(
        st.success(),
        "{} exit on SIGTERM: {st}\n{}",
        s.child.name,
        tail(&s.log)
    );
    Ok(())
}

/// `reps` starts of the agent on the broker at `port`; the last stays `idle` once online and
/// is measured (`baseline` too, at the same moment, when given).
fn agent_starts(
    arch: Arch,
    bin: &Path,
    setup: &Setup,
    (broker, port): (&str, u16),
    reps: usize,
    idle: Duration,
    baseline: Option<u32>,
) -> Result<(Starts, Option<Footprint>)> {
    let cfg = setup.agent_config(port)?;
    let watcher = Watcher::start(port)?;
    let mut out = Starts {
        ready_ms: Vec::new(),
        online_ms: Vec::new(),
        idle: Footprint::default(),
        breakdown: Breakdown::default(),
    };
    let mut base = None;
    for rep in 0..reps {
        let mut cmd = arch.command(bin);
        cmd.arg("run").arg("--config").arg(&cfg);
        let since = unix_ms();
        let tag = format!("agent-{port}-{}-{rep}", arch.label().replace(' ', "-"));
        let s = start_notify("zk0-agent", cmd, setup.path(), &tag, arch.timeout())?;
        let online = watcher
            .wait_online(since, arch.timeout())
            .with_context(|| tail(&s.log))?;
        out.ready_ms.push(s.ready.as_secs_f64() * 1e3);
        out.online_ms
            .push(online.duration_since(s.t0).as_secs_f64() * 1e3);
        eprintln!(
            "{} on {broker}, start {rep}: READY=1 after {:.1} ms, online after {:.1} ms",
            arch.label(),
            out.ready_ms[rep],
            out.online_ms[rep]
        );
        if rep + 1 == reps {
            thread::sleep(idle);
            let pid = s.child.child.id();
            out.idle = Footprint::read(pid)?;
            out.breakdown = Breakdown::read(pid, bin)?;
            base = baseline.map(Footprint::read).transpose()?;
        }
        stop(s)?;
    }
    Ok((out, base))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `zk0-aggregator serve` the agent connects to: embedded broker on a free loopback port,
/// one round that wants 2 clients (so the one agent waits, idle), started as systemd would.
fn start_aggregator(bins: &Bins, setup: &Setup) -> Result<(Started, u16)> {
    let port = free_port()?;
    let mut cmd = Command::new(&bins.aggregator);
    cmd.arg("--state-dir")
        .arg(&setup.state)
        .args(["serve", "--insecure"])
        .args(["--federation", FEDERATION, "--metrics-listen", ""])
        .args(["--rounds", "1", "--min-clients", "2"])
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    let s = start_notify(
        "zk0-aggregator",
        cmd,
        setup.path(),
        "aggregator",
        Duration::from_secs(60),
    )?;
    wait_for(Duration::from_secs(30), "the aggregator's broker", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    Ok((s, port))
}

/// mosquitto on a free loopback port, listening; `None` when it is not installed.
fn start_mosquitto(dir: &Path) -> Result<Option<(ChildGuard, u16)>> {
    let Some(mosq) = find_mosquitto() else {
        return Ok(None);
    };
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("persistence false\nlistener {port} 127.0.0.1\nallow_anonymous true\n"),
    )?;
    let mut cmd = Command::new(mosq);
    cmd.arg("-c").arg(&conf);
    let child = ChildGuard::spawn("mosquitto", cmd, &dir.join("mosquitto.log"))?;
    wait_for(Duration::from_secs(10), "mosquitto to listen", || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    })?;
    Ok(Some((child, port)))
}

/// File size and `strip`ped size (bytes; `None` without the strip tool).
fn sizes(bin: &Path, strip: &str, dir: &Path) -> Result<(u64, Option<u64>)> {
    let file = std::fs::metadata(bin)
        .with_context(|| format!("{}", bin.display()))?
        .len();
    let out = dir.join("stripped");
    let stripped = Command::new(strip)
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&out).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&out);
    Ok((file, stripped))
}

struct Row {
    what: String,
    arch: &'static str,
    f: Footprint,
}

fn main() -> ExitCode {
    bench_main(|| {
        let o = parse_args()?;
        let bins = binaries()?;
        let arm = target_dir().join(AARCH64).join("release").join("zk0-agent");
        let arm = match (arm.is_file(), o.require_aarch64) {
            (true, _) => Some(arm),
            (false, true) => anyhow::bail!(
                "--aarch64: {} is missing (cargo xtask cross --release builds it)",
                arm.display()
            ),
            (false, false) => None,
        };
        let setup = Setup::new(&bins)?;
        let (agg, port) = start_aggregator(&bins, &setup)?;
        let agg_ready_ms = agg.ready.as_secs_f64() * 1e3;
        let (x86, agg_idle) = agent_starts(
            Arch::X86_64,
            &bins.agent,
            &setup,
            ("zk0-aggregator", port),
            o.reps,
            o.idle,
            Some(agg.child.child.id()),
        )?;
        let mut rows = vec![Row {
            what: "zk0-agent run".into(),
            arch: "x86_64",
            f: x86.idle,
        }];
        if let Some(f) = agg_idle {
            rows.push(Row {
                what: "baseline: zk0-aggregator serve (its broker serving this agent)".into(),
                arch: "x86_64",
                f,
            });
        }
        let arm_starts = match &arm {
            Some(bin) => {
                let (s, _) = agent_starts(
                    Arch::Aarch64Qemu,
                    bin,
                    &setup,
                    ("zk0-aggregator", port),
                    o.reps.min(3),
                    o.idle,
                    None,
                )?;
                rows.push(Row {
                    what: "zk0-agent run under qemu-aarch64-static (emulator included)".into(),
                    arch: "aarch64",
                    f: s.idle,
                });
                Some(s)
            }
            None => None,
        };
        stop(agg)?;
        // mosquitto's idle footprint with this agent connected (no aggregator: it waits).
        if let Some((mosq, mport)) = start_mosquitto(setup.path())? {
            let (_, m) = agent_starts(
                Arch::X86_64,
                &bins.agent,
                &setup,
                ("mosquitto", mport),
                1,
                o.idle,
                Some(mosq.child.id()),
            )?;
            if let Some(f) = m {
                rows.push(Row {
                    what: "baseline: mosquitto (this agent connected)".into(),
                    arch: "x86_64",
                    f,
                });
            }
        }

        let profile = bins.profile;
        println!();
        println!(
            "zk0-agent footprint ({profile} build), idle {:.0} s after its online status, enrolled, \
             waiting for a round, on zk0-aggregator's embedded broker (loopback); MB = 10^6 bytes",
            o.idle.as_secs_f64()
        );
        println!(
            "| process | arch | VmRSS (MB) | VmHWM (MB) | PSS (MB) | private (MB) | anonymous (MB) | threads | VmRSS / {GOAL_MB:.0} MB goal |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.2} |",
                r.what,
                r.arch,
                mb(r.f.rss),
                mb(r.f.hwm),
                mb(r.f.pss),
                mb(r.f.private),
                mb(r.f.anon),
                r.f.threads,
                mb(r.f.rss) / GOAL_MB
            );
        }
        for r in rows
            .iter()
            .skip(1)
            .filter(|r| r.what.starts_with("baseline"))
        {
            println!(
                "agent VmRSS / {}: {:.2}",
                r.what.trim_start_matches("baseline: "),
                x86.idle.rss as f64 / r.f.rss as f64
            );
        }
        println!();
        println!("resident set by mapping (/proc/<pid>/smaps), idle agent");
        println!(
            "| mapping | x86_64 (MB) |{}",
            if arm_starts.is_some() {
                " aarch64 under qemu (MB) |"
            } else {
                ""
            }
        );
        println!(
            "|---|---:|{}",
            if arm_starts.is_some() { "---:|" } else { "" }
        );
        let kinds: [(&str, fn(&Breakdown) -> u64); 7] = [
            (
                "the zk0-agent binary's own pages (code, rodata, relocated data)",
                |b| b.binary,
            ),
            ("shared libraries (libc, libm, libgcc_s, ld.so)", |b| {
                b.libraries
            }),
            ("[heap] (brk: glibc's main malloc arena)", |b| b.heap),
            (
                "other anonymous (malloc arenas, thread stacks; under qemu: its code cache)",
                |b| b.anon,
            ),
            ("[stack] (main thread)", |b| b.stack),
            ("other (vdso, other files; under qemu: the emulator)", |b| {
                b.other
            }),
            ("total", Breakdown::total),
        ];
        for (name, get) in kinds {
            let arm = arm_starts
                .as_ref()
                .map(|s| format!(" {:.1} |", mb(get(&s.breakdown))))
                .unwrap_or_default();
            println!("| {name} | {:.1} |{arm}", mb(get(&x86.breakdown)));
        }
        println!();
        println!("start-up, spawn → READY=1 on NOTIFY_SOCKET (what systemd waits for) and → its online status on the broker");
        println!(
            "| daemon | arch | starts | READY=1 median (ms) | min | max | online median (ms) |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|");
        let starts = |what: &str, arch: &str, s: &Starts| {
            let (lo, hi) = s
                .ready_ms
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
            println!(
                "| {what} | {arch} | {} | {:.1} | {lo:.1} | {hi:.1} | {:.1} |",
                s.ready_ms.len(),
                median(&s.ready_ms),
                median(&s.online_ms)
            );
        };
        starts("zk0-agent run", "x86_64", &x86);
        if let Some(s) = &arm_starts {
            starts("zk0-agent run (qemu-user: indicative)", "aarch64", s);
        }
        println!("| baseline: zk0-aggregator serve | x86_64 | 1 | {agg_ready_ms:.1} | | | |");
        println!();
        println!("binary size");
        println!("| binary | arch | file (MB) | stripped (MB) |");
        println!("|---|---|---:|---:|");
        let mut size_rows = vec![
            ("zk0-agent", "x86_64", bins.agent.clone(), "strip"),
            ("zk0-aggregator", "x86_64", bins.aggregator.clone(), "strip"),
        ];
        if let Some(a) = &arm {
            size_rows.push(("zk0-agent", "aarch64", a.clone(), "aarch64-linux-gnu-strip"));
        }
        for (name, arch, path, strip) in size_rows {
            let (file, stripped) = sizes(&path, strip, setup.path())?;
            let stripped = stripped.map_or("n/a (no strip tool)".into(), |s| {
                format!("{:.1}", s as f64 / 1e6)
            });
            println!(
                "| {name} ({profile}) | {arch} | {:.1} | {stripped} |",
                file as f64 / 1e6
            );
        }
        match &arm {
            Some(a) => println!("aarch64: measured {}", a.display()),
            None => println!(
                "aarch64: not measured ({}/{AARCH64}/release/zk0-agent missing; \
                 `cargo xtask bench agent --aarch64` builds it first)",
                target_dir().display()
            ),
        }
        println!(
            "x86_64 idle VmRSS: {:.1} MB, {:.2} × the {GOAL_MB:.0} MB goal ({})",
            mb(x86.idle.rss),
            mb(x86.idle.rss) / GOAL_MB,
            if mb(x86.idle.rss) <= GOAL_MB {
                "met"
            } else {
                "NOT met"
            }
        );
        Ok(())
    })
}
