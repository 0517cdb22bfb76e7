//! The API's errors and its request extractors.
//!
//! Every error is JSON `{"error": "..."}` with a status that says whose
//! fault it is: 400 bad input (naming the field or value), 404 an unknown
//! id, 409 the same work already under way, 422 a request that is well formed but cannot be carried out, 503 a
//! service that does not answer (named), 500 anything else. axum's own
//! extractors answer rejections in plain text with assorted statuses; the
//! wrappers here turn those into the same JSON 400, so a client (and the
//! OpenAPI document) sees one error shape everywhere.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::model::ErrorBody;
use crate::admin::AdminError;
use crate::client::{ClientError, ResultError};
use crate::replay::ReplayError;
use crate::store::blobs::BlobError;
use crate::store::db;

/// An API error, by the status it answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is wrong; the message names what.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such video, source or result.
    #[error("{0}")]
    NotFound(String),
    /// 409: another request is doing the same thing right now.
    #[error("{0}")]
    Conflict(String),
    /// 422: understood, but cannot be done with this data.
    #[error("{0}")]
    Unprocessable(String),
    /// 503: a service (named in the message) does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a fault of ours.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A PostgreSQL failure: 503 when the server cannot be reached (or
    /// has no schema yet), 500 when a query of ours is at fault.
    pub fn database(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            _ if db::is_unavailable(&e) => {
                Self::Unavailable(format!("PostgreSQL is not serving: {e}"))
            }
            // character_not_in_repertoire: a NUL in a string from the
            // request (PostgreSQL text cannot hold one). Ids with one name
            // nothing and are answered 404 before any query
            // (`client::storable`); this catches the rest.
            E::Database(d) if d.code().as_deref() == Some("22021") => Self::BadRequest(
                "a value in the request holds a character PostgreSQL cannot store (NUL)"
                    .to_string(),
            ),
            // undefined_table: a database that `vidpipe migrate` never saw.
            E::Database(d) if d.code().as_deref() == Some("42P01") => Self::Unavailable(format!(
                "PostgreSQL: {e} (apply the schema with `vidpipe migrate`)"
            )),
            _ => Self::Internal(format!("PostgreSQL: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "API request failed");
        }
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::database(e)
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::BadUrl(_) => Self::BadRequest(e.to_string()),
            ClientError::Kafka { .. } | ClientError::Registry(_) => {
                Self::Unavailable(e.to_string())
            }
            ClientError::Database(e) => Self::database(e),
        }
    }
}

impl From<ResultError> for ApiError {
    fn from(e: ResultError) -> Self {
        match e {
            ResultError::BadFormat { .. } | ResultError::BadGeneration(_) => {
                Self::BadRequest(e.to_string())
            }
            ResultError::UnknownVideo(_) | ResultError::NotFinished { .. } => {
                Self::NotFound(e.to_string())
            }
            // The object store's words name its endpoint and object paths:
            // they go to the log.
            ResultError::Blob {
                ref video_id,
                ref file,
                ref source,
            } if matches!(**source, BlobError::Store { .. }) => {
                tracing::warn!(video_id, file, error = %source, "the blob store did not answer");
                Self::Unavailable(
                    "the blob store did not answer (the server's log says why)".into(),
                )
            }
            ResultError::NoFile { .. } => Self::Internal(e.to_string()),
            // The store's own words name files and paths on the server:
            // they go to the log, and the answer says what is missing.
            ResultError::Blob {
                ref video_id,
                ref file,
                ref source,
            } => {
                tracing::error!(video_id, file, error = %source, "a result file cannot be read");
                Self::Internal(format!(
                    "the {file} of {video_id} cannot be read from the blob store \
                     (the server's log says why)"
                ))
            }
            ResultError::Database(e) => Self::database(e),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::UnknownStage(_) | ReplayError::Usage(_) => Self::BadRequest(e.to_string()),
            ReplayError::UnknownVideos(_) => Self::NotFound(e.to_string()),
            ReplayError::Unsupported(_)
            | ReplayError::NotReplayable(_)
            | ReplayError::TooMany(_) => Self::Unprocessable(e.to_string()),
            // The pipeline's topics are not there yet: `vidpipe run` makes them.
            ReplayError::MissingTopic(_) | ReplayError::Kafka { .. } => {
                Self::Unavailable(format!("Kafka: {e}"))
            }
            ReplayError::Registry(_) => Self::Unavailable(e.to_string()),
            ReplayError::Database(e) => Self::database(e),
            ReplayError::InProgress(_) => Self::Conflict(e.to_string()),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::UnknownStage(_) => Self::BadRequest(e.to_string()),
            AdminError::MissingTopic(_) | AdminError::Kafka { .. } => {
                Self::Unavailable(e.to_string())
            }
            AdminError::Shrink { .. } | AdminError::Refused { .. } => Self::Internal(e.to_string()),
        }
    }
}

/// A JSON request body; a bad one is a JSON 400 naming the problem.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Query parameters; bad ones are a JSON 400 naming the problem.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

/// Path parameters; bad ones (invalid percent-encoding or UTF-8) are a
/// JSON 400.
pub struct PathParams<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}
