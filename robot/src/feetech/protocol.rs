//! Feetech STS/SMS packets ("protocol end 0", the SO-100/SO-101 servos), pure bytes.
//!
//! ```text
//! instruction: FF FF ID LEN INSTR P1 .. Pn CHK      LEN = n + 2
//! status:      FF FF ID LEN ERR   P1 .. Pn CHK      LEN = n + 2
//! CHK = !(ID + LEN + INSTR_or_ERR + P1 + .. + Pn)
//! ```
//!
//! Builders return the exact bytes the vendor SDK (feetech-servo-sdk 1.0.0) sends; [`decode`]
//! scans a receive buffer the way the SDK's `rxPacket` does (skip to `FF FF`, resync past an
//! impossible header, wait for `LEN + 4` bytes, check the sum) but returns a typed outcome and
//! never panics, whatever the bytes.

use std::fmt;

/// Every servo listens to this id; only PING and SYNC_READ get answers to it.
pub const BROADCAST_ID: u8 = 0xFE;
/// Highest id a servo can have.
pub const MAX_ID: u8 = 0xFC;
/// The SDK's TX/RX buffer size; `LEN` above this is impossible.
pub const MAX_PACKET_LEN: usize = 250;
const HEADER: [u8; 2] = [0xFF, 0xFF];
/// Header, id, length, instruction/error and checksum.
const OVERHEAD: usize = 6;

/// Instruction codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Instruction {
    Ping = 0x01,
    Read = 0x02,
    Write = 0x03,
    RegWrite = 0x04,
    Action = 0x05,
    SyncRead = 0x82,
    SyncWrite = 0x83,
}

impl Instruction {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => Self::Ping,
            0x02 => Self::Read,
            0x03 => Self::Write,
            0x04 => Self::RegWrite,
            0x05 => Self::Action,
            0x82 => Self::SyncRead,
            0x83 => Self::SyncWrite,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ping => "PING",
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::RegWrite => "REG_WRITE",
            Self::Action => "ACTION",
            Self::SyncRead => "SYNC_READ",
            Self::SyncWrite => "SYNC_WRITE",
        }
    }
}

/// Why bytes are not a usable packet, or an instruction cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(
        "bad header: id {id:#04x}, length {len}, error byte {error:#04x} (not a status packet)"
    )]
    BadHeader { id: u8, len: u8, error: u8 },
    #[error("bad checksum from id {id}: got {got:#04x}, expected {expected:#04x}")]
    BadChecksum { id: u8, got: u8, expected: u8 },
    #[error("truncated packet: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("reply from id {got}, expected id {expected}")]
    WrongId { expected: u8, got: u8 },
    #[error("length byte {len} is below the minimum of 2")]
    BadLength { len: u8 },
    #[error("reply has {got} data bytes, expected {expected}")]
    WrongDataLength { expected: usize, got: usize },
    #[error("packet would be {len} bytes (the limit is {MAX_PACKET_LEN})")]
    TooLong { len: usize },
    #[error("id {0} is out of range (0..={MAX_ID})")]
    BadId(u8),
    #[error("sync write: data for id {id} is {got} bytes, expected {expected}")]
    SyncWriteLength { id: u8, expected: usize, got: usize },
    #[error("{0} bytes of noise with no packet header")]
    Noise(usize),
}

/// The status error byte. The SDK reports it beside (not instead of) a successful exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct ErrorBits(pub u8);

impl ErrorBits {
    pub const VOLTAGE: u8 = 0x01;
    pub const ANGLE: u8 = 0x02;
    pub const OVERHEAT: u8 = 0x04;
    /// "OverEle" in the SDK: over-current.
    pub const OVERCURRENT: u8 = 0x08;
    pub const OVERLOAD: u8 = 0x20;
    const NAMES: [(u8, &'static str); 5] = [
        (Self::VOLTAGE, "input voltage"),
        (Self::ANGLE, "angle sensor"),
        (Self::OVERHEAT, "overheat"),
        (Self::OVERCURRENT, "over-current"),
        (Self::OVERLOAD, "overload"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, bit: u8) -> bool {
        self.0 & bit == bit
    }

    /// Names of the bits set, including unnamed ones as hex.
    pub fn names(self) -> Vec<String> {
        let mut out: Vec<String> = Self::NAMES
            .iter()
            .filter(|(b, _)| self.0 & b != 0)
            .map(|(_, n)| (*n).to_string())
            .collect();
        let known = Self::NAMES.iter().fold(0, |a, (b, _)| a | b);
        if self.0 & !known != 0 {
            out.push(format!("unknown bits {:#04x}", self.0 & !known));
        }
        out
    }
}

impl fmt::Display for ErrorBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no error");
        }
        write!(f, "{} ({:#04x})", self.names().join(", "), self.0)
    }
}

