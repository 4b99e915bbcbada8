//! The S3 store: a checkpoint as objects under `s3://BUCKET/PREFIX/` of any S3-protocol object
//! store (AWS S3, MinIO, SeaweedFS, ...).
//!
//! ```text
//! PREFIX/state.bin          opaque device state
//! PREFIX/page-index.bin     per-page state and hash
//! PREFIX/manifest.json      the manifest (JSON)
//! PREFIX/memory/00000000    memory in fixed-size chunks (8 MiB by default): chunk c holds
//! PREFIX/memory/00000001    bytes c*chunk..(c+1)*chunk of the memory image, so any page range
//! ...                       is one ranged GET of one chunk; a chunk whose pages are all zero
//!                           is not written
//! PREFIX/COMPLETE           completion marker, written last, once every other object is
//!                           acknowledged: the manifest's length and checksum, the chunk size
//! ```
//!
//! Pages arrive from many threads in any order; a chunk is uploaded as soon as all its pages
//! arrived (zero pages are announced with [`StoreWriter::zero_memory`]), several uploads in
//! flight. See [`writer`] for how the memory held in buffers is bounded.
//!
//! Endpoint, region and credentials come from the usual environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, ...) unless set on the [`S3Store`]. An `http://` endpoint is allowed.
//!
//! The store is synchronous; it runs a small private tokio runtime. In a forked child (the
//! `fork` strategy writes memory from a child process) it starts a runtime and client of its
//! own on first use, since the parent's runtime threads do not exist there.

mod cache;
pub(crate) mod error;
mod reader;
mod writer;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig, WriteMultipart,
};
use tokio::runtime::Runtime;

use super::{Layout, Overwrite, Store, StoreReader, StoreWriter};
use crate::error::{Error, Result};
use crate::manifest::Section;

pub use self::error::S3Error;

/// Default size of a memory chunk object.
const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
const DEFAULT_UPLOADS: usize = 8;
const DEFAULT_BUFFERED_CHUNKS: usize = 16;
const MEMORY_DIR: &str = "memory/";
const COMPLETE: &str = "COMPLETE";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(15);

impl From<S3Error> for Error {
    fn from(e: S3Error) -> Error {
        Error::S3(Box::new(e))
    }
}

/// A place in an S3 bucket: `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    bucket: String,
    prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET/PREFIX` (the prefix may be empty; trailing slashes are ignored).
    pub fn parse(url: &str) -> Result<S3Location, S3Error> {
        let bad = |reason| S3Error::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(bad(
                "the bucket name must be 3 to 63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || ObjectPath::parse(prefix).is_err()
        {
            return Err(bad("the prefix is not a valid object path"));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The prefix inside the bucket (without trailing slash; may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Path of object `name` under the prefix.
    fn object(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// `s3://BUCKET/PREFIX/name`, for messages.
    fn url_of(&self, name: &str) -> String {
        format!("{self}/{name}")
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Name of the object of `section`.
fn object_of(section: Section) -> &'static str {
    match section {
        Section::State => "state.bin",
        Section::PageIndex => "page-index.bin",
        Section::Manifest => "manifest.json",
        Section::Memory => MEMORY_DIR,
    }
}

/// Name of memory chunk `chunk`.
fn chunk_name(chunk: u64) -> String {
    format!("{MEMORY_DIR}{chunk:08}")
}

/// A checkpoint in an S3 bucket.
#[derive(Clone, Debug)]
pub struct S3Store {
    config: Arc<S3Config>,
}

#[derive(Clone, Debug)]
struct S3Config {
    location: S3Location,
    endpoint: Option<String>,
    region: Option<String>,
    credentials: Option<(String, String)>,
    chunk_size: u64,
    uploads: usize,
    buffered_chunks: usize,
    overwrite: Overwrite,
    cache: Option<PathBuf>,
}

