//! Who is calling the admin plane. Transport-neutral, so that the gRPC Admin service, the REST
//! API and the console authenticate the same way and hand the admin layer the same [`Principal`].
//!
//! Authentication is never off. Callers prove themselves with a named bearer token or, on an
//! mTLS admin listener, with a client certificate (named by its subject CN, else its first DNS
//! SAN). Tokens are never kept in memory: only their SHA-256 digests, compared in constant time,
//! so neither a token's content nor its length leaks through timing. Where the tokens come from:
//! - `--admin-tokens-file`: one `NAME sha256:HEX` line per token (digests, not tokens), so one
//!   person's token can be rotated alone;
//! - `--admin-token`: one token, named `admin`;
//! - neither: `<data-dir>/admin.token`, generated (0600) on the first start; its token is named
//!   `admin`. The log names the file, never the token.
//!
//! Must not import: tonic, hyper or any other transport.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use keyfence_admin::Principal;
use keyfence_policy::random::RandomSource;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The name of the generated token and of `--admin-token`.
pub const DEFAULT_TOKEN_NAME: &str = "admin";
/// The file the generated token is written to, in the data directory.
pub const GENERATED_TOKEN_FILE: &str = "admin.token";
/// Characters of a generated token after its prefix (about 248 bits).
const GENERATED_TOKEN_CHARS: usize = 48;
/// The shortest token accepted from the configuration.
pub const MIN_TOKEN_CHARS: usize = 16;
/// The longest caller-supplied actor detail recorded after the principal.
pub const MAX_ACTOR_CHARS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    TokensFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Why a caller was refused. The message is safe to send: it never contains a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing credentials: send authorization: Bearer <token> or use a client certificate")]
    Missing,
    #[error("invalid bearer token")]
    InvalidToken,
    #[error("x-keyfence-actor: {0}")]
    BadActor(String),
}

/// A named token digest.
#[derive(Clone)]
struct NamedDigest {
    name: String,
    digest: [u8; 32],
}

/// The admin plane's credentials.
#[derive(Clone)]
pub struct AdminCredentials {
    tokens: Vec<NamedDigest>,
    /// Whether a verified client certificate authenticates (mTLS admin listener).
    accept_client_certificates: bool,
}

/// Where the token the server accepts came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    TokensFile(PathBuf),
    Configured,
    /// The generated token's file, and whether this start created it.
    Generated {
        path: PathBuf,
        created: bool,
    },
}

impl std::fmt::Debug for AdminCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("AdminCredentials")
            .field("token_names", &names)
            .field(
                "accept_client_certificates",
                &self.accept_client_certificates,
            )
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// The line of a tokens file that accepts `token` under `name`.
pub fn tokens_file_line(name: &str, token: &str) -> Result<String, AuthnError> {
    if !valid_name(name) {
        return Err(AuthnError::Invalid(format!(
            "token name {name:?} may contain only ASCII letters, digits, '.', '_', '-' and '@' (at most 64)"
        )));
    }
    Ok(format!("{name} sha256:{}", hex::encode(digest(token))))
}

/// A fresh admin token.
pub fn generate_token(random: &dyn RandomSource) -> String {
    format!("kfadm_{}", random.token(GENERATED_TOKEN_CHARS))
}

fn parse_tokens_file(path: &Path, text: &str) -> Result<Vec<NamedDigest>, AuthnError> {
    let mut tokens: Vec<NamedDigest> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| AuthnError::TokensFile {
            path: path.to_owned(),
            line: index + 1,
            reason,
        };
        let (name, value) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("expected `NAME sha256:HEX`".into()))?;
        if !valid_name(name) {
            return Err(bad(format!(
                "name {name:?} may contain only ASCII letters, digits, '.', '_', '-' and '@'"
            )));
        }
        let hex_digest = value
            .trim()
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("the digest must start with sha256:".into()))?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest, &mut digest)
            .map_err(|_| bad("the digest must be 64 hex digits".into()))?;
        if tokens.iter().any(|t| t.name == name) {
            return Err(bad(format!("name {name:?} appears twice")));
        }
        tokens.push(NamedDigest {
            name: name.to_owned(),
            digest,
        });
    }
    if tokens.is_empty() {
        return Err(AuthnError::Invalid(format!(
            "{}: holds no token; add a `NAME sha256:HEX` line (keyfence admin-token new prints one)",
            path.display()
        )));
    }
    Ok(tokens)
}

/// Writes `contents` to a new file readable by its owner only.
pub fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}

