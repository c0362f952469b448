//! Who calls the admin layer. The edge authenticates the caller and hands in a [`Principal`];
//! every command records it in the audit fields it writes, so the audit trail names whoever the
//! edge vouched for and nothing a caller merely claimed.

use std::fmt;

/// An authenticated caller of the admin layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: String,
}

impl Principal {
    pub fn new(name: impl Into<String>) -> Principal {
        Principal { name: name.into() }
    }

    /// The name recorded in `created_by`, `updated_by` and `added_by`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}