impl S3Store {
    /// A store at `location`; endpoint, region and credentials from the environment.
    pub fn new(location: S3Location) -> S3Store {
        S3Store {
            config: Arc::new(S3Config {
                location,
                endpoint: None,
                region: None,
                credentials: None,
                chunk_size: DEFAULT_CHUNK_SIZE,
                uploads: DEFAULT_UPLOADS,
                buffered_chunks: DEFAULT_BUFFERED_CHUNKS,
                overwrite: Overwrite::Never,
                cache: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut S3Config {
        Arc::make_mut(&mut self.config)
    }

    /// Sets the endpoint URL (e.g. `http://127.0.0.1:8333`), overriding `AWS_ENDPOINT_URL`.
    pub fn endpoint(mut self, url: impl Into<String>) -> S3Store {
        self.config_mut().endpoint = Some(url.into());
        self
    }

    /// Keeps what restores read in the local directory `dir` (see [`cache`]): a later restore
    /// of the same checkpoint on this host reads it from there, each section and page verified
    /// again. The parents of an incremental checkpoint are cached too.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> S3Store {
        self.config_mut().cache = Some(dir.into());
        self
    }

    /// Uploads `bytes` as the one object `name` under the prefix by a plain multipart upload
    /// (parts of the chunk size, as many in flight as chunk uploads): the yardstick the
    /// benchmarks compare this store's own write-out with, on the same client and server.
    pub fn upload_plain(&self, name: &str, bytes: Arc<Vec<u8>>) -> Result<()> {
        let config = &self.config;
        let client = Client::connect(config)?;
        let store = Arc::clone(&client.store);
        let path = config.location.object(name);
        let part = usize::try_from(config.chunk_size).expect("chunk size fits in memory");
        let in_flight = config.uploads;
        client
            .run(async move {
                let upload = store.put_multipart(&path).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
                for piece in bytes.chunks(part) {
                    writer.wait_for_capacity(in_flight).await?;
                    writer.write(piece);
                }
                writer.finish().await.map(|_| ())
            })
            .map_err(|e| {
                config
                    .classify("upload", &config.location.url_of(name), e)
                    .into()
            })
    }

    /// Sets the region, overriding `AWS_REGION`.
    pub fn region(mut self, region: impl Into<String>) -> S3Store {
        self.config_mut().region = Some(region.into());
        self
    }

    /// Sets the access key, overriding `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> S3Store {
        self.config_mut().credentials =
            Some((access_key_id.to_string(), secret_access_key.to_string()));
        self
    }

    /// Sets the size of the memory chunk objects written (a non-zero multiple of 4096 bytes;
    /// 8 MiB by default: fewer, larger requests upload faster, and a restore reads any page
    /// range with one ranged GET whatever the size). Readers take it from the completion marker.
    pub fn chunk_size(mut self, bytes: u64) -> Result<S3Store> {
        if bytes == 0 || bytes % crate::PAGE_SIZE as u64 != 0 || bytes > 1 << 30 {
            return Err(S3Error::InvalidOption(format!(
                "chunk size {bytes} is not a multiple of 4096 bytes between 4 KiB and 1 GiB"
            ))
            .into());
        }
        self.config_mut().chunk_size = bytes;
        Ok(self)
    }

    /// Sets how many chunk uploads may be in flight at once (8 by default) and how many
    /// partly filled chunks may be buffered (16 by default). Memory held in buffers is at
    /// most `(uploads + buffered) * chunk size`.
    pub fn parallelism(mut self, uploads: usize, buffered: usize) -> S3Store {
        let c = self.config_mut();
        c.uploads = uploads.max(1);
        c.buffered_chunks = buffered.max(1);
        self
    }

    /// Sets what `create` may overwrite (by default nothing: any object under the prefix
    /// makes it refuse).
    pub fn overwrite(mut self, overwrite: Overwrite) -> S3Store {
        self.config_mut().overwrite = overwrite;
        self
    }

    /// The location.
    pub fn location(&self) -> &S3Location {
        &self.config.location
    }
}

impl S3Config {
    /// The endpoint requests go to, for messages.
    fn endpoint_name(&self) -> String {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(e) = self
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
        {
            return e;
        }
        let region = self
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        format!("https://s3.{region}.amazonaws.com")
    }

    /// Turns a client error on `object` into a clear error.
    fn classify(&self, op: &'static str, object: &str, e: object_store::Error) -> S3Error {
        let text = error_chain_text(&e);
        let code = s3_code(&text);
        let denied = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || code.as_deref().is_some_and(|c| ACCESS_CODES.contains(&c));
        match &e {
            _ if denied => S3Error::AccessDenied {
                bucket: self.location.bucket.clone(),
                endpoint: self.endpoint_name(),
                code: code.unwrap_or_else(|| "AccessDenied".to_string()),
            },
            _ if code.as_deref() == Some("NoSuchBucket") => S3Error::NoSuchBucket {
                bucket: self.location.bucket.clone(),
                endpoint: self.endpoint_name(),
            },
            _ => match connect_failure(&e) {
                Some(source) => S3Error::Unreachable {
                    endpoint: self.endpoint_name(),
                    source,
                },
                None => S3Error::Request {
                    op,
                    object: object.to_string(),
                    source: e,
                },
            },
        }
    }
}

/// S3 error codes that mean the credentials or their rights are wrong.
const ACCESS_CODES: [&str; 7] = [
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
];

/// Every message of an error's chain, joined.
fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

/// The S3 error code (`<Code>NoSuchBucket</Code>`) in a response body, if any.
fn s3_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(text[start..start + len].to_string())
}

/// The cause of a failure to connect (or a timeout), if that is what `e` is.
fn connect_failure(e: &(dyn std::error::Error + 'static)) -> Option<io::Error> {
    let mut connect = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if connect.is_some() {
                return Some(io::Error::new(io.kind(), io.to_string()));
            }
        }
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind;
            if matches!(
                http.kind(),
                HttpErrorKind::Connect | HttpErrorKind::Timeout | HttpErrorKind::Interrupted
            ) {
                connect = Some(http.kind());
            }
        }
        cur = err.source();
    }
    connect.map(|kind| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{kind:?} failure, no response"),
        )
    })
}

