//! The processes the DICOM node's tests start, each once: the node itself
//! ([`Node`], its flags spelled out at each call site), Orthanc ([`Orthanc`]),
//! dcmtk's storescp ([`Storescp`]), a pynetdicom SCP ([`PythonScp`]) and
//! PostgreSQL ([`Postgres`]); each is stopped when its guard is dropped. And the
//! checks the tests repeat: a C-STORE that must succeed, a metric waited for, the
//! dead letters an admin sees, a column of the outbox.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, free_port, metrics_of, python, root, start_node, storescu, tool};
use crate::ris;

/// `cxr-serve` with the DICOM node: `--dicom-port 0` and a peers file
/// (`peers.toml` under the test's folder) listing `MODALITY` from any host,
/// unless the test says otherwise; each further flag is the call site's.
#[derive(Clone)]
pub struct Node {
    dir: PathBuf,
    args: Vec<String>,
}

impl Node {
    pub fn new(dir: &Path) -> Self {
        let node = Self {
            dir: dir.to_path_buf(),
            args: Vec::new(),
        };
        node.flag("--dicom-port", "0")
            .flag("--dicom-peers-file", dir.join("peers.toml").display())
            .peers("[[peers]]\nae_title = \"MODALITY\"\n")
    }

    /// The peers file's text.
    pub fn peers(self, toml: &str) -> Self {
        std::fs::write(self.dir.join("peers.toml"), toml).unwrap();
        self
    }

    /// `name value`, in place of an earlier value of `name`.
    pub fn flag(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string();
        match self.args.iter().position(|a| a == name) {
            Some(i) => self.args[i + 1] = value,
            None => self.args.extend([name.to_string(), value]),
        }
        self
    }

    /// `flags` as they are (names and values), after the others.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.args.extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// `--dicom-outbox` at `path`.
    pub fn outbox(self, path: &Path) -> Self {
        self.flag("--dicom-outbox", path.display())
    }

    /// The server, and the node's DICOM port.
    pub fn start(&self, models: &Path) -> (common::Server, u16) {
        start_node(models, &self.args)
    }
}

/// stderr of `out`, for an assertion's message.
pub fn stderr(out: &Output) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&out.stderr)
}

/// Asserts that `out` is a success, its stderr the message otherwise.
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

/// dcmtk's storescu sends `files` to the node on `port` as `MODALITY`, and
/// succeeds.
pub fn store_ok(port: u16, files: &[&Path]) {
    assert_ok(&storescu("MODALITY", port, files));
}

