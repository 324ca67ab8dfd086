//! The broker harness (`tests/support/broker.rs`) does what the cloud-link tests rely on: a real
//! mosquitto with mutual TLS that delivers QoS 1, refuses clients without a trusted certificate,
//! survives SIGKILL + restart on the same port, and keeps retained messages.

#[path = "support/broker.rs"]
mod broker;

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use broker::{Broker, BrokerOptions, Subscriber, publish_qos1, wait_connack};
use rumqttc::{AsyncClient, Event, Packet, QoS};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn qos1_over_mutual_tls_reaches_a_subscriber() {
    let broker = Broker::start();
    assert_ne!(broker.port(), 1883);
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/site-1/gw-1/#").await;

    publish_qos1(
        broker.mqtt_options("gw-1"),
        "gatehouse/site-1/gw-1/events",
        br#"{"seq":1}"#.to_vec(),
        false,
    )
    .await
    .expect("publish over mutual TLS");

    let msgs = sub
        .wait_for(|m| m.iter().any(|r| r.payload == br#"{"seq":1}"#), WAIT)
        .await;
    let m = msgs.iter().find(|r| r.payload == br#"{"seq":1}"#).unwrap();
    assert_eq!(m.topic, "gatehouse/site-1/gw-1/events");
    assert!(!m.retain);
    assert_eq!(m.json()["seq"], 1);
    // use_identity_as_username: the broker knows the client by its certificate's CN.
    let log = broker.log();
    assert!(log.contains("u'gw-1'"), "no user gw-1 in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_trusted_certificate_are_refused() {
    let broker = Broker::start();

    // No client certificate at all.
    let (_c, mut el) = AsyncClient::new(broker.mqtt_options_without_certificate("anon"), 8);
    let r = wait_connack(&mut el, WAIT).await;
    // Refused in the TLS handshake (rustls reports the broker's alert: CertificateRequired).
    let err = r.expect_err("a client without a certificate got a CONNACK");
    assert!(err.contains("alert"), "not a TLS refusal: {err}");

    // A certificate from another CA.
    let rogue = broker.untrusted_client("gw-1");
    let opts = broker::mqtt_options(
        "rogue",
        broker.port(),
        Some(broker::tls_client_config(
            &rogue.ca,
            Some((&rogue.cert, &rogue.key)),
        )),
    );
    let (_c, mut el) = AsyncClient::new(opts, 8);
    let r = wait_connack(&mut el, WAIT).await;
    let err = r.expect_err("a client with an untrusted certificate got a CONNACK");
    assert!(err.contains("alert"), "not a TLS refusal: {err}");

    // Plain MQTT on the TLS port.
    let opts = broker::mqtt_options("plain", broker.port(), None);
    let (_c, mut el) = AsyncClient::new(opts, 8);
    assert!(wait_connack(&mut el, WAIT).await.is_err());

    // The broker is still fine for a good client.
    publish_qos1(broker.mqtt_options("gw-1"), "t", "x", false)
        .await
        .expect("a trusted client still connects");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_and_restarted_broker_traffic_resumes() {
    let mut broker = Broker::start();
    let port = broker.port();
    let pid = broker.pid();
    let sub = Subscriber::connect(&broker, "cloud", "gatehouse/#").await;

    // A long-lived publisher that reconnects on its own (as the gateway does).
    let (client, mut el) = AsyncClient::new(broker.mqtt_options("gw-1"), 64);
    let connacks = Arc::new(AtomicU64::new(0));
    let pubacks = Arc::new(AtomicU64::new(0));
    let task = {
        let (connacks, pubacks) = (connacks.clone(), pubacks.clone());
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        pubacks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    };
    let until = |n: &Arc<AtomicU64>, at_least: u64| {
        let n = n.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                while n.load(Ordering::SeqCst) < at_least {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .is_ok()
        }
    };
    assert!(until(&connacks, 1).await, "publisher never connected");
    client
        .publish("gatehouse/e", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    assert!(until(&pubacks, 1).await);
    sub.wait_for(|m| m.iter().any(|r| r.payload == b"before"), WAIT)
        .await;

    let subscribed = sub.subscriptions();
    broker.kill();
    assert!(!broker.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something still listens on the killed broker's port"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    broker.restart();
    assert_eq!(broker.port(), port, "restart keeps the port");
    assert_ne!(broker.pid(), pid, "restart runs a new process");
    assert!(until(&connacks, 2).await, "publisher did not reconnect");
    sub.wait_subscribed(subscribed + 1, WAIT).await;

    client
        .publish("gatehouse/e", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    assert!(until(&pubacks, 2).await, "no PUBACK after the restart");
    sub.wait_for(|m| m.iter().any(|r| r.payload == b"after"), WAIT)
        .await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_message_reaches_a_later_subscriber() {
    let broker = Broker::start();
    let topic = "gatehouse/site-1/gw-1/status";
    publish_qos1(
        broker.mqtt_options("gw-1"),
        topic,
        r#"{"online":true}"#,
        true,
    )
    .await
    .unwrap();

    let sub = Subscriber::connect(&broker, "cloud", topic).await;
    let msgs = sub.wait_for(|m| m.iter().any(|r| r.retain), WAIT).await;
    assert_eq!(msgs[0].topic, topic);
    assert_eq!(msgs[0].json()["online"], true);

    // A second subscriber sees the retained message too; a live one is not flagged retained.
    let sub2 = Subscriber::connect(&broker, "cloud", topic).await;
    sub2.wait_for(|m| m.iter().any(|r| r.retain), WAIT).await;
    publish_qos1(
        broker.mqtt_options("gw-1"),
        topic,
        r#"{"online":false}"#,
        true,
    )
    .await
    .unwrap();
    let msgs = sub.wait_for(|m| m.len() >= 2, WAIT).await;
    assert!(
        !msgs[1].retain,
        "a live message arrives with retain = false"
    );
    assert_eq!(msgs[1].json()["online"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_listener_variant_and_persistence() {
    // Both listeners on one broker: plain TCP in, mutual TLS out.
    let mut broker = Broker::start_with(BrokerOptions {
        plain: true,
        persistence: true,
        ..BrokerOptions::default()
    });
    let plain = broker.plain_port().expect("plain listener");
    assert_ne!(Some(plain), broker.tls_port());
    let sub = Subscriber::connect(&broker, "cloud", "demo/#").await;
    publish_qos1(broker.plain_mqtt_options("demo-gw"), "demo/r", "kept", true)
        .await
        .expect("publish over plain TCP");
    sub.wait_for(|m| m.iter().any(|r| r.payload == b"kept"), WAIT)
        .await;
    drop(sub);

    // With persistence, a clean stop and a restart keep the retained message.
    broker.terminate();
    broker.restart();
    let sub = Subscriber::with_options(broker.plain_mqtt_options("late"), "demo/#").await;
    sub.wait_for(|m| m.iter().any(|r| r.retain && r.payload == b"kept"), WAIT)
        .await;

    // A plain-only broker.
    let only = Broker::start_plain();
    assert_eq!(only.tls_port(), None);
    publish_qos1(only.plain_mqtt_options("p"), "x", "y", false)
        .await
        .unwrap();
}

#[test]
fn certificate_files_are_pem_and_keys_are_private() {
    let broker = Broker::start();
    let f = broker.client("gw-1");
    for path in [&f.ca, &f.cert, &f.key] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.starts_with("-----BEGIN "),
            "{} is not PEM",
            path.display()
        );
    }
    let mode = std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "client key mode");
    for entry in std::fs::read_dir(broker.dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "key") {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is readable by others", p.display());
        }
    }
    // Same name, same files; another name, other files.
    assert_eq!(broker.client("gw-1"), f);
    assert_ne!(broker.client("gw-2").cert, f.cert);
}
