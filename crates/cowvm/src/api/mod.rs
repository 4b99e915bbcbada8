//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (axum on tokio), served by
//! `cowvm run --api-sock PATH` in the process that runs the VM.
//!
//! Routes are listed once, in [`routes`]; the OpenAPI document next to this file
//! (`openapi.json`, also served at `GET /openapi.json`) is checked against that list by a test.
//! Every answer outside 2xx has an [`ErrorBody`](model::ErrorBody). Operations that block run
//! off the async workers, so a slow request never stalls another client.

pub mod control;
pub mod model;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use ckpt_format::{DirStore, RawStore, Store};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use vmm::RestoreError;
use vmm::StoreSpec;

use self::control::{ControlError, Controller, Outcome};
use self::model::{
    CheckpointBody, CheckpointJob, DiskMetrics, ErrorBody, Health, RollbackBody, RollbackDone,
    VersionInfo, VmInfo, VmMetrics, VmPatch, VmState, WaitQuery,
};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How long a `PUT /checkpoints` waits for the store to accept the checkpoint before it
/// answers (so that a refusal is the answer rather than a failed job).
const PREPARE_WAIT: Duration = Duration::from_secs(10);
/// How long the server waits for requests in flight when the VM ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type Ctl = Arc<Controller>;

/// Errors of starting the server.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Another server answers on the socket.
    #[error("{0} is in use by a running server")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Creating, binding or moving the socket failed.
    #[error("cannot {op} {path}")]
    Io {
        /// The step.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, error: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_string(),
                message: message.into(),
                field: None,
            },
        }
    }

    fn field(mut self, field: impl Into<String>) -> ApiError {
        self.body.field = Some(field.into());
        self
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let message = e.to_string();
        match e {
            ControlError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            ControlError::Exited(_) => ApiError::new(StatusCode::CONFLICT, "vm_exited", message),
            ControlError::StoreConflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "checkpoint_exists", message).field("out")
            }
            ControlError::BadStore(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).field("out")
            }
            ControlError::Pause(ref source) => match source {
                vmm::VmError::Vcpu(vmm::VcpuError::AlreadyPaused | vmm::VcpuError::Exiting) => {
                    ApiError::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        format!("{message}: {source}"),
                    )
                }
                _ => ApiError::internal(format!("{message}: {source}")),
            },
            ControlError::Restore(ref source) => {
                let message = format!("{message}: {}", control::chain(source));
                if unusable_checkpoint(source) {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_checkpoint", message)
                        .field("from")
                } else {
                    ApiError::internal(message)
                }
            }
            ControlError::Spawn(_) | ControlError::Checkpoint(_) => ApiError::internal(message),
        }
    }
}

/// Whether a restore failed because of the checkpoint (missing, incomplete, corrupt, not for
/// this VMM) rather than the host.
fn unusable_checkpoint(e: &RestoreError) -> bool {
    e.kind() == vmm::ErrorKind::InvalidInput
}

/// A JSON request body: `Content-Type: application/json`, at most [`MAX_BODY`] bytes, one
/// JSON value whose unknown fields are refused. Errors name the field at fault.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, with Content-Type: application/json",
            ));
        }
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|e| {
                if std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        format!("the body is larger than {MAX_BODY} bytes"),
                    )
                } else {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", e.to_string())
                }
            })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses one JSON value, naming the field at fault in the error.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // Within a field, a value of the wrong kind can read as a syntax error to serde_json
        // (an integer where an enum's string is expected): name the field all the same.
        if !inner.is_data() && path == "." {
            return ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message);
        }
        // A missing field is named only in serde's message; the path is then that of the
        // enclosing object.
        let named = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|name| {
                if path == "." {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                }
            });
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message)
            .field(named.unwrap_or(path))
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("trailing characters after the JSON value: {e}"),
        )
    })?;
    Ok(value)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()).field("query")
    })
}