/// Where a caller-presented token is read from, for the CLI: the variable, then a file named by
/// flag or variable, then `./keyfence-data/admin.token`.
pub fn read_token_file(path: &Path) -> Result<String, AuthnError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthnError::Io {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AuthnError::Invalid(format!("{}: is empty", path.display())));
    }
    Ok(token.to_owned())
}

/// What the configuration says about admin credentials.
pub struct CredentialSettings<'a> {
    pub tokens_file: Option<&'a Path>,
    pub token: Option<&'a str>,
    pub data_dir: &'a Path,
    pub accept_client_certificates: bool,
}

impl AdminCredentials {
    /// Loads the configured tokens, or reads (generating on the first start) the data
    /// directory's `admin.token`.
    pub fn load(
        settings: CredentialSettings<'_>,
        random: &dyn RandomSource,
    ) -> Result<(AdminCredentials, TokenSource), AuthnError> {
        let CredentialSettings {
            tokens_file,
            token,
            data_dir,
            accept_client_certificates,
        } = settings;
        let mut tokens = Vec::new();
        let mut source = None;
        if let Some(path) = tokens_file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthnError::Io {
                path: path.to_owned(),
                source,
            })?;
            tokens = parse_tokens_file(path, &text)?;
            source = Some(TokenSource::TokensFile(path.to_owned()));
        }
        if let Some(token) = token {
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(AuthnError::Invalid(format!(
                    "admin_token: must be at least {MIN_TOKEN_CHARS} characters"
                )));
            }
            if tokens.iter().any(|t| t.name == DEFAULT_TOKEN_NAME) {
                return Err(AuthnError::Invalid(format!(
                    "admin_token: the tokens file already names a token {DEFAULT_TOKEN_NAME:?}"
                )));
            }
            tokens.push(NamedDigest {
                name: DEFAULT_TOKEN_NAME.into(),
                digest: digest(token),
            });
            source.get_or_insert(TokenSource::Configured);
        }
        let source = match source {
            Some(source) => source,
            None => {
                let path = data_dir.join(GENERATED_TOKEN_FILE);
                let created = !path.exists();
                if created {
                    let mut dir = std::fs::DirBuilder::new();
                    dir.recursive(true);
                    #[cfg(unix)]
                    std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
                    dir.create(data_dir).map_err(|source| AuthnError::Io {
                        path: data_dir.to_owned(),
                        source,
                    })?;
                    write_private_file(&path, &format!("{}\n", generate_token(random))).map_err(
                        |source| AuthnError::Io {
                            path: path.clone(),
                            source,
                        },
                    )?;
                }
                let token = read_token_file(&path)?;
                tokens.push(NamedDigest {
                    name: DEFAULT_TOKEN_NAME.into(),
                    digest: digest(&token),
                });
                TokenSource::Generated { path, created }
            }
        };
        Ok((
            AdminCredentials {
                tokens,
                accept_client_certificates,
            },
            source,
        ))
    }

    /// The principal behind a bearer token or a verified client certificate identity. A token
    /// that is presented must be valid: a certificate never excuses a wrong token.
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
        certificate_identity: Option<&str>,
    ) -> Result<Principal, Refusal> {
        if let Some(token) = bearer {
            let presented = digest(token);
            // Every digest is compared, whatever matches: the time taken does not depend on
            // which token (if any) was presented.
            let mut found: Option<&NamedDigest> = None;
            for candidate in &self.tokens {
                if bool::from(candidate.digest.ct_eq(&presented)) {
                    found = Some(candidate);
                }
            }
            return found
                .map(|t| Principal::new(t.name.clone()))
                .ok_or(Refusal::InvalidToken);
        }
        match certificate_identity {
            Some(identity) if self.accept_client_certificates => Ok(Principal::new(identity)),
            _ => Err(Refusal::Missing),
        }
    }
}

