//! The control API: HTTP/1.1 with JSON bodies on a Unix socket (axum on tokio), served by
//! `cowvm run --api-sock PATH` in the process that runs the VM.
//!
//! Routes are listed once, in [`routes`]; the OpenAPI document next to this file
//! (`openapi.json`, also served at `GET /openapi.json`) is checked against that list by a test.
//! Every answer outside 2xx has an [`ErrorBody`](model::ErrorBody). Operations that block run
//! off the async workers, so a slow request never stalls another client.

mod error;
mod listen;
pub mod model;
pub mod standby;

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use thiserror::Error;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use self::error::{query, store_address, ApiError, JsonBody};
use self::model::{
    CheckpointBody, CheckpointDeleted, CheckpointJob, DeleteBody, DiskMetrics, Health, JobPhase,
    JobProgress, JobStatus, MergedLayer, MigrateBody, RollbackBody, RollbackDone, VersionInfo,
    VmConfigInfo, VmInfo, VmMetrics, VmPatch, VmState, WaitQuery,
};
use vmm::Phase;

use crate::control::{
    chain, refused_by_store, CheckpointSpec, ControlError, Controller, Job, Outcome,
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

/// Runs a blocking controller operation off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<Result<T, ControlError>, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker failed: {e}")))
}

/// A checkpoint job as the API shows it.
fn job_view(job: &Job) -> CheckpointJob {
    let (done, total) = job.progress().pages();
    let page = ckpt_format::PAGE_SIZE as u64;
    let (status, metrics, strategy_used, error) = match job.end() {
        None => (JobStatus::Running, None, None, None),
        Some((Outcome::Complete(m), _)) => (
            JobStatus::Complete,
            Some(m.metrics),
            Some(m.options.strategy),
            None,
        ),
        Some((Outcome::Failed(e), _)) => (JobStatus::Failed, None, None, Some(chain(&e))),
    };
    let phase = match job.progress().phase() {
        Phase::Pending => JobPhase::Pending,
        Phase::Preparing => JobPhase::Preparing,
        Phase::Paused => JobPhase::Paused,
        Phase::Writing => JobPhase::Writing,
        Phase::Done | Phase::Failed => JobPhase::Done,
    };
    let spec = job.spec();
    CheckpointJob {
        id: job.id().to_string(),
        status,
        phase,
        out: spec.store.to_string(),
        strategy: spec.options.strategy,
        strategy_used,
        io: spec.options.io,
        disk: spec.options.disk,
        started_unix_ms: job.started_unix_ms(),
        elapsed_ms: job.elapsed().as_millis() as u64,
        progress: JobProgress {
            pages_done: done,
            pages_total: total,
            bytes_done: done * page,
            bytes_total: total * page,
        },
        metrics,
        error,
    }
}

/// The VM's state and configuration as the API shows them.
fn vm_info(c: &Controller) -> VmInfo {
    let status = c.status();
    let vm = c.vm();
    let s = vm.summary();
    VmInfo {
        state: match status.paused {
            Some(_) => VmState::Paused,
            None => VmState::Running,
        },
        paused_by: status.paused,
        config: VmConfigInfo {
            mem_size: s.mem_size,
            vcpus: s.vcpus,
            kernel: s.kernel.as_ref().map(|k| k.display().to_string()),
            cmdline: s.cmdline.clone(),
        },
        checkpoint_in_progress: status.checkpoint_in_progress.map(|id| id.to_string()),
        restored_from: status.restored_from.map(|a| a.to_string()),
        uptime_ms: status.uptime.as_millis() as u64,
        restore: vm.restore_stats().map(Into::into),
    }
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
        vm: vm_info(&c).state,
    }))
}

async fn get_openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn get_vm(State(c): State<Ctl>) -> Json<VmInfo> {
    Json(vm_info(&c))
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
    .await??;
    Ok(Json(vm_info(&c)))
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
        uptime_ms: c.status().uptime.as_millis() as u64,
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
    let spec = CheckpointSpec {
        store: store_address(&body.out, "out")?,
        s3_endpoint: body.s3_endpoint.clone(),
        options: body.options(),
        parent: body
            .parent
            .as_deref()
            .map(|p| store_address(p, "parent"))
            .transpose()?,
    };
    let ctl = c.clone();
    let job = blocking(move || ctl.start_checkpoint(spec))
        .await?
        .map_err(|e| ApiError::for_store(e, "out"))?;
    // Answer once the store has accepted the checkpoint, so that a refusal (an existing
    // checkpoint, a missing directory) is this request's answer.
    if tokio::time::timeout(PREPARE_WAIT, job.prepared())
        .await
        .is_err()
    {
        debug!(id = job.id(), "checkpoint still preparing; answering");
    }
    if let Some((Outcome::Failed(e), _)) = job.end() {
        if refused_by_store(&e) {
            c.forget(&job);
            return Err(ApiError::for_store(ControlError::Checkpoint(e), "out"));
        }
    }
    if wait {
        job.finished().await;
    }
    let view = job_view(&job);
    let status = if view.status == JobStatus::Running {
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
    let from = store_address(&body.from, "from")?;
    let ctl = c.clone();
    let endpoint = body.s3_endpoint.clone();
    let took = blocking(move || ctl.rollback(&from, endpoint.as_deref(), body.eager))
        .await?
        .map_err(|e| ApiError::for_store(e, "from"))?;
    Ok(Json(RollbackDone {
        from: body.from,
        eager: body.eager,
        restore_us: took.restore.as_micros() as u64,
        downtime_us: took.downtime.as_micros() as u64,
    }))
}

async fn put_migration(
    State(c): State<Ctl>,
    JsonBody(body): JsonBody<MigrateBody>,
) -> Result<Json<vmm::MigrationReport>, ApiError> {
    let mode = body.mode.unwrap_or_default();
    if body.tls_ca.as_ref().is_some_and(|ca| !ca.is_absolute()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "tls_ca: expected an absolute path",
        )
        .field("tls_ca"));
    }
    let mut options = vmm::MigrateOptions::new(body.to, mode);
    if let Some(ms) = body.max_downtime_ms {
        options.max_downtime = Duration::from_millis(ms);
    }
    options.copy_disks = body.copy_disks.unwrap_or(false);
    options.tls_ca = body.tls_ca;
    options.tls_server_name = body.tls_server_name;
    let ctl = c.clone();
    let report = blocking(move || ctl.migrate(&options))
        .await?
        .map_err(|e| {
            let field = migration_field(&e);
            ApiError::for_store(e, field)
        })?;
    Ok(Json(report))
}

