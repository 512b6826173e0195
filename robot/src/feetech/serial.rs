//! [`Transport`] over a real serial port (the arm's USB adapter, or an emulator's pty).

use std::io::{self, Read, Write};
use std::time::Duration;

use serialport::{ClearBuffer, SerialPort};

use super::bus::Transport;

/// A serial port opened 8N1 at the bus speed, raw (serialport sets raw mode itself).
pub struct SerialTransport {
    port: Box<dyn SerialPort>,
}

impl std::fmt::Debug for SerialTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialTransport")
            .field("name", &self.port.name())
            .finish()
    }
}

impl SerialTransport {
    /// Opens `path` (e.g. `/dev/ttyACM0`) at `baud` (LeRobot: 1,000,000).
    pub fn open(path: &str, baud: u32) -> serialport::Result<Self> {
        let port = serialport::new(path, baud)
            .timeout(Duration::from_millis(50))
            .open()?;
        Ok(Self { port })
    }
}

impl Transport for SerialTransport {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.port.write_all(bytes)
    }

    fn read(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.port.set_timeout(timeout).map_err(io::Error::from)?;
        match self.port.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(0),
            other => other,
        }
    }

    fn clear_input(&mut self) -> io::Result<()> {
        self.port.clear(ClearBuffer::Input).map_err(io::Error::from)
    }
}