/// Waits (up to `secs`) until `ok`, panicking with `what` otherwise.
pub fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} (waited {secs} s)");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (up to `secs`) until `/metrics` of one of `servers` holds `line`.
pub fn wait_metric(servers: &[&common::Server], line: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !servers.iter().any(|s| metrics_of(s).contains(line)) {
        assert!(
            Instant::now() < deadline,
            "no `{line}` in {secs} s:\n{}",
            servers.iter().map(|s| metrics_of(s)).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts that `/metrics` of `server` holds each of `lines`.
pub fn assert_metrics<S: AsRef<str>>(server: &common::Server, lines: &[S]) {
    let m = metrics_of(server);
    for line in lines {
        assert!(m.contains(line.as_ref()), "{}\n{m}", line.as_ref());
    }
}

/// The keys file of [`common::ops::keys`]: an operator with the `admin` scope
/// ([`ADMIN_KEY`]) and a reader without it ([`READER_KEY`]).
pub use common::ops::{ADMIN as ADMIN_KEY, READER as READER_KEY, keys as keys_file};

/// `GET /dicom/outbox/dead-letters` with `key`: status and body.
pub fn dead_letters(server: &common::Server, key: &str) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let (s, b) = common::tcp_http_headers(
        &server.addr,
        "GET",
        "/dicom/outbox/dead-letters",
        &[("Authorization", auth.as_str())],
        b"",
    );
    (s, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// The dead letters listed for the admin key (answered 200), and the whole answer.
pub fn admin_dead_letters(server: &common::Server) -> (Vec<Value>, Value) {
    let (s, v) = dead_letters(server, ADMIN_KEY);
    assert_eq!(s, 200, "{v}");
    let letters = v["dead_letters"].as_array().unwrap().clone();
    (letters, v)
}

/// The rows of one column that `sql` selects from the SQLite outbox at `path`
/// (opened read-only).
pub fn outbox_column<T: rusqlite::types::FromSql>(path: &Path, sql: &str) -> Vec<T> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A running Orthanc.
pub struct Orthanc {
    child: Child,
    pub http: u16,
    pub dicom: u16,
    config: PathBuf,
}

impl Orthanc {
    pub fn start(dir: &Path, name: &str) -> Self {
        Self::start_with(dir, name, serde_json::json!({}))
    }

    /// [`Orthanc::start`] with `extra` settings over the test's own.
    pub fn start_with(dir: &Path, name: &str, extra: Value) -> Self {
        let (http, dicom) = (free_port(), free_port());
        let db = dir.join(format!("{name}-db"));
        std::fs::create_dir_all(&db).unwrap();
        let plugin = ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("orthanc-dicomweb is not installed: run scripts/setup.sh --test");
        let config = dir.join(format!("{name}.json"));
        let mut settings = serde_json::json!({
            "Name": name,
            "StorageDirectory": db,
            "IndexDirectory": db,
            "HttpPort": http,
            "DicomPort": dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": false,
            "AuthenticationEnabled": false,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
            "DicomCheckCalledAet": false,
        });
        for (k, v) in extra.as_object().unwrap() {
            settings[k] = v.clone();
        }
        std::fs::write(&config, serde_json::to_string_pretty(&settings).unwrap()).unwrap();
        let mut o = Self {
            child: Self::spawn(&config),
            http,
            dicom,
            config,
        };
        o.wait_up();
        o
    }

    fn spawn(config: &Path) -> Child {
        Command::new(tool("Orthanc"))
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Orthanc")
    }

    fn wait_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/system").is_none() {
            assert!(Instant::now() < deadline, "Orthanc did not start in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config);
        self.wait_up();
    }

    /// dcmtk's storescu sends `files` to this Orthanc as `MODALITY`, calling
    /// `called`, and succeeds.
    pub fn store(&self, called: &str, files: &[&Path]) {
        let out = Command::new(tool("storescu"))
            .args(["-aet", "MODALITY", "-aec", called, "127.0.0.1"])
            .arg(self.dicom.to_string())
            .args(files)
            .output()
            .unwrap();
        assert_ok(&out);
    }

    pub fn get_bytes(&self, path: &str) -> Option<Vec<u8>> {
        let (status, body) =
            common::tcp_http_bytes(&format!("127.0.0.1:{}", self.http), "GET", path, &[], b"")?;
        (status == 200).then_some(body)
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        serde_json::from_slice(&self.get_bytes(path)?).ok()
    }

    /// Every instance's (Orthanc id, SOP Instance UID, Modality), in the study.
    pub fn study_instances(&self, study_uid: &str) -> Vec<(String, String, String)> {
        let Some(ids) = self.get("/instances") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for id in ids.as_array().unwrap() {
            let id = id.as_str().unwrap();
            let t = self
                .get(&format!("/instances/{id}/simplified-tags"))
                .unwrap();
            if t["StudyInstanceUID"] == study_uid {
                out.push((
                    id.to_string(),
                    t["SOPInstanceUID"].as_str().unwrap().to_string(),
                    t["Modality"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
        out
    }

    /// Waits (up to `secs`) until the study holds `n` instances.
    pub fn wait_count(&self, study: &str, n: usize, secs: u64) -> Vec<(String, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.study_instances(study);
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dcmtk's storescp on a free port, with the association profile `profile` of
/// the configuration `config` (written to a file), storing into a folder of its
/// own. Killed when dropped.
pub struct Storescp {
    _child: ris::Killed,
    pub port: u16,
    out: PathBuf,
}

impl Storescp {
    pub fn start(dir: &Path, config: &str, profile: &str) -> Self {
        let cfg = dir.join("storescp.cfg");
        std::fs::write(&cfg, config).unwrap();
        let out = dir.join("scp-out");
        std::fs::create_dir_all(&out).unwrap();
        let port = free_port();
        let child = listening(
            Command::new(tool("storescp"))
                .arg("-xf")
                .arg(&cfg)
                .arg(profile)
                .arg("-od")
                .arg(&out)
                .arg(port.to_string()),
            port,
            "storescp",
            10,
        );
        Self {
            _child: child,
            port,
            out,
        }
    }

    /// The files it stored.
    pub fn stored(&self) -> usize {
        std::fs::read_dir(&self.out).unwrap().count()
    }
}

/// `cmd` started, its output discarded, once it listens on `port` (within
/// `secs`); killed when dropped.
fn listening(cmd: &mut Command, port: u16, what: &str, secs: u64) -> ris::Killed {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let child = ris::Killed(child);
    ris::wait_port(port, what, secs);
    child
}

/// A pynetdicom SCP (`tests/dicom_node/refusing_scp.py`) on a free port, with
/// `args` after its port and log file; killed when dropped.
pub struct PythonScp {
    _child: ris::Killed,
    pub port: u16,
}

impl PythonScp {
    pub fn start(log: &Path, args: &[&str]) -> Self {
        let port = free_port();
        let child = listening(
            Command::new(python())
                .arg(root().join("tests/dicom_node/refusing_scp.py"))
                .arg(port.to_string())
                .arg(log)
                .args(args),
            port,
            "the pynetdicom SCP",
            20,
        );
        Self {
            _child: child,
            port,
        }
    }
}

/// A PostgreSQL server of Debian's, started for a test on a free port (by
/// `pg_ctl`, stopped by it when dropped).
pub struct Postgres {
    pg_ctl: PathBuf,
    data: PathBuf,
    root: bool,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// `program` run as the data directory's owner: the server refuses to run as
    /// root, so as the `postgres` user then.
    fn command(&self, program: &Path) -> Command {
        owner_command(self.root, program)
    }

    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .find(|p| p.join("initdb").exists())
            })
            .expect("PostgreSQL is not installed: run scripts/setup.sh --test (Debian package postgresql)");
        let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let data = dir.path().join("data");
        let init = owner_command(root, &bin.join("initdb"))
            .args(["-U", "cxr", "--auth=trust", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(init.status.success(), "initdb: {}", stderr(&init));
        let port = free_port();
        let pg = Self {
            pg_ctl: bin.join("pg_ctl"),
            data,
            root,
            url: format!("postgres://cxr@127.0.0.1:{port}/postgres"),
            _dir: dir,
        };
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            pg._dir.path().display()
        );
        let started = pg
            .command(&pg.pg_ctl)
            .arg("-D")
            .arg(&pg.data)
            .args(["-o", &options, "-l"])
            .arg(pg._dir.path().join("server.log"))
            .args(["-w", "-t", "30", "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&started.stdout),
            std::fs::read_to_string(pg._dir.path().join("server.log")).unwrap_or_default()
        );
        pg
    }
}

fn owner_command(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
