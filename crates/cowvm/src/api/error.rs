//! Error answers: every answer outside 2xx is an [`ErrorBody`] with a short code, a message
//! and, when one is at fault, the request field.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ckpt_format::{AddressError, StoreAddress};
use serde::Deserialize;
use vmm::ErrorKind;

use super::model::{ErrorBody, RequestBody};
use super::MAX_BODY;
use crate::control::{chain, ControlError};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, error: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_string(),
                message: message.into(),
                field: None,
            },
        }
    }

    pub(super) fn field(mut self, field: impl Into<String>) -> ApiError {
        self.body.field = Some(field.into());
        self
    }

    pub(super) fn internal(message: impl Into<String>) -> ApiError {
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
        let (status, code) = match e.kind() {
            ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "invalid_field"),
            ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "checkpoint_exists"),
            ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorKind::VmExited => (StatusCode::CONFLICT, "vm_exited"),
            ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, chain(&e))
    }
}

impl ApiError {
    /// The answer to a failed request naming a store in its field `store_field`: a refusal of
    /// the request's input names the field at fault.
    pub(super) fn for_store(e: ControlError, store_field: &str) -> ApiError {
        let field = match (&e, e.kind()) {
            (ControlError::CopyCommitNeedsDir, _) => Some("disk"),
            (_, ErrorKind::InvalidInput | ErrorKind::AlreadyExists) => Some(store_field),
            _ => None,
        };
        let answer = ApiError::from(e);
        match field {
            Some(field) => answer.field(field),
            None => answer,
        }
    }
}

/// The store a request names in `field`: an absolute, normal path (no `..`, no NUL, no
/// relative path — the server's working directory is nobody's business), `raw:` and such a
/// path, or `mem:NAME`.
pub fn store_address(value: &str, field: &str) -> Result<StoreAddress, ApiError> {
    let address: StoreAddress = value
        .parse()
        .map_err(|e: AddressError| invalid(&e, field))?;
    address.require_absolute().map_err(|e| invalid(&e, field))?;
    Ok(address)
}

fn invalid(e: &AddressError, field: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e.about(field)).field(field)
}

/// A JSON request body: `Content-Type: application/json`, at most [`MAX_BODY`] bytes, one
/// JSON value whose unknown fields are refused. Errors name the field at fault.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: RequestBody> FromRequest<S> for JsonBody<T> {
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

/// Parses one JSON value, naming the field at fault in the error; a value of the wrong type
/// is answered with the type its field expects.
fn parse_json<T: RequestBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let json = serde_json::Value::deserialize(&mut de)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("trailing characters after the JSON value: {e}"),
        )
    })?;
    serde_path_to_error::deserialize(&json).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
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
        // An object where an enum's string is expected reads as an "invalid value" to serde.
        let value = json.get(&path);
        let wrong_type = message.starts_with("invalid type")
            || (message.starts_with("invalid value") && value.is_some_and(|v| !v.is_string()));
        let expected = (T::FIELDS.iter()).find(|&&(name, _)| name == path);
        let message = match (wrong_type, expected, value) {
            (true, Some((name, expected)), Some(value)) => {
                format!("{name}: expected {expected}, found {}", kind_of(value))
            }
            _ => message,
        };
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message)
            .field(named.unwrap_or(path))
    })
}

/// What kind of JSON value `value` is, for an error message.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()).field("query")
    })
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{CheckpointBody, RollbackBody, VmPatch};

    #[test]
    fn store_paths() {
        assert_eq!(
            store_address("/a/b", "out").ok(),
            Some(StoreAddress::Dir("/a/b".into()))
        );
        assert_eq!(
            store_address("raw:/dev/sdb", "from").ok(),
            Some(StoreAddress::Raw("/dev/sdb".into()))
        );
        assert_eq!(
            store_address("mem:x", "from").ok(),
            Some(StoreAddress::Mem("x".into()))
        );
        assert_eq!(
            store_address("s3://bucket/x", "out").ok(),
            Some(StoreAddress::S3 {
                bucket: "bucket".into(),
                prefix: "x".into()
            })
        );
        for bad in [
            "",
            "rel/dir",
            "./x",
            "/a/../b",
            "/a/..",
            "raw:rel",
            "raw:/a/../b",
            "s3://bucket/a/../b",
            "/a\0b",
            "/",
        ] {
            let e = store_address(bad, "out").expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.body.field.as_deref(), Some("out"), "{bad}");
            let e = store_address(bad, "from").expect_err(bad);
            assert_eq!(e.body.field.as_deref(), Some("from"), "{bad}");
            assert!(
                e.body.message.starts_with("from "),
                "{bad}: {}",
                e.body.message
            );
        }
        for bad in ["mem:", "mem:a/b"] {
            let e = store_address(bad, "out").expect_err(bad);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.body.field.as_deref(), Some("out"), "{bad}");
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

    /// A value of the wrong type names its field and the type the field expects.
    #[test]
    fn type_errors_name_the_expected_type() {
        let cases: [(&[u8], &str, &str); 8] = [
            (
                br#"{"out":7}"#,
                "out",
                "out: expected a string (a directory, raw:PATH or mem:NAME), found a number",
            ),
            (
                br#"{"out":"/x","strategy":1}"#,
                "strategy",
                "strategy: expected a string (one of uffd, fork, stop), found a number",
            ),
            (
                br#"{"out":"/x","io":true}"#,
                "io",
                "io: expected a string (one of live, drain), found a boolean",
            ),
            (
                br#"{"out":"/x","disk":[]}"#,
                "disk",
                "disk: expected a string (one of keep, copy-commit), found an array",
            ),
            (
                br#"{"from":null}"#,
                "from",
                "from: expected a string (a directory, raw:PATH or mem:NAME), found null",
            ),
            (
                br#"{"from":"/x","eager":"yes"}"#,
                "eager",
                "eager: expected a boolean, found a string",
            ),
            (
                br#"{"from":"/x","eager":1}"#,
                "eager",
                "eager: expected a boolean, found a number",
            ),
            (
                br#"{"state":{}}"#,
                "state",
                "state: expected a string (one of Paused, Running), found an object",
            ),
        ];
        for (body, field, message) in cases {
            let text = String::from_utf8_lossy(body);
            let e = match field {
                "from" | "eager" => parse_json::<RollbackBody>(body).map(|_| ()),
                "state" => parse_json::<VmPatch>(body).map(|_| ()),
                _ => parse_json::<CheckpointBody>(body).map(|_| ()),
            }
            .expect_err(&text);
            assert_eq!(e.body.error, "invalid_field", "{text}");
            assert_eq!(e.body.field.as_deref(), Some(field), "{text}");
            assert_eq!(e.body.message, message, "{text}");
        }
    }
}
