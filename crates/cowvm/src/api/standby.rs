//! The API of a standby VM (`cowvm standby --api-sock PATH`): a VM made before its checkpoint
//! is known waits for `PUT /restore`. The handler only checks the request and passes it to the
//! process's main thread, which restores; once the VM runs, the process serves the VM's own
//! API on the same socket.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use ckpt_format::StoreAddress;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vmm::ErrorKind;

use super::error::{store_address, ApiError, JsonBody};
use super::model::RequestBody;
use super::{log_request, method_not_allowed, not_found};

/// `PUT /restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyRestoreBody {
    /// The checkpoint: an absolute directory path, `raw:` and an absolute path, or
    /// `s3://BUCKET/PREFIX`.
    pub from: String,
    /// The endpoint URL of an `s3://` store (default: the server's `--s3-endpoint`, else its
    /// environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
}

impl RequestBody for StandbyRestoreBody {
    const FIELDS: &'static [(&'static str, &'static str)] = &[
        (
            "from",
            "a string (a directory, raw:PATH or s3://BUCKET/PREFIX)",
        ),
        ("s3_endpoint", "a string (a URL)"),
    ];
}

/// The answer to `PUT /restore`: the VM runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyRestored {
    /// The checkpoint, as the request named it.
    pub from: String,
    /// From the request reaching the VMM until the vCPUs ran.
    pub first_instruction_us: u64,
}

/// `GET /health` of a standby VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyHealth {
    /// Always `standby`: the VM waits for its checkpoint.
    pub status: String,
    /// Guest memory, in bytes: a checkpoint of another size is refused.
    pub mem_size: u64,
    /// vCPUs: a checkpoint with another count is refused.
    pub vcpus: u8,
}

/// A restore asked for, passed to the thread that owns the standby.
pub struct RestoreAsked {
    /// The checkpoint.
    pub from: StoreAddress,
    /// As the request named it.
    pub from_text: String,
    /// The request's S3 endpoint, if it named one.
    pub s3_endpoint: Option<String>,
    /// Where the outcome goes: the VM runs, or why not (what kind of failure, and the message).
    pub reply: oneshot::Sender<Result<StandbyRestored, (ErrorKind, String)>>,
}

#[derive(Clone)]
struct Standby {
    shape: (u64, u8),
    asks: mpsc::Sender<RestoreAsked>,
}

/// The routes of a standby VM of `mem_size` bytes and `vcpus` vCPUs; restores asked for go to
/// `asks`.
pub fn router(mem_size: u64, vcpus: u8, asks: mpsc::Sender<RestoreAsked>) -> Router {
    Router::new()
        .route("/health", on(MethodFilter::GET, get_health))
        .route("/restore", on(MethodFilter::PUT, put_restore))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(Standby {
            shape: (mem_size, vcpus),
            asks,
        })
}

async fn get_health(State(s): State<Standby>) -> Json<StandbyHealth> {
    Json(StandbyHealth {
        status: "standby".into(),
        mem_size: s.shape.0,
        vcpus: s.shape.1,
    })
}

async fn put_restore(
    State(s): State<Standby>,
    JsonBody(body): JsonBody<StandbyRestoreBody>,
) -> Result<Json<StandbyRestored>, ApiError> {
    let from = store_address(&body.from, "from")?;
    if matches!(from, StoreAddress::Mem(_)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "from: a RAM checkpoint exists only in the process that took it",
        )
        .field("from"));
    }
    let (reply, outcome) = oneshot::channel();
    let gone = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "the standby VM has been used by another restore",
        )
    };
    s.asks
        .send(RestoreAsked {
            from,
            from_text: body.from,
            s3_endpoint: body.s3_endpoint,
            reply,
        })
        .await
        .map_err(|_| gone())?;
    match outcome.await.map_err(|_| gone())? {
        Ok(done) => Ok(Json(done)),
        Err((kind, message)) => {
            let answer = match kind {
                ErrorKind::InvalidInput => {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).field("from")
                }
                ErrorKind::Conflict | ErrorKind::AlreadyExists | ErrorKind::VmExited => {
                    ApiError::new(StatusCode::CONFLICT, "conflict", message)
                }
                ErrorKind::Internal => ApiError::internal(message),
            };
            Err(answer)
        }
    }
}