/// The field of `PUT /migration` a refused migration is about.
fn migration_field(e: &ControlError) -> &'static str {
    use vmm::{MigrationError, TlsError};
    let ControlError::Migrate(MigrationError::Resumed { source, .. }) = e else {
        return "to";
    };
    match &**source {
        MigrationError::Tls(TlsError::ServerName(_) | TlsError::NameWithoutCa) => "tls_server_name",
        MigrationError::Tls(
            TlsError::Read { .. }
            | TlsError::Missing { .. }
            | TlsError::Pem { .. }
            | TlsError::Unusable { .. },
        ) => "tls_ca",
        _ => "to",
    }
}

async fn delete_checkpoint(
    State(c): State<Ctl>,
    JsonBody(body): JsonBody<DeleteBody>,
) -> Result<Json<CheckpointDeleted>, ApiError> {
    let address = store_address(&body.path, "path")?;
    let ctl = c.clone();
    let merges = blocking(move || ctl.delete_checkpoint(&address))
        .await?
        .map_err(|e| ApiError::for_store(e, "path"))?;
    Ok(Json(CheckpointDeleted {
        path: body.path,
        merged: merges
            .into_iter()
            .map(|m| MergedLayer {
                disk: m.disk,
                layer: m.layer.display().to_string(),
                into: m.into.display().to_string(),
                bytes: m.bytes,
            })
            .collect(),
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
    let job = id.parse().ok().and_then(|id| c.job(id)).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no checkpoint job {id:?}"),
        )
    })?;
    if wait {
        job.finished().await;
    }
    Ok(Json(job_view(&job)))
}

async fn list_checkpoints(State(c): State<Ctl>) -> Json<serde_json::Value> {
    let jobs: Vec<CheckpointJob> = c.jobs().iter().map(|j| job_view(j)).collect();
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
            "DELETE",
            "/checkpoints",
            on(MethodFilter::DELETE, delete_checkpoint),
        ),
        (
            "GET",
            "/checkpoints/{id}",
            on(MethodFilter::GET, get_checkpoint),
        ),
        ("PUT", "/rollback", on(MethodFilter::PUT, put_rollback)),
        ("PUT", "/migration", on(MethodFilter::PUT, put_migration)),
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
    task: JoinHandle<()>,
    spare: std::os::unix::net::UnixListener,
}

impl ApiServer {
    /// Binds `path` (owner-only) and serves the API for `controller` on the current runtime.
    pub fn start(path: &Path, controller: Ctl) -> Result<ApiServer, ServeError> {
        ApiServer::serve(bind_owner_only(path)?, path, router(controller))
    }

    /// Serves the API for `controller` on `listener`, bound at `path` by a server before it
    /// ([`hand_over`](Self::hand_over)).
    pub fn start_on(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
        controller: Ctl,
    ) -> Result<ApiServer, ServeError> {
        ApiServer::serve(listener, path, router(controller))
    }

    /// Binds `path` (owner-only) and serves `router` on the current runtime.
    pub fn bind(path: &Path, router: Router) -> Result<ApiServer, ServeError> {
        ApiServer::serve(bind_owner_only(path)?, path, router)
    }

    fn serve(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
        router: Router,
    ) -> Result<ApiServer, ServeError> {
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
        // Kept to hand the bound socket to the next server without a moment unbound.
        let spare = listener.try_clone().map_err(cleanup)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(cleanup)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(listen::serve(listener, router, stopped));
        info!(socket = %path.display(), "API server listening");
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            task,
            spare,
        })
    }

    /// Stops serving (requests in flight finish) and returns the socket, still bound at its
    /// path: connections arriving meanwhile wait for the next server to accept them.
    pub async fn hand_over(self) -> std::os::unix::net::UnixListener {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            warn!("API requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
            task.abort();
        }
        self.spare
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
            Ok(Ok(())) => {}
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
