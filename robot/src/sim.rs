//! Emulated STS3215 servos for tests and the demo, in memory ([`SimTransport`]) or on a
//! pseudo-terminal ([`PtyEmulator`]) that any client opens as if it were the arm's adapter.
//!
//! Behaviour follows the reference emulators (`pty_servo_emulator.py`, `EmulatedBus` in
//! `make_lerobot_trace.py`): a 256-byte register file per id, little-endian; replies only to
//! PING/READ/WRITE/REG_WRITE/ACTION addressed to an existing id; no reply to broadcasts except
//! PING (every servo) and SYNC_READ (listed ids that exist, in list order); SYNC_WRITE writes
//! silently; instructions with a bad checksum are ignored; nothing is echoed. On top of those:
//! `Present_Position = actual - Homing_Offset` as on the real servo, first-order motion of the
//! actual position towards `Goal_Position + Homing_Offset` while torque is on (turning torque on
//! holds the joint where it is), joints that can
//! be moved "by hand" ([`Servos::set_actual`]), and [`Faults`] per servo.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::arm::{Motor, FULL_TURN_MOTOR};
use crate::calibration::{Calibration, MotorCalibration};
use crate::feetech::protocol::{self, decode, Decoded, Direction, ErrorBits, Instruction, Packet};
use crate::feetech::table::{self, Register};
use crate::feetech::Transport;

/// Faults injected into one servo's replies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Never answers (unplugged, wrong id, dead).
    pub silent: bool,
    /// The next N replies are not sent.
    pub drop_replies: u32,
    /// The next N replies have their checksum inverted.
    pub corrupt_replies: u32,
    /// The next N replies are cut in half.
    pub truncate_replies: u32,
    /// Sent in the error byte of every reply (e.g. [`ErrorBits::OVERLOAD`]).
    pub error_bits: u8,
}

#[derive(Debug, Clone)]
struct Servo {
    mem: [u8; 256],
    /// Encoder position before the homing offset, in steps.
    actual: f64,
    pending: Option<(u8, Vec<u8>)>,
    faults: Faults,
    sweep: Option<Sweep>,
}

/// A hand moving a joint back and forth: each sync read of Present_Position that includes
/// the servo first moves it `step` raw steps, turning round at `lo` and `hi`. Tied to reads,
/// not time, so a test knows the position every read returns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sweep {
    pub lo: f64,
    pub hi: f64,
    pub step: f64,
}

impl Sweep {
    fn advance(&mut self, actual: f64) -> f64 {
        let next = actual + self.step;
        if next > self.hi || next < self.lo {
            self.step = -self.step;
            return actual + self.step;
        }
        next
    }
}

impl Servo {
    fn new(id: u8) -> Self {
        let mut mem = [0u8; 256];
        let mut set = |r: Register, v: u32| {
            let at = usize::from(r.addr);
            mem[at..at + usize::from(r.size)]
                .copy_from_slice(&protocol::le_bytes(v, r.size.into()));
        };
        // Synthetic factory state, as the Python emulators have it (firmware 3.10 made up).
        set(table::FIRMWARE_MAJOR_VERSION, 3);
        set(table::FIRMWARE_MINOR_VERSION, 10);
        set(table::MODEL_NUMBER, u32::from(table::STS3215_MODEL));
        set(table::ID, u32::from(id));
        set(table::RETURN_DELAY_TIME, 250);
        set(table::MAX_POSITION_LIMIT, 4095);
        set(table::PHASE, 0x0C);
        set(table::P_COEFFICIENT, 32);
        set(table::D_COEFFICIENT, 32);
        set(table::LOCK, 1);
        set(table::GOAL_POSITION, 2048);
        let mut s = Self {
            mem,
            actual: 2048.0,
            pending: None,
            faults: Faults::default(),
            sweep: None,
        };
        s.refresh();
        s
    }

    fn get(&self, r: &Register) -> i64 {
        let at = usize::from(r.addr);
        r.decode(protocol::from_le(&self.mem[at..at + usize::from(r.size)]))
    }

