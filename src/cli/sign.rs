//! `keyfence sign`: signs a request as a partner must, with no server. It prints the headers to
//! send (or a curl command line) and, with `--explain`, the exact canonical string and its bytes,
//! so that a partner can compare them with what their own code signs. The signing secret or
//! private key is read from a file and never printed.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use keyfence_policy::{clock::Clock, random::RandomSource};
use sha2::{Digest, Sha256};

use super::CliError;
use crate::{
    grpc::decision_io::MAX_NONCE_BYTES,
    signing::{PartnerKey, RequestToSign, Signed},
    system::{OsRandom, SystemClock},
};

/// Random nonce length: 32 characters of `[a-z0-9]`, about 165 bits.
const NONCE_LEN: usize = 32;

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// File holding the API key (as `keys create --secret-file` writes it).
    #[arg(long)]
    key_file: PathBuf,
    /// File holding the HMAC signing secret, base64 as keyfence issued it
    /// (`keys create --signing-secret-file`).
    #[arg(long, required_unless_present = "private_key_file")]
    secret_file: Option<PathBuf>,
    /// File holding the Ed25519 private key, PKCS#8 PEM (`keys create --private-key-out`).
    #[arg(long, conflicts_with = "secret_file")]
    private_key_file: Option<PathBuf>,
    /// The HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The path with its query, exactly as it goes on the wire (/v1/orders?limit=10).
    #[arg(long)]
    path: String,
    /// File with the request body; `-` reads it from stdin. Without it the body is empty.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Unix seconds to sign with (default: now).
    #[arg(long, allow_hyphen_values = true)]
    timestamp: Option<i64>,
    /// The nonce to sign with (default: 32 fresh random characters); `--nonce ''` signs without
    /// one, which gives up replay protection.
    #[arg(long)]
    nonce: Option<String>,
    /// What to print: the headers, or a curl command line.
    #[arg(long, value_enum, default_value = "headers")]
    format: Format,
    /// Scheme and host the curl command calls (https://api.example.com); for --format curl.
    #[arg(long, required_if_eq("format", "curl"))]
    base_url: Option<String>,
    /// Also print, on stderr, the canonical string and its bytes in hex (never the secret).
    #[arg(long)]
    explain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `name: value` lines.
    Headers,
    /// A curl command line.
    Curl,
}

/// Where the body came from, for the curl command.
enum BodySource<'a> {
    None,
    File(&'a Path),
    Stdin,
}

pub fn run(args: SignArgs) -> Result<(), CliError> {
    let api_key = read_text(&args.key_file)?.trim().to_owned();
    if api_key.is_empty() {
        return Err(input(&args.key_file, "is empty; expected the API key"));
    }
    let key = match (&args.secret_file, &args.private_key_file) {
        (Some(path), _) => PartnerKey::hmac_from_text(&read_text(path)?),
        (None, Some(path)) => PartnerKey::ed25519_from_pem(&read_text(path)?),
        (None, None) => unreachable!("clap requires --secret-file or --private-key-file"),
    }
    .map_err(|error| {
        let path = args.secret_file.as_ref().or(args.private_key_file.as_ref());
        input(path.expect("one of them"), &error.to_string())
    })?;
    check_method(&args.method)?;
    check_path(&args.path)?;
    let nonce = match args.nonce {
        Some(nonce) => {
            check_nonce(&nonce)?;
            nonce
        }
        None => OsRandom.token(NONCE_LEN),
    };
    let timestamp = args
        .timestamp
        .unwrap_or_else(|| SystemClock.now().as_secs());
    let (body, source) = match &args.body_file {
        None => (Vec::new(), BodySource::None),
        Some(path) if path.as_os_str() == "-" => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(CliError::file("read the body from", Path::new("stdin")))?;
            (body, BodySource::Stdin)
        }
        Some(path) => (
            std::fs::read(path).map_err(|e| input(path, &e.to_string()))?,
            BodySource::File(path),
        ),
    };
    let request = RequestToSign {
        timestamp,
        nonce: &nonce,
        method: &args.method,
        path: &args.path,
        body: &body,
    };
    let signed = key.sign(&request);
    let headers = headers(&api_key, &request, &signed);
    match args.format {
        Format::Headers => {
            for (name, value) in &headers {
                println!("{name}: {value}");
            }
        }
        Format::Curl => {
            let base_url = args.base_url.as_deref().expect("clap requires --base-url");
            println!("{}", curl(base_url, &request, &headers, &source)?);
        }
    }
    if args.explain {
        eprint!("{}", explain(&key, &request, &signed));
    }
    Ok(())
}

fn input(path: &Path, problem: &str) -> CliError {
    CliError::Input(format!("{}: {problem}", path.display()))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| input(path, &e.to_string()))
}