/// What the audit fields record: the principal, then the caller's own detail after a `/`
/// (`ops/alice`). The detail can add to the principal, never replace it.
pub fn with_actor_detail(principal: Principal, actor: Option<&str>) -> Result<Principal, Refusal> {
    let Some(actor) = actor else {
        return Ok(principal);
    };
    if actor.is_empty() || actor.chars().count() > MAX_ACTOR_CHARS {
        return Err(Refusal::BadActor(format!(
            "must be 1 to {MAX_ACTOR_CHARS} characters"
        )));
    }
    if !actor.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(Refusal::BadActor("must be printable ASCII".into()));
    }
    Ok(Principal::new(format!("{}/{actor}", principal.name())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::OsRandom;

    fn settings<'a>(dir: &'a Path) -> CredentialSettings<'a> {
        CredentialSettings {
            tokens_file: None,
            token: None,
            data_dir: dir,
            accept_client_certificates: false,
        }
    }

    #[test]
    fn the_first_start_generates_a_private_token_and_later_starts_reuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (credentials, source) = AdminCredentials::load(settings(&data), &OsRandom).unwrap();
        let path = data.join(GENERATED_TOKEN_FILE);
        assert_eq!(
            source,
            TokenSource::Generated {
                path: path.clone(),
                created: true
            }
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let token = read_token_file(&path).unwrap();
        assert!(token.starts_with("kfadm_") && token.len() == 6 + GENERATED_TOKEN_CHARS);
        assert_eq!(
            credentials.authenticate(Some(&token), None).unwrap().name(),
            "admin"
        );
        assert_eq!(
            credentials.authenticate(Some("kfadm_wrong"), None),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(credentials.authenticate(None, None), Err(Refusal::Missing));

        let (again, source) = AdminCredentials::load(settings(&data), &OsRandom).unwrap();
        assert!(matches!(
            source,
            TokenSource::Generated { created: false, .. }
        ));
        assert!(again.authenticate(Some(&token), None).is_ok());
    }

    #[test]
    fn named_digests_authenticate_each_token_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        let text = format!(
            "# ops team\n{}\n\n{}\n",
            tokens_file_line("ops", "ops-token-0123456789").unwrap(),
            tokens_file_line("ci.bot", "ci-token-0123456789").unwrap()
        );
        std::fs::write(&file, &text).unwrap();
        assert!(!text.contains("ops-token-0123456789"), "digests only");
        let (credentials, _) = AdminCredentials::load(
            CredentialSettings {
                tokens_file: Some(&file),
                ..settings(dir.path())
            },
            &OsRandom,
        )
        .unwrap();
        let name = |token| {
            credentials
                .authenticate(Some(token), None)
                .map(|p| p.name().to_owned())
        };
        assert_eq!(name("ops-token-0123456789").unwrap(), "ops");
        assert_eq!(name("ci-token-0123456789").unwrap(), "ci.bot");
        assert_eq!(name("ops-token-012345678"), Err(Refusal::InvalidToken));
        assert!(!dir.path().join(GENERATED_TOKEN_FILE).exists());
    }

    #[test]
    fn bad_tokens_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        for (text, expected) in [
            (
                "ops sha256:abcd\n",
                "line 1: the digest must be 64 hex digits",
            ),
            (
                "# c\nops deadbeef\n",
                "line 2: the digest must start with sha256:",
            ),
            ("ops\n", "line 1: expected `NAME sha256:HEX`"),
            ("# nothing\n", "holds no token"),
        ] {
            std::fs::write(&file, text).unwrap();
            let error = AdminCredentials::load(
                CredentialSettings {
                    tokens_file: Some(&file),
                    ..settings(dir.path())
                },
                &OsRandom,
            )
            .err()
            .unwrap()
            .to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn certificates_authenticate_only_on_an_mtls_listener_and_never_excuse_a_bad_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = settings(dir.path());
        config.token = Some("a-configured-token-123");
        let (plain, _) = AdminCredentials::load(config, &OsRandom).unwrap();
        assert_eq!(
            plain.authenticate(None, Some("alice")),
            Err(Refusal::Missing)
        );
        let mut config = settings(dir.path());
        config.token = Some("a-configured-token-123");
        config.accept_client_certificates = true;
        let (mtls, _) = AdminCredentials::load(config, &OsRandom).unwrap();
        assert_eq!(
            mtls.authenticate(None, Some("alice")).unwrap().name(),
            "alice"
        );
        assert_eq!(
            mtls.authenticate(Some("wrong"), Some("alice")),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(
            mtls.authenticate(Some("a-configured-token-123"), Some("alice"))
                .unwrap()
                .name(),
            "admin"
        );
    }

    #[test]
    fn the_actor_adds_detail_after_the_principal_and_never_replaces_it() {
        let principal = Principal::new("ops");
        assert_eq!(
            with_actor_detail(principal.clone(), None).unwrap().name(),
            "ops"
        );
        assert_eq!(
            with_actor_detail(principal.clone(), Some("alice"))
                .unwrap()
                .name(),
            "ops/alice"
        );
        assert!(with_actor_detail(principal.clone(), Some("")).is_err());
        assert!(with_actor_detail(principal, Some("a\u{7f}")).is_err());
    }
}