    fn set(&mut self, r: &Register, value: i64) {
        let raw = r.encode(value).unwrap_or(0);
        let at = usize::from(r.addr);
        self.mem[at..at + usize::from(r.size)]
            .copy_from_slice(&protocol::le_bytes(raw, r.size.into()));
    }

    fn store(&mut self, addr: u8, data: &[u8]) {
        let torque_was = self.get(&table::TORQUE_ENABLE);
        let at = usize::from(addr);
        let n = data.len().min(256 - at);
        self.mem[at..at + n].copy_from_slice(&data[..n]);
        if torque_was == 0 && self.get(&table::TORQUE_ENABLE) != 0 {
            // Torque on holds the joint where it is rather than jumping to a stale goal.
            self.refresh();
            let here = self.get(&table::PRESENT_POSITION);
            self.set(&table::GOAL_POSITION, here);
        }
    }

    /// Present_Position as the servo reports it.
    fn refresh(&mut self) {
        let offset = self.get(&table::HOMING_OFFSET);
        let present = (self.actual.round() as i64 - offset).clamp(-32767, 32767);
        self.set(&table::PRESENT_POSITION, present);
    }

    fn advance(&mut self, dt: Duration, tau: Duration) {
        if self.get(&table::TORQUE_ENABLE) == 0 {
            return;
        }
        let target = (self.get(&table::GOAL_POSITION) + self.get(&table::HOMING_OFFSET)) as f64;
        let k = if tau.is_zero() {
            1.0
        } else {
            1.0 - (-dt.as_secs_f64() / tau.as_secs_f64()).exp()
        };
        self.actual += (target - self.actual) * k;
        if (target - self.actual).abs() < 0.5 {
            self.actual = target;
        }
    }

    fn status(&mut self, id: u8, params: &[u8]) -> Vec<u8> {
        let f = &mut self.faults;
        if f.silent {
            return vec![];
        }
        if f.drop_replies > 0 {
            f.drop_replies -= 1;
            return vec![];
        }
        let mut out = protocol::status(id, ErrorBits(f.error_bits), params).unwrap_or_default();
        if f.corrupt_replies > 0 {
            f.corrupt_replies -= 1;
            if let Some(last) = out.last_mut() {
                *last ^= 0xFF;
            }
        }
        if f.truncate_replies > 0 {
            f.truncate_replies -= 1;
            out.truncate(out.len() / 2);
        }
        out
    }

    fn read(&mut self, id: u8, addr: u8, len: u8) -> Vec<u8> {
        self.refresh();
        let at = usize::from(addr);
        let end = (at + usize::from(len)).min(256);
        let data = self.mem[at..end].to_vec();
        self.status(id, &data)
    }
}

/// A bus of emulated servos.
#[derive(Debug, Clone)]
pub struct Servos {
    servos: BTreeMap<u8, Servo>,
    tau: Duration,
    rx: Vec<u8>,
    instructions: u64,
}

impl Servos {
    /// Servos `ids` at their factory state, at raw position 2048, moving with a 30 ms time
    /// constant when torque is on.
    pub fn new(ids: impl IntoIterator<Item = u8>) -> Self {
        Self {
            servos: ids.into_iter().map(|i| (i, Servo::new(i))).collect(),
            tau: Duration::from_millis(30),
            rx: Vec::new(),
            instructions: 0,
        }
    }

    /// Time constant of the motion towards the goal (zero: instant, as the Python emulators).
    pub fn set_time_constant(&mut self, tau: Duration) {
        self.tau = tau;
    }

    pub fn ids(&self) -> Vec<u8> {
        self.servos.keys().copied().collect()
    }

    /// Valid instructions handled so far.
    pub fn instructions(&self) -> u64 {
        self.instructions
    }

    /// Moves a joint by hand: the raw encoder position before the homing offset.
    pub fn set_actual(&mut self, id: u8, position: f64) {
        if let Some(s) = self.servos.get_mut(&id) {
            s.actual = position;
        }
    }

