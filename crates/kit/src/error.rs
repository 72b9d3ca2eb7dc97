//! The one place where errors become gRPC statuses.
//!
//! Every service maps its domain errors into [`ApiError`]; the exhaustive `From<ApiError>
//! for Status` below decides the code. Internal errors are logged with their cause and
//! reach the caller as a bare `INTERNAL` so that nothing about the database leaks out.

use tonic::{Code, Status};

/// An error a Relance API call can end with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` is the path of the offending field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// The thing asked for does not exist (in the caller's workspace).
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to perform it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No credentials, or credentials that are not valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the scope the call needs.
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was reached; the caller may retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (database, broker) is unreachable; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A concurrent operation conflicts (e.g. a training already running); retry later.
    #[error("{0}")]
    Aborted(String),
    /// A bug or an unexpected failure; logged, never detailed to the caller.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Result of an API-facing operation.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let code = error.code();
        match error {
            ApiError::Internal(cause) => {
                tracing::error!(error = ?cause, "internal error");
                Status::internal("internal error")
            }
            other => Status::new(code, other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        match database_unavailable(&error) {
            Some(unavailable) => unavailable,
            None => ApiError::Internal(error.into()),
        }
    }
}

/// UNAVAILABLE (logged) when `error` means the database cannot be reached now, so that the
/// caller retries; `None` for any other database failure.
pub fn database_unavailable(error: &sqlx::Error) -> Option<ApiError> {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            tracing::warn!(error = %error, "database unavailable");
            Some(ApiError::Unavailable("database unavailable".into()))
        }
        _ => None,
    }
}

impl From<crate::bus::BusError> for ApiError {
    fn from(error: crate::bus::BusError) -> ApiError {
        tracing::warn!(error = %error, "message broker unavailable");
        ApiError::Unavailable("message broker unavailable".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(ApiError::invalid("event.name", "must be snake_case"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "event.name: must be snake_case");
    }

    #[test]
    fn internal_errors_hide_their_cause() {
        let status = Status::from(ApiError::Internal(anyhow::anyhow!(
            "relation x does not exist"
        )));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
