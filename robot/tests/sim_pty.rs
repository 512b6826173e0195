//! The bus driver against the Rust emulator on a real pty, opened by path through `serialport`
//! as the arm's USB adapter would be: ping, sync read, sync write and motion, and each injected
//! fault giving its error and its counter, never a panic. Every wait is bounded.

use std::time::Duration;

use zk0_robot::feetech::protocol::ErrorBits;
use zk0_robot::feetech::table;
use zk0_robot::sim::{PtyEmulator, Servos};
use zk0_robot::{Bus, BusConfig, BusError, SerialTransport};

const IDS: [u8; 6] = [1, 2, 3, 4, 5, 6];

fn setup(retries: u32) -> (PtyEmulator, Bus<SerialTransport>) {
    let mut servos = Servos::new(IDS);
    // Slow enough that a loaded machine still sees the motion in progress.
    servos.set_time_constant(Duration::from_millis(100));
    let emu = PtyEmulator::start(servos).expect("open a pty");
    let port = SerialTransport::open(emu.path(), 1_000_000).expect("open the pty slave");
    let bus = Bus::new(
        port,
        BusConfig {
            retries,
            ..BusConfig::default()
        },
    );
    (emu, bus)
}

#[test]
fn ping_sync_read_sync_write_and_motion() {
    let (emu, mut bus) = setup(0);
    assert!(emu.path().starts_with("/dev/"), "{}", emu.path());
    for id in IDS {
        assert_eq!(bus.ping(id).unwrap(), table::STS3215_MODEL, "id {id}");
    }
    assert!(matches!(bus.ping(9), Err(BusError::Timeout { .. })));
    let found = bus.broadcast_ping(Duration::from_millis(100)).unwrap();
    assert_eq!(found.iter().map(|(i, _)| *i).collect::<Vec<_>>(), IDS);

    assert_eq!(
        bus.sync_read(&table::PRESENT_POSITION, &IDS).unwrap(),
        [2048; 6]
    );
    for id in IDS {
        bus.write(id, &table::TORQUE_ENABLE, 1).unwrap();
    }
    let goals: Vec<(u8, i64)> = IDS
        .iter()
        .map(|i| (*i, 1000 + 100 * i64::from(*i)))
        .collect();
    bus.sync_write(&table::GOAL_POSITION, &goals).unwrap();
    let want: Vec<i64> = goals.iter().map(|(_, g)| *g).collect();
    let mut seen = vec![];
    for _ in 0..300 {
        let now = bus.sync_read(&table::PRESENT_POSITION, &IDS).unwrap();
        seen.push(now.clone());
        if now == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        seen.last(),
        Some(&want),
        "positions did not reach the goals"
    );
    // First-order motion: the first read after the goal was still on its way.
    assert_ne!(seen[0], want, "motion was instant");
    let s = bus.stats();
    assert_eq!(
        (s.checksum_errors, s.corrupt, s.stray_packets, s.echoes),
        (0, 0, 0, 0)
    );
    assert_eq!(s.timeouts, 1, "only id 9");
}

#[test]
fn silent_servo_times_out_naming_it() {
    let (emu, mut bus) = setup(2);
    bus.set_names([(3, "elbow_flex".to_string())]);
    emu.servos().lock().unwrap().faults_mut(3).unwrap().silent = true;
    let err = bus.ping(3).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("motor 3 (elbow_flex) PING: no reply within"),
        "{err}"
    );
    assert_eq!((bus.stats().timeouts, bus.stats().retries), (3, 2));
    let err = bus.sync_read(&table::PRESENT_POSITION, &IDS).unwrap_err();
    assert_eq!(err.target().id, 3, "{err}");
    assert_eq!(err.target().register, Some("Present_Position"));
    // The others still answer.
    assert_eq!(
        bus.sync_read(&table::PRESENT_POSITION, &[1, 2, 4]).unwrap(),
        [2048; 3]
    );
}

#[test]
fn corrupt_checksum_is_an_error_then_retried_away() {
    let (emu, mut bus) = setup(0);
    emu.servos()
        .lock()
        .unwrap()
        .faults_mut(2)
        .unwrap()
        .corrupt_replies = 1;
    let err = bus.read(2, &table::PRESENT_POSITION).unwrap_err();
    assert!(err.to_string().contains("bad checksum from id 2"), "{err}");
    assert_eq!(bus.stats().checksum_errors, 1);
    assert_eq!(
        bus.read(2, &table::PRESENT_POSITION).unwrap(),
        2048,
        "recovers"
    );

    bus.config_mut().retries = 2;
    emu.servos()
        .lock()
        .unwrap()
        .faults_mut(5)
        .unwrap()
        .corrupt_replies = 1;
    assert_eq!(
        bus.sync_read(&table::PRESENT_POSITION, &IDS).unwrap(),
        [2048; 6]
    );
    assert_eq!((bus.stats().checksum_errors, bus.stats().retries), (2, 1));

    emu.servos()
        .lock()
        .unwrap()
        .faults_mut(4)
        .unwrap()
        .truncate_replies = 1;
    assert_eq!(bus.read(4, &table::PRESENT_POSITION).unwrap(), 2048);
    assert_eq!((bus.stats().corrupt, bus.stats().retries), (1, 2));
}

#[test]
fn overload_bit_fails_single_reads_and_is_counted_in_sync_reads() {
    let (emu, mut bus) = setup(2);
    emu.servos()
        .lock()
        .unwrap()
        .faults_mut(4)
        .unwrap()
        .error_bits = ErrorBits::OVERLOAD;
    match bus.read(4, &table::PRESENT_POSITION) {
        Err(BusError::Servo { at, bits }) => {
            assert_eq!((at.id, bits), (4, ErrorBits(ErrorBits::OVERLOAD)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(bus.stats().retries, 0, "servo errors are not retried");
    assert_eq!(
        bus.sync_read(&table::PRESENT_POSITION, &IDS).unwrap(),
        [2048; 6]
    );
    let s = bus.stats();
    assert_eq!(s.status_errors, 2);
    assert!(s.error_bits_seen.contains(ErrorBits::OVERLOAD));
}
