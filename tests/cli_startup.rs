//! `gatehouse` at start: the code key's fingerprint (a lost or replaced `code.key` is refused,
//! not silent), the data directory's permissions (private whatever the umask; loose modes fixed
//! with a warning or refused), and `check-config` refusing what `run` could not start with.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn gatehouse(args: &[&str]) -> Output {
    Command::new(gatehouse_bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A data directory holding the demo snapshot (version 1).
fn demo_db() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        dir.path().to_str().unwrap(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    dir
}

/// A config whose data directory is `data_dir`, with `extra` appended.
fn config_at(dir: &Path, data_dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = dir.join("gatehouse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n[storage]\ndata_dir = \"{}\"\n{extra}",
            data_dir.display()
        ),
    )
    .unwrap();
    cfg
}

/// `sh -c 'umask 022; exec gatehouse ARGS'`: the binary started by hand with a common umask.
fn under_umask_022(args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 022; exec \"$0\" \"$@\"")
        .arg(gatehouse_bin())
        .args(args)
        .env("RUST_LOG", "gatehouse=info")
        .env("NO_COLOR", "1");
    c
}

/// Starts `gatehouse run` on `cfg` and reads its log until it is running (then stops it with
/// SIGTERM) or exits. Returns whether it ran, and its log.
fn run_daemon(mut cmd: Command) -> (bool, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut log = String::new();
    let mut running = false;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("waiting for SIGTERM") {
            running = true;
            let kill = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
            break;
        }
    }
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    if running {
        assert!(status.success(), "{log}");
    } else {
        assert!(!status.success(), "{log}");
    }
    (running, log)
}

fn run_cmd(cfg: &Path) -> Command {
    let mut c = Command::new(gatehouse_bin());
    c.args(["run", "--config", cfg.to_str().unwrap()])
        .env("RUST_LOG", "gatehouse=info")
        .env("NO_COLOR", "1");
    c
}

#[test]
fn a_lost_or_replaced_code_key_is_refused_until_restored() {
    let dir = demo_db();
    let db = dir.path().to_str().unwrap();
    let key = dir.path().join("code.key");
    let backup = std::fs::read(&key).unwrap();
    let etc = tempfile::tempdir().unwrap();
    let cfg = config_at(etc.path(), dir.path(), "");
    let refused = |what: &str| {
        let o = gatehouse(&["db", "stats", "--db", db]);
        assert!(!o.status.success(), "{what}: db stats ran");
        let err = stderr(&o);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        for e in [
            what,
            "every keypad code would be denied",
            "restore `code.key` from a backup",
            "delete the data directory",
            "resync",
        ] {
            assert!(err.contains(e), "`{e}` missing from: {err}");
        }
        let (ran, log) = run_daemon(run_cmd(&cfg));
        assert!(!ran && log.contains(what), "run: {log}");
    };
    // Deleted: nothing is made in its place.
    std::fs::remove_file(&key).unwrap();
    refused("is missing");
    assert!(!key.exists(), "a new key was made");
    // Replaced by another (well-formed, private) key.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        std::io::Write::write_all(&mut f, format!("{}\n", "ab".repeat(32)).as_bytes()).unwrap();
    }
    refused("but the database was built with code key");
    // Restored: it opens, and keypad codes are granted again.
    std::fs::write(&key, &backup).unwrap();
    let o = gatehouse(&[
        "access",
        "check",
        "--db",
        db,
        "--code",
        "123456",
        "--unit",
        "A-101",
        "--at",
        "2026-11-23T12:00:00-05:00",
    ]);
    assert!(stdout(&o).starts_with("GRANTED"), "{}", stderr(&o));
    let (ran, log) = run_daemon(run_cmd(&cfg));
    assert!(ran, "{log}");
}

