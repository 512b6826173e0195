//! The Feetech STS3215 servo bus: [`protocol`] bytes and [`table`] registers.

pub mod protocol;
pub mod table;
