//! The Feetech STS3215 servo bus: [`protocol`] bytes, [`table`] registers, the [`bus`] driver
//! and its [`serial`] port.

pub mod bus;
pub mod protocol;
pub mod serial;
pub mod table;

pub use bus::{Bus, BusConfig, BusError, BusStats, Target, Transport};
pub use serial::SerialTransport;
