//! The error codes of PROTOCOL.md as one closed enum. The transport maps each to its
//! HTTP status in one place; everything else passes these values around.

use std::fmt;

use dispatch_engine::{DriverError, RiderError, TripError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    InvalidLocation,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    QuoteExpired,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::InvalidLocation,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::QuoteExpired,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidLocation => "invalid_location",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::QuoteExpired => "quote_expired",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A typed failure with a message safe to show a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("no such {what}"))
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

/// The answer to a new trip whose pickup's shard this node does not serve now (not yet,
/// or no longer: its shard is ending here): retry, on its owner.
pub(crate) fn pickup_not_served() -> ApiError {
    ApiError::unavailable("this node does not serve the pickup's shard now; retry")
}

/// The answer to a command waiting on a trip whose actor stopped (`TripFailed`): it
/// failed and is read back from the store, or its shard ended here (`System::end_shard`,
/// a handoff) and the trip goes on on the shard's next owner. Which one, the message does
/// not say (it crosses nodes as it is); both are retried the same way.
pub(crate) fn trip_stopped() -> ApiError {
    ApiError::unavailable(
        "the trip's actor stopped: it failed and is being reloaded, or its shard moved to another node; retry",
    )
}

/// The answer while a failed trip actor is read back from the store (docs/api.md, "A trip
/// actor that fails"): nothing the command asked was applied, and a retry can succeed.
pub(crate) fn trip_reloading() -> ApiError {
    ApiError::unavailable("the trip is being reloaded after a failure; retry")
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<TripError> for ApiError {
    fn from(e: TripError) -> Self {
        match e {
            TripError::Forbidden(m) => ApiError::forbidden(m),
            TripError::Conflict(m) => ApiError::conflict(m),
            TripError::NotFound(what) => ApiError::not_found(what),
            TripError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Suspended => ApiError::forbidden(e.to_string()),
            _ => ApiError::conflict(e.to_string()),
        }
    }
}

impl From<RiderError> for ApiError {
    fn from(e: RiderError) -> Self {
        ApiError::conflict(e.to_string())
    }
}
