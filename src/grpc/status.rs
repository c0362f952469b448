//! The one table from internal errors to gRPC statuses.
//!
//! Bad input is INVALID_ARGUMENT naming the field; a missing thing is NOT_FOUND; a state that
//! forbids the edit is FAILED_PRECONDITION; a store that cannot be reached, or no decision to be
//! had, is UNAVAILABLE; bugs and damaged data are INTERNAL with the details logged here and not
//! sent. The admin layer points at bad input by position ([`Field`]); the wire names are given
//! here, once.

use std::fmt::Display;

use keyfence_admin::{
    AdminError,
    error::{Field, Problem},
};
use tonic::Status;

use crate::authz::AuthzError;

/// INVALID_ARGUMENT as `field: reason`.
pub fn invalid(field: impl Display, reason: impl Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// No decision could be made: the caller must not take this as an allow or a deny. Too many
/// callers already waiting for a revision is RESOURCE_EXHAUSTED (retry later); the rest is
/// UNAVAILABLE.
impl From<AuthzError> for Status {
    fn from(error: AuthzError) -> Status {
        match error {
            AuthzError::Overloaded { .. } => Status::resource_exhausted(error.to_string()),
            AuthzError::DeadlineExceeded { .. } => Status::deadline_exceeded(error.to_string()),
            AuthzError::TooManyWaiting => Status::resource_exhausted(error.to_string()),
            AuthzError::NotLoaded
            | AuthzError::RevisionNotReached { .. }
            | AuthzError::Stale { .. }
            | AuthzError::NonceStoreUnavailable(_) => Status::unavailable(error.to_string()),
        }
    }
}

/// Maps an admin error for a request whose allowlist entries (if any) are the field `entries`.
pub fn admin(error: AdminError) -> Status {
    admin_status(error, "entries")
}

/// Maps an admin error for a request whose allowlist entries are the field `entries_field`
/// (`entries`, or `allowlist` on CreateKey).
pub fn admin_status(error: AdminError, entries_field: &str) -> Status {
    match error {
        AdminError::Invalid { field, problem } => {
            let reason = match problem {
                Problem::Message(text) => text,
                Problem::Duplicates { cidr, first } => {
                    format!("{cidr} duplicates {entries_field}[{first}]")
                }
            };
            invalid(field_name(field, entries_field), reason)
        }
        AdminError::NothingToChange => Status::invalid_argument(error.to_string()),
        AdminError::NotFound(what) => Status::not_found(format!("{what} not found")),
        AdminError::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
        AdminError::FailedPrecondition(message) => Status::failed_precondition(message),
        AdminError::StoreUnavailable(message) => {
            tracing::warn!(%message, "store unavailable");
            Status::unavailable(format!("store unavailable: {message}"))
        }
        AdminError::DecisionUnavailable(message) => Status::unavailable(message),
        AdminError::Internal(message) => {
            tracing::error!(%message, "admin request failed");
            Status::internal("internal error; see the server log")
        }
    }
}

/// The proto field an admin error points at.
fn field_name(field: Field, entries_field: &str) -> String {
    match field {
        Field::ExpiresAt => "expires_at".into(),
        Field::PublicKey => "public_key".into(),
        Field::GracePeriod => "grace_period_seconds".into(),
        Field::Entries => entries_field.into(),
        Field::Entry { index, part } => format!("{entries_field}[{index}].{}", part.as_str()),
        Field::Removals => "cidrs".into(),
        Field::Removal { index } => format!("cidrs[{index}]"),
        Field::PageSize => "page_size".into(),
        Field::PageToken => "page_token".into(),
        Field::Limit => "limit".into(),
        Field::Since => "since".into(),
    }
}

#[cfg(test)]
mod tests {
    use keyfence_admin::error::EntryPart;
    use keyfence_store::StoreError;
    use tonic::Code;

    use super::*;

    #[test]
    fn each_admin_error_has_its_status() {
        let cases = [
            (
                AdminError::from(StoreError::NotFound("key key_x".into())),
                Code::NotFound,
            ),
            (
                AdminError::invalid(Field::Removal { index: 0 }, "x"),
                Code::InvalidArgument,
            ),
            (
                AdminError::from(StoreError::AlreadyExists("key k".into())),
                Code::AlreadyExists,
            ),
            (
                AdminError::from(StoreError::FailedPrecondition("revoked".into())),
                Code::FailedPrecondition,
            ),
            (
                AdminError::from(StoreError::Unavailable("down".into())),
                Code::Unavailable,
            ),
            (
                AdminError::from(StoreError::Corrupt("secret detail".into())),
                Code::Internal,
            ),
            (AdminError::NothingToChange, Code::InvalidArgument),
            (
                AdminError::DecisionUnavailable("policy not loaded yet".into()),
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            let status = admin(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret detail"));
        }
        assert_eq!(
            invalid("entries[2].cidr", "bad").message(),
            "entries[2].cidr: bad"
        );
    }

    #[test]
    fn the_edge_names_the_field_the_admin_layer_points_at() {
        let duplicate = || AdminError::Invalid {
            field: Field::Entry {
                index: 1,
                part: EntryPart::Cidr,
            },
            problem: Problem::Duplicates {
                cidr: "198.51.100.0/24".parse().unwrap(),
                first: 0,
            },
        };
        assert_eq!(
            admin(duplicate()).message(),
            "entries[1].cidr: 198.51.100.0/24 duplicates entries[0]"
        );
        assert_eq!(
            admin_status(duplicate(), "allowlist").message(),
            "allowlist[1].cidr: 198.51.100.0/24 duplicates allowlist[0]"
        );
        let removal = AdminError::invalid(
            Field::Removal { index: 1 },
            "203.0.113.0/24 is not on this allowlist",
        );
        assert_eq!(
            admin(removal).message(),
            "cidrs[1]: 203.0.113.0/24 is not on this allowlist"
        );
    }
}
