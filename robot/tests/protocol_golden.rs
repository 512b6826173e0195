//! The pure protocol layer against every case of `golden-packets.json` (the vendor SDK's bytes)
//! and every exchange of `lerobot-so101-trace.json` (LeRobot's own bus traffic):
//! our builders produce the same bytes, and our decoder, driven the way the SDK's `readRx`
//! reads a stream, finds the same values, error bytes and failure kinds.

mod common;

use common::{bytes, call_args, golden_cases, packets, trace};
use serde_json::Value;
use zk0_robot::feetech::protocol::{self, decode, Decoded, Direction, ErrorBits, ProtocolError};
use zk0_robot::feetech::table;

/// The instruction bytes the SDK call of a golden case must produce, built with our builders.
fn expected_tx(case: &Value) -> Vec<Vec<u8>> {
    let call = case["sdk_call"].as_str().unwrap();
    let name = case["name"].as_str().unwrap();
    let a = call_args(call);
    let exp = &case["expected_result"];
    let ok = |r: Result<Vec<u8>, ProtocolError>| r.unwrap();
    if call.starts_with("ph.ping(") {
        let id = a[0] as u8;
        if id >= protocol::BROADCAST_ID {
            return vec![]; // the SDK refuses without sending
        }
        // PING, then READ Model_Number, unless the PING already failed.
        let mut out = vec![ok(protocol::ping(id))];
        if comm_of(exp).is_none() {
            out.push(ok(protocol::read(id, 3, 2)));
        }
        return out;
    }
    if call.starts_with("FeetechMotorsBus._broadcast_ping") {
        return vec![ok(protocol::ping(protocol::BROADCAST_ID))];
    }
    for n in [1u8, 2, 4] {
        if call.starts_with(&format!("ph.read{n}ByteTxRx(")) {
            return vec![ok(protocol::read(a[0] as u8, a[1] as u8, n))];
        }
        if call.starts_with(&format!("ph.write{n}ByteTx")) {
            let data = protocol::le_bytes(a[2] as u32, usize::from(n));
            return vec![ok(protocol::write(a[0] as u8, a[1] as u8, &data))];
        }
    }
    if call.starts_with("ph.regWriteTxRx(") {
        let data: Vec<u8> = a[3..].iter().map(|b| *b as u8).collect();
        assert_eq!(data.len() as i64, a[2]);
        return vec![ok(protocol::reg_write(a[0] as u8, a[1] as u8, &data))];
    }
    if call.starts_with("ph.action(") {
        return vec![ok(protocol::action(a[0] as u8))];
    }
    if call.starts_with("GroupSyncWrite") {
        let (addr, len, values): (u8, u8, Vec<(u8, u32)>) = match name {
            "sync_write_torque_enable_ids_1_to_6" => (40, 1, (1..=6).map(|i| (i, 1)).collect()),
            // The one case that does not list its values; they are the ones in its bytes.
            "sync write Goal_Position ids 1..6" => (
                42,
                2,
                vec![
                    (1, 2048),
                    (2, 1500),
                    (3, 2600),
                    (4, 1024),
                    (5, 3072),
                    (6, 2000),
                ],
            ),
            _ => (42, 2, id_map(&exp["values"])),
        };
        let data: Vec<(u8, Vec<u8>)> = values
            .iter()
            .map(|(i, v)| (*i, protocol::le_bytes(*v, usize::from(len))))
            .collect();
        let items: Vec<(u8, &[u8])> = data.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        return vec![ok(protocol::sync_write(addr, len, &items))];
    }
    if call.starts_with("GroupSyncRead") {
        let ids: Vec<u8> = id_map(&exp["data"]).iter().map(|(i, _)| *i).collect();
        return vec![ok(protocol::sync_read(56, 2, &ids))];
    }
    panic!("{name}: no builder for {call}");
}

