//! gatehouse: the site gateway of a self-storage facility. See ARCHITECTURE.md for the map.

#![forbid(unsafe_code)]

pub mod access;
pub mod automation;
pub mod ble;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod demo_pairing;
pub mod devstate;
pub mod events;
pub mod fsperm;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod pairing;
pub mod policy;
pub mod preflight;
pub mod profiles;
pub mod redact;
pub mod reload;
pub mod rs485;
pub mod site;
pub mod store;
pub mod supervise;
pub mod sync;