    /// Moves joint `id` by `sweep` on every sync read of its position (see [`Sweep`]).
    pub fn set_sweep(&mut self, id: u8, sweep: Option<Sweep>) {
        if let Some(s) = self.servos.get_mut(&id) {
            s.sweep = sweep;
        }
    }

    pub fn actual(&self, id: u8) -> Option<f64> {
        self.servos.get(&id).map(|s| s.actual)
    }

    /// A register's value (sign decoded), as the servo would report it.
    pub fn register(&mut self, id: u8, reg: &Register) -> Option<i64> {
        let s = self.servos.get_mut(&id)?;
        s.refresh();
        Some(s.get(reg))
    }

    pub fn set_register(&mut self, id: u8, reg: &Register, value: i64) {
        if let Some(s) = self.servos.get_mut(&id) {
            s.set(reg, value);
        }
    }

    pub fn faults_mut(&mut self, id: u8) -> Option<&mut Faults> {
        self.servos.get_mut(&id).map(|s| &mut s.faults)
    }

    /// Lets `dt` of time pass.
    pub fn advance(&mut self, dt: Duration) {
        for s in self.servos.values_mut() {
            s.advance(dt, self.tau);
        }
    }

    /// Bytes from the host in (any split), reply bytes out. Garbage and packets with a bad
    /// checksum are dropped, as a real servo ignores them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.rx.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            match decode(&self.rx, Direction::Instruction) {
                Decoded::Packet { packet, consumed } => {
                    self.rx.drain(..consumed);
                    out.extend(self.handle(&packet));
                }
                Decoded::Bad { consumed, .. } => {
                    self.rx.drain(..consumed);
                }
                Decoded::Incomplete { skip, .. } => {
                    self.rx.drain(..skip);
                    return out;
                }
            }
        }
    }

    /// Drops a partial instruction: the line went idle, so its missing bytes are lost (a header
    /// made of noise would otherwise swallow the next real instruction).
    pub fn reset_input(&mut self) {
        self.rx.clear();
    }

    /// The reply bytes to one instruction packet (empty when none is due).
    pub fn handle(&mut self, packet: &Packet) -> Vec<u8> {
        self.instructions += 1;
        let p = packet.params.as_slice();
        let Some(instr) = packet.instruction() else {
            return vec![];
        };
        match instr {
            Instruction::SyncWrite => {
                if let [addr, len, items @ ..] = p {
                    let len = usize::from(*len);
                    for item in items.chunks(len + 1).filter(|c| c.len() == len + 1) {
                        if let Some(s) = self.servos.get_mut(&item[0]) {
                            s.store(*addr, &item[1..]);
                        }
                    }
                }
                vec![]
            }
            Instruction::SyncRead => match p {
                [addr, len, ids @ ..] => ids
                    .iter()
                    .flat_map(|id| match self.servos.get_mut(id) {
                        Some(s) => {
                            if *addr == table::PRESENT_POSITION.addr && !s.faults.silent {
                                if let Some(mut sw) = s.sweep {
                                    s.actual = sw.advance(s.actual);
                                    s.sweep = Some(sw);
                                }
                            }
                            s.read(*id, *addr, *len)
                        }
                        None => vec![],
                    })
                    .collect(),
                _ => vec![],
            },
            _ if packet.id == protocol::BROADCAST_ID => {
                let ids = self.ids();
                ids.iter()
                    .flat_map(|id| {
                        let reply = self.single(*id, instr, p);
                        // Of broadcasts only PING is answered.
                        if instr == Instruction::Ping {
                            reply
                        } else {
                            vec![]
                        }
                    })
                    .collect()
            }
            _ => self.single(packet.id, instr, p),
        }
    }

    fn single(&mut self, id: u8, instr: Instruction, p: &[u8]) -> Vec<u8> {
        let Some(s) = self.servos.get_mut(&id) else {
            return vec![];
        };
        match (instr, p) {
            (Instruction::Ping, _) => s.status(id, &[]),
            (Instruction::Read, [addr, len]) => s.read(id, *addr, *len),
            (Instruction::Write, [addr, data @ ..]) => {
                s.store(*addr, data);
                s.status(id, &[])
            }
            (Instruction::RegWrite, [addr, data @ ..]) => {
                s.pending = Some((*addr, data.to_vec()));
                s.status(id, &[])
            }
            (Instruction::Action, _) => {
                if let Some((addr, data)) = s.pending.take() {
                    s.store(addr, &data);
                }
                s.status(id, &[])
            }
            _ => vec![],
        }
    }
}

