//! Quoting what a caller sent inside an error message, without echoing all of it.
//!
//! Errors name the bad input so that people can find it, but an error that repeats a megabyte of
//! input is an amplifier (a 1 MB grpc-message, a 1 MB log line). Every message that quotes input
//! quotes at most [`MAX_EXCERPT_CHARS`] characters of it, escaped.

/// The most characters of caller input an error message quotes.
pub const MAX_EXCERPT_CHARS: usize = 48;

/// `text` quoted and escaped (`"10.0.0.1/33"`), cut to [`MAX_EXCERPT_CHARS`] characters with the
/// full length said when longer (`"aaaa…" (1048576 bytes)`).
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(MAX_EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => {
            let quoted = format!("{:?}", &text[..cut]);
            let open = &quoted[..quoted.len() - 1];
            format!("{open}…\" ({} bytes)", text.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(excerpt("10.0.0.1/33"), "\"10.0.0.1/33\"");
        assert_eq!(excerpt("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn long_input_is_cut_and_its_length_said() {
        let long = "é".repeat(1 << 20);
        let quoted = excerpt(&long);
        assert!(quoted.chars().count() < MAX_EXCERPT_CHARS + 30, "{quoted}");
        assert!(
            quoted.ends_with(&format!("…\" ({} bytes)", long.len())),
            "{quoted}"
        );
        assert!(quoted.starts_with("\"éé"));
    }
}
