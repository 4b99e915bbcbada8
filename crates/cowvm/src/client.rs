//! A client of the control API over its Unix socket (hyper's HTTP/1.1 client on a tokio
//! `UnixStream`, one connection per request).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::net::UnixStream;
use tracing::debug;

use crate::api::model::ErrorBody;

/// Errors of an API call.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nobody answers on the socket.
    #[error("cannot connect to {path} (is `cowvm run --api-sock` running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with {0} failed")]
    Http(PathBuf, #[source] hyper::Error),
    /// A request could not be built (a bug).
    #[error("bad request")]
    Request(#[source] hyper::http::Error),
    /// The server refused the request.
    #[error("{}{}", .body.message, .body.field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: ErrorBody,
    },
    /// The answer is not what the API documents.
    #[error("unexpected answer ({status}): {text}")]
    Unexpected {
        /// HTTP status.
        status: StatusCode,
        /// The body, as text.
        text: String,
    },
    /// Encoding the request body failed.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// A client of one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client of the server on `socket`.
    pub fn new(socket: &Path) -> ApiClient {
        ApiClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request and decodes a JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let http = |e| ClientError::Http(self.socket.clone(), e);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("API connection closed: {e}");
            }
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        let bytes = match body {
            Some(b) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b).map_err(ClientError::Encode)?)
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(bytes))
            .map_err(ClientError::Request)?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => ClientError::Api { status, body },
                Err(_) => ClientError::Unexpected {
                    status,
                    text: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|_| ClientError::Unexpected {
            status,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }
}
