//! Two replicas of the real binary behind a real reverse proxy (Debian's nginx,
//! with an ordinary upstream block: keep-alive, `proxy_next_upstream error timeout
//! http_502 http_503`, so a POST that reached a replica is never re-sent), a bounded
//! closed loop of clients on 127.0.0.1, and two rolling restarts (SIGTERM, then the
//! same command again) of the shipped `weighted` model, loading for longer than
//! nginx's fail_timeout: every request must be answered 200. A replica that accepted connections while loading turned ~8 % of
//! them into 503s (bench/RESULTS.md, "Rolling restarts behind nginx").

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a restarted replica takes to load its model: longer than nginx's
/// fail_timeout (10 s), so that the gateway tries it again while it loads.
const LOAD_TIME: Duration = Duration::from_secs(13);

/// A free port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nginx() -> Option<String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .map(str::to_string)
}

/// One replica on a fixed port, logs discarded. Its model file is a FIFO that a
/// thread fills `load_delay` after the start: a model that takes that long to load,
/// longer than nginx's fail_timeout, as the shipped models take on a slow CPU.
fn replica(models: &Path, port: u16, bytes: Arc<Vec<u8>>, load_delay: Duration) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_cxr-serve"))
        .args([
            "--host",
            "127.0.0.1",
            "--device",
            "cpu",
            "--intra-threads",
            "1",
        ])
        .args(["--port", &port.to_string(), "--ood-action", "off"])
        .arg("--models-dir")
        .arg(models)
        .env("ORT_DYLIB_PATH", cxr::inference::resolve_library(None))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cxr-serve");
    let fifo = models.join("weighted.onnx");
    std::thread::spawn(move || {
        std::thread::sleep(load_delay);
        // Blocks until the replica opens the file to read it.
        let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
        let _ = f.write_all(&bytes);
    });
    child
}

/// A models folder for one replica: the shipped `weighted` card and OOD file, and a
/// FIFO where its ONNX file goes.
fn replica_models(shipped: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["weighted.json", "weighted.ood.json"] {
        std::os::unix::fs::symlink(shipped.join(f), dir.path().join(f)).unwrap();
    }
    let fifo = dir.path().join("weighted.onnx");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    dir
}

/// Waits until `GET /ready` on `port` answers 200 (a refused connection is "not
/// yet").
fn wait_ready(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            if out.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "replica on {port} not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm_and_wait(child: &mut Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "replica exit {status:?}");
}

/// One POST over a keep-alive connection (opened when `conn` is `None` or closed):
/// the status code, or 0 when the connection failed under the request.
fn post(conn: &mut Option<TcpStream>, port: u16, body: &[u8]) -> u16 {
    if conn.is_none() {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to nginx");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        *conn = Some(s);
    }
    let s = conn.as_mut().unwrap();
    let head = format!(
        "POST /predict HTTP/1.1\r\nHost: cxr\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() || s.write_all(body).is_err() {
        *conn = None;
        return 0;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => {
                *conn = None;
                return 0;
            }
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    let mut rest = vec![0u8; len];
    if s.read_exact(&mut rest).is_err() || text.contains("connection: close") {
        *conn = None;
    }
    status
}

#[test]
fn rolling_restarts_behind_nginx_lose_no_request() {
    let Some(nginx) = nginx() else {
        panic!("nginx is not installed: run scripts/setup.sh --test");
    };
    // The shipped `weighted` model alone (one model's memory per replica).
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let bytes = Arc::new(std::fs::read(shipped.join("weighted.onnx")).unwrap());
    let dirs = [replica_models(&shipped), replica_models(&shipped)];
    let ports = [free_port(), free_port()];
    let mut replicas: Vec<Child> = (0..2)
        .map(|i| replica(dirs[i].path(), ports[i], bytes.clone(), Duration::ZERO))
        .collect();
    for &p in &ports {
        wait_ready(p, Duration::from_secs(120));
    }

    let gw = tempfile::tempdir().unwrap();
    let front = free_port();
    let prefix = gw.path().display().to_string();
    let conf = format!(
        "worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  upstream cxr {{
    server 127.0.0.1:{a};
    server 127.0.0.1:{b};
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{front};
    client_max_body_size 32m;
    client_body_buffer_size 1m;
    location / {{
      proxy_pass http://cxr;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_next_upstream error timeout http_502 http_503;
    }}
  }}
}}
",
        a = ports[0],
        b = ports[1],
    );
    std::fs::write(gw.path().join("nginx.conf"), conf).unwrap();
    let mut proxy = Command::new(&nginx)
        .args(["-p", &prefix, "-c", &format!("{prefix}/nginx.conf")])
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", front)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Four clients in a closed loop until the restarts are over (bounded: 5 min).
    let jpeg = Arc::new(common::jpeg_bytes(&common::gray_image(224, 224, 3)));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (jpeg, stop) = (jpeg.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut conn = None;
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300)
                {
                    statuses.push(post(&mut conn, front, &jpeg));
                }
                statuses
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(2));
    for (i, &port) in ports.iter().enumerate() {
        sigterm_and_wait(&mut replicas[i]);
        replicas[i] = replica(dirs[i].path(), port, bytes.clone(), LOAD_TIME);
        wait_ready(port, Duration::from_secs(120));
        // A rolling update waits until the gateway routes to the new replica again
        // before it stops the next (nginx retries a peer it saw refuse after its
        // fail_timeout, 10 s by default, and the replica was refusing while loading).
        std::thread::sleep(Duration::from_secs(11));
    }
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let _ = Command::new("kill")
        .args(["-QUIT", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    for r in &mut replicas {
        let _ = r.kill();
        let _ = r.wait();
    }
    let bad: Vec<u16> = statuses.iter().copied().filter(|&s| s != 200).collect();
    if !bad.is_empty() {
        let log = std::fs::read_to_string(gw.path().join("error.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(400).collect();
        eprintln!(
            "nginx error.log (last lines, newest first):\n{}",
            tail.join("\n")
        );
    }
    eprintln!(
        "gateway: {} requests through nginx over two rolling restarts, {} not 200 ({bad:?})",
        statuses.len(),
        bad.len()
    );
    assert!(statuses.len() >= 20, "only {} requests ran", statuses.len());
    assert!(
        bad.is_empty(),
        "{} of {} requests not answered 200: {bad:?}",
        bad.len(),
        statuses.len()
    );
}