/// One packet off the wire, either direction: `code` is the instruction (host to servo) or the
/// error byte (servo to host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub id: u8,
    pub code: u8,
    pub params: Vec<u8>,
}

impl Packet {
    pub fn error_bits(&self) -> ErrorBits {
        ErrorBits(self.code)
    }

    pub fn instruction(&self) -> Option<Instruction> {
        Instruction::from_code(self.code)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        frame(self.id, self.code, &self.params)
    }
}

/// Which way a packet travels; only status packets have the SDK's `ERR <= 0x7F` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host to servo (what an emulator decodes).
    Instruction,
    /// Servo to host (what the bus driver decodes).
    Status,
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A whole packet; drop `consumed` bytes (noise before it included) before the next scan.
    Packet { packet: Packet, consumed: usize },
    /// No whole packet yet. The first `skip` bytes can never start one and may be dropped;
    /// `need` is how many bytes (from `skip`) the next packet needs, when a header was seen.
    Incomplete { skip: usize, need: Option<usize> },
    /// A malformed packet (bad header or checksum); drop `consumed` bytes and scan again.
    Bad {
        error: ProtocolError,
        consumed: usize,
    },
}

/// The checksum over `id, len, instr/err, params`.
pub fn checksum(body: &[u8]) -> u8 {
    !body.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// A whole packet with header and checksum.
pub fn frame(id: u8, code: u8, params: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let total = params.len() + OVERHEAD;
    if total > MAX_PACKET_LEN {
        return Err(ProtocolError::TooLong { len: total });
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&HEADER);
    out.push(id);
    out.push((params.len() + 2) as u8);
    out.push(code);
    out.extend_from_slice(params);
    out.push(checksum(&out[2..]));
    Ok(out)
}

fn instruction(id: u8, instr: Instruction, params: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if id > MAX_ID && id != BROADCAST_ID {
        return Err(ProtocolError::BadId(id));
    }
    frame(id, instr as u8, params)
}

/// PING (the SDK's `ping()` then reads Model_Number; see the bus driver).
pub fn ping(id: u8) -> Result<Vec<u8>, ProtocolError> {
    instruction(id, Instruction::Ping, &[])
}

/// READ `len` bytes from `addr`.
pub fn read(id: u8, addr: u8, len: u8) -> Result<Vec<u8>, ProtocolError> {
    instruction(id, Instruction::Read, &[addr, len])
}

/// WRITE `data` (already little-endian) at `addr`.
pub fn write(id: u8, addr: u8, data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    instruction(id, Instruction::Write, &[&[addr], data].concat())
}

/// REG_WRITE: like WRITE, but the servo holds it until ACTION.
pub fn reg_write(id: u8, addr: u8, data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    instruction(id, Instruction::RegWrite, &[&[addr], data].concat())
}

/// ACTION: apply the REG_WRITEs held (broadcast: all servos, no reply).
pub fn action(id: u8) -> Result<Vec<u8>, ProtocolError> {
    instruction(id, Instruction::Action, &[])
}

/// SYNC_READ `len` bytes at `addr` from each id; each answers in list order.
pub fn sync_read(addr: u8, len: u8, ids: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if let Some(bad) = ids.iter().find(|i| **i > MAX_ID) {
        return Err(ProtocolError::BadId(*bad));
    }
    instruction(
        BROADCAST_ID,
        Instruction::SyncRead,
        &[&[addr, len], ids].concat(),
    )
}

/// SYNC_WRITE `len` bytes at `addr`, each id its own data; no reply.
pub fn sync_write(addr: u8, len: u8, items: &[(u8, &[u8])]) -> Result<Vec<u8>, ProtocolError> {
    let mut params = vec![addr, len];
    for (id, data) in items {
        if *id > MAX_ID {
            return Err(ProtocolError::BadId(*id));
        }
        if data.len() != usize::from(len) {
            return Err(ProtocolError::SyncWriteLength {
                id: *id,
                expected: usize::from(len),
                got: data.len(),
            });
        }
        params.push(*id);
        params.extend_from_slice(data);
    }
    instruction(BROADCAST_ID, Instruction::SyncWrite, &params)
}

/// A status packet (what servos send back), for tests and the emulator.
pub fn status(id: u8, error: ErrorBits, params: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    frame(id, error.0, params)
}

/// Scans `buf` for the first packet. Never panics; see [`Decoded`].
pub fn decode(buf: &[u8], dir: Direction) -> Decoded {
    let Some(start) = buf.windows(2).position(|w| w == HEADER) else {
        // A trailing FF may be the first half of a header.
        let skip = if buf.last() == Some(&0xFF) {
            buf.len() - 1
        } else {
            buf.len()
        };
        return Decoded::Incomplete { skip, need: None };
    };
    let rest = &buf[start..];
    if rest.len() < 5 {
        return Decoded::Incomplete {
            skip: start,
            need: None,
        };
    }
    let (id, len, code) = (rest[2], rest[3], rest[4]);
    let impossible = match dir {
        Direction::Status => id > 0xFD || code > 0x7F,
        Direction::Instruction => id > BROADCAST_ID,
    } || usize::from(len) > MAX_PACKET_LEN;
    if impossible || len < 2 {
        // The SDK drops one byte and resyncs; so do we.
        let error = if impossible {
            ProtocolError::BadHeader {
                id,
                len,
                error: code,
            }
        } else {
            ProtocolError::BadLength { len }
        };
        return Decoded::Bad {
            error,
            consumed: start + 1,
        };
    }
    let need = usize::from(len) + 4;
    if rest.len() < need {
        return Decoded::Incomplete {
            skip: start,
            need: Some(need),
        };
    }
    let got = rest[need - 1];
    let expected = checksum(&rest[2..need - 1]);
    if got != expected {
        return Decoded::Bad {
            error: ProtocolError::BadChecksum { id, got, expected },
            consumed: start + need,
        };
    }
    Decoded::Packet {
        packet: Packet {
            id,
            code,
            params: rest[5..need - 1].to_vec(),
        },
        consumed: start + need,
    }
}

/// Parses one complete status packet from `expected_id` with exactly `data_len` data bytes
/// (leading noise allowed). For a stream use [`decode`].
pub fn parse_status(
    bytes: &[u8],
    expected_id: u8,
    data_len: usize,
) -> Result<Packet, ProtocolError> {
    let mut at = 0;
    let mut resynced = None;
    loop {
        match decode(&bytes[at..], Direction::Status) {
            Decoded::Packet { packet, .. } => {
                if packet.id != expected_id {
                    return Err(ProtocolError::WrongId {
                        expected: expected_id,
                        got: packet.id,
                    });
                }
                if packet.params.len() != data_len {
                    return Err(ProtocolError::WrongDataLength {
                        expected: data_len,
                        got: packet.params.len(),
                    });
                }
                return Ok(packet);
            }
            Decoded::Bad {
                error: error @ (ProtocolError::BadHeader { .. } | ProtocolError::BadLength { .. }),
                consumed,
            } if at + consumed < bytes.len() => {
                at += consumed;
                resynced = Some(error);
            }
            Decoded::Bad { error, .. } => return Err(error),
            Decoded::Incomplete { skip, need } => {
                return Err(match need {
                    Some(need) => ProtocolError::Truncated {
                        have: bytes.len() - at - skip,
                        need,
                    },
                    None if bytes.len() - at - skip > 0 => ProtocolError::Truncated {
                        have: bytes.len() - at - skip,
                        need: OVERHEAD,
                    },
                    None => resynced.unwrap_or(ProtocolError::Noise(bytes.len())),
                })
            }
        }
    }
}

/// Little-endian bytes of a register value (protocol end 0; 4-byte values low word first).
pub fn le_bytes(value: u32, size: usize) -> Vec<u8> {
    value.to_le_bytes()[..size.min(4)].to_vec()
}

/// The value of little-endian bytes (at most 4).
pub fn from_le(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .take(4)
        .rev()
        .fold(0u32, |a, b| (a << 8) | u32::from(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_ping() {
        assert_eq!(ping(1).unwrap(), [0xFF, 0xFF, 0x01, 0x02, 0x01, 0xFB]);
    }

    #[test]
    fn decode_finds_a_packet_after_noise_and_lone_ff() {
        let bytes = [
            0x00, 0x13, 0xFF, 0xFF, 0xFF, 0x01, 0x04, 0x00, 0x00, 0x08, 0xF2,
        ];
        // FF FF FF 01: the first FF FF is a header with id 0xFF (impossible): resync by one.
        let Decoded::Bad { consumed, .. } = decode(&bytes, Direction::Status) else {
            panic!("expected a bad header first");
        };
        match decode(&bytes[consumed..], Direction::Status) {
            Decoded::Packet { packet, consumed } => {
                assert_eq!(packet.id, 1);
                assert_eq!(packet.params, [0x00, 0x08]);
                assert_eq!(consumed, bytes.len() - 3);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_status(&bytes, 1, 2).unwrap().params, [0x00, 0x08]);
    }

    #[test]
    fn decode_incomplete_keeps_a_trailing_ff() {
        assert_eq!(
            decode(&[0x01, 0x02, 0xFF], Direction::Status),
            Decoded::Incomplete {
                skip: 2,
                need: None
            }
        );
        assert_eq!(
            decode(&[0xFF, 0xFF, 0x01, 0x04, 0x00, 0x00], Direction::Status),
            Decoded::Incomplete {
                skip: 0,
                need: Some(8)
            }
        );
    }

    #[test]
    fn error_bits_name_every_bit() {
        assert_eq!(ErrorBits(0).to_string(), "no error");
        assert_eq!(
            ErrorBits(0x25).to_string(),
            "input voltage, overheat, overload (0x25)"
        );
        assert_eq!(ErrorBits(0x40).names(), ["unknown bits 0x40"]);
        assert!(ErrorBits(0x28).contains(ErrorBits::OVERCURRENT));
    }

    #[test]
    fn builders_refuse_what_does_not_fit() {
        assert_eq!(ping(0xFD), Err(ProtocolError::BadId(0xFD)));
        assert!(matches!(
            sync_write(42, 2, &[(1, &[1, 2, 3])]),
            Err(ProtocolError::SyncWriteLength { id: 1, .. })
        ));
        assert!(matches!(
            write(1, 0, &[0; 250]),
            Err(ProtocolError::TooLong { .. })
        ));
        assert_eq!(from_le(&le_bytes(0x0BB8_0800, 4)), 0x0BB8_0800);
    }

    /// Every byte string of up to 3 bytes, and a few thousand longer pseudo-random ones:
    /// decode and parse_status return, they do not panic, and consumed always makes progress.
    #[test]
    fn decode_never_panics_and_always_progresses() {
        let mut inputs: Vec<Vec<u8>> = vec![vec![]];
        for a in 0..=255u8 {
            inputs.push(vec![a]);
            for b in [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF] {
                inputs.push(vec![a, b]);
                inputs.push(vec![0xFF, a, b]);
                inputs.push(vec![0xFF, 0xFF, a, b]);
                inputs.push(vec![0xFF, 0xFF, 0x01, a, b]);
            }
        }
        let mut x: u32 = 0x1234_5678;
        for n in 0..4000 {
            let len = n % 40;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Many FFs, so headers are common.
                v.push(if x.is_multiple_of(3) {
                    0xFF
                } else {
                    (x >> 8) as u8
                });
            }
            inputs.push(v);
        }
        for input in &inputs {
            for dir in [Direction::Status, Direction::Instruction] {
                let mut at = 0;
                for _ in 0..=input.len() {
                    match decode(&input[at..], dir) {
                        Decoded::Packet { consumed, .. } | Decoded::Bad { consumed, .. } => {
                            assert!(consumed > 0 && at + consumed <= input.len());
                            at += consumed;
                        }
                        Decoded::Incomplete { skip, .. } => {
                            assert!(at + skip <= input.len());
                            break;
                        }
                    }
                }
            }
            let _ = parse_status(input, 1, 2);
        }
    }
}
