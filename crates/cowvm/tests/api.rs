//! The control API end to end: the real `cowvm` binary runs the test guest with `--api-sock`,
//! and a real HTTP client (hyper over the Unix socket) drives it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const COWVM: &str = env!("CARGO_BIN_EXE_cowvm");

/// A `cowvm run --api-sock` process; killed (by its own pid) if a test fails.
struct Running {
    child: Option<Child>,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Running {
    fn start(cmdline: &str, extra: &[&str]) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let child = Command::new(COWVM)
            .args(["run", "--kernel"])
            .arg(guests::pvh_guest())
            .args(["--cmdline", cmdline, "--mem", "64M", "--console"])
            .arg(dir.path().join("console.txt"))
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn cowvm");
        let running = Running {
            child: Some(child),
            dir,
            sock,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while StdUnixStream::connect(&running.sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        running
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn console_len(&self) -> u64 {
        std::fs::metadata(self.path("console.txt")).map_or(0, |m| m.len())
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: signalling a child process we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        wait_exit(&mut child)
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cowvm did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP request with hyper over the socket: (status, JSON body or Null).
fn request(
    sock: &Path,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from(body))).expect("request"))
            .await
            .expect("send");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "{path}: answer is not JSON: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    })
}

/// Writes raw bytes (ignoring a server that closes early) and reads the raw answer.
fn raw_exchange(sock: &Path, bytes: &[u8]) -> String {
    let mut conn = StdUnixStream::connect(sock).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The server may answer and close before it has read everything.
    let _ = conn.write_all(bytes);
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status and JSON body of a raw answer.
fn parse_raw(answer: &str) -> (StatusCode, Value) {
    let status: u16 = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        StatusCode::from_u16(status).expect("status"),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn get(sock: &Path, path: &str) -> (StatusCode, Value) {
    request(sock, Method::GET, path, None, Vec::new())
}

fn send_json(sock: &Path, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    request(
        sock,
        method,
        path,
        Some("application/json"),
        body.as_bytes().to_vec(),
    )
}

fn put_checkpoint(sock: &Path, body: Value) -> (StatusCode, Value) {
    send_json(sock, Method::PUT, "/checkpoints", &body.to_string())
}

/// Polls a checkpoint job until it is over; returns its last view.
fn poll_until_done(sock: &Path, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut saw_progress = false;
    loop {
        let (status, job) = get(sock, &format!("/checkpoints/{id}"));
        assert_eq!(status, StatusCode::OK, "{job}");
        if job["progress"]["pages_total"].as_u64().unwrap_or(0) > 0 {
            saw_progress = true;
        }
        if job["status"] != "running" {
            assert!(saw_progress, "no progress reported: {job}");
            return job;
        }
        assert!(Instant::now() < deadline, "checkpoint never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vm_state(sock: &Path) -> String {
    let (status, vm) = get(sock, "/vm");
    assert_eq!(status, StatusCode::OK);
    vm["state"].as_str().expect("state").to_string()
}

/// Checks an error answer: the status, a JSON error body, and the field named.
#[track_caller]
fn assert_refused(
    (status, body): (StatusCode, Value),
    expected: StatusCode,
    field: Option<&str>,
    what: &str,
) {
    assert_eq!(status, expected, "{what}: {body}");
    assert!(body["error"].is_string(), "{what}: no error code: {body}");
    assert!(body["message"].is_string(), "{what}: no message: {body}");
    if let Some(f) = field {
        assert_eq!(body["field"], f, "{what}: {body}");
    }
}

fn cowvm(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(COWVM).args(args).output().expect("run cowvm");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn boot_pause_resume_checkpoint_poll_inspect() {
    let mut vm = Running::start("dirty mem=32M every=50", &["--cow-budget", "4M"]);
    let sock = vm.sock.clone();
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");

    let (status, version) = get(&sock, "/version");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version["name"], "cowvm");
    let (status, vm_info) = get(&sock, "/vm");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(vm_info["state"], "Running");
    assert_eq!(vm_info["config"]["mem_size"], 64 << 20);
    assert_eq!(vm_info["config"]["cmdline"], "dirty mem=32M every=50");

    // Pause: the guest stops writing its console; resume: it goes on.
    let (status, paused) = send_json(&sock, Method::PATCH, "/vm", r#"{"state":"Paused"}"#);
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["state"], "Paused");
    assert_eq!(paused["paused_by"], "api");
    let before = vm.console_len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.console_len(), before, "the guest ran while paused");
    assert_eq!(vm_state(&sock), "Paused");
    let (status, resumed) = send_json(&sock, Method::PATCH, "/vm", r#"{"state":"Running"}"#);
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(vm_state(&sock), "Running");

    // A checkpoint: 202 with an id, polled to completion.
    let out = vm.path("ckpt-a");
    let (status, job) = put_checkpoint(
        &sock,
        json!({"out": out, "strategy": "uffd", "io": "live", "disk": "keep"}),
    );
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::OK,
        "{status}: {job}"
    );
    let id = job["id"].as_str().expect("id").to_string();
    let done = poll_until_done(&sock, &id);
    assert_eq!(done["status"], "complete", "{done}");
    assert_eq!(done["strategy_used"], "uffd", "{done}");
    let metrics = &done["metrics"];
    for key in [
        "pause_us",
        "total_us",
        "write_out_us",
        "stall_us",
        "max_stall_us",
        "guest_lost_us",
        "bytes_written",
        "pages_saved_by_fault",
        "pages_saved_in_background",
    ] {
        assert!(metrics[key].is_u64(), "{key} missing: {done}");
    }
    let us = |key: &str| metrics[key].as_u64().unwrap();
    assert_eq!(
        us("guest_lost_us"),
        us("pause_us") + us("stall_us"),
        "{done}"
    );
    assert!(metrics["bytes_written"].as_u64().unwrap() > 0);
    assert_eq!(
        done["progress"]["pages_done"],
        done["progress"]["pages_total"]
    );
    let (status, list) = get(&sock, "/checkpoints");
    assert_eq!(status, StatusCode::OK);
    assert!(list["checkpoints"]
        .as_array()
        .expect("list")
        .iter()
        .any(|j| j["id"] == id.as_str()));
    // The guest writes its console through port I/O, so once its first line is out the VM
    // has taken I/O exits (a slow host may not have printed one yet).
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.console_len() == 0 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, metrics) = get(&sock, "/metrics");
    assert_eq!(metrics["checkpoints"]["complete"], 1, "{metrics}");
    assert!(metrics["exits"]["io"].as_u64().unwrap() > 0, "{metrics}");
    assert!(metrics["disks"].is_array(), "{metrics}");

    // Awaiting instead of polling.
    let (status, waited) = send_json(
        &sock,
        Method::PUT,
        "/checkpoints?wait=true",
        &json!({"out": vm.path("ckpt-b"), "strategy": "stop"}).to_string(),
    );
    assert_eq!(status, StatusCode::OK, "{waited}");
    assert_eq!(waited["status"], "complete");

    // The CLI, as scripts use it.
    let sock_arg = sock.to_str().expect("utf-8");
    let cli_out = vm.path("ckpt-cli");
    let (st, stdout, stderr) = cowvm(&[
        "checkpoint",
        "--api-sock",
        sock_arg,
        "--out",
        cli_out.to_str().unwrap(),
        "--strategy",
        "fork",
        "--io",
        "drain",
        "--json",
    ]);
    assert!(st.success(), "{stderr}");
    let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for key in [
        "pause_us",
        "total_us",
        "write_out_us",
        "guest_lost_us",
        "bytes_written",
        "pages_saved_by_fault",
        "pages_saved_in_background",
    ] {
        assert!(report[key].is_u64(), "{key}: {report}");
    }
    // The kernel serves `fork`'s copy-on-write faults: their stalls are not measured.
    assert!(report.get("stall_us").is_none(), "{report}");
    assert_eq!(report["guest_lost_us"], report["pause_us"], "{report}");
    assert_eq!(report["strategy"], "fork");
    assert_eq!(report["strategy_used"], "fork");
    assert_eq!(report["io"], "drain");
    let (st, stdout, stderr) = cowvm(&["status", "--api-sock", sock_arg]);
    assert!(st.success(), "{stderr}");
    assert!(stdout.contains("running"), "{stdout}");
    let (st, stdout, stderr) = cowvm(&["pause", "--api-sock", sock_arg, "--json"]);
    assert!(st.success(), "{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["state"],
        "Paused"
    );
    let (st, _, stderr) = cowvm(&["pause", "--api-sock", sock_arg]);
    assert!(!st.success());
    assert!(stderr.contains("already paused"), "{stderr}");
    let (st, _, stderr) = cowvm(&["resume", "--api-sock", sock_arg]);
    assert!(st.success(), "{stderr}");

    // Inspect reads the stores directly, and verifies every page on request.
    for dir in [&out, &cli_out] {
        let (st, stdout, stderr) = cowvm(&["inspect", dir.to_str().unwrap(), "--json", "--verify"]);
        assert!(st.success(), "{stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
        assert!(report["pause_us"].is_u64());
        assert_eq!(report["manifest"]["memory"]["mem_size"], 64 << 20);
        assert!(report["verified"]["pages_verified"].as_u64().unwrap() > 0);
    }
    let (st, stdout, stderr) = cowvm(&["inspect", out.to_str().unwrap()]);
    assert!(st.success(), "{stderr}");
    assert!(stdout.contains("pages saved by fault"), "{stdout}");

    let status = vm.stop();
    assert_eq!(status.code(), Some(143), "stopped by SIGTERM: {status:?}");
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn hostile_requests_get_4xx_and_the_vm_survives() {
    let mut vm = Running::start("dirty mem=32M every=50", &[]);
    let sock = vm.sock.clone();
    let s = sock.as_path();
    let bad = StatusCode::BAD_REQUEST;

    // Malformed JSON and wrong types.
    for body in [
        "{",
        "not json",
        r#"{"state":}"#,
        "",
        "[]",
        "null",
        r#"{"state":"Paused"} x"#,
    ] {
        assert_refused(send_json(s, Method::PATCH, "/vm", body), bad, None, body);
    }
    for (body, field) in [
        (r#"{"state":1}"#, "state"),
        (r#"{"state":"Sleeping"}"#, "state"),
        (r#"{"state":"Paused","extra":true}"#, "extra"),
        (r#"{}"#, "state"),
    ] {
        assert_refused(
            send_json(s, Method::PATCH, "/vm", body),
            bad,
            Some(field),
            body,
        );
    }
    let abs = vm.path("x").display().to_string();
    for (body, field) in [
        (json!({"out": 5}), "out"),
        (json!({"strategy": "uffd"}), "out"),
        (json!({"out": abs, "strategy": "teleport"}), "strategy"),
        (json!({"out": abs, "strategy": 3}), "strategy"),
        (json!({"out": abs, "io": "maybe"}), "io"),
        (json!({"out": abs, "disk": "delete"}), "disk"),
        (json!({"out": abs, "verbose": 1}), "verbose"),
        (json!({"out": ["/a"]}), "out"),
    ] {
        assert_refused(
            put_checkpoint(s, body.clone()),
            bad,
            Some(field),
            &body.to_string(),
        );
    }
    // Path traversal and other store paths the server must not touch.
    let traversal = format!("{}/../../etc/cowvm", vm.dir.path().display());
    for out in [
        traversal.as_str(),
        "relative/dir",
        "./here",
        "../up",
        "",
        "/",
        "raw:relative.img",
        "raw:/tmp/../etc/passwd",
        "/tmp/a\u{0}b",
        "mem:bad/name",
        "mem:",
        "s3://bucket/key",
    ] {
        assert_refused(
            put_checkpoint(s, json!({ "out": out })),
            bad,
            Some("out"),
            out,
        );
    }
    // Huge bodies, wrong media types, bad queries.
    let huge = format!(r#"{{"out":"/{}"}}"#, "a".repeat(4 << 20));
    let head = format!(
        "PUT /checkpoints HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        huge.len()
    );
    assert_refused(
        parse_raw(&raw_exchange(
            s,
            &[head.as_bytes(), huge.as_bytes()].concat(),
        )),
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
        "huge body",
    );
    // A length that announces far more than is sent.
    let lying = "PUT /checkpoints HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: 100000000000\r\n\r\n";
    assert_refused(
        parse_raw(&raw_exchange(
            s,
            &[lying.as_bytes(), &[b' '; 128 << 10]].concat(),
        )),
        StatusCode::PAYLOAD_TOO_LARGE,
        None,
        "huge Content-Length",
    );
    assert_refused(
        request(
            s,
            Method::PATCH,
            "/vm",
            Some("text/plain"),
            br#"{"state":"Paused"}"#.to_vec(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
        "text/plain",
    );
    assert_refused(
        request(
            s,
            Method::PATCH,
            "/vm",
            None,
            br#"{"state":"Paused"}"#.to_vec(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
        "no content type",
    );
    for q in ["/checkpoints?wait=maybe", "/checkpoints?evil=1"] {
        assert_refused(
            send_json(s, Method::PUT, q, &json!({ "out": abs }).to_string()),
            bad,
            Some("query"),
            q,
        );
    }
    // Wrong methods and unknown routes.
    for (method, path) in [
        (Method::DELETE, "/vm"),
        (Method::POST, "/vm"),
        (Method::PUT, "/vm"),
        (Method::POST, "/version"),
        (Method::POST, "/checkpoints"),
        (Method::PATCH, "/checkpoints"),
        (Method::DELETE, "/checkpoints/1"),
    ] {
        assert_refused(
            request(s, method.clone(), path, None, Vec::new()),
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            &format!("{method} {path}"),
        );
    }
    for path in [
        "/nope",
        "/checkpoints/999",
        "/checkpoints/1/../../vm",
        "/vm/x",
        "/%2e%2e/etc",
    ] {
        assert_refused(get(s, path), StatusCode::NOT_FOUND, None, path);
    }
    // Garbage that is not HTTP at all: hyper answers 400 and closes.
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let answer = raw_exchange(s, garbage);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 4")
                || answer.starts_with("HTTP/1.0 4"),
            "{garbage:?}: {answer}"
        );
    }

    // Conflicts with the VM's state.
    assert_refused(
        send_json(s, Method::PATCH, "/vm", r#"{"state":"Running"}"#),
        StatusCode::CONFLICT,
        None,
        "resume while running",
    );
    assert_eq!(
        send_json(s, Method::PATCH, "/vm", r#"{"state":"Paused"}"#).0,
        StatusCode::OK
    );
    assert_refused(
        send_json(s, Method::PATCH, "/vm", r#"{"state":"Paused"}"#),
        StatusCode::CONFLICT,
        None,
        "pause while paused",
    );
    assert_refused(
        put_checkpoint(s, json!({ "out": vm.path("while-paused") })),
        StatusCode::CONFLICT,
        None,
        "checkpoint while paused",
    );
    assert!(
        !vm.path("while-paused").exists(),
        "nothing written while refused"
    );
    assert_eq!(
        send_json(s, Method::PATCH, "/vm", r#"{"state":"Running"}"#).0,
        StatusCode::OK
    );

    // A client that sends half a request and stalls does not block the others.
    let mut stalled = StdUnixStream::connect(s).expect("connect");
    stalled.write_all(b"PUT /checkpoints HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"out\":").unwrap();

    // A checkpoint in progress: a second one, and a pause, are refused while it runs; a
    // client awaiting it does not block the others.
    let first = vm.path("first");
    let (status, job) = put_checkpoint(s, json!({ "out": first }));
    assert!(status.is_success(), "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let waiter = {
        let sock = sock.clone();
        let id = id.clone();
        std::thread::spawn(move || get(&sock, &format!("/checkpoints/{id}?wait=true")))
    };
    let second = put_checkpoint(s, json!({ "out": vm.path("second") }));
    let pause = send_json(s, Method::PATCH, "/vm", r#"{"state":"Paused"}"#);
    let still_running = get(s, &format!("/checkpoints/{id}")).1["status"] == "running";
    let mut listed = 2;
    if still_running {
        assert_refused(second, StatusCode::CONFLICT, None, "second checkpoint");
        assert_refused(
            pause,
            StatusCode::CONFLICT,
            None,
            "pause during a checkpoint",
        );
    } else {
        eprintln!("the first checkpoint ended too fast to test the conflicts");
        if pause.0 == StatusCode::OK {
            send_json(s, Method::PATCH, "/vm", r#"{"state":"Running"}"#);
        }
        if second.0.is_success() {
            let done = poll_until_done(s, second.1["id"].as_str().unwrap());
            assert_eq!(done["status"], "complete", "{done}");
            listed += 1;
        }
    }
    let (status, waited) = waiter.join().expect("waiter");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(waited["status"], "complete", "{waited}");
    drop(stalled);

    // An existing complete checkpoint is refused by the store: 409.
    assert_refused(
        put_checkpoint(s, json!({ "out": first })),
        StatusCode::CONFLICT,
        Some("out"),
        "existing checkpoint",
    );
    // A store the server cannot create: a 4xx naming the field, and no job left behind.
    let file = vm.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    assert_refused(
        put_checkpoint(s, json!({ "out": file.join("sub") })),
        bad,
        Some("out"),
        "store under a file",
    );
    assert_refused(
        put_checkpoint(
            s,
            json!({ "out": format!("raw:{}", vm.path("missing.img").display()) }),
        ),
        bad,
        Some("out"),
        "missing raw store",
    );

    // The VM is still running and checkpointable.
    assert_eq!(get(s, "/health").0, StatusCode::OK);
    assert_eq!(vm_state(s), "Running");
    let before = vm.console_len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.console_len() == before {
        assert!(Instant::now() < deadline, "the guest makes no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, job) = put_checkpoint(s, json!({ "out": vm.path("after") }));
    assert!(status.is_success(), "{job}");
    let done = poll_until_done(s, job["id"].as_str().unwrap());
    assert_eq!(done["status"], "complete", "{done}");
    let (_, list) = get(s, "/checkpoints");
    assert_eq!(
        list["checkpoints"].as_array().unwrap().len(),
        listed,
        "{list}"
    );

    assert_eq!(vm.stop().code(), Some(143), "stopped by SIGTERM");
}

#[test]
fn openapi_document_matches_the_served_routes() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/openapi.json"),
        )
        .expect("openapi.json"),
    )
    .expect("valid JSON");
    let mut vm = Running::start("dirty mem=8M every=50", &[]);
    let s = vm.sock.as_path();
    let (_, job) = put_checkpoint(s, json!({ "out": vm.path("c") }));
    let id = job["id"].as_str().expect("id").to_string();
    poll_until_done(s, &id);

    let (status, served) = get(s, "/openapi.json");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(served, doc, "the server serves the document in the repo");

    let all = [
        Method::GET,
        Method::PUT,
        Method::PATCH,
        Method::POST,
        Method::DELETE,
    ];
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let concrete = path.replace("{id}", &id);
        for method in &all {
            let documented = item.get(method.as_str().to_lowercase()).is_some();
            let body = if *method == Method::GET {
                Vec::new()
            } else {
                b"{}".to_vec()
            };
            let (status, answer) =
                request(s, method.clone(), &concrete, Some("application/json"), body);
            if documented {
                operations += 1;
                assert!(
                    status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but answers {status}: {answer}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented"
                );
            }
        }
    }
    assert!(operations >= 9);
    assert_eq!(vm.stop().code(), Some(143), "stopped by SIGTERM");
}

#[test]
fn the_process_exits_with_the_guest_status_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut child = Command::new(COWVM)
        .args(["run", "--kernel"])
        .arg(guests::pvh_guest())
        .args(["--cmdline", "no-such-workload", "--mem", "16M", "--console"])
        .arg(dir.path().join("console.txt"))
        .arg("--api-sock")
        .arg(&sock)
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(
        status.code(),
        Some(2),
        "the guest's bad-command-line status"
    );
    assert!(!sock.exists());

    // A live server's socket is not taken over.
    let mut vm = Running::start("dirty mem=8M every=50", &[]);
    let (st, _, stderr) = cowvm(&[
        "run",
        "--kernel",
        guests::pvh_guest().to_str().unwrap(),
        "--mem",
        "16M",
        "--api-sock",
        vm.sock.to_str().unwrap(),
    ]);
    assert!(!st.success());
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(vm_state(&vm.sock), "Running");
    assert_eq!(vm.stop().code(), Some(143), "stopped by SIGTERM");
}

#[test]
fn periodic_checkpoints_keep_the_newest_complete_ones() {
    let mut vm = Running::start(
        "dirty mem=8M every=50",
        &[
            "--checkpoint-every",
            "300ms",
            "--checkpoint-dir",
            "periodic",
            "--keep",
            "2",
        ],
    );
    let complete = |d: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.join("COMPLETE").exists());
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_, metrics) = loop {
        let m = get(&vm.sock, "/metrics");
        if m.1["checkpoints"]["complete"].as_u64().unwrap_or(0) >= 4 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "periodic checkpoints too slow: {}",
            m.1
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(metrics["checkpoints"]["failed"], 0, "{metrics}");
    assert_eq!(vm.stop().code(), Some(143), "stopped by SIGTERM");
    let dir = vm.path("periodic");
    let kept = complete(&dir);
    // Two kept, plus possibly one that completed after the trigger stopped pruning.
    assert!((2..=3).contains(&kept.len()), "{kept:?}");
    for p in std::fs::read_dir(&dir).unwrap() {
        let p = p.unwrap().path();
        assert!(
            p.join("COMPLETE").exists(),
            "incomplete left: {}",
            p.display()
        );
        let (st, _, stderr) = cowvm(&["inspect", p.to_str().unwrap()]);
        assert!(st.success(), "{stderr}");
    }
}

/// Runs `f` on its own thread; `None` if it has not answered within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Raises this process's soft limit on open files to the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[test]
fn idle_and_slow_connections_do_not_starve_the_api() {
    raise_open_file_limit();
    let vm = Running::start("dirty mem=32M every=50", &[]);
    let sock = vm.sock.clone();
    // 1100 connections that never send a byte: more than the server's file limit by default.
    let idle: Vec<StdUnixStream> = (0..1100)
        .map(|_| StdUnixStream::connect(&sock).expect("connect"))
        .collect();
    // A few slowloris clients: one header byte a second, never ending the header. Each reports
    // how long the server kept it open.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let mut conn = StdUnixStream::connect(&sock).expect("connect");
            std::thread::spawn(move || {
                let started = Instant::now();
                let header = b"GET /vm HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
                for byte in header.iter().chain(std::iter::repeat(&b'a')) {
                    if conn.write_all(&[*byte]).is_err()
                        || started.elapsed() > Duration::from_secs(60)
                    {
                        return started.elapsed();
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                unreachable!("the header never ends")
            })
        })
        .collect();

    // The VM's own clients are still served: a bounded wait, which without a connection limit
    // is exceeded forever.
    let s = sock.clone();
    let (status, info) = within(Duration::from_secs(30), move || get(&s, "/vm"))
        .expect("GET /vm answered with 1100 idle connections open");
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["state"], "Running", "{info}");
    let s = sock.clone();
    let (status, job) = within(Duration::from_secs(60), move || {
        send_json(
            &s,
            Method::PUT,
            "/checkpoints?wait=true",
            r#"{"out":"mem:starved","strategy":"stop"}"#,
        )
    })
    .expect("PUT /checkpoints answered with 1100 idle connections open");
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "complete", "{job}");

    // A slowloris is cut by the header timeout (10 s), long before its header would end.
    for client in slow {
        let open_for = client.join().expect("slowloris thread");
        assert!(
            open_for < Duration::from_secs(30),
            "a slowloris connection stayed open {open_for:?}"
        );
    }
    // Idle connections are closed: by eviction or by the header timeout.
    for mut conn in idle {
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).expect("closed, not timed out"), 0);
    }
    assert_eq!(vm_state(&sock), "Running");
}

#[test]
fn type_errors_in_bodies_name_the_field_and_the_type() {
    let vm = Running::start("dirty mem=32M every=50", &[]);
    let s = vm.sock.as_path();
    for (path, body, field, expected) in [
        (
            "/checkpoints",
            r#"{"out":1}"#,
            "out",
            "out: expected a string",
        ),
        (
            "/checkpoints",
            r#"{"out":"/x","strategy":1}"#,
            "strategy",
            "strategy: expected a string (one of uffd, fork, stop)",
        ),
        (
            "/checkpoints",
            r#"{"out":"/x","io":false}"#,
            "io",
            "io: expected a string (one of live, drain)",
        ),
        (
            "/checkpoints",
            r#"{"out":"/x","disk":2}"#,
            "disk",
            "disk: expected a string (one of keep, copy-commit)",
        ),
        (
            "/rollback",
            r#"{"from":[]}"#,
            "from",
            "from: expected a string",
        ),
        (
            "/rollback",
            r#"{"from":"/x","eager":"yes"}"#,
            "eager",
            "eager: expected a boolean",
        ),
    ] {
        let answer = send_json(s, Method::PUT, path, body);
        assert_refused(answer.clone(), StatusCode::BAD_REQUEST, Some(field), body);
        let message = answer.1["message"].as_str().expect("message");
        assert!(message.starts_with(expected), "{body}: {message}");
        assert_eq!(answer.1["error"], "invalid_field", "{body}");
    }
}

/// The pids of `pid`'s child processes.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let path = task.expect("task").path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        found.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found
}

#[test]
fn the_fork_writer_dies_with_the_vmm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("api.sock");
    // 1 GiB dirtied: the forked writer runs for a while.
    let mut child = Command::new(COWVM)
        .args(["run", "--kernel"])
        .arg(guests::pvh_guest())
        .args(["--cmdline", "dirty mem=1024M every=50", "--mem", "1280M"])
        .arg("--console")
        .arg(dir.path().join("console.txt"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn cowvm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while StdUnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the guest dirty its memory.
    std::thread::sleep(Duration::from_secs(3));
    let out = dir.path().join("ckpt").display().to_string();
    let (status, job) = put_checkpoint(&sock, json!({"out": out, "strategy": "fork"}));
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let writers = children(child.id());
    assert_eq!(writers.len(), 1, "one forked writer: {writers:?} ({job})");
    child.kill().expect("kill -9 the VMM");
    child.wait().expect("reap");
    let gone = Instant::now() + Duration::from_secs(1);
    // Dead once gone or a zombie (reparented, it waits for a reaper that may be slow).
    let stat = format!("/proc/{}/stat", writers[0]);
    let alive = || {
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    while alive() {
        assert!(
            Instant::now() < gone,
            "the forked writer outlived the VMM by a second"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The disk file a checkpoint's manifest names.
fn manifest_disk(ckpt: &Path) -> PathBuf {
    let text = std::fs::read_to_string(ckpt.join("manifest.json")).expect("manifest");
    let manifest: Value = serde_json::from_str(&text).expect("manifest JSON");
    PathBuf::from(
        manifest["vm"]["disks"][0]["path"]
            .as_str()
            .expect("disk path"),
    )
}

#[test]
fn deleting_checkpoints_merges_the_disk_layers_they_alone_needed() {
    let disks = tempfile::tempdir().unwrap();
    let base = disks.path().join("base.qcow2");
    let base_arg = base.to_str().unwrap();
    let (st, _, err) = cowvm(&["disk", "create", "--size", "2M", base_arg]);
    assert!(st.success(), "{err}");
    let mut vm = Running::start(
        "disk blocks=32 rounds=1000000 qd=4 mem=4M seed=5 area=2M",
        &["--disk", &format!("{base_arg},delay_ms=1")],
    );
    let take = |name: &str| -> PathBuf {
        let out = vm.path(name);
        let (status, job) = send_json(
            &vm.sock,
            Method::PUT,
            "/checkpoints?wait=true",
            &json!({ "out": out }).to_string(),
        );
        assert_eq!(status, StatusCode::OK, "{job}");
        assert_eq!(job["status"], "complete", "{job}");
        out
    };
    let delete = |path: &Path| {
        send_json(
            &vm.sock,
            Method::DELETE,
            "/checkpoints",
            &json!({ "path": path }).to_string(),
        )
    };
    // base ← o0 ← o1 ← o2 (the running top); c0 needs base, c1 o0, c2 o1.
    let c: Vec<PathBuf> = (0..3).map(|i| take(&format!("c{i}"))).collect();
    let layers: Vec<PathBuf> = c.iter().map(|p| manifest_disk(p)).collect();
    assert_eq!(layers[0], base.canonicalize().unwrap());

    // o0 is needed by no one once c1 is gone: merged into o1 (c2's disk) and deleted.
    let (status, done) = delete(&c[1]);
    assert_eq!(status, StatusCode::OK, "{done}");
    assert!(!c[1].exists());
    let merged = done["merged"].as_array().expect("merged");
    assert_eq!(merged.len(), 1, "{done}");
    assert_eq!(merged[0]["layer"], layers[1].to_str().unwrap(), "{done}");
    assert_eq!(merged[0]["into"], layers[2].to_str().unwrap(), "{done}");
    assert!(!layers[1].exists());

    // o1's child is the running top: merged after the next checkpoint.
    let (status, done) = delete(&c[2]);
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["merged"], json!([]), "{done}");
    assert!(layers[2].exists());
    let c3 = take("c3");
    assert!(!layers[2].exists(), "the deferred merge did not happen");
    let (st, out, err) = cowvm(&["inspect", c3.to_str().unwrap(), "--verify"]);
    assert!(st.success(), "{out}{err}");

    // Refusals delete nothing.
    let not_a_checkpoint = vm.path("plain");
    std::fs::create_dir(&not_a_checkpoint).unwrap();
    std::fs::write(not_a_checkpoint.join("data"), b"mine").unwrap();
    assert_refused(
        delete(&not_a_checkpoint),
        StatusCode::BAD_REQUEST,
        Some("path"),
        "a directory without a checkpoint",
    );
    assert!(not_a_checkpoint.join("data").exists());
    assert_refused(
        delete(&c[1]),
        StatusCode::BAD_REQUEST,
        Some("path"),
        "a deleted checkpoint",
    );
    assert_refused(
        send_json(
            &vm.sock,
            Method::DELETE,
            "/checkpoints",
            r#"{"path":"raw:/x"}"#,
        ),
        StatusCode::BAD_REQUEST,
        Some("path"),
        "a raw store",
    );

    // The command line: c0 needed the user's image, which is never merged; a file of the
    // user's in the checkpoint's directory stays.
    std::fs::write(c[0].join("notes.txt"), b"mine").unwrap();
    let (st, out, err) = cowvm(&[
        "checkpoint",
        "delete",
        "--api-sock",
        vm.sock.to_str().unwrap(),
        c[0].to_str().unwrap(),
        "--json",
    ]);
    assert!(st.success(), "{out}{err}");
    let done: Value = serde_json::from_str(&out).expect("--json");
    assert_eq!(done["merged"], json!([]), "{done}");
    assert!(!c[0].join("manifest.json").exists() && c[0].join("notes.txt").exists());
    assert!(base.exists());
    assert_eq!(vm.stop().code(), Some(143), "stopped by SIGTERM");
}