/// A calibration for emulated arms (a real arm's comes from `calibrate`): no homing offset,
/// joints over raw 1024..3072, `wrist_roll` over the full turn, as LeRobot records it.
pub fn calibration(motors: &[Motor]) -> Calibration {
    Calibration {
        motors: motors
            .iter()
            .map(|m| {
                let (range_min, range_max) = if m.name == FULL_TURN_MOTOR {
                    (0, 4095)
                } else {
                    (1024, 3072)
                };
                let c = MotorCalibration {
                    id: m.id,
                    drive_mode: 0,
                    homing_offset: 0,
                    range_min,
                    range_max,
                };
                (m.name.to_string(), c)
            })
            .collect(),
    }
}

fn lock(servos: &Mutex<Servos>) -> MutexGuard<'_, Servos> {
    // A test that panicked while holding the lock leaves consistent registers behind.
    servos.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared handle to the emulated servos (fault injection, moving joints by hand).
pub type SharedServos = Arc<Mutex<Servos>>;

/// The emulator as an in-memory [`Transport`]: replies are ready as soon as the instruction
/// is written, and time advances by the wall-clock time between writes.
#[derive(Debug)]
pub struct SimTransport {
    servos: SharedServos,
    rx: VecDeque<u8>,
    last: Instant,
}

impl SimTransport {
    pub fn new(servos: Servos) -> Self {
        Self::shared(Arc::new(Mutex::new(servos)))
    }

    pub fn shared(servos: SharedServos) -> Self {
        Self {
            servos,
            rx: VecDeque::new(),
            last: Instant::now(),
        }
    }

    pub fn servos(&self) -> SharedServos {
        Arc::clone(&self.servos)
    }
}

impl Transport for SimTransport {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut s = lock(&self.servos);
        let now = Instant::now();
        s.advance(now - self.last);
        self.last = now;
        // One write is one whole transaction here.
        s.reset_input();
        self.rx.extend(s.feed(bytes));
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], _timeout: Duration) -> io::Result<usize> {
        let n = buf.len().min(self.rx.len());
        for (b, r) in buf.iter_mut().zip(self.rx.drain(..n)) {
            *b = r;
        }
        Ok(n)
    }

    fn clear_input(&mut self) -> io::Result<()> {
        self.rx.clear();
        Ok(())
    }
}

#[cfg(unix)]
/// The emulator serving the master side of a pty; clients open [`PtyEmulator::path`].
/// Stops (and joins its thread) when dropped.
pub struct PtyEmulator {
    path: String,
    servos: SharedServos,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    // Held open so the pty stays up while clients come and go.
    _slave: serialport::TTYPort,
}

#[cfg(unix)]
impl std::fmt::Debug for PtyEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtyEmulator")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(unix)]
impl PtyEmulator {
    /// Opens a pty pair (raw mode, no echo) and serves `servos` on it from a thread.
    pub fn start(servos: Servos) -> io::Result<Self> {
        use serialport::SerialPort;
        let (mut master, slave) = serialport::TTYPort::pair().map_err(io::Error::from)?;
        let path = slave
            .name()
            .ok_or_else(|| io::Error::other("pty slave has no path"))?;
        master
            .set_timeout(Duration::from_millis(5))
            .map_err(io::Error::from)?;
        let servos = Arc::new(Mutex::new(servos));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (servos, stop) = (Arc::clone(&servos), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("servo-emulator".into())
                .spawn(move || serve(&mut master, &servos, &stop))?
        };
        Ok(Self {
            path,
            servos,
            stop,
            thread: Some(thread),
            _slave: slave,
        })
    }

