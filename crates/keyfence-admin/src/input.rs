//! Limits and checks on admin input that every surface applies the same way. An edge parses its
//! wire format, calls these for the values it hands to a command, and names the field itself when
//! one fails: the reason comes from here, so gRPC, REST and the console say the same thing.

/// The longest key name.
pub const MAX_NAME_CHARS: usize = 128;
/// The longest allowlist entry description.
pub const MAX_DESCRIPTION_CHARS: usize = 512;
/// The longest rotation grace period accepted.
pub const MAX_GRACE_SECS: u32 = 30 * 24 * 3600;
/// Keys or access records per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most keys or access records one page may hold.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A list of entries (or removals) of one request, against the deployment's bound. One request
/// holds the whole list several times over while it is decoded, checked, stored and compiled, so
/// the bound is on the request; a larger list is built by several. `Err` is the reason.
pub fn entry_count(count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!(
            "holds {count} entries, more than the {max} one request may carry \
             (admin_max_entries_per_request); send them in several requests"
        ));
    }
    Ok(())
}

/// Free text (a name, a description): no control characters, at most `max_chars` characters,
/// and not blank when `required`. `Err` is the reason.
pub fn text(value: String, max_chars: usize, required: bool) -> Result<String, String> {
    if required && value.trim().is_empty() {
        return Err("is empty".into());
    }
    if value.chars().count() > max_chars {
        return Err(format!("is longer than {max_chars} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("contains control characters".into());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_counts_are_bounded() {
        assert!(entry_count(3, 3).is_ok());
        assert_eq!(
            entry_count(4, 3).unwrap_err(),
            "holds 4 entries, more than the 3 one request may carry \
             (admin_max_entries_per_request); send them in several requests"
        );
    }

    #[test]
    fn text_is_bounded_and_printable() {
        assert_eq!(text("ok".into(), 2, true).unwrap(), "ok");
        assert_eq!(text(" ".into(), 2, true).unwrap_err(), "is empty");
        assert_eq!(text(String::new(), 2, false).unwrap(), "");
        assert_eq!(
            text("abc".into(), 2, false).unwrap_err(),
            "is longer than 2 characters"
        );
        assert_eq!(
            text("a\nb".into(), 9, false).unwrap_err(),
            "contains control characters"
        );
    }
}
