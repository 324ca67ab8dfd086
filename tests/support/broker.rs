//! Test harness: a real `mosquitto` (2.x) with mutual TLS, started per test on a free port.
//!
//! # Including it
//!
//! This file is a module, not a test target (Cargo only builds `tests/*.rs`). An integration test
//! pulls it in with
//!
//! ```ignore
//! #[path = "support/broker.rs"]
//! mod broker;
//! use broker::{Broker, BrokerOptions, Subscriber};
//! ```
//!
//! Tests that use it should run on the multi-threaded runtime
//! (`#[tokio::test(flavor = "multi_thread")]`): `Broker::start`, `kill` and `restart` block for
//! up to a few hundred milliseconds while the subscriber's task keeps polling.
//!
//! # What it does
//!
//! - **Certificates** (rcgen, ECDSA P-256): a CA, a server certificate for `localhost` and
//!   `127.0.0.1`, and on demand a client certificate per name (`CN = name`, client-auth usage),
//!   all PEM files in the broker's temp dir; private keys are mode 0600. [`Broker::client`] gives
//!   the paths, exactly what a gateway's `[cloud]` config (`ca_file`, `cert_file`, `key_file`)
//!   wants. [`Broker::untrusted_client`] signs one with another CA (must be refused).
//! - **mosquitto** from [`MOSQUITTO`] with a generated config: one listener on `127.0.0.1:PORT`
//!   with `require_certificate true` and `use_identity_as_username true` (the client's user name
//!   is its certificate's CN), optionally a plain-TCP listener ([`BrokerOptions::plain`]),
//!   persistence off unless [`BrokerOptions::persistence`], logging to `mosquitto.log` in the temp
//!   dir ([`Broker::log`]). Ports come from the kernel's ephemeral range (never 1883, where a
//!   system broker may run); a collision is retried on another port. `start` returns once the
//!   broker logged that it runs and every listener accepts TCP connections.
//! - **Running as root.** mosquitto started by root drops privileges to user `mosquitto`, which
//!   cannot read root's 0700 temp dir (nor the 0600 keys). The config therefore says `user root`:
//!   mosquitto then keeps the identity it was started with (it only warns), and for a non-root
//!   user the option has no effect. Keys stay readable by their owner only.
//! - **Faults.** [`Broker::kill`] sends SIGKILL (no clean shutdown: no will suppression, no
//!   persistence save); [`Broker::restart`] starts it again on the same ports with the same
//!   certificates and config; [`Broker::terminate`] is the clean SIGTERM stop. Drop kills it.
//! - **Clients.** [`Broker::mqtt_options`] builds rumqttc v4 (MQTT 3.1.1) options with mutual
//!   TLS through `TlsConfiguration::Rustls` (rustls with the ring provider, roots = the test CA
//!   only). [`Subscriber`] subscribes at QoS 1 and collects what arrives, reconnecting and
//!   subscribing again after broker restarts. [`publish_qos1`] publishes one message and waits for
//!   its PUBACK.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The broker binary (Debian/Ubuntu package `mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Never used: a system broker may listen there.
const SYSTEM_PORT: u16 = 1883;
/// How long `start`/`restart` wait for the broker to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest packet the harness's clients send or accept (snapshot chunks are large).
pub const MAX_PACKET: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Certificates

/// A certificate authority that signs server and client certificates into `dir`.
pub struct Pki {
    dir: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    /// The CA certificate, PEM.
    pub ca_file: PathBuf,
}

/// The files a client needs for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The certificate's CN (and the MQTT user name the broker gives the client).
    pub name: String,
    /// The CA that signed the broker's certificate (to check the broker with).
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// PKCS#8 PEM, mode 0600.
    pub key: PathBuf,
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("creating `{}`: {e}", path.display()));
    f.write_all(contents)
        .unwrap_or_else(|e| panic!("writing `{}`: {e}", path.display()));
}

impl Pki {
    /// A new CA named `ca_name`, its certificate written to `dir/<file_stem>-ca.pem`.
    pub fn new(dir: &Path, file_stem: &str, ca_name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, ca_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        let ca_file = dir.join(format!("{file_stem}-ca.pem"));
        write_file(&ca_file, ca_cert.pem().as_bytes(), 0o644);
        Pki {
            dir: dir.to_path_buf(),
            ca_cert,
            ca_key,
            ca_file,
        }
    }