/// An HTTP method is a token; anything else would not reach the server as signed.
fn check_method(method: &str) -> Result<(), CliError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if method.is_empty() || !method.bytes().all(token) {
        return Err(CliError::Input(format!(
            "--method {method:?} is not an HTTP method"
        )));
    }
    Ok(())
}

/// Envoy signs over the path it receives, so a URL or a path without its leading `/` can never
/// verify: refuse it here rather than print a signature that will be denied.
fn check_path(path: &str) -> Result<(), CliError> {
    if !path.starts_with('/') {
        return Err(CliError::Input(format!(
            "--path {path:?}: give the path with its query as sent, starting with / \
             (/v1/orders?limit=10), not a URL"
        )));
    }
    if path.contains('#') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CliError::Input(format!(
            "--path {path:?}: a fragment (#), whitespace or control characters never reach the \
             server as written; percent-encode them"
        )));
    }
    Ok(())
}

/// The server trims header values and refuses nonces over [`MAX_NONCE_BYTES`].
fn check_nonce(nonce: &str) -> Result<(), CliError> {
    if nonce.len() > MAX_NONCE_BYTES {
        return Err(CliError::Input(format!(
            "--nonce is {} bytes; the server accepts at most {MAX_NONCE_BYTES}",
            nonce.len()
        )));
    }
    if !nonce.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::Input(
            "--nonce must be printable ASCII without spaces: it travels as a header value".into(),
        ));
    }
    Ok(())
}

/// The headers to send, in order; `x-nonce` only when there is one.
fn headers(
    api_key: &str,
    request: &RequestToSign<'_>,
    signed: &Signed,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("x-api-key", api_key.to_owned()),
        ("x-signature", signed.signature.clone()),
        ("x-timestamp", request.timestamp.to_string()),
    ];
    if !request.nonce.is_empty() {
        headers.push(("x-nonce", request.nonce.to_owned()));
    }
    headers
}

/// A curl command line that sends exactly what was signed: `--path-as-is` keeps curl from
/// resolving `/../` and `/./`, `--globoff` from reading `[]{}` as patterns.
fn curl(
    base_url: &str,
    request: &RequestToSign<'_>,
    headers: &[(&'static str, String)],
    source: &BodySource<'_>,
) -> Result<String, CliError> {
    let url = format!("{}{}", base_url.trim_end_matches('/'), request.path);
    let mut words = vec![
        "curl".to_owned(),
        "--include".into(),
        "--silent".into(),
        "--show-error".into(),
        "--globoff".into(),
        "--path-as-is".into(),
        "--request".into(),
        shell_quote(&request.method.to_ascii_uppercase()),
        shell_quote(&url),
    ];
    for (name, value) in headers {
        words.push("--header".into());
        words.push(shell_quote(&format!("{name}: {value}")));
    }
    match source {
        BodySource::None => {}
        BodySource::File(path) => {
            words.push("--data-binary".into());
            words.push(shell_quote(&format!("@{}", path.display())));
        }
        BodySource::Stdin => {
            let text = std::str::from_utf8(request.body)
                .ok()
                .filter(|text| !text.contains('\0'))
                .ok_or_else(|| {
                    CliError::Input(
                        "a binary body from stdin cannot go on a command line; \
                         use --body-file FILE with --format curl"
                            .into(),
                    )
                })?;
            words.push("--data-binary".into());
            words.push(shell_quote(text));
        }
    }
    Ok(words.join(" "))
}

/// Single-quoted for POSIX shells.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The canonical string line by line, exactly, and as hex: what a partner compares with theirs.
fn explain(key: &PartnerKey, request: &RequestToSign<'_>, signed: &Signed) -> String {
    let canonical = String::from_utf8_lossy(&signed.canonical);
    let body_hash = hex::encode(Sha256::digest(request.body));
    let mut out = String::new();
    out.push_str(&format!(
        "canonical string: 5 lines joined by \\n, no trailing newline, {} bytes of UTF-8\n",
        signed.canonical.len()
    ));
    let labels = [
        "timestamp",
        "nonce",
        "METHOD",
        "path_and_query",
        "hex(sha256(body))",
    ];
    for (label, line) in labels.iter().zip(canonical.split('\n')) {
        out.push_str(&format!("  {label:<18} {line:?}\n"));
    }
    out.push_str(&format!(
        "body: {} bytes, sha256 {body_hash}\n",
        request.body.len()
    ));
    out.push_str(
        "canonical string, exactly (between the markers):\n-----BEGIN CANONICAL STRING-----\n",
    );
    out.push_str(&canonical);
    out.push_str("\n-----END CANONICAL STRING-----\n");
    out.push_str(&format!(
        "canonical string bytes, hex:\n{}\n",
        hex::encode(&signed.canonical)
    ));
    out.push_str(&format!(
        "signature: {} over those bytes, base64: {}\n",
        key.scheme(),
        signed.signature
    ));
    if request.nonce.is_empty() {
        out.push_str("note: no nonce: this request can be replayed within the timestamp window\n");
    }
    out
}