/// Turns a store path of a request (the `out` of a checkpoint, the `from` of a rollback, named
/// by `field`) into a store, refusing anything but an absolute, normal path: no `..`, no NUL,
/// no relative path (the server's working directory is nobody's business), and only the
/// `raw:` prefix.
pub fn parse_store(value: &str, field: &str) -> Result<StoreSpec, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", m).field(field);
    if value.contains('\0') {
        return Err(bad(format!("{field} contains a NUL byte")));
    }
    let (raw, path) = match value.strip_prefix("raw:") {
        Some(p) => (true, p),
        None => (false, value),
    };
    if !path.starts_with('/') {
        return Err(bad(format!(
            "{field} must be an absolute directory path or raw:/absolute/path of a file or device"
        )));
    }
    let path = Path::new(path);
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad(format!("{field} must not contain '..' components")));
    }
    if path.parent().is_none() {
        return Err(bad(format!("{field} must not be the root directory")));
    }
    Ok(if raw {
        StoreSpec::Raw(path.to_path_buf())
    } else {
        StoreSpec::Dir(path.to_path_buf())
    })
}

/// The name of a RAM store (`mem:NAME`), if `value` names one: 1 to 64 ASCII letters, digits,
/// `-`, `_` or `.`.
fn mem_store_name<'a>(value: &'a str, field: &str) -> Result<Option<&'a str>, ApiError> {
    let Some(name) = value.strip_prefix("mem:") else {
        return Ok(None);
    };
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("{field}: a RAM store is mem:NAME, NAME of 1 to 64 letters, digits, '-', '_' or '.'"),
        )
        .field(field));
    }
    Ok(Some(name))
}

/// Refuses early a store that already holds a complete checkpoint (the store refuses too, but
/// after the job has started; this answers before).
fn check_store_free(store: &StoreSpec) -> Result<(), ApiError> {
    let exists = match store {
        StoreSpec::Dir(p) => DirStore::new(p).is_complete().then_some(p),
        StoreSpec::Raw(p) => RawStore::new(p)
            .open()
            .and_then(|r| r.read_commit())
            .is_ok_and(|c| c.is_some())
            .then_some(p),
        StoreSpec::Mem(_) => None,
    };
    match exists {
        Some(path) => Err(ApiError::from(ControlError::StoreConflict(format!(
            "{} already holds a complete checkpoint",
            path.display()
        )))),
        None => Ok(()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))?
        .map_err(ApiError::from)
}

async fn get_version() -> Json<VersionInfo> {
    Json(VersionInfo {
        name: "cowvm".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        checkpoint_format: ckpt_format::FORMAT_VERSION,
    })
}

async fn get_health(State(c): State<Ctl>) -> Result<Json<Health>, ApiError> {
    if let Some(exit) = c.vm().exit_status() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "vm_exited",
            exit.to_string(),
        ));
    }
    Ok(Json(Health {
        status: "ok".into(),
        vm: c.info().state,
    }))
}

async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn get_vm(State(c): State<Ctl>) -> Json<VmInfo> {
    Json(c.info())
}

async fn patch_vm(
    State(c): State<Ctl>,
    JsonBody(patch): JsonBody<VmPatch>,
) -> Result<Json<VmInfo>, ApiError> {
    let ctl = c.clone();
    blocking(move || match patch.state {
        VmState::Paused => ctl.pause().map(drop),
        VmState::Running => ctl.resume(),
    })
    .await?;
    Ok(Json(c.info()))
}

async fn get_metrics(State(c): State<Ctl>) -> Json<VmMetrics> {
    let vm = c.vm();
    // The disk counters come from the device thread: ask it off the async runtime.
    let disks = tokio::task::spawn_blocking(move || {
        vm.disks()
            .iter()
            .filter_map(|h| {
                let info = h.image_info().ok()?;
                Some(DiskMetrics {
                    path: info.path,
                    generation: info.generation,
                    clusters_allocated: info.stats.clusters_allocated,
                    copy_ups: info.stats.copy_ups,
                    inflight: h.inflight().map_or(0, |r| r.len()),
                })
            })
            .collect()
    })
    .await
    .unwrap_or_default();
    Json(VmMetrics {
        uptime_ms: c.uptime_ms(),
        exits: c.vm().exit_counts(),
        disks,
        checkpoints: c.counters(),
    })
}

