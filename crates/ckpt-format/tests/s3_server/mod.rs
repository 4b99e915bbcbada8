//! A real SeaweedFS server (master, volume, filer and S3 gateway in one `weed server` process)
//! on free loopback ports, for the S3 store tests. Killed (SIGKILL) and waited for on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, Error, S3Location, S3Store};

/// Access key of the test identity.
pub const ACCESS_KEY: &str = "cowvm-test";
/// Secret key of the test identity.
pub const SECRET_KEY: &str = "cowvm-test-secret";
/// The bucket every server starts with.
pub const BUCKET: &str = "ckpt";

/// The `weed` binary: `$COWVM_WEED`, else the project's virtual environment under `target/`
/// (made by `scripts/setup.sh`), else `weed` on `PATH`.
pub fn weed_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("COWVM_WEED") {
        return p.into();
    }
    let venv =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/seaweedfs-venv/bin/weed");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("weed")
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A running SeaweedFS server.
pub struct Weed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    /// Run under a shell that kills it when this process ends (see [`Weed::shared`]).
    tied: bool,
}

impl Weed {
    /// Starts a server and creates [`BUCKET`]; panics if it is not serving within 60 s.
    pub fn start() -> Weed {
        Weed::launch(false)
    }

    /// The server of every test of this process that needs none of its own (each works under
    /// its own prefix of [`BUCKET`]), so that a server starts once, not once per test. The
    /// first test that asks starts it; it runs until the process ends, however that ends: a
    /// shell between the two kills the server, and removes its files, once its standard
    /// input, a pipe from this process, closes.
    pub fn shared() -> &'static Weed {
        static SHARED: OnceLock<Weed> = OnceLock::new();
        SHARED.get_or_init(|| Weed::launch(true))
    }

    fn launch(tied: bool) -> Weed {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"cowvm","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        let mut weed = Weed {
            child: None,
            dir,
            ports: free_ports(8),
            tied,
        };
        weed.spawn();
        weed.create_bucket(BUCKET);
        weed
    }

    fn spawn(&mut self) {
        let p = &self.ports;
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("weed.log")).unwrap();
        let mut command = if self.tied {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg(r#"dir=$1; shift; "$@" </dev/null & read -r _; kill -9 $!; wait; rm -rf "$dir""#)
                .arg("sh")
                .arg(dir)
                .arg(weed_binary());
            sh.stdin(Stdio::piped());
            sh
        } else {
            let mut weed = Command::new(weed_binary());
            weed.stdin(Stdio::null());
            weed
        };
        let child = command
            .arg("server")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg("-filer")
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg("-s3")
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .args(["-master.volumeSizeLimitMB=256", "-volume.max=0"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (run scripts/setup.sh): {e}",
                    weed_binary().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", self.ports[6])).is_err()
            || TcpStream::connect(("127.0.0.1", self.ports[4])).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "weed did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    /// A store at `s3://BUCKET/prefix` with the test credentials and small chunks (16 pages)
    /// so that tests span many chunks.
    pub fn store(&self, prefix: &str) -> S3Store {
        self.store_in(BUCKET, prefix)
    }

    /// A store at `s3://bucket/prefix` with the test credentials and 16-page chunks.
    pub fn store_in(&self, bucket: &str, prefix: &str) -> S3Store {
        S3Store::new(S3Location::parse(&format!("s3://{bucket}/{prefix}")).unwrap())
            .endpoint(self.endpoint())
            .region("us-east-1")
            .credentials(ACCESS_KEY, SECRET_KEY)
            .chunk_size(16 * 4096)
            .unwrap()
    }

    /// Creates a bucket (a directory under `/buckets` of the filer) and waits until the S3
    /// gateway serves it.
    pub fn create_bucket(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = self.filer("POST", &format!("/buckets/{name}/"), &[]);
            if status == 201 || status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "cannot create bucket: {status}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // The first write into a bucket makes SeaweedFS grow volumes for it, which can take
        // seconds: done now, so that no test's first checkpoint (or a guest racing it) waits.
        loop {
            let (status, _) = self.filer("PUT", &format!("/buckets/{name}/warm-up/object"), b"x");
            if (200..300).contains(&status) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cannot write to bucket: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let store = self.store_in(name, "ready-probe");
        loop {
            match Checkpoint::open(&store) {
                Err(Error::Incomplete { .. }) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for the S3 gateway: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => panic!("S3 gateway not ready: {other:?}\n{}", self.log()),
            }
        }
    }

    /// One HTTP/1.1 request to the filer; returns the status and body.
    pub fn filer(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.ports[4])) else {
            return (0, Vec::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body))
            .is_err()
        {
            return (0, Vec::new());
        }
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(resp.len(), |p| p + 4);
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut body = resp[split..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }

    /// The bytes of object `key` of [`BUCKET`], through the filer.
    pub fn get_object(&self, key: &str) -> Vec<u8> {
        let (status, body) = self.filer("GET", &format!("/buckets/{BUCKET}/{key}"), &[]);
        assert_eq!(status, 200, "GET {key}");
        body
    }

    /// Replaces object `key` of [`BUCKET`] through the filer.
    pub fn put_object(&self, key: &str, bytes: &[u8]) {
        let (status, body) = self.filer("PUT", &format!("/buckets/{BUCKET}/{key}"), bytes);
        assert!(
            status == 200 || status == 201 || status == 204,
            "PUT {key}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Deletes object `key` of [`BUCKET`] through the filer.
    pub fn delete_object(&self, key: &str) {
        let (status, _) = self.filer("DELETE", &format!("/buckets/{BUCKET}/{key}"), &[]);
        assert!(
            status == 200 || status == 202 || status == 204,
            "DELETE {key}: {status}"
        );
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&body[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[eol + 2 + size + 2..];
    }
    out
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.stop();
    }
}