    fn issue(&self, file_stem: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("signing a certificate");
        let cert_file = self.dir.join(format!("{file_stem}.crt"));
        let key_file = self.dir.join(format!("{file_stem}.key"));
        write_file(&cert_file, cert.pem().as_bytes(), 0o644);
        write_file(&key_file, key.serialize_pem().as_bytes(), 0o600);
        (cert_file, key_file)
    }

    /// A server certificate for `localhost` and `127.0.0.1`: (cert, key) paths.
    pub fn server(&self, file_stem: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file_stem, params)
    }

    /// A client certificate with `CN = name`: (cert, key) paths.
    pub fn client(&self, file_stem: &str, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file_stem, params)
    }
}

/// A file-name-safe form of a client name.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// TLS and MQTT options for clients

/// A rustls client configuration (ring provider) trusting only `ca`, presenting `client_auth`
/// (certificate chain file, key file) when given.
pub fn tls_client_config(
    ca: &Path,
    client_auth: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .unwrap_or_else(|e| panic!("reading CA `{}`: {e}", ca.display()))
    {
        roots
            .add(cert.expect("CA PEM"))
            .expect("adding the CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client_auth {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .unwrap_or_else(|e| panic!("reading `{}`: {e}", cert.display()))
                .collect::<Result<_, _>>()
                .expect("certificate PEM");
            let key = PrivateKeyDer::from_pem_file(key)
                .unwrap_or_else(|e| panic!("reading key `{}`: {e}", key.display()));
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate and key")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// rumqttc v4 options for `127.0.0.1:port`: keep-alive 5 s, clean session, packets up to
/// [`MAX_PACKET`], and TLS when `tls` is given.
pub fn mqtt_options(
    client_id: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(true);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(cfg) = tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    o
}

// ---------------------------------------------------------------------------------------------
// The broker

/// What to start. The default is one mutual-TLS listener, no persistence.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// A listener requiring a client certificate signed by the test CA.
    pub tls: bool,
    /// A plain-TCP listener with anonymous access (for tests that want no TLS).
    pub plain: bool,
    /// mosquitto persistence in the temp dir (`autosave_interval 1`): retained messages and
    /// sessions survive [`Broker::terminate`] + [`Broker::restart`], and survive
    /// [`Broker::kill`] only as far as the last autosave.
    pub persistence: bool,
    /// Lines appended to the end of the config (after the listeners, so listener options apply
    /// to the last listener; with `per_listener_settings true`).
    pub extra_config: Vec<String>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            tls: true,
            plain: false,
            persistence: false,
            extra_config: Vec::new(),
        }
    }
}

/// A running (or killed) mosquitto with its certificates, config and log in a temp dir.
pub struct Broker {
    dir: tempfile::TempDir,
    opts: BrokerOptions,
    pki: Pki,
    server_cert: PathBuf,
    server_key: PathBuf,
    rogue: Mutex<Option<Pki>>,
    clients: Mutex<HashMap<String, ClientFiles>>,
    tls_port: Option<u16>,
    plain_port: Option<u16>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

enum SpawnError {
    /// A port was taken (by the time mosquitto bound it).
    PortInUse(String),
}

fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        if port != SYSTEM_PORT {
            return port;
        }
    }
}

impl Broker {
    /// A broker with one mutual-TLS listener.
    pub fn start() -> Broker {
        Broker::start_with(BrokerOptions::default())
    }

    /// A broker with only a plain-TCP, anonymous listener.
    pub fn start_plain() -> Broker {
        Broker::start_with(BrokerOptions {
            tls: false,
            plain: true,
            ..BrokerOptions::default()
        })
    }