async fn put_checkpoint(
    State(c): State<Ctl>,
    wait: Result<Query<WaitQuery>, QueryRejection>,
    JsonBody(body): JsonBody<CheckpointBody>,
) -> Result<Response, ApiError> {
    let wait = query(wait)?.wait;
    if body.disk == model::DiskArg::CopyCommit
        && (body.out.starts_with("mem:") || body.out.starts_with("raw:"))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "disk copy-commit needs a directory store (out) to hold the disk copy".to_string(),
        )
        .field("disk"));
    }
    let store = match mem_store_name(&body.out, "out")? {
        Some(name) => c.mem_store_for_checkpoint(name)?,
        None => parse_store(&body.out, "out")?,
    };
    check_store_free(&store)?;
    let ctl = c.clone();
    let job = blocking(move || ctl.start_checkpoint(body, store)).await?;
    // Answer once the store has accepted the checkpoint, so that a refusal (an existing
    // checkpoint, a missing directory) is this request's answer.
    let deadline = Instant::now() + PREPARE_WAIT;
    while !job.prepared() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if let Some(Outcome::Failed {
        refused_by_store: refused @ Some(_),
        message,
    }) = job.outcome()
    {
        c.forget(&job);
        return Err(ControlError::from_outcome(refused, message).into());
    }
    if wait {
        job.finished().await;
    }
    let view = job.view();
    let status = if view.status == model::JobStatus::Running {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/checkpoints/{}", view.id);
    Ok((status, [(header::LOCATION, location)], Json(view)).into_response())
}

async fn put_rollback(
    State(c): State<Ctl>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Json<RollbackDone>, ApiError> {
    let store = match mem_store_name(&body.from, "from")? {
        Some(name) => c.mem_store(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("no RAM checkpoint mem:{name} in this process"),
            )
            .field("from")
        })?,
        None => parse_store(&body.from, "from")?,
    };
    let ctl = c.clone();
    let from = body.from.clone();
    let took = blocking(move || ctl.rollback(&store, &from, body.eager)).await?;
    Ok(Json(RollbackDone {
        from: body.from,
        eager: body.eager,
        restore_us: took.restore.as_micros() as u64,
        downtime_us: took.downtime.as_micros() as u64,
    }))
}

async fn get_checkpoint(
    State(c): State<Ctl>,
    id: Result<UrlPath<String>, PathRejection>,
    wait: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Json<CheckpointJob>, ApiError> {
    let UrlPath(id) =
        id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text()))?;
    let wait = query(wait)?.wait;
    let job = c.job(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no checkpoint job {id:?}"),
        )
    })?;
    if wait {
        job.finished().await;
    }
    Ok(Json(job.view()))
}

async fn list_checkpoints(State(c): State<Ctl>) -> Json<serde_json::Value> {
    let jobs: Vec<CheckpointJob> = c.jobs().iter().map(|j| j.view()).collect();
    Json(serde_json::json!({ "checkpoints": jobs }))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let us = start.elapsed().as_micros() as u64;
    if response.status().is_server_error() {
        warn!(%method, path, status, us, "api request");
    } else {
        info!(%method, path, status, us, "api request");
    }
    response
}

/// Every route served: (method, path, handler). The OpenAPI test checks this list against
/// the document.
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Ctl>)> {
    vec![
        ("GET", "/version", on(MethodFilter::GET, get_version)),
        ("GET", "/health", on(MethodFilter::GET, get_health)),
        ("GET", "/openapi.json", on(MethodFilter::GET, get_openapi)),
        ("GET", "/vm", on(MethodFilter::GET, get_vm)),
        ("PATCH", "/vm", on(MethodFilter::PATCH, patch_vm)),
        ("GET", "/metrics", on(MethodFilter::GET, get_metrics)),
        (
            "GET",
            "/checkpoints",
            on(MethodFilter::GET, list_checkpoints),
        ),
        ("PUT", "/checkpoints", on(MethodFilter::PUT, put_checkpoint)),
        (
            "GET",
            "/checkpoints/{id}",
            on(MethodFilter::GET, get_checkpoint),
        ),
        ("PUT", "/rollback", on(MethodFilter::PUT, put_rollback)),
    ]
}

