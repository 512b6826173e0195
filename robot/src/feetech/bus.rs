//! The bus driver: one transaction at a time over a [`Transport`] (a serial port, the
//! emulator's pty, or memory).
//!
//! Each transaction drops stale input first (the SDK does not, so a failed exchange poisons the
//! next one), sends one instruction, and reads the expected replies against one deadline sized
//! as LeRobot sizes it (`50 ms + bytes × byte time`). Timeouts and corrupt replies are retried
//! up to [`BusConfig::retries`] times; servo error bits are never retried. Everything that
//! happens is counted in [`BusStats`], and every error names the motor and register.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use super::protocol::{self, decode, Decoded, Direction, ErrorBits, Packet, ProtocolError};
use super::table::{self, Register, ValueError};

/// Bytes in, bytes out, with a timeout: what the bus needs from a port.
pub trait Transport {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Reads what arrives within `timeout` into `buf`. `Ok(0)` means nothing came in time, and
    /// the bus then treats its deadline as passed (so an in-memory transport may return at once).
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
    /// Drops unread input.
    fn clear_input(&mut self) -> io::Result<()>;
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        (**self).write_all(bytes)
    }
    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        (**self).read(buf, timeout)
    }
    fn clear_input(&mut self) -> io::Result<()> {
        (**self).clear_input()
    }
}

/// Timing and retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct BusConfig {
    /// Line speed, for the byte time in the deadline (LeRobot: 1 Mbaud).
    pub baud: u32,
    /// Fixed part of each transaction's deadline (LeRobot's patched SDK: 50 ms).
    pub base_timeout: Duration,
    /// Extra attempts after a timeout or a corrupt reply (LeRobot's arms: 2 for reads).
    pub retries: u32,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            baud: 1_000_000,
            base_timeout: Duration::from_millis(50),
            retries: 2,
        }
    }
}

impl BusConfig {
    /// LeRobot's `patch_setPacketTimeout`: `byte_time × (n + 3) + 50 ms`.
    pub fn timeout_for(&self, bytes: usize) -> Duration {
        let byte_ns = 10_000_000_000u64 / u64::from(self.baud.max(1));
        self.base_timeout + Duration::from_nanos(byte_ns * (bytes as u64 + 3))
    }
}

/// Counters since the bus was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Instructions sent (each attempt counts).
    pub transactions: u64,
    /// Attempts repeated after a timeout or corrupt reply.
    pub retries: u64,
    /// Attempts that ended with no (or no matching) reply.
    pub timeouts: u64,
    /// Replies whose checksum was wrong.
    pub checksum_errors: u64,
    /// Attempts that ended on other garbage: truncated replies, impossible headers, wrong size.
    pub corrupt: u64,
    /// Whole packets from an id nobody asked (discarded, as the SDK does).
    pub stray_packets: u64,
    /// Our own instruction read back (a line that echoes TX); discarded.
    pub echoes: u64,
    /// Replies that carried servo error bits.
    pub status_errors: u64,
    /// Every error bit seen, OR-ed.
    pub error_bits_seen: ErrorBits,
}

/// Where on the bus something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: u8,
    pub motor: Option<String>,
    pub op: &'static str,
    pub register: Option<&'static str>,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.motor, self.id) {
            (Some(m), id) => write!(f, "motor {id} ({m})")?,
            (None, protocol::BROADCAST_ID) => f.write_str("broadcast")?,
            (None, id) => write!(f, "motor {id}")?,
        }
        write!(f, " {}", self.op)?;
        if let Some(r) = self.register {
            write!(f, " {r}")?;
        }
        Ok(())
    }
}

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{at}: no reply within {} ms{}", timeout.as_millis(),
        stray_from.map(|i| format!(" (a reply from id {i} was discarded)")).unwrap_or_default())]
    Timeout {
        at: Target,
        timeout: Duration,
        stray_from: Option<u8>,
    },
    #[error("{at}: corrupt reply: {source}")]
    Corrupt { at: Target, source: ProtocolError },
    #[error("{at}: servo reports {bits}")]
    Servo { at: Target, bits: ErrorBits },
    #[error("{at}: {source}")]
    Value { at: Target, source: ValueError },
    #[error("{at}: cannot build the instruction: {source}")]
    Packet { at: Target, source: ProtocolError },
    #[error("{at}: serial port: {source}")]
    Io { at: Target, source: io::Error },
}

impl BusError {
    pub fn target(&self) -> &Target {
        match self {
            Self::Timeout { at, .. }
            | Self::Corrupt { at, .. }
            | Self::Servo { at, .. }
            | Self::Value { at, .. }
            | Self::Packet { at, .. }
            | Self::Io { at, .. } => at,
        }
    }