/// The client of one process: a private runtime and the object-store client.
struct Client {
    runtime: Option<Runtime>,
    store: Arc<AmazonS3>,
    pid: u32,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Client({})", self.store)
    }
}

impl Client {
    fn connect(config: &S3Config) -> Result<Client, S3Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-store")
            .enable_all()
            .build()
            .map_err(S3Error::Runtime)?;
        let mut builder =
            AmazonS3Builder::from_env().with_bucket_name(config.location.bucket.clone());
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region.clone());
        }
        if let Some((key, secret)) = &config.credentials {
            builder = builder
                .with_access_key_id(key.clone())
                .with_secret_access_key(secret.clone());
        }
        let allow_http = config.endpoint_name().starts_with("http://");
        let store = builder
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(allow_http)
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            })
            .build()
            .map_err(|source| S3Error::Client {
                location: config.location.to_string(),
                source,
            })?;
        Ok(Client {
            runtime: Some(runtime),
            store: Arc::new(store),
            pid: std::process::id(),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    /// Runs `fut` on the client's runtime and waits for it. Safe to call from inside another
    /// runtime (it blocks the calling thread without entering this runtime).
    fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match futures::executor::block_on(self.runtime().spawn(fut)) {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Lists one level of the prefix: checks endpoint, credentials and bucket in one request,
    /// and returns what is there (objects and "directories").
    fn probe(&self, config: &S3Config) -> Result<Vec<ObjectPath>, S3Error> {
        let store = Arc::clone(&self.store);
        let prefix = (!config.location.prefix.is_empty())
            .then(|| ObjectPath::from(config.location.prefix.as_str()));
        self.run(async move { store.list_with_delimiter(prefix.as_ref()).await })
            .map(|l| {
                let objects = l.objects.into_iter().map(|m| m.location);
                objects.chain(l.common_prefixes).collect()
            })
            .map_err(|e| config.classify("list", &config.location.to_string(), e))
    }

    /// Lists every object under the prefix.
    fn list_all(&self, config: &S3Config) -> Result<Vec<ObjectPath>, S3Error> {
        let store = Arc::clone(&self.store);
        let prefix = (!config.location.prefix.is_empty())
            .then(|| ObjectPath::from(config.location.prefix.as_str()));
        self.run(async move {
            use futures::TryStreamExt;
            store
                .list(prefix.as_ref())
                .map_ok(|m| m.location)
                .try_collect::<Vec<_>>()
                .await
        })
        .map_err(|e| config.classify("list", &config.location.to_string(), e))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime: let its threads go.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for S3Store {
    fn create(&self, layout: &Layout) -> Result<Box<dyn StoreWriter>> {
        Ok(Box::new(writer::S3Writer::create(
            Arc::clone(&self.config),
            layout,
        )?))
    }

    fn open(&self) -> Result<Box<dyn StoreReader>> {
        Ok(Box::new(reader::S3Reader::open(Arc::clone(&self.config))?))
    }

    fn parent(&self, address: &str) -> Result<Box<dyn Store>> {
        if !address.starts_with("s3://") {
            return super::store_at(address);
        }
        let location = S3Location::parse(address).map_err(|e| Error::ParentUnreachable {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        let mut store = self.clone();
        store.config_mut().location = location;
        Ok(Box::new(store))
    }
}

/// The completion marker's text.
const MARKER_HEADER: &str = "cowvm-checkpoint complete";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        let l = S3Location::parse("s3://ckpt/vm1/monday/").unwrap();
        assert_eq!((l.bucket(), l.prefix()), ("ckpt", "vm1/monday"));
        assert_eq!(l.to_string(), "s3://ckpt/vm1/monday");
        assert_eq!(l.object("COMPLETE").as_ref(), "vm1/monday/COMPLETE");
        let l = S3Location::parse("s3://ckpt").unwrap();
        assert_eq!(l.object("COMPLETE").as_ref(), "COMPLETE");
        for bad in [
            "ckpt/x",
            "s3://ab/x",
            "s3://Bad/x",
            "s3://ckpt/a/../b",
            "s3://ckpt/a//b",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn s3_codes_are_found() {
        let body = "Server returned non-2xx status code: 404: <?xml?><Error><Code>NoSuchBucket</Code></Error>";
        assert_eq!(s3_code(body).as_deref(), Some("NoSuchBucket"));
        assert_eq!(s3_code("connection refused"), None);
        assert_eq!(chunk_name(3), "memory/00000003");
    }
}