/// The application: routes, JSON fallbacks, request logs.
pub fn router(controller: Ctl) -> Router {
    let mut router = Router::new();
    for (_, path, handler) in routes() {
        router = router.route(path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(controller)
}

/// Binds `path` so that only the owner can connect: the socket is bound in a fresh directory
/// of mode 0700, given mode 0600, then renamed into place, so it is never reachable with wider
/// permissions. A stale socket (nobody answers) is replaced; a live one is refused.
fn bind_owner_only(path: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| ServeError::Io {
            op,
            path: p,
            source,
        }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let private = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(io("create", &private))?;
    let staged = private.join("s");
    let result = UnixListener::bind(&staged)
        .map_err(io("bind", &staged))
        .and_then(|listener| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
                .map_err(io("set permissions of", &staged))?;
            std::fs::rename(&staged, path).map_err(io("move the socket to", path))?;
            Ok(listener)
        });
    if let Err(e) = std::fs::remove_file(&staged) {
        debug!("staged socket already moved: {e}");
    }
    std::fs::remove_dir(&private).map_err(io("remove", &private))?;
    result
}

/// A running API server.
pub struct ApiServer {
    path: PathBuf,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl ApiServer {
    /// Binds `path` (owner-only) and serves the API for `controller` on the current runtime.
    pub fn start(path: &Path, controller: Ctl) -> Result<ApiServer, ServeError> {
        let listener = bind_owner_only(path)?;
        let cleanup = |source| {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("cannot remove {}: {e}", path.display());
            }
            ServeError::Io {
                op: "listen on",
                path: path.to_path_buf(),
                source,
            }
        };
        listener.set_nonblocking(true).map_err(cleanup)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(cleanup)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router(controller)).with_graceful_shutdown(async {
            // A dropped sender stops the server too.
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { serve.await });
        info!(socket = %path.display(), "API server listening");
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            task,
        })
    }

    /// Stops accepting, lets requests in flight finish (a few seconds at most), and removes
    /// the socket.
    pub async fn shutdown(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!("cannot remove {}: {e}", self.path.display());
        }
        // The receiver is gone only if the server already ended.
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!("API server failed: {e}"),
            Ok(Err(e)) => warn!("API server task failed: {e}"),
            Err(_) => {
                warn!("API requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
                task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths() {
        assert!(
            matches!(parse_store("/a/b", "out"), Ok(StoreSpec::Dir(p)) if p == Path::new("/a/b"))
        );
        assert!(
            matches!(parse_store("raw:/dev/sdb", "from"), Ok(StoreSpec::Raw(p)) if p == Path::new("/dev/sdb"))
        );
        for bad in [
            "",
            "rel/dir",
            "./x",
            "/a/../b",
            "/a/..",
            "raw:rel",
            "raw:/a/../b",
            "mem:x",
            "s3://bucket/x",
            "/a\0b",
            "/",
        ] {
            let e = parse_store(bad, "out").expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.body.field.as_deref(), Some("out"), "{bad}");
            let e = parse_store(bad, "from").expect_err(bad);
            assert_eq!(e.body.field.as_deref(), Some("from"), "{bad}");
            assert!(
                e.body.message.starts_with("from "),
                "{bad}: {}",
                e.body.message
            );
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<CheckpointBody>(br#"{"out":"/x","strategy":"teleport"}"#)
            .expect_err("unknown variant");
        assert_eq!(e.body.field.as_deref(), Some("strategy"));
        let e =
            parse_json::<CheckpointBody>(br#"{"out":"/x","colour":1}"#).expect_err("unknown field");
        assert_eq!(e.body.field.as_deref(), Some("colour"));
        let e = parse_json::<CheckpointBody>(br#"{"strategy":"fork"}"#).expect_err("missing");
        assert_eq!(e.body.field.as_deref(), Some("out"));
        let e = parse_json::<CheckpointBody>(br#"{"out":7}"#).expect_err("wrong type");
        assert_eq!(e.body.field.as_deref(), Some("out"));
        let e = parse_json::<VmPatch>(br#"{"state":1}"#).expect_err("wrong type");
        assert_eq!(e.body.field.as_deref(), Some("state"));
        let e = parse_json::<VmPatch>(br#"{"state""#).expect_err("truncated");
        assert_eq!(e.body.error, "invalid_json");
        let e = parse_json::<VmPatch>(br#"{"state":"Paused"} {}"#).expect_err("trailing");
        assert_eq!(e.body.error, "invalid_json");
        assert!(parse_json::<VmPatch>(br#" {"state":"Running"} "#).is_ok());
    }

    /// Every route served is in the OpenAPI document, and every operation documented is served.
    #[test]
    fn openapi_matches_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if method != "parameters" {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