#[test]
fn a_database_without_a_site_takes_a_new_code_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data");
    let db = db.to_str().unwrap();
    let o = gatehouse(&["db", "stats", "--db", db]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(dir.path().join("data/code.key")).unwrap();
    let o = gatehouse(&["db", "stats", "--db", db]);
    assert!(o.status.success(), "no site, no hashes: {}", stderr(&o));
    let o = gatehouse(&[
        "db",
        "import",
        "--db",
        db,
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Every mode under `dir` (itself included), as `(path, mode)`.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.push((p.display().to_string(), m.permissions().mode() & 0o777));
    }
    out
}

#[test]
fn the_data_is_private_whatever_the_umask() {
    let etc = tempfile::tempdir().unwrap();
    let data = etc.path().join("var/data");
    let cfg = config_at(
        etc.path(),
        &data,
        &format!(
            "[access]\ninitial_snapshot = \"{}\"\n",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo-snapshot.json")
        ),
    );
    let (ran, log) = run_daemon(under_umask_022(&["run", "--config", cfg.to_str().unwrap()]));
    assert!(ran, "{log}");
    let found = modes(&data);
    assert!(found.len() >= 5, "{found:?}");
    for (p, mode) in &found {
        let want = if Path::new(p).is_dir() { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "`{p}` is {mode:04o} under umask 022");
    }
    // An export (another process, same umask) is private too.
    let out = etc.path().join("export.json");
    let o = under_umask_022(&["db", "export", "--config", cfg.to_str().unwrap(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(modes(&out)[0].1, 0o600);
}

#[test]
fn loose_modes_are_fixed_with_a_warning_or_refused_when_writable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = demo_db();
    let db = dir.path().to_str().unwrap();
    let etc = tempfile::tempdir().unwrap();
    let cfg = config_at(etc.path(), dir.path(), "");
    let cfg = cfg.to_str().unwrap();
    let conf = dir.path().join("db/conf");
    let chmod =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // Readable by others (what an older gatehouse left under umask 022): check-config says
    // what `run` will do; opening fixes it and warns.
    chmod(dir.path(), 0o755);
    chmod(&conf, 0o644);
    let o = gatehouse(&["check-config", "--config", cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("has mode 0644 (readable by group or others): set to 0600 at open"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        (mode(dir.path()), mode(&conf)),
        (0o755, 0o644),
        "check-config changed modes"
    );
    let o = gatehouse(&["db", "stats", "--db", db]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("readable by group or others") && err.contains("may have been read"),
        "{err}"
    );
    assert_eq!((mode(dir.path()), mode(&conf)), (0o700, 0o600));
    // Writable by others: refused by run, check-config and db commands alike; nothing changed.
    chmod(&conf, 0o666);
    for o in [
        gatehouse(&["db", "stats", "--db", db]),
        gatehouse(&["check-config", "--config", cfg]),
        gatehouse(&["run", "--config", cfg]),
    ] {
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains("has mode 0666 (writable by group or others)") && err.contains("chmod"),
            "{err}"
        );
    }
    assert_eq!(mode(&conf), 0o666);
    // The code key readable by others is refused (by check-config too), not fixed.
    chmod(&conf, 0o600);
    chmod(&dir.path().join("code.key"), 0o640);
    for o in [
        gatehouse(&["db", "stats", "--db", db]),
        gatehouse(&["check-config", "--config", cfg]),
    ] {
        assert!(!o.status.success());
        assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    }
}

#[test]
fn check_config_refuses_what_run_cannot_start_with() {
    let etc = tempfile::tempdir().unwrap();
    let head = "[site]\nid = \"s1\"\ngateway_id = \"g1\"\n";
    std::fs::write(etc.path().join("a-file"), "").unwrap();
    let zeros = "0".repeat(64);
    let bad_snapshot = etc.path().join("bad-snapshot.json");
    std::fs::write(&bad_snapshot, "{\"schema_version\": 1,").unwrap();
    for (body, expect) in [
        (
            "[storage]\ndata_dir = \"a-file/data\"\n".to_string(),
            ":5: key `storage.data_dir`: data directory".to_string(),
        ),
        (
            "[storage]\ndata_dir = \"a-file\"\n".to_string(),
            ":5: key `storage.data_dir`: data directory".to_string(),
        ),
        (
            format!(
                "[cloud]\nhost = \"h\"\ntransport = \"tcp\"\ncommand_public_key = \"{zeros}\"\n"
            ),
            ":7: key `cloud.command_public_key`: all zeros is not a usable Ed25519 public key"
                .to_string(),
        ),
        (
            format!("[access]\ndigital_key_public_key = \"{zeros}\"\n"),
            ":5: key `access.digital_key_public_key`: all zeros".to_string(),
        ),
        (
            format!(
                "[storage]\ndata_dir = \"data\"\n[access]\ninitial_snapshot = \"{}\"\n",
                bad_snapshot.display()
            ),
            "access.initial_snapshot: `".to_string(),
        ),
    ] {
        let cfg = etc.path().join("gatehouse.toml");
        std::fs::write(&cfg, format!("{head}{body}")).unwrap();
        for cmd in ["check-config", "run"] {
            let o = gatehouse(&[cmd, "--config", cfg.to_str().unwrap()]);
            assert!(!o.status.success(), "{cmd} accepted:\n{body}");
            let err = stderr(&o);
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(
                err.contains(&expect),
                "{cmd}: `{expect}` missing from: {err}"
            );
        }
    }
    // Invalid UTF-8 is named by line and column, not `:0:`.
    let cfg = etc.path().join("latin1.toml");
    std::fs::write(
        &cfg,
        b"[site]\nid = \"s1\"\n# caf\xe9\ngateway_id = \"g1\"\n",
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let o = gatehouse(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(
            err.contains("latin1.toml:3: column 6: invalid UTF-8 (byte 0xe9"),
            "{err}"
        );
    }
}