    pub fn start_with(opts: BrokerOptions) -> Broker {
        assert!(
            opts.tls || opts.plain,
            "a broker needs at least one listener"
        );
        assert!(
            Path::new(MOSQUITTO).exists(),
            "{MOSQUITTO} is missing: install mosquitto (apt-get install mosquitto; `make test` does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("gatehouse-broker-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki::new(dir.path(), "test", "gatehouse test CA");
        let (server_cert, server_key) = pki.server("server");
        let mut b = Broker {
            config: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            dir,
            opts,
            pki,
            server_cert,
            server_key,
            rogue: Mutex::new(None),
            clients: Mutex::new(HashMap::new()),
            tls_port: None,
            plain_port: None,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..8 {
            b.tls_port = b.opts.tls.then(free_port);
            b.plain_port = b.opts.plain.then(free_port);
            if b.tls_port.is_some() && b.tls_port == b.plain_port {
                continue;
            }
            b.write_config();
            match b.spawn() {
                Ok(()) => return b,
                Err(SpawnError::PortInUse(why)) => last = why,
            }
        }
        panic!("mosquitto could not find a free port after 8 tries: {last}");
    }

    /// Kills the broker with SIGKILL (no clean shutdown) and reaps it. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the broker cleanly (SIGTERM; persistence, if on, is saved) and reaps it.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same ports with the same certificates and config (killing
    /// it first if it still runs). Waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(SpawnError::PortInUse(why)) => {
                    if Instant::now() > deadline {
                        panic!("mosquitto could not take its port back: {why}");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The mutual-TLS port, or the plain one when the broker has no TLS listener.
    pub fn port(&self) -> u16 {
        self.tls_port.or(self.plain_port).expect("a listener")
    }

    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    pub fn plain_port(&self) -> Option<u16> {
        self.plain_port
    }

    /// The temp dir holding the certificates, the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM) that signed the broker's and the clients' certificates.
    pub fn ca_file(&self) -> &Path {
        &self.pki.ca_file
    }

    /// The broker's log so far (all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The paths a client named `name` uses (generated on first use; `CN = name`).
    /// Writes `dir/gatehouse.toml` for a daemon that connects to this broker with mutual TLS as
    /// site `site-1`, gateway `gw-1`, data in `data_dir` (relative to `dir` or absolute),
    /// keep-alive 5 s, commands verified with `command_key`. `cloud_extra` is appended to
    /// `[cloud]` (e.g. `reconnect_min_ms = 200\n`), `extra` after it (more sections).
    pub fn write_gateway_config(
        &self,
        dir: &Path,
        data_dir: &str,
        command_key: &ed25519_dalek::VerifyingKey,
        cloud_extra: &str,
        extra: &str,
    ) -> PathBuf {
        let f = self.client("gw-1");
        let cfg = dir.join("gatehouse.toml");
        std::fs::write(
            &cfg,
            format!(
                "[site]\nid = \"site-1\"\ngateway_id = \"gw-1\"\n[storage]\ndata_dir = \"{data_dir}\"\n\
                 [cloud]\nhost = \"127.0.0.1\"\nport = {}\nca_file = \"{}\"\ncert_file = \"{}\"\n\
                 key_file = \"{}\"\nkeep_alive_secs = 5\ncommand_public_key = \"{}\"\n{cloud_extra}{extra}",
                self.port(),
                f.ca.display(),
                f.cert.display(),
                f.key.display(),
                hex::encode(command_key.to_bytes())
            ),
        )
        .unwrap();
        cfg
    }

    pub fn client(&self, name: &str) -> ClientFiles {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(name.to_string())
            .or_insert_with(|| {
                let stem = format!("client-{}", file_stem(name));
                let (cert, key) = self.pki.client(&stem, name);
                ClientFiles {
                    name: name.to_string(),
                    ca: self.pki.ca_file.clone(),
                    cert,
                    key,
                }
            })
            .clone()
    }

    /// A client certificate `CN = name` signed by another CA: the broker must refuse it. `ca` is
    /// still the broker's CA (the client trusts the broker; the broker does not trust it).
    pub fn untrusted_client(&self, name: &str) -> ClientFiles {
        let mut rogue = self.rogue.lock().unwrap_or_else(|e| e.into_inner());
        let pki = rogue.get_or_insert_with(|| Pki::new(self.dir.path(), "rogue", "rogue CA"));
        let (cert, key) = pki.client(&format!("rogue-{}", file_stem(name)), name);
        ClientFiles {
            name: name.to_string(),
            ca: self.pki.ca_file.clone(),
            cert,
            key,
        }
    }

    /// rustls configuration for client `name` (mutual TLS).
    pub fn tls_config(&self, name: &str) -> Arc<rustls::ClientConfig> {
        let f = self.client(name);
        tls_client_config(&f.ca, Some((&f.cert, &f.key)))
    }

    /// MQTT 3.1.1 options over mutual TLS for client `name` (client id = `name`).
    pub fn mqtt_options(&self, name: &str) -> MqttOptions {
        self.mqtt_options_as(name, name)
    }

    /// As [`Broker::mqtt_options`] with another client id (the certificate's CN stays `name`).
    pub fn mqtt_options_as(&self, name: &str, client_id: &str) -> MqttOptions {
        let port = self.tls_port.expect("this broker has no TLS listener");
        mqtt_options(client_id, port, Some(self.tls_config(name)))
    }

    /// TLS options that present no client certificate (the broker must refuse them).
    pub fn mqtt_options_without_certificate(&self, client_id: &str) -> MqttOptions {
        let port = self.tls_port.expect("this broker has no TLS listener");
        mqtt_options(
            client_id,
            port,
            Some(tls_client_config(&self.pki.ca_file, None)),
        )
    }

    /// Plain-TCP options for the plain listener.
    pub fn plain_mqtt_options(&self, client_id: &str) -> MqttOptions {
        let port = self.plain_port.expect("this broker has no plain listener");
        mqtt_options(client_id, port, None)
    }

    fn write_config(&self) {
        let d = self.dir.path();
        let mut c = String::from("# Generated by tests/support/broker.rs\n");
        // Started by root, mosquitto would switch to user `mosquitto`, which cannot read this
        // 0700 dir; `user root` keeps the starting identity (no effect for a non-root user).
        c.push_str("user root\n");
        c.push_str("per_listener_settings true\n");
        if self.opts.persistence {
            c.push_str("persistence true\n");
            c.push_str(&format!("persistence_location {}/\n", d.display()));
            c.push_str("autosave_interval 1\n");
        } else {
            c.push_str("persistence false\n");
        }
        c.push_str(&format!("log_dest file {}\n", self.log.display()));
        c.push_str("log_type error\nlog_type warning\nlog_type notice\nlog_type information\n");
        c.push_str("connection_messages true\n");
        c.push_str("log_timestamp true\nlog_timestamp_format %Y-%m-%dT%H:%M:%S\n");
        if let Some(port) = self.tls_port {
            c.push_str(&format!("\nlistener {port} 127.0.0.1\n"));
            c.push_str(&format!("cafile {}\n", self.pki.ca_file.display()));
            c.push_str(&format!("certfile {}\n", self.server_cert.display()));
            c.push_str(&format!("keyfile {}\n", self.server_key.display()));
            c.push_str("require_certificate true\n");
            c.push_str("use_identity_as_username true\n");
            c.push_str("allow_anonymous true\n");
        }
        if let Some(port) = self.plain_port {
            c.push_str(&format!("\nlistener {port} 127.0.0.1\n"));
            c.push_str("allow_anonymous true\n");
        }
        if !self.opts.extra_config.is_empty() {
            c.push('\n');
            for line in &self.opts.extra_config {
                c.push_str(line);
                c.push('\n');
            }
        }
        write_file(&self.config, c.as_bytes(), 0o600);
    }

    fn ports(&self) -> Vec<u16> {
        self.tls_port.into_iter().chain(self.plain_port).collect()
    }

    /// Starts mosquitto on the configured ports and waits until it runs and accepts TCP.
    fn spawn(&mut self) -> Result<(), SpawnError> {
        assert!(self.child.is_none(), "the broker is already running");
        for p in self.ports() {
            assert_ne!(p, SYSTEM_PORT, "port 1883 belongs to the system broker");
        }
        let log_start = fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let stderr_path = self.dir.path().join("mosquitto.stderr");
        let stderr = fs::File::create(&stderr_path).expect("stderr file");
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {MOSQUITTO}: {e}"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.log();
            let this_run = log.get(log_start..).unwrap_or("");
            if let Ok(Some(status)) = child.try_wait() {
                let err = fs::read_to_string(&stderr_path).unwrap_or_default();
                let why = format!("mosquitto exited ({status}):\n{err}{this_run}");
                if this_run.contains("in use") || err.contains("in use") {
                    return Err(SpawnError::PortInUse(why));
                }
                panic!(
                    "{why}\nconfig:\n{}",
                    fs::read_to_string(&self.config).unwrap_or_default()
                );
            }
            if this_run.contains(" running") && self.ports().into_iter().all(accepts) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto did not come up within {START_TIMEOUT:?}:\n{this_run}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// One message as a subscriber received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Received {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload as JSON (panics with the payload when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on `{}` is not JSON ({e}): {}",
                self.topic,
                self.text()
            )
        })
    }
}

