//! The cloud link: events to the cloud, commands and sync documents from it, over MQTT.

pub mod commands;
pub mod limits;
pub mod link;
pub mod messages;
pub mod mqtt;
pub mod tls;