/// `{"1": v, ...}` as `(id, v)` in id order.
fn id_map(v: &Value) -> Vec<(u8, u32)> {
    let mut out: Vec<(u8, u32)> = v
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap() as u32))
        .collect();
    out.sort();
    out
}

/// The SDK's failure kinds, which is all the golden file can tell us about a failure.
#[derive(Debug, PartialEq)]
enum Comm {
    Timeout,
    Corrupt,
}

/// Reads the next status packet from `want` the way the SDK's `readRx` does: packets from other
/// ids are consumed and skipped; impossible headers resync by one byte; a bad checksum fails at
/// once; running out of bytes is a timeout when nothing unparsed was received since the last
/// whole packet, and corruption otherwise.
fn read_rx(rx: &[u8], at: &mut usize, want: u8) -> Result<protocol::Packet, (Comm, ProtocolError)> {
    let mut last = None;
    let mut noise = 0;
    loop {
        match decode(&rx[*at..], Direction::Status) {
            Decoded::Packet { packet, consumed } => {
                *at += consumed;
                noise = 0;
                if packet.id == want {
                    return Ok(packet);
                }
                last = Some(ProtocolError::WrongId {
                    expected: want,
                    got: packet.id,
                });
            }
            Decoded::Bad {
                error: e @ ProtocolError::BadChecksum { .. },
                consumed,
            } => {
                *at += consumed;
                return Err((Comm::Corrupt, e));
            }
            Decoded::Bad { error, consumed } => {
                *at += consumed;
                noise += consumed;
                last = Some(error);
            }
            Decoded::Incomplete { skip, need } => {
                let pending = rx.len() - *at;
                *at = rx.len();
                if noise + pending == 0 {
                    return Err((Comm::Timeout, last.unwrap_or(ProtocolError::Noise(0))));
                }
                let err = match need {
                    Some(need) => ProtocolError::Truncated {
                        have: pending - skip,
                        need,
                    },
                    None => last.unwrap_or(ProtocolError::Noise(pending)),
                };
                return Err((Comm::Corrupt, err));
            }
        }
    }
}

fn comm_of(exp: &Value) -> Option<Comm> {
    match exp["comm"]["name"].as_str().unwrap() {
        "COMM_SUCCESS" => None,
        "COMM_RX_TIMEOUT" => Some(Comm::Timeout),
        "COMM_RX_CORRUPT" => Some(Comm::Corrupt),
        "COMM_NOT_AVAILABLE" => None,
        other => panic!("unexpected comm {other}"),
    }
}