    /// Worth another attempt: the exchange failed, not the servo.
    fn is_transient(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Corrupt { .. })
    }
}

/// A Feetech bus on one port.
pub struct Bus<T> {
    port: T,
    config: BusConfig,
    stats: BusStats,
    names: BTreeMap<u8, String>,
}

impl<T> fmt::Debug for Bus<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// One expected status packet.
struct Expect {
    id: u8,
    data_len: usize,
}

impl<T: Transport> Bus<T> {
    pub fn new(port: T, config: BusConfig) -> Self {
        Self {
            port,
            config,
            stats: BusStats::default(),
            names: BTreeMap::new(),
        }
    }

    /// Motor names for error messages.
    pub fn set_names(&mut self, names: impl IntoIterator<Item = (u8, String)>) {
        self.names = names.into_iter().collect();
    }

    pub fn stats(&self) -> &BusStats {
        &self.stats
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut BusConfig {
        &mut self.config
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.port
    }

    pub fn into_transport(self) -> T {
        self.port
    }

    fn target(&self, id: u8, op: &'static str, register: Option<&Register>) -> Target {
        Target {
            id,
            motor: self.names.get(&id).cloned(),
            op,
            register: register.map(|r| r.name),
        }
    }

    /// PING `id`, then READ its Model_Number, as the SDK's `ping()` does.
    pub fn ping(&mut self, id: u8) -> Result<u16, BusError> {
        let at = self.target(id, "PING", None);
        let packet = single_id(id, &at).and_then(|_| build(protocol::ping(id), &at))?;
        // Error bits do not stop the SDK's ping before the model read; they fail it after.
        let bits = self.exchange_first(&at, &packet, 0)?.error_bits();
        let reg = table::MODEL_NUMBER;
        let at = self.target(id, "READ", Some(&reg));
        let packet = build(protocol::read(id, reg.addr, reg.size), &at)?;
        let reply = self.exchange_first(&at, &packet, 2)?;
        let bits = ErrorBits(bits.0 | reply.error_bits().0);
        if !bits.is_empty() {
            return Err(BusError::Servo { at, bits });
        }
        Ok(protocol::from_le(&reply.params) as u16)
    }

    /// Broadcast PING: every servo answers; returns `(id, error bits)` of each reply.
    /// Waits the whole deadline (`wait`), since the number of servos is unknown.
    pub fn broadcast_ping(&mut self, wait: Duration) -> Result<Vec<(u8, ErrorBits)>, BusError> {
        let at = self.target(protocol::BROADCAST_ID, "PING", None);
        let packet = build(protocol::ping(protocol::BROADCAST_ID), &at)?;
        self.send(&at, &packet)?;
        let deadline = Instant::now() + wait;
        let mut buf = Vec::new();
        let mut found = Vec::new();
        loop {
            match decode(&buf, Direction::Status) {
                Decoded::Packet { packet, consumed } => {
                    buf.drain(..consumed);
                    self.note_bits(packet.error_bits());
                    found.push((packet.id, packet.error_bits()));
                }
                Decoded::Bad { error, consumed } => {
                    buf.drain(..consumed);
                    self.count_bad(&error);
                }
                Decoded::Incomplete { skip, .. } => {
                    buf.drain(..skip);
                    if !self.fill(&at, &mut buf, deadline)? {
                        return Ok(found);
                    }
                }
            }
        }
    }

    /// READ `reg` of one servo, sign decoded.
    pub fn read(&mut self, id: u8, reg: &Register) -> Result<i64, BusError> {
        let at = self.target(id, "READ", Some(reg));
        let packet =
            single_id(id, &at).and_then(|_| build(protocol::read(id, reg.addr, reg.size), &at))?;
        let reply = self.exchange_one(&at, &packet, usize::from(reg.size))?;
        Ok(reg.decode(protocol::from_le(&reply.params)))
    }

    /// WRITE `value` to `reg` of one servo (broadcast id: all servos, no reply).
    pub fn write(&mut self, id: u8, reg: &Register, value: i64) -> Result<(), BusError> {
        self.write_with(id, reg, value, "WRITE", protocol::write)
    }

    /// REG_WRITE: held by the servo until [`Bus::action`].
    pub fn reg_write(&mut self, id: u8, reg: &Register, value: i64) -> Result<(), BusError> {
        self.write_with(id, reg, value, "REG_WRITE", protocol::reg_write)
    }

    fn write_with(
        &mut self,
        id: u8,
        reg: &Register,
        value: i64,
        op: &'static str,
        builder: fn(u8, u8, &[u8]) -> Result<Vec<u8>, ProtocolError>,
    ) -> Result<(), BusError> {
        let at = self.target(id, op, Some(reg));
        let raw = reg.encode(value).map_err(|source| BusError::Value {
            at: at.clone(),
            source,
        })?;
        let data = protocol::le_bytes(raw, usize::from(reg.size));
        let packet = build(builder(id, reg.addr, &data), &at)?;
        if id == protocol::BROADCAST_ID {
            return self.send(&at, &packet);
        }
        self.exchange_one(&at, &packet, 0).map(|_| ())
    }

    /// ACTION: apply held REG_WRITEs (broadcast id: all servos, no reply).
    pub fn action(&mut self, id: u8) -> Result<(), BusError> {
        let at = self.target(id, "ACTION", None);
        let packet = build(protocol::action(id), &at)?;
        if id == protocol::BROADCAST_ID {
            return self.send(&at, &packet);
        }
        self.exchange_one(&at, &packet, 0).map(|_| ())
    }

    /// SYNC_READ `reg` from `ids`, sign decoded, in the order of `ids`. Servo error bits in the
    /// replies are counted in [`BusStats`] but do not fail the read (as in LeRobot).
    pub fn sync_read(&mut self, reg: &Register, ids: &[u8]) -> Result<Vec<i64>, BusError> {
        let at = self.target(protocol::BROADCAST_ID, "SYNC_READ", Some(reg));
        let packet = build(protocol::sync_read(reg.addr, reg.size, ids), &at)?;
        let expect: Vec<Expect> = ids
            .iter()
            .map(|id| Expect {
                id: *id,
                data_len: usize::from(reg.size),
            })
            .collect();
        let replies = self.exchange(&at, &packet, &expect)?;
        Ok(replies
            .iter()
            .map(|p| reg.decode(protocol::from_le(&p.params)))
            .collect())
    }

    /// SYNC_WRITE `reg` for each `(id, value)`; servos do not answer, so loss is not detectable.
    pub fn sync_write(&mut self, reg: &Register, values: &[(u8, i64)]) -> Result<(), BusError> {
        let at = self.target(protocol::BROADCAST_ID, "SYNC_WRITE", Some(reg));
        let mut data = Vec::with_capacity(values.len());
        for (id, v) in values {
            let raw = reg.encode(*v).map_err(|source| BusError::Value {
                at: self.target(*id, "SYNC_WRITE", Some(reg)),
                source,
            })?;
            data.push((*id, protocol::le_bytes(raw, usize::from(reg.size))));
        }
        let items: Vec<(u8, &[u8])> = data.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        let packet = build(protocol::sync_write(reg.addr, reg.size, &items), &at)?;
        self.send(&at, &packet)
    }

    /// One instruction to one servo and its reply, error bits and all.
    fn exchange_first(
        &mut self,
        at: &Target,
        packet: &[u8],
        data_len: usize,
    ) -> Result<Packet, BusError> {
        let expect = [Expect {
            id: at.id,
            data_len,
        }];
        let mut replies = self.exchange(at, packet, &expect)?;
        replies.pop().ok_or_else(|| BusError::Timeout {
            at: at.clone(),
            timeout: self.config.timeout_for(packet.len()),
            stray_from: None,
        })
    }

    /// One instruction to one servo and its reply; error bits become [`BusError::Servo`].
    fn exchange_one(
        &mut self,
        at: &Target,
        packet: &[u8],
        data_len: usize,
    ) -> Result<Packet, BusError> {
        let reply = self.exchange_first(at, packet, data_len)?;
        if !reply.error_bits().is_empty() {
            return Err(BusError::Servo {
                at: at.clone(),
                bits: reply.error_bits(),
            });
        }
        Ok(reply)
    }

    /// Sends `packet` and collects `expect`, retrying transient failures.
    fn exchange(
        &mut self,
        at: &Target,
        packet: &[u8],
        expect: &[Expect],
    ) -> Result<Vec<Packet>, BusError> {
        let mut attempt = 0;
        loop {
            let result = self
                .send(at, packet)
                .and_then(|_| self.receive(at, packet, expect));
            match result {
                Err(e) if e.is_transient() && attempt < self.config.retries => {
                    attempt += 1;
                    self.stats.retries += 1;
                }
                other => return other,
            }
        }
    }

    /// Drops stale input, then writes one instruction.
    fn send(&mut self, at: &Target, packet: &[u8]) -> Result<(), BusError> {
        let io = |source| BusError::Io {
            at: at.clone(),
            source,
        };
        self.port.clear_input().map_err(io)?;
        self.stats.transactions += 1;
        self.port.write_all(packet).map_err(io)
    }

    /// Reads the replies in `expect` order against one deadline, like the SDK's `readRx` per id:
    /// packets from other ids are discarded, an impossible header resyncs by one byte, a bad
    /// checksum fails at once.
    fn receive(
        &mut self,
        at: &Target,
        sent: &[u8],
        expect: &[Expect],
    ) -> Result<Vec<Packet>, BusError> {
        let reply_bytes: usize = expect.iter().map(|e| e.data_len + 6).sum();
        let timeout = self.config.timeout_for(sent.len() + reply_bytes);
        let deadline = Instant::now() + timeout;
        let mut buf: Vec<u8> = Vec::new();
        let mut out = Vec::with_capacity(expect.len());
        let mut echo_possible = true;
        for want in expect {
            let at = Target {
                id: want.id,
                motor: self.names.get(&want.id).cloned(),
                ..at.clone()
            };
            // Garbage seen since the last whole packet, to tell corrupt from silent.
            let mut garbage: Option<ProtocolError> = None;
            let mut stray_from = None;
            loop {
                match decode(&buf, Direction::Status) {
                    Decoded::Packet { packet, consumed } => {
                        let raw = buf.drain(..consumed).collect::<Vec<u8>>();
                        garbage = None;
                        if echo_possible && raw.ends_with(sent) {
                            echo_possible = false;
                            self.stats.echoes += 1;
                            continue;
                        }
                        echo_possible = false;
                        if packet.id != want.id {
                            self.stats.stray_packets += 1;
                            stray_from = Some(packet.id);
                            continue;
                        }
                        if packet.params.len() != want.data_len {
                            self.stats.corrupt += 1;
                            return Err(BusError::Corrupt {
                                at,
                                source: ProtocolError::WrongDataLength {
                                    expected: want.data_len,
                                    got: packet.params.len(),
                                },
                            });
                        }
                        self.note_bits(packet.error_bits());
                        out.push(packet);
                        break;
                    }
                    Decoded::Bad {
                        error: error @ ProtocolError::BadChecksum { .. },
                        ..
                    } => {
                        self.stats.checksum_errors += 1;
                        return Err(BusError::Corrupt { at, source: error });
                    }
                    Decoded::Bad { error, consumed } => {
                        // An echo of a broadcast instruction lands here (id 0xFE): resync.
                        buf.drain(..consumed);
                        garbage = Some(error);
                    }
                    Decoded::Incomplete { skip, need } => {
                        if skip > 0 {
                            buf.drain(..skip);
                            garbage.get_or_insert(ProtocolError::Noise(skip));
                        }
                        if self.fill(&at, &mut buf, deadline)? {
                            continue;
                        }
                        let pending = buf.len();
                        if let Some(need) = need {
                            garbage = Some(ProtocolError::Truncated {
                                have: pending,
                                need,
                            });
                        } else if pending > 0 && garbage.is_none() {
                            garbage = Some(ProtocolError::Truncated {
                                have: pending,
                                need: 6,
                            });
                        }
                        return Err(match garbage {
                            Some(source) => {
                                self.stats.corrupt += 1;
                                BusError::Corrupt { at, source }
                            }
                            None => {
                                self.stats.timeouts += 1;
                                BusError::Timeout {
                                    at,
                                    timeout,
                                    stray_from,
                                }
                            }
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads more bytes before `deadline`; false when none came in time.
    fn fill(
        &mut self,
        at: &Target,
        buf: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<bool, BusError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut chunk = [0u8; 256];
        let n = self
            .port
            .read(&mut chunk, left)
            .map_err(|source| BusError::Io {
                at: at.clone(),
                source,
            })?;
        buf.extend_from_slice(&chunk[..n.min(chunk.len())]);
        Ok(n > 0)
    }

    fn note_bits(&mut self, bits: ErrorBits) {
        if !bits.is_empty() {
            self.stats.status_errors += 1;
            self.stats.error_bits_seen.0 |= bits.0;
        }
    }

    fn count_bad(&mut self, error: &ProtocolError) {
        match error {
            ProtocolError::BadChecksum { .. } => self.stats.checksum_errors += 1,
            _ => self.stats.corrupt += 1,
        }
    }
}

fn single_id(id: u8, at: &Target) -> Result<(), BusError> {
    if id > protocol::MAX_ID {
        return Err(BusError::Packet {
            at: at.clone(),
            source: ProtocolError::BadId(id),
        });
    }
    Ok(())
}

fn build(r: Result<Vec<u8>, ProtocolError>, at: &Target) -> Result<Vec<u8>, BusError> {
    r.map_err(|source| BusError::Packet {
        at: at.clone(),
        source,
    })
}
