//! Quoting what a caller sent inside an error message, without echoing all of it.
//!
//! Errors name the bad input so that people can find it, but an error that repeats a megabyte of
//! input is an amplifier (a 1 MB grpc-message, a 1 MB log line). Every message that quotes input
//! quotes at most [`MAX_EXCERPT_CHARS`] characters of it, escaped.

/// The most characters an excerpt quotes, counted as printed (escapes included), so that input
/// of control characters, each printed as `\u{1b}`, cannot make it longer.
pub const MAX_EXCERPT_CHARS: usize = 48;

/// `text` quoted and escaped (`"10.0.0.1/33"`), cut to [`MAX_EXCERPT_CHARS`] printed characters
/// with the full length said when longer (`"aaaa…" (1048576 bytes)`).
pub fn excerpt(text: &str) -> String {
    let mut quoted = String::from("\"");
    let mut printed = 0;
    for (at, character) in text.char_indices() {
        let escaped = format!("{:?}", &text[at..at + character.len_utf8()]);
        let escaped = &escaped[1..escaped.len() - 1];
        printed += escaped.chars().count();
        if printed > MAX_EXCERPT_CHARS {
            return format!("{quoted}…\" ({} bytes)", text.len());
        }
        quoted.push_str(escaped);
    }
    quoted.push('"');
    quoted
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
    fn escapes_count_against_the_bound() {
        let controls = "\u{1b}".repeat(40);
        let quoted = excerpt(&controls);
        assert!(quoted.chars().count() < MAX_EXCERPT_CHARS + 20, "{quoted}");
        assert!(quoted.starts_with("\"\\u{1b}"), "{quoted}");
        assert!(quoted.ends_with("…\" (40 bytes)"), "{quoted}");
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
