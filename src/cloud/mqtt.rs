//! MQTT 3.1.1 and 5 behind one small surface: rumqttc has a separate client for each, and the
//! link needs only connect, QoS 1 publish and subscribe, disconnect, and a handful of events.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::Outgoing;

use crate::config::Protocol;

/// Publishes beyond the link's event window that rumqttc may have in flight (status, results).
pub const INFLIGHT_HEADROOM: u16 = 256;

/// What the link needs to open a connection.
pub struct Settings {
    pub protocol: Protocol,
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub inflight: u16,
    /// The largest packet the gateway takes in. With MQTT 5 it is advertised in CONNECT
    /// (Maximum Packet Size), so the broker does not send anything larger; with 3.1.1 the broker
    /// cannot be told, and a larger packet ends the connection ([`PollError::TooLarge`]).
    pub max_incoming_bytes: usize,
    /// The largest packet the gateway sends (before any lower limit the broker announces in an
    /// MQTT 5 CONNACK).
    pub max_outgoing_bytes: usize,
    /// Last will: topic and payload, QoS 1, retained.
    pub will: (String, Vec<u8>),
    /// Mutual TLS, or plain TCP when `None`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The events the link acts on; everything else is `Other`.
pub enum Ev {
    /// The broker's answer; on success, the Maximum Packet Size of an MQTT 5 CONNACK, if any.
    ConnAck(Result<Option<u32>, String>),
    /// A publish was written to the network with this packet id (in request order).
    Written(u16),
    PubAck(u16),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    Disconnected,
    Other,
}

/// Why polling stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// A packet from the broker was larger than the gateway takes in (`bytes` as the packet's
    /// header announced them, without reading them).
    TooLarge { bytes: usize, max: usize },
    /// Anything else: the connection is gone.
    Other(String),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::TooLarge { bytes, max } => write!(
                f,
                "the broker sent a packet of {bytes} bytes, larger than the {max} bytes the \
                 gateway takes in"
            ),
            PollError::Other(e) => f.write_str(e),
        }
    }
}

fn v4_error(e: rumqttc::ConnectionError, max: usize) -> PollError {
    use rumqttc::{ConnectionError, StateError};
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
        )) => PollError::TooLarge { bytes, max },
        e => PollError::Other(e.to_string()),
    }
}

fn v5_error(e: rumqttc::v5::ConnectionError, max: usize) -> PollError {
    use rumqttc::v5::mqttbytes::Error;
    use rumqttc::v5::{ConnectionError, StateError};
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            Error::PayloadSizeLimitExceeded { pkt_size, .. },
        )) => PollError::TooLarge {
            bytes: pkt_size,
            max,
        },
        e => PollError::Other(e.to_string()),
    }
}

/// The size on the wire of a QoS 1 PUBLISH of `payload` bytes on a topic of `topic` bytes,
/// without properties: fixed header (type byte and remaining length), topic, packet id,
/// (MQTT 5) the properties' length, payload.
pub fn publish_packet_size(protocol: Protocol, topic: usize, payload: usize) -> usize {
    let props = match protocol {
        Protocol::V311 => 0,
        Protocol::V5 => 1,
    };
    let remaining = 2 + topic + 2 + props + payload;
    let len_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_bytes + remaining
}

/// Creates a client and its event loop (a fresh session: clean start).
pub fn connect(s: &Settings, capacity: usize) -> (Client, Loop) {
    match s.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(s.keep_alive);
            o.set_clean_session(true);
            // Headroom above the link's window for status and command results, so that rumqttc
            // never holds a publish back (which would reorder what it reports as written).
            o.set_inflight(s.inflight.saturating_add(INFLIGHT_HEADROOM));
            o.set_max_packet_size(s.max_incoming_bytes, s.max_outgoing_bytes);
            o.set_last_will(rumqttc::LastWill::new(
                &s.will.0,
                s.will.1.clone(),
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
            if let Some(tls) = &s.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (c, mut l) = rumqttc::AsyncClient::new(o, capacity);
            l.set_network_options(network_options());
            (Client::V4(c), Loop::V4(Box::new(l)))
        }
        Protocol::V5 => {
            use rumqttc::v5::mqttbytes::QoS;
            let mut o = rumqttc::v5::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(s.keep_alive);
            o.set_clean_start(true);
            o.set_outgoing_inflight_upper_limit(s.inflight.saturating_add(INFLIGHT_HEADROOM));
            // Sent in CONNECT: the broker must not send a larger packet (it drops it instead).
            // rumqttc limits what it sends by the broker's CONNACK value, when there is one.
            o.set_max_packet_size(Some(
                u32::try_from(s.max_incoming_bytes).unwrap_or(u32::MAX),
            ));
            o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                &s.will.0,
                s.will.1.clone(),
                QoS::AtLeastOnce,
                true,
                None,
            ));
            if let Some(tls) = &s.tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls.clone()),
                ));
            }
            let (c, mut l) = rumqttc::v5::AsyncClient::new(o, capacity);
            l.options.set_network_options(network_options());
            (Client::V5(c), Loop::V5(Box::new(l)))
        }
    }
}

/// No Nagle delay: a command result or an access event should not wait for more data to fill
/// a segment (with delayed ACKs that costs tens of milliseconds).
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

impl Client {
    /// The size on the wire of a publish of `payload` bytes on a topic of `topic` bytes.
    pub fn packet_size(&self, topic: usize, payload: usize) -> usize {
        let protocol = match self {
            Client::V4(_) => Protocol::V311,
            Client::V5(_) => Protocol::V5,
        };
        publish_packet_size(protocol, topic, payload)
    }

    /// Queues a QoS 1 publish without waiting (fails when rumqttc's queue is full).
    pub fn try_publish(&self, topic: String, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl Loop {
    pub async fn poll(&mut self) -> Result<Ev, PollError> {
        match self {
            Loop::V4(l) => {
                use rumqttc::{Event, Packet};
                let max = l.mqtt_options.max_packet_size();
                Ok(match l.poll().await.map_err(|e| v4_error(e, max))? {
                    Event::Incoming(Packet::ConnAck(a)) => {
                        Ev::ConnAck(if a.code == rumqttc::ConnectReturnCode::Success {
                            Ok(None)
                        } else {
                            Err(format!("{:?}", a.code))
                        })
                    }
                    Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
                    Event::Incoming(Packet::Publish(p)) => Ev::Message {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Written(pkid),
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
                    _ => Ev::Other,
                })
            }
            Loop::V5(l) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
                let max = l.options.max_packet_size().unwrap_or(u32::MAX) as usize;
                Ok(match l.poll().await.map_err(|e| v5_error(e, max))? {
                    Event::Incoming(Packet::ConnAck(a)) => {
                        Ev::ConnAck(if a.code == ConnectReturnCode::Success {
                            Ok(a.properties.as_ref().and_then(|p| p.max_packet_size))
                        } else {
                            Err(format!("{:?}", a.code))
                        })
                    }
                    Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
                    Event::Incoming(Packet::Publish(p)) => Ev::Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => Ev::Written(pkid),
                    Event::Outgoing(Outgoing::Disconnect) => Ev::Disconnected,
                    _ => Ev::Other,
                })
            }
        }
    }
}
