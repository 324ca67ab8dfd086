//! The cloud link: events to the cloud, commands and sync documents from it, over MQTT.

pub mod commands;
mod lanes;
pub mod limits;
pub mod link;
pub mod messages;
pub mod mqtt;
pub mod supervisor;
pub mod tls;
