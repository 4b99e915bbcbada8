//! The S3 store's errors, apart from the rest of the store so that the crate's error type can
//! wrap them without depending on the store.

use std::io;

/// Errors of the S3 store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    /// A URL that is not `s3://BUCKET/PREFIX`.
    #[error("invalid S3 URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    /// A store option out of range.
    #[error("invalid S3 store option: {0}")]
    InvalidOption(String),
    /// The client could not be configured (bad endpoint, region, ...).
    #[error("configuring the S3 client for {location}")]
    Client {
        location: String,
        #[source]
        source: object_store::Error,
    },
    /// The client's runtime could not start.
    #[error("starting the S3 client runtime")]
    Runtime(#[source] io::Error),
    /// No connection to the endpoint.
    #[error("cannot reach S3 endpoint {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// The endpoint refused the credentials or their rights.
    #[error("access denied to bucket {bucket} at {endpoint} ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")]
    AccessDenied {
        bucket: String,
        endpoint: String,
        code: String,
    },
    /// The bucket does not exist.
    #[error("bucket {bucket} does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    /// Any other failed request.
    #[error("{op} {object}")]
    Request {
        op: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
    /// A memory chunk that should exist does not.
    #[error("memory chunk {object} is missing")]
    ChunkMissing { object: String },
    /// A memory chunk shorter than the memory image says.
    #[error("memory chunk {object} is truncated: {expected} bytes expected, {found} found")]
    ChunkTruncated {
        object: String,
        expected: u64,
        found: u64,
    },
    /// A memory chunk whose bytes do not match the page index.
    #[error("memory chunk {object} is corrupt: page {page} does not match the page index")]
    ChunkCorrupt { object: String, page: u64 },
    /// A memory upload failed earlier; the checkpoint cannot complete.
    #[error("an earlier memory upload to {location} failed")]
    UploadFailed { location: String },
}
