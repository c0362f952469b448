//! What an admin command can answer instead of a result. Errors say *which* input was at fault by
//! position ([`Field`]): an entry's index, never a wire name such as `entries[3].cidr` or
//! `allowedIps[3]`, which each edge derives in its one status table.

use std::fmt;

use keyfence_policy::ip::Cidr;
use keyfence_store::StoreError;

use crate::rules::RuleViolation;

/// The input a command refused, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The key's own expiry.
    ExpiresAt,
    /// An Ed25519 public key.
    PublicKey,
    /// A rotation's grace period.
    GracePeriod,
    /// The request's allowlist entries as a whole.
    Entries,
    /// One of the request's allowlist entries.
    Entry {
        index: usize,
        part: EntryPart,
    },
    /// The networks a removal names, as a whole.
    Removals,
    /// One network a removal names.
    Removal {
        index: usize,
    },
    PageSize,
    PageToken,
    /// How many access records to list.
    Limit,
    /// The start of an access-log time range.
    Since,
}

/// Which part of an allowlist entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPart {
    Cidr,
    Description,
    ExpiresAt,
}

impl EntryPart {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryPart::Cidr => "cidr",
            EntryPart::Description => "description",
            EntryPart::ExpiresAt => "expires_at",
        }
    }
}

/// What is wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Message(String),
    /// The entry names the same network as the request's entry `first`.
    Duplicates {
        cidr: Cidr,
        first: usize,
    },
}

impl Problem {
    pub fn message(text: impl Into<String>) -> Problem {
        Problem::Message(text.into())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Message(text) => f.write_str(text),
            Problem::Duplicates { cidr, first } => write!(f, "{cidr} duplicates entry {first}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input: the edge names the field and answers INVALID_ARGUMENT (HTTP 400).
    #[error("{field:?}: {problem}")]
    Invalid { field: Field, problem: Problem },
    #[error("no field to change was given")]
    NothingToChange,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The target's state forbids the edit (a revoked key).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store cannot be reached; the caller may retry.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// No decision can be made (policy not loaded, stale, nonce store down).
    #[error("{0}")]
    DecisionUnavailable(String),
    /// A bug or damaged data: logged at the edge, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AdminError {
    pub fn invalid(field: Field, problem: impl Into<String>) -> AdminError {
        AdminError::Invalid {
            field,
            problem: Problem::Message(problem.into()),
        }
    }
}

impl From<RuleViolation> for AdminError {
    fn from(violation: RuleViolation) -> AdminError {
        match violation {
            RuleViolation::DuplicateEntry { index, first, cidr } => AdminError::Invalid {
                field: Field::Entry {
                    index,
                    part: EntryPart::Cidr,
                },
                problem: Problem::Duplicates { cidr, first },
            },
            RuleViolation::NotListed { index, cidr } => AdminError::invalid(
                Field::Removal { index },
                format!("{cidr} is not on this allowlist"),
            ),
            RuleViolation::NamedTwice { index, cidr } => {
                AdminError::invalid(Field::Removal { index }, format!("{cidr} is named twice"))
            }
            revoked @ RuleViolation::Revoked(_) => {
                AdminError::FailedPrecondition(revoked.to_string())
            }
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> AdminError {
        match error {
            StoreError::NotFound(what) => AdminError::NotFound(what),
            StoreError::AlreadyExists(what) => AdminError::AlreadyExists(what),
            StoreError::FailedPrecondition(message) => AdminError::FailedPrecondition(message),
            StoreError::ForeignPageToken => {
                AdminError::invalid(Field::PageToken, StoreError::ForeignPageToken.to_string())
            }
            StoreError::Unavailable(message) => AdminError::StoreUnavailable(message),
            StoreError::Corrupt(message) => {
                AdminError::Internal(format!("store data is corrupt: {message}"))
            }
            refused @ StoreError::Refused { .. } => AdminError::Internal(refused.to_string()),
            StoreError::Rejected(cause) => match cause.downcast::<RuleViolation>() {
                Ok(violation) => AdminError::from(*violation),
                Err(other) => {
                    AdminError::Internal(format!("edit rejected by an unknown rule: {other}"))
                }
            },
        }
    }
}

pub type AdminResult<T> = Result<T, AdminError>;
