//! Six emulated STS3215 servos (ids 1..6) on a pty, for trying a client without an arm:
//!
//! ```sh
//! cargo run -p zk0-robot --example servo_emulator -- [SECONDS]
//! ```
//!
//! Prints the device path (open it at 1 Mbaud, e.g. as LeRobot's `--robot.port`), then serves
//! for SECONDS (default: until killed).

use std::time::Duration;

use zk0_robot::sim::{PtyEmulator, Servos};

fn main() -> std::io::Result<()> {
    let seconds: Option<u64> = match std::env::args().nth(1) {
        Some(a) => Some(
            a.parse()
                .map_err(|_| std::io::Error::other(format!("not a number of seconds: {a}")))?,
        ),
        None => None,
    };
    let emu = PtyEmulator::start(Servos::new(1..=6))?;
    println!("{}", emu.path());
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    let n = emu.servos().lock().map(|s| s.instructions()).unwrap_or(0);
    eprintln!("served {n} instructions");
    Ok(())
}