#[test]
fn every_golden_instruction_is_built_byte_exact() {
    for case in golden_cases() {
        let name = case["name"].as_str().unwrap();
        let want = packets(&case["tx_packets"]);
        assert_eq!(expected_tx(&case), want, "{name}");
        // And each decodes back to itself as an instruction.
        for tx in &want {
            match decode(tx, Direction::Instruction) {
                Decoded::Packet { packet, consumed } => {
                    assert_eq!(consumed, tx.len(), "{name}");
                    assert!(packet.instruction().is_some(), "{name}");
                    assert_eq!(&packet.to_bytes().unwrap(), tx, "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}

#[test]
fn every_golden_reply_decodes_as_the_sdk_reads_it() {
    let mut checked = 0;
    for case in golden_cases() {
        let name = case["name"].as_str().unwrap();
        let call = case["sdk_call"].as_str().unwrap();
        let exp = &case["expected_result"];
        let rx = bytes(&case["rx_hex"]);
        let tx = packets(&case["tx_packets"]);
        let is_tx_only = call.contains("TxOnly")
            || call.starts_with("GroupSyncWrite")
            || tx.is_empty()
            || tx
                .last()
                .is_some_and(|p| p[2] == protocol::BROADCAST_ID && p[4] != 0x82 && p[4] != 0x01);
        let mut at = 0;
        if is_tx_only {
            assert!(rx.is_empty(), "{name}: no reply expected");
            checked += 1;
            continue;
        }
        if call.starts_with("FeetechMotorsBus._broadcast_ping") {
            let mut found = vec![];
            while let Decoded::Packet { packet, consumed } = decode(&rx[at..], Direction::Status) {
                at += consumed;
                found.push((packet.id.to_string(), packet.code));
            }
            let want: Vec<(String, u8)> = exp["ids_status"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as u8))
                .collect();
            assert_eq!(found, want, "{name}");
            checked += 1;
            continue;
        }
        if call.starts_with("GroupSyncRead") {
            let data = id_map(&exp["data"]);
            let available = exp.get("available");
            let mut failure = None;
            for (id, want) in &data {
                let ok = available.is_none_or(|a| a[id.to_string()].as_bool().unwrap());
                match read_rx(&rx, &mut at, *id) {
                    Ok(p) => {
                        assert!(ok, "{name}: id {id} should be missing");
                        assert_eq!(protocol::from_le(&p.params), *want, "{name}: id {id}");
                    }
                    Err((comm, _)) => {
                        assert!(!ok, "{name}: id {id} should be read");
                        failure = Some(comm);
                        break;
                    }
                }
            }
            assert_eq!(failure, comm_of(exp), "{name}");
            checked += 1;
            continue;
        }
        // Single-servo exchanges: one reply per instruction; the SDK reports the last one.
        let id = tx[0][2];
        let mut result = None;
        for _ in &tx {
            result = Some(read_rx(&rx, &mut at, id));
            if matches!(result, Some(Err(_))) {
                break;
            }
        }
        match (result.unwrap(), comm_of(exp)) {
            (Ok(p), None) => {
                let err = exp["error"].as_u64().unwrap_or(0) as u8;
                assert_eq!(p.error_bits(), ErrorBits(err), "{name}");
                let value = exp.get("value").or_else(|| exp.get("model_number"));
                if let Some(v) = value {
                    assert_eq!(
                        u64::from(protocol::from_le(&p.params)),
                        v.as_u64().unwrap(),
                        "{name}"
                    );
                }
                if let Some(d) = exp.get("lerobot_decoded") {
                    let raw = protocol::from_le(&p.params);
                    assert_eq!(
                        table::PRESENT_POSITION.decode(raw),
                        d.as_i64().unwrap(),
                        "{name}"
                    );
                }
            }
            (Err((comm, err)), Some(want)) => {
                assert_eq!(comm, want, "{name}: {err}");
                let kind_ok = match comm {
                    Comm::Corrupt => matches!(
                        err,
                        ProtocolError::BadChecksum { .. }
                            | ProtocolError::Truncated { .. }
                            | ProtocolError::BadHeader { .. }
                    ),
                    Comm::Timeout => {
                        matches!(err, ProtocolError::Noise(0) | ProtocolError::WrongId { .. })
                    }
                };
                assert!(kind_ok, "{name}: {err:?}");
            }
            (got, want) => panic!("{name}: got {got:?}, SDK says {want:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 49);
}

#[test]
fn golden_failures_give_the_specific_typed_error() {
    let by_name = |n: &str| {
        golden_cases()
            .into_iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no case {n}"))
    };
    let parse = |n: &str| protocol::parse_status(&bytes(&by_name(n)["rx_hex"]), 1, 2);
    assert_eq!(
        parse("read2_bad_checksum"),
        Err(ProtocolError::BadChecksum {
            id: 1,
            got: 0x0d,
            expected: 0xf2
        })
    );
    assert_eq!(
        parse("read2_truncated"),
        Err(ProtocolError::Truncated { have: 5, need: 8 })
    );
    assert_eq!(
        parse("read2_wrong_id_reply"),
        Err(ProtocolError::WrongId {
            expected: 1,
            got: 2
        })
    );
    assert!(matches!(
        parse("read2_error_byte_gt_0x7f"),
        Err(ProtocolError::BadHeader {
            id: 1,
            error: 0x80,
            ..
        })
    ));
    assert_eq!(parse("read2_timeout"), Err(ProtocolError::Noise(0)));
    assert_eq!(parse("read2_leading_garbage").unwrap().params, [0x00, 0x08]);
}

/// LeRobot's `what` labels name the register; its address and size come from our table.
fn register_of(what: &str) -> Option<table::Register> {
    let name = what.split_once(' ').map(|(_, r)| r)?;
    Some(table::by_name(name).unwrap_or_else(|| panic!("no register {name}")))
}

#[test]
fn every_lerobot_trace_packet_is_built_and_parsed_byte_exact() {
    let trace = trace();
    let exchanges = trace["exchanges"].as_array().unwrap();
    assert_eq!(exchanges.len(), 231);
    for (n, ex) in exchanges.iter().enumerate() {
        let what = ex["what"].as_str().unwrap();
        let tx = bytes(&ex["tx"]);
        let rx = bytes(&ex["rx"]);
        let id = ex["id"].as_u64().unwrap() as u8;
        let Decoded::Packet { packet, .. } = decode(&tx, Direction::Instruction) else {
            panic!("#{n} {what}: tx does not decode");
        };
        let instr = packet.instruction().unwrap();
        assert!(what.starts_with(instr.name()), "#{n}: {what} vs {instr:?}");
        assert_eq!(packet.id, id, "#{n}");
        let p = &packet.params;
        let rebuilt = match instr {
            protocol::Instruction::Ping => protocol::ping(id),
            protocol::Instruction::Read => {
                let r = register_of(what).unwrap();
                assert_eq!((p[0], p[1]), (r.addr, r.size), "#{n} {what}");
                protocol::read(id, r.addr, r.size)
            }
            protocol::Instruction::Write => {
                let r = register_of(what).unwrap();
                assert_eq!(p[0], r.addr, "#{n} {what}");
                assert_eq!(p.len() - 1, usize::from(r.size), "#{n} {what}");
                let value = r.decode(protocol::from_le(&p[1..]));
                let raw = r.encode(value).unwrap();
                protocol::write(id, r.addr, &protocol::le_bytes(raw, r.size.into()))
            }
            protocol::Instruction::SyncRead => {
                let r = register_of(what).unwrap();
                protocol::sync_read(r.addr, r.size, &p[2..])
            }
            protocol::Instruction::SyncWrite => {
                let r = register_of(what).unwrap();
                let items: Vec<(u8, &[u8])> = p[2..]
                    .chunks(1 + usize::from(r.size))
                    .map(|c| (c[0], &c[1..]))
                    .collect();
                protocol::sync_write(r.addr, r.size, &items)
            }
            other => panic!("#{n}: LeRobot does not send {other:?}"),
        };
        assert_eq!(rebuilt.unwrap(), tx, "#{n} {what}");

        // Replies: one per instruction to a single id, one per listed id for SYNC_READ, none
        // for SYNC_WRITE; all from the right id, with no error bits, and re-encodable.
        let ids: Vec<u8> = match instr {
            protocol::Instruction::SyncRead => p[2..].to_vec(),
            protocol::Instruction::SyncWrite => vec![],
            _ => vec![id],
        };
        let data_len = match instr {
            protocol::Instruction::Read | protocol::Instruction::SyncRead => usize::from(p[1]),
            _ => 0,
        };
        let mut at = 0;
        for want in ids {
            let reply = protocol::parse_status(&rx[at..], want, data_len)
                .unwrap_or_else(|e| panic!("#{n} {what}: {e}"));
            assert!(reply.error_bits().is_empty());
            let again = protocol::status(want, ErrorBits(0), &reply.params).unwrap();
            assert_eq!(&rx[at..at + again.len()], again.as_slice(), "#{n}");
            at += again.len();
        }
        assert_eq!(at, rx.len(), "#{n} {what}: trailing reply bytes");
    }
}
