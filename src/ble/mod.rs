//! BLE: padlocks and unit controllers (legacy lock protocol), fobs and BTHome sensors, through
//! BlueZ (bluer). Work in progress: the protocol modules come first.

pub mod bthome;
pub mod noke;
