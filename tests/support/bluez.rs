//! The mock BlueZ (`tests/peers/bluez_mock.py`) for tests that run bluer in their own process.
//! bluer finds the system bus through `DBUS_SYSTEM_BUS_ADDRESS`, read from the process
//! environment, which a test must not change while threads run: [`in_child`] runs a test's body
//! in a child process of the test binary started with the variable naming the socket the mock
//! will make (`--bus-dir`), and [`mock`] starts the mock there.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::peers::{self, Peer};

/// Set in the child: the directory of the mock's bus socket.
const BUS_DIR: &str = "GATEHOUSE_TEST_BLUEZ_BUS_DIR";
const WAIT: Duration = Duration::from_secs(30);

/// Runs the test `name` in a child process whose `DBUS_SYSTEM_BUS_ADDRESS` names the bus the
/// mock will make in a fresh directory, and checks that it passed. In that child, returns the
/// directory: the test body runs there.
pub fn in_child(name: &str) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(BUS_DIR) {
        return Some(PathBuf::from(d));
    }
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(BUS_DIR, dir.path())
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}/system_bus_socket", dir.path().display()),
        )
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{name} failed in its child process (its output is above)"
    );
    None
}

/// The mock BlueZ with these devices (`--padlock=…`, `--sensor=…`, `--fob=…`), its bus in `dir`
/// (the directory [`in_child`] returned).
pub fn mock(dir: &Path, devices: &[String]) -> Peer {
    let mut args = vec![format!("--bus-dir={}", dir.display())];
    args.extend_from_slice(devices);
    Peer::start_with("bluez_mock.py", &args)
}

/// Waits until the mock has seen discovery started `n` times.
pub fn discovering(bluez: &Peer, n: usize) {
    peers::eventually("discovery started", WAIT, || {
        let starts = bluez
            .events()
            .iter()
            .filter(|e| e["ev"] == "discovery" && e["state"] == "started")
            .count();
        (starts >= n).then_some(())
    });
}