static SUBSCRIBERS: AtomicU64 = AtomicU64::new(0);

/// A client that subscribes to one topic filter at QoS 1 and collects every message, from a
/// spawned task polling its event loop. After a lost connection it reconnects (every 100 ms) and
/// subscribes again (clean session: what was published while it was away is not delivered,
/// except retained messages). Dropping it stops the task.
pub struct Subscriber {
    pub client: AsyncClient,
    pub filter: String,
    messages: Arc<Mutex<Vec<Received>>>,
    subacks: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects as client `name` over mutual TLS (client id `<name>-sub-<n>`, so several
    /// subscribers may share a certificate), subscribes to `filter`, and waits for the SUBACK.
    pub async fn connect(broker: &Broker, name: &str, filter: &str) -> Subscriber {
        let n = SUBSCRIBERS.fetch_add(1, Ordering::Relaxed);
        let opts = broker.mqtt_options_as(name, &format!("{name}-sub-{n}"));
        Subscriber::with_options(opts, filter).await
    }

    /// Subscribes with the given options (e.g. [`Broker::plain_mqtt_options`]).
    pub async fn with_options(opts: MqttOptions, filter: &str) -> Subscriber {
        let (client, mut el) = AsyncClient::new(opts, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let task = {
            let (client, messages, subacks, connected) = (
                client.clone(),
                messages.clone(),
                subacks.clone(),
                connected.clone(),
            );
            let filter = filter.to_string();
            tokio::spawn(async move {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected.store(true, Ordering::SeqCst);
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            messages
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Received {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                    retain: p.retain,
                                });
                        }
                        Ok(_) => {}
                        Err(_) => {
                            connected.store(false, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        };
        let sub = Subscriber {
            client,
            filter: filter.to_string(),
            messages,
            subacks,
            connected,
            task,
        };
        sub.wait_subscribed(1, Duration::from_secs(10)).await;
        sub
    }

    /// Everything received so far, in arrival order.
    pub fn messages(&self) -> Vec<Received> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// How many SUBACKs arrived: 1 after `connect`, one more after each reconnection.
    pub fn subscriptions(&self) -> u64 {
        self.subacks.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` SUBACKs arrived (panics after `timeout`). After a broker restart,
    /// `wait_subscribed(sub.subscriptions() + 1, ..)` (read before the restart) tells when the
    /// subscriber listens again.
    pub async fn wait_subscribed(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.subscriptions() < n {
            if Instant::now() > deadline {
                panic!(
                    "subscriber on `{}`: {} SUBACK(s) after {timeout:?}, expected {n}",
                    self.filter,
                    self.subscriptions()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `pred` holds for the messages received so far and returns them; `None` after
    /// `timeout`.
    pub async fn try_wait_for<F>(&self, pred: F, timeout: Duration) -> Option<Vec<Received>>
    where
        F: Fn(&[Received]) -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let msgs = self.messages.lock().unwrap_or_else(|e| e.into_inner());
                if pred(&msgs) {
                    return Some(msgs.clone());
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// As [`Subscriber::try_wait_for`], panicking on timeout with what did arrive.
    pub async fn wait_for<F>(&self, pred: F, timeout: Duration) -> Vec<Received>
    where
        F: Fn(&[Received]) -> bool,
    {
        match self.try_wait_for(pred, timeout).await {
            Some(m) => m,
            None => {
                let msgs = self.messages();
                let tail: Vec<String> = msgs
                    .iter()
                    .rev()
                    .take(5)
                    .rev()
                    .map(|m| {
                        let mut t = m.text();
                        t.truncate(200);
                        format!(
                            "  {}{}: {t}",
                            m.topic,
                            if m.retain { " (retained)" } else { "" }
                        )
                    })
                    .collect();
                panic!(
                    "subscriber on `{}`: condition not met after {timeout:?}; {} message(s), the last:\n{}",
                    self.filter,
                    msgs.len(),
                    tail.join("\n")
                );
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Drives `el` until its CONNACK; an error or a refusal is returned as text.
pub async fn wait_connack(el: &mut EventLoop, timeout: Duration) -> Result<(), String> {
    let fut = async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == rumqttc::ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("refused: {:?}", a.code))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no CONNACK within {timeout:?}")))
}

/// Connects with `opts`, publishes one message at QoS 1, waits for its PUBACK, disconnects.
pub async fn publish_qos1(
    opts: MqttOptions,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    retain: bool,
) -> Result<(), String> {
    let (client, mut el) = AsyncClient::new(opts, 16);
    let timeout = Duration::from_secs(10);
    wait_connack(&mut el, timeout).await?;
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.into())
        .await
        .map_err(|e| e.to_string())?;
    let acked = tokio::time::timeout(timeout, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no PUBACK in time".into()));
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    acked
}