    /// The device path to open, e.g. `/dev/pts/3`.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn servos(&self) -> SharedServos {
        Arc::clone(&self.servos)
    }
}

#[cfg(unix)]
impl Drop for PtyEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(unix)]
fn serve(master: &mut serialport::TTYPort, servos: &Mutex<Servos>, stop: &AtomicBool) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 512];
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = match master.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => 0,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(_) => return,
        };
        let reply = {
            let mut s = lock(servos);
            if n == 0 {
                s.reset_input();
            }
            let now = Instant::now();
            s.advance(now - last);
            last = now;
            s.feed(&buf[..n])
        };
        if !reply.is_empty() && master.write_all(&reply).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homing_offset_shifts_present_position() {
        let mut s = Servos::new([1]);
        s.set_actual(1, 1000.0);
        s.set_register(1, &table::HOMING_OFFSET, -1011);
        assert_eq!(s.register(1, &table::PRESENT_POSITION), Some(2011));
        s.set_register(1, &table::HOMING_OFFSET, 1500);
        assert_eq!(s.register(1, &table::PRESENT_POSITION), Some(-500));
    }

    #[test]
    fn motion_is_first_order_and_only_with_torque() {
        let mut s = Servos::new([1]);
        s.set_register(1, &table::GOAL_POSITION, 3048);
        s.advance(Duration::from_millis(30));
        assert_eq!(s.actual(1), Some(2048.0), "torque off: no motion");
        s.set_register(1, &table::TORQUE_ENABLE, 1);
        s.advance(Duration::from_millis(30)); // one time constant: 63 %
        let a = s.actual(1).unwrap();
        assert!(
            (a - (2048.0 + 1000.0 * (1.0 - (-1f64).exp()))).abs() < 1e-6,
            "{a}"
        );
        s.advance(Duration::from_secs(1));
        assert_eq!(s.actual(1), Some(3048.0));
    }

    #[test]
    fn sweep_moves_a_joint_per_sync_read_and_turns_round() {
        let mut s = Servos::new([1, 2]);
        s.set_sweep(
            1,
            Some(Sweep {
                lo: 2040.0,
                hi: 2056.0,
                step: 5.0,
            }),
        );
        let read = protocol::sync_read(table::PRESENT_POSITION.addr, 2, &[1, 2]).unwrap();
        let mut seen = vec![];
        for _ in 0..6 {
            s.feed(&read);
            seen.push(s.actual(1).unwrap());
        }
        assert_eq!(seen, [2053.0, 2048.0, 2043.0, 2048.0, 2053.0, 2048.0]);
        assert_eq!(s.actual(2), Some(2048.0), "servo 2 has no sweep");
        // Other registers do not move it.
        s.feed(&protocol::sync_read(table::PRESENT_VELOCITY.addr, 2, &[1]).unwrap());
        assert_eq!(s.actual(1), Some(2048.0));
    }

    #[test]
    fn garbage_and_bad_checksums_get_no_reply() {
        let mut s = Servos::new([1, 2]);
        let mut ping = protocol::ping(1).unwrap();
        assert_eq!(
            s.feed(&ping),
            protocol::status(1, ErrorBits(0), &[]).unwrap()
        );
        *ping.last_mut().unwrap() ^= 1;
        assert!(s.feed(&ping).is_empty());
        assert!(s.feed(&[0xFF, 0xFF, 0xFF, 0x00, 0x13]).is_empty());
        // That noise looks like the start of a 23-byte packet; idle time drops it.
        s.reset_input();
        // Split in two writes, and a packet with a short READ: still no panic, no reply.
        let read = protocol::read(2, 56, 2).unwrap();
        assert!(s.feed(&read[..3]).is_empty());
        assert_eq!(s.feed(&read[3..]).len(), 8);
        let short = protocol::frame(2, Instruction::Read as u8, &[56]).unwrap();
        assert!(s.feed(&short).is_empty());
    }
}
