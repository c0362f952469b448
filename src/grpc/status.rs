//! The one table from internal errors to gRPC statuses.
//!
//! Bad input is INVALID_ARGUMENT naming the field; a missing thing is NOT_FOUND; a state that
//! forbids the edit is FAILED_PRECONDITION; a store that cannot be reached is UNAVAILABLE; bugs and
//! damaged data are INTERNAL with the details logged here and not sent.

use std::fmt::Display;

use tonic::Status;

use crate::store::StoreError;

/// INVALID_ARGUMENT as `field: reason`.
pub fn invalid(field: impl Display, reason: impl Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Status {
        match error {
            StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
            StoreError::Rejected { field, reason } => invalid(field, reason),
            StoreError::AlreadyExists(what) => {
                Status::already_exists(format!("{what} already exists"))
            }
            StoreError::FailedPrecondition(message) => Status::failed_precondition(message),
            StoreError::Unavailable(message) => {
                tracing::warn!(%message, "store unavailable");
                Status::unavailable(format!("store unavailable: {message}"))
            }
            StoreError::Corrupt(message) => {
                tracing::error!(%message, "store data is corrupt");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_store_error_has_its_status() {
        let cases = [
            (StoreError::NotFound("key key_x".into()), Code::NotFound),
            (StoreError::rejected("cidrs[0]", "x"), Code::InvalidArgument),
            (
                StoreError::AlreadyExists("key k".into()),
                Code::AlreadyExists,
            ),
            (
                StoreError::FailedPrecondition("revoked".into()),
                Code::FailedPrecondition,
            ),
            (StoreError::Unavailable("down".into()), Code::Unavailable),
            (StoreError::Corrupt("secret detail".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
        assert_eq!(
            invalid("entries[2].cidr", "bad").message(),
            "entries[2].cidr: bad"
        );
    }
}
