//! Sealing stored records: HMAC signing secrets encrypted, every record authenticated.
//!
//! A [`Keyring`] holds one or more named 256-bit keys (the key-encryption keys). The first, the
//! primary, seals; every key opens. From each key two subkeys are derived with HKDF-SHA256 under
//! distinct labels: one for ChaCha20-Poly1305, which encrypts a key record's HMAC secret, and one
//! for HMAC-SHA256, which authenticates the whole stored value (key records, allowlists and the
//! store's sealing marker). A stored value is `kf1.<key id>.<mac>.<JSON body>`:
//! - the body is the record's JSON with `signature.secret` replaced by `signature.sealed_secret`
//!   (base64 of nonce, ciphertext and tag; the AAD names the API key and the keyring key), so
//!   the record stays readable to an operator but its secret does not;
//! - the MAC covers a version label, the value's location (`key/<id>`, `list/key/<id>`,
//!   `list/partner/<partner>/<env>`, `meta/sealing`), the keyring key id and the body, so a
//!   value edited in place, or moved to another key, fails to open.
//!
//! A value that fails to open is *refused* ([`StoreError::Refused`]): the caller treats the record
//! as unusable (a key is denied, a partner list contributes nothing), logs it and counts it. It is
//! never trusted and never re-sealed. Values in clear (written before sealing existed) are read
//! only while a store migrates them, once, at start (see `migrating` on [`Codec`]).
//!
//! Invariant: key material appears in no `Debug` output, error or log; [`Keyring::to_file_text`]
//! is the only way out, for writing the key file.
//! Invariant: the policy model never sees any of this: a [`KeyRecord`] in memory keeps its plain
//! secret; only stored bytes are sealed.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, RwLock},
};

use base64::{
    Engine as _, engine::general_purpose::STANDARD, engine::general_purpose::URL_SAFE_NO_PAD,
};
use ring::{
    aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hkdf, hmac,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use zeroize::Zeroizing;

use keyfence_policy::model::{AllowlistEntry, KeyId, KeyRecord, Scope};

use super::{StoreError, StoreResult};

/// The length of a keyring key, in bytes (256 bits).
pub const KEY_LEN: usize = 32;
const PREFIX: &str = "kf1.";
const HKDF_SALT: &[u8] = b"keyfence keyring v1";
const AEAD_LABEL: &[u8] = b"keyfence secret aead v1";
const MAC_LABEL: &[u8] = b"keyfence record mac v1";
const MAX_ID_LEN: usize = 32;

/// Why a key file or a keyring edit was refused. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("line {line}: expected `<id> <64 hex digits>`")]
    BadLine { line: usize },
    #[error("key id {0:?} must be 1 to 32 ASCII letters, digits, '-' or '_'")]
    BadId(String),
    #[error("key id {0:?} appears twice")]
    Duplicate(String),
    #[error("holds no key")]
    Empty,
    #[error("has no key {0:?}")]
    NoSuchKey(String),
    #[error("key {0:?} is the primary (it seals new records): promote another key first")]
    RemovingPrimary(String),
}

/// One named key-encryption key.
struct RingKey {
    id: String,
    secret: Zeroizing<[u8; KEY_LEN]>,
}

/// Named 256-bit keys; the first seals, every one opens.
pub struct Keyring {
    keys: Vec<RingKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}

fn check_id(id: &str) -> Result<(), KeyringError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(KeyringError::BadId(id.to_owned()))
    }
}

impl Keyring {
    /// A keyring of one key.
    pub fn single(id: &str, secret: [u8; KEY_LEN]) -> Result<Keyring, KeyringError> {
        check_id(id)?;
        Ok(Keyring {
            keys: vec![RingKey {
                id: id.to_owned(),
                secret: Zeroizing::new(secret),
            }],
        })
    }

    /// Reads a key file: one key a line, `<id> <64 hex digits>`; blank lines and `#` comments
    /// are skipped. The first key is the primary.
    pub fn parse(text: &str) -> Result<Keyring, KeyringError> {
        let mut keyring = Keyring { keys: Vec::new() };
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = KeyringError::BadLine { line: index + 1 };
            let mut parts = line.split_whitespace();
            let (Some(id), Some(hex_key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad);
            };
            let mut secret = Zeroizing::new([0u8; KEY_LEN]);
            hex::decode_to_slice(hex_key, &mut secret[..]).map_err(|_| bad)?;
            keyring.add(id, *secret)?;
        }
        if keyring.keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(keyring)
    }

    /// The key file's text (it holds the keys: write it 0600).
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut text = String::from(
            "# keyfence secrets keyring: one key a line, `<id> <64 hex digits>`.\n\
             # The first key seals new records (the primary); every key opens. Keep this file\n\
             # 0600 and identical on every replica; `keyfence secrets --help` edits it.\n",
        );
        for key in &self.keys {
            text.push_str(&key.id);
            text.push(' ');
            text.push_str(&hex::encode(&key.secret[..]));
            text.push('\n');
        }
        Zeroizing::new(text)
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    pub fn primary_id(&self) -> &str {
        &self.keys[0].id
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Adds a key that opens but does not seal (unless it is the only one).
    pub fn add(&mut self, id: &str, secret: [u8; KEY_LEN]) -> Result<(), KeyringError> {
        check_id(id)?;
        if self.contains(id) {
            return Err(KeyringError::Duplicate(id.to_owned()));
        }
        self.keys.push(RingKey {
            id: id.to_owned(),
            secret: Zeroizing::new(secret),
        });
        Ok(())
    }

    /// Makes `id` the primary: it seals from now on.
    pub fn promote(&mut self, id: &str) -> Result<(), KeyringError> {
        let at = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or_else(|| KeyringError::NoSuchKey(id.to_owned()))?;
        let key = self.keys.remove(at);
        self.keys.insert(0, key);
        Ok(())
    }

    /// Removes a key that no longer seals.
    pub fn remove(&mut self, id: &str) -> Result<(), KeyringError> {
        if self.primary_id() == id {
            return Err(KeyringError::RemovingPrimary(id.to_owned()));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        if self.keys.len() == before {
            return Err(KeyringError::NoSuchKey(id.to_owned()));
        }
        Ok(())
    }
}

/// The subkeys derived from one keyring key.
struct Derived {
    id: String,
    aead: LessSafeKey,
    mac: hmac::Key,
}

impl Derived {
    fn new(key: &RingKey) -> Derived {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&key.secret[..]);
        let aead_key: UnboundKey = prk
            .expand(&[AEAD_LABEL], &CHACHA20_POLY1305)
            .expect("32 bytes is a valid HKDF-SHA256 output length")
            .into();
        let mac: hmac::Key = prk
            .expand(&[MAC_LABEL], hmac::HMAC_SHA256)
            .expect("32 bytes is a valid HKDF-SHA256 output length")
            .into();
        Derived {
            id: key.id.clone(),
            aead: LessSafeKey::new(aead_key),
            mac,
        }
    }
}

/// The derived keys in use: the file's keys, primary first, then keys the file dropped that
/// stored records may still need until a re-seal pass has moved them to the primary.
struct Active {
    keys: Vec<Arc<Derived>>,
    /// How many of `keys`, from the front, are the file's.
    from_file: usize,
}

impl Active {
    fn find(&self, id: &str) -> Option<&Derived> {
        self.keys.iter().find(|k| k.id == id).map(|k| &**k)
    }
}

/// Seals and opens stored values with the current keyring. Shared by the store and by whatever
/// reloads the key file ([`Sealer::replace`]); readers never see half a keyring.
pub struct Sealer {
    active: RwLock<Arc<Active>>,
    random: SystemRandom,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("keys", &self.key_ids())
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(keyring: &Keyring) -> Arc<Sealer> {
        Arc::new(Sealer {
            active: RwLock::new(Arc::new(Active {
                keys: keyring
                    .keys
                    .iter()
                    .map(|k| Arc::new(Derived::new(k)))
                    .collect(),
                from_file: keyring.keys.len(),
            })),
            random: SystemRandom::new(),
        })
    }

    /// A sealer with one fresh random key, for tests and benchmarks.
    pub fn ephemeral() -> Arc<Sealer> {
        let mut secret = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the operating system's random generator failed");
        Sealer::new(&Keyring::single("ephemeral", secret).expect("a valid id"))
    }

    fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Switches to `keyring`. A key the old keyring had and `keyring` lacks keeps opening (never
    /// sealing) until [`Sealer::retire_unused`] learns no stored value needs it, so a key removed
    /// from the file before the re-seal pass finished loses nothing.
    pub fn replace(&self, keyring: &Keyring) {
        let mut guard = self
            .active
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut keys: Vec<Arc<Derived>> = keyring
            .keys
            .iter()
            .map(|k| Arc::new(Derived::new(k)))
            .collect();
        let from_file = keys.len();
        for old in &guard.keys {
            if !keyring.contains(&old.id) {
                keys.push(old.clone());
            }
        }
        *guard = Arc::new(Active { keys, from_file });
    }

    /// Forgets retired keys (dropped from the file) that no stored value is sealed under, given
    /// how many values each key id seals after a complete re-seal pass.
    pub fn retire_unused(&self, in_use: &BTreeMap<String, usize>) {
        let mut guard = self
            .active
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let from_file = guard.from_file;
        let keep = |(index, key): &(usize, &Arc<Derived>)| {
            *index < from_file || in_use.get(&key.id).is_some_and(|n| *n > 0)
        };
        if guard.keys.iter().enumerate().all(|entry| keep(&entry)) {
            return;
        }
        let keys = guard
            .keys
            .iter()
            .enumerate()
            .filter(keep)
            .map(|(_, key)| key.clone())
            .collect();
        *guard = Arc::new(Active { keys, from_file });
    }

    /// The primary's id, then the other keys that open, retired ones included.
    pub fn key_ids(&self) -> Vec<String> {
        self.active().keys.iter().map(|k| k.id.clone()).collect()
    }

    pub fn primary_id(&self) -> String {
        self.active().keys[0].id.clone()
    }

    fn mac_input(location: &str, kid: &str, body: &[u8]) -> Vec<u8> {
        let mut input = Vec::with_capacity(32 + location.len() + kid.len() + body.len());
        input.extend_from_slice(b"keyfence record v1\0");
        input.extend_from_slice(location.as_bytes());
        input.push(0);
        input.extend_from_slice(kid.as_bytes());
        input.push(0);
        input.extend_from_slice(body);
        input
    }

    fn secret_aad(key_id: &str, kid: &str) -> Vec<u8> {
        format!("keyfence secret v1\0{key_id}\0{kid}").into_bytes()
    }

    /// Seals `body` (JSON) at `location` under the primary.
    fn seal_body(&self, active: &Active, location: &str, body: &[u8]) -> Vec<u8> {
        let key = &active.keys[0];
        let tag = hmac::sign(&key.mac, &Sealer::mac_input(location, &key.id, body));
        let mut out = Vec::with_capacity(PREFIX.len() + key.id.len() + 45 + body.len());
        out.extend_from_slice(PREFIX.as_bytes());
        out.extend_from_slice(key.id.as_bytes());
        out.push(b'.');
        out.extend_from_slice(URL_SAFE_NO_PAD.encode(tag.as_ref()).as_bytes());
        out.push(b'.');
        out.extend_from_slice(body);
        out
    }

    /// Checks a sealed value's MAC; returns the key that sealed it and the body.
    fn open_body<'a>(
        active: &'a Active,
        location: &str,
        bytes: &'a [u8],
    ) -> Result<(&'a Derived, &'a [u8]), String> {
        let rest = bytes
            .strip_prefix(PREFIX.as_bytes())
            .ok_or("not a sealed value")?;
        let mut parts = rest.splitn(3, |b| *b == b'.');
        let (Some(kid), Some(mac), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("malformed sealed value".into());
        };
        let kid = std::str::from_utf8(kid).map_err(|_| "malformed key id")?;
        let key = active.find(kid).ok_or_else(|| {
            format!("it is sealed under key {kid:?}, which the keyring does not hold")
        })?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| "malformed record MAC")?;
        hmac::verify(&key.mac, &Sealer::mac_input(location, kid, body), &mac).map_err(|_| {
            format!(
                "its MAC under key {kid:?} does not match: it was altered outside keyfence, or moved from another record"
            )
        })?;
        Ok((key, body))
    }

    fn seal_secret(&self, active: &Active, key_id: &str, secret: &[u8]) -> String {
        let key = &active.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the operating system's random generator failed");
        // Encrypted in place: the plain copy is overwritten by the ciphertext.
        let mut in_out = secret.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Sealer::secret_aad(key_id, &key.id)),
                &mut in_out,
            )
            .expect("ChaCha20-Poly1305 seals any length this small");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&in_out);
        STANDARD.encode(out)
    }

    fn open_secret(
        key: &Derived,
        key_id: &str,
        sealed: &str,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|_| "malformed sealed secret")?;
        if bytes.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err("malformed sealed secret".into());
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "malformed nonce")?;
        let mut in_out = Zeroizing::new(ciphertext.to_vec());
        let plain = key
            .aead
            .open_in_place(
                nonce,
                Aad::from(Sealer::secret_aad(key_id, &key.id)),
                &mut in_out,
            )
            .map_err(|_| "its signing secret does not decrypt")?;
        Ok(Zeroizing::new(plain.to_vec()))
    }
}

/// Where a stored value lives: part of what its MAC covers, so a value cannot be moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Key(KeyId),
    List(Scope),
    /// The store's sealing marker ([`MarkerState`]).
    Marker,
}

impl Location {
    fn path(&self) -> String {
        match self {
            Location::Key(id) => format!("key/{id}"),
            Location::List(Scope::Key(id)) => format!("list/key/{id}"),
            Location::List(Scope::Partner(p)) => {
                format!("list/partner/{}/{}", p.partner_id, p.environment)
            }
            Location::Marker => "meta/sealing".into(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Key(id) => write!(f, "key {id}"),
            Location::List(scope) => write!(f, "allowlist of {scope}"),
            Location::Marker => f.write_str("the store's sealing marker"),
        }
    }
}

/// Whether a store's records are sealed, kept in the store itself (sealed like any value).
/// Absent on a store that predates sealing; `Migrating` while its values are being sealed (a
/// start that crashed half-way picks up from there); `Sealed` once every value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkerState {
    Migrating,
    Sealed,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    sealed_store: MarkerState,
}

/// What a re-seal found a value to be.
#[derive(Debug)]
pub enum Resealed {
    /// Sealed under the primary already.
    Current,
    /// Sealed under another key (or, while migrating, in clear): here it is under the primary.
    Replaced(Vec<u8>),
}

/// Encodes and decodes every stored record, sealing when a keyring is configured. Each backend
/// holds one. `None`: no keyring (a Redis deployment without `--secrets-key-file`): records are
/// stored in clear, and an HMAC key cannot be stored at all.
#[derive(Clone)]
pub struct Codec {
    sealer: Option<Arc<Sealer>>,
}

fn refused(location: &Location, reason: impl Into<String>) -> StoreError {
    StoreError::Refused {
        what: location.to_string(),
        reason: reason.into(),
    }
}

fn encode_error(error: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("cannot encode: {error}"))
}

impl Codec {
    pub fn new(sealer: Option<Arc<Sealer>>) -> Codec {
        Codec { sealer }
    }

    pub fn sealer(&self) -> Option<&Arc<Sealer>> {
        self.sealer.as_ref()
    }

    /// Whether `bytes` is a sealed value (rather than JSON in clear).
    pub fn is_sealed(bytes: &[u8]) -> bool {
        bytes.starts_with(PREFIX.as_bytes())
    }

    /// The id of the keyring key a sealed value names (unauthenticated: for reports only).
    pub fn sealed_under(bytes: &[u8]) -> Option<&str> {
        let rest = bytes.strip_prefix(PREFIX.as_bytes())?;
        let end = rest.iter().position(|b| *b == b'.')?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    pub fn encode_key(&self, record: &KeyRecord) -> StoreResult<Vec<u8>> {
        let Some(sealer) = &self.sealer else {
            if matches!(
                record.signature,
                keyfence_policy::model::SignatureScheme::HmacSha256 { .. }
            ) {
                return Err(StoreError::FailedPrecondition(
                    "HMAC signing secrets are encrypted at rest, and this store has no keyring: \
                     start every replica with --secrets-key-file (one shared key file, made with \
                     `keyfence secrets add-key`)"
                        .into(),
                ));
            }
            return serde_json::to_vec(record).map_err(encode_error);
        };
        let active = sealer.active();
        let mut body = serde_json::to_value(record).map_err(encode_error)?;
        if let keyfence_policy::model::SignatureScheme::HmacSha256 { secret } = &record.signature {
            let signature = body
                .get_mut("signature")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| StoreError::Corrupt("a key record without a signature".into()))?;
            signature.remove("secret");
            signature.insert(
                "sealed_secret".into(),
                Value::String(sealer.seal_secret(&active, record.id.as_str(), secret)),
            );
        }
        let body = serde_json::to_vec(&body).map_err(encode_error)?;
        Ok(sealer.seal_body(&active, &Location::Key(record.id.clone()).path(), &body))
    }

    pub fn decode_key(&self, id: &KeyId, bytes: &[u8]) -> StoreResult<KeyRecord> {
        self.decode_key_as(id, bytes, false)
    }

    fn decode_key_as(&self, id: &KeyId, bytes: &[u8], migrating: bool) -> StoreResult<KeyRecord> {
        let location = Location::Key(id.clone());
        let (mut body, key) = self.open(&location, bytes, migrating)?;
        if let Some(key) = key {
            let signature = body
                .get_mut("signature")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| refused(&location, "it has no signature scheme"))?;
            if signature.get("scheme").and_then(Value::as_str) == Some("hmac_sha256") {
                if signature.contains_key("secret") {
                    return Err(refused(&location, "it holds a signing secret in clear"));
                }
                let sealed = signature
                    .remove("sealed_secret")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .ok_or_else(|| refused(&location, "its sealed signing secret is missing"))?;
                let secret = Sealer::open_secret(&key, id.as_str(), &sealed)
                    .map_err(|reason| refused(&location, reason))?;
                signature.insert("secret".into(), Value::String(hex::encode(&secret[..])));
            }
        }
        let record: KeyRecord = serde_json::from_value(body)
            .map_err(|e| StoreError::Corrupt(format!("{location}: {e}")))?;
        if record.id != *id {
            return Err(refused(&location, format!("it names key {}", record.id)));
        }
        Ok(record)
    }

    pub fn encode_list(&self, scope: &Scope, entries: &[AllowlistEntry]) -> StoreResult<Vec<u8>> {
        self.encode_plain(&Location::List(scope.clone()), &entries)
    }

    pub fn decode_list(&self, scope: &Scope, bytes: &[u8]) -> StoreResult<Vec<AllowlistEntry>> {
        self.decode_plain(&Location::List(scope.clone()), bytes, false)
    }

    /// The sealing marker in `state`; `None` without a keyring.
    pub fn encode_marker(&self, state: MarkerState) -> StoreResult<Option<Vec<u8>>> {
        if self.sealer.is_none() {
            return Ok(None);
        }
        self.encode_plain(
            &Location::Marker,
            &Marker {
                sealed_store: state,
            },
        )
        .map(Some)
    }

    pub fn decode_marker(&self, bytes: &[u8]) -> StoreResult<MarkerState> {
        let marker: Marker = self.decode_plain(&Location::Marker, bytes, false)?;
        Ok(marker.sealed_store)
    }

    /// `bytes` at `location` re-sealed under the primary when it is sealed under another key, or
    /// (only when `migrating`) stored in clear. A value that fails to open is refused, never
    /// re-sealed: that would launder an edit.
    pub fn reseal(
        &self,
        location: &Location,
        bytes: &[u8],
        migrating: bool,
    ) -> StoreResult<Resealed> {
        let Some(sealer) = &self.sealer else {
            return Ok(Resealed::Current);
        };
        if Codec::sealed_under(bytes) == Some(sealer.primary_id().as_str()) {
            // Still authenticate it, so that the pass reports a damaged value.
            self.open(location, bytes, false)?;
            return Ok(Resealed::Current);
        }
        let sealed = match location {
            Location::Key(id) => self.encode_key(&self.decode_key_as(id, bytes, migrating)?)?,
            Location::List(scope) => {
                let entries: Vec<AllowlistEntry> = self.decode_plain(location, bytes, migrating)?;
                self.encode_list(scope, &entries)?
            }
            Location::Marker => {
                let marker: Marker = self.decode_plain(location, bytes, migrating)?;
                self.encode_plain(location, &marker)?
            }
        };
        Ok(Resealed::Replaced(sealed))
    }

    fn encode_plain<T: Serialize + ?Sized>(
        &self,
        location: &Location,
        value: &T,
    ) -> StoreResult<Vec<u8>> {
        let body = serde_json::to_vec(value).map_err(encode_error)?;
        Ok(match &self.sealer {
            Some(sealer) => sealer.seal_body(&sealer.active(), &location.path(), &body),
            None => body,
        })
    }

    fn decode_plain<T: DeserializeOwned>(
        &self,
        location: &Location,
        bytes: &[u8],
        migrating: bool,
    ) -> StoreResult<T> {
        let (body, _) = self.open(location, bytes, migrating)?;
        serde_json::from_value(body).map_err(|e| StoreError::Corrupt(format!("{location}: {e}")))
    }

    /// Authenticates a value and parses its body; also the key that sealed it (`None` for a
    /// value in clear, accepted only without a keyring or while migrating).
    fn open(
        &self,
        location: &Location,
        bytes: &[u8],
        migrating: bool,
    ) -> StoreResult<(Value, Option<Arc<Derived>>)> {
        let parse = |body: &[u8]| {
            serde_json::from_slice::<Value>(body)
                .map_err(|e| StoreError::Corrupt(format!("{location}: {e}")))
        };
        if !Codec::is_sealed(bytes) {
            return match &self.sealer {
                None => Ok((parse(bytes)?, None)),
                Some(_) if migrating => Ok((parse(bytes)?, None)),
                Some(_) => Err(refused(
                    location,
                    "it is stored in clear, and this store accepts only sealed records: it was \
                     written outside keyfence",
                )),
            };
        }
        let Some(sealer) = &self.sealer else {
            return Err(refused(
                location,
                format!(
                    "it is sealed under key {:?}, and no keyring is configured (--secrets-key-file)",
                    Codec::sealed_under(bytes).unwrap_or("?")
                ),
            ));
        };
        let active = sealer.active();
        let (key, body) = Sealer::open_body(&active, &location.path(), bytes)
            .map_err(|r| refused(location, r))?;
        let key = active
            .keys
            .iter()
            .find(|k| k.id == key.id)
            .cloned()
            .expect("open_body returned one of these keys");
        Ok((parse(body)?, Some(key)))
    }
}

#[cfg(test)]
mod tests {
    use keyfence_policy::model::{
        Audit, Enforcement, KeyStatus, SecretHash, SignatureScheme, UnixMillis,
    };

    use super::*;

    const SECRET: [u8; 32] = [0x5a; 32];

    fn record(id: &str, status: KeyStatus) -> KeyRecord {
        let audit = Audit {
            actor: "test".into(),
            at: UnixMillis(1),
        };
        KeyRecord {
            id: id.parse().unwrap(),
            partner_id: "acme".parse().unwrap(),
            environment: "production".parse().unwrap(),
            name: "n".into(),
            display_prefix: "kf_live_abcd".into(),
            secret_hash: SecretHash::of(id),
            previous_secret: None,
            status,
            ip_allowlist_enabled: true,
            enforcement: Enforcement::Enforce,
            signature: SignatureScheme::HmacSha256 {
                secret: SECRET.to_vec(),
            },
            rate_limit: None,
            expires_at: None,
            require_nonce: false,
            created: audit.clone(),
            updated: audit,
        }
    }

    fn codec(keyring: &Keyring) -> Codec {
        Codec::new(Some(Sealer::new(keyring)))
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_sealed_record_hides_its_secret_and_round_trips() {
        let codec = codec(&Keyring::single("k1", [1; 32]).unwrap());
        let record = record("key_a", KeyStatus::Active);
        let bytes = codec.encode_key(&record).unwrap();
        assert!(bytes.starts_with(b"kf1.k1."));
        assert!(!contains(&bytes, &SECRET));
        assert!(!contains(&bytes, hex::encode(SECRET).as_bytes()));
        assert!(contains(&bytes, b"\"status\":\"active\""), "readable");
        assert_eq!(codec.decode_key(&record.id, &bytes).unwrap(), record);
    }

    #[test]
    fn an_edited_record_is_refused() {
        let codec = codec(&Keyring::single("k1", [1; 32]).unwrap());
        let record = record("key_a", KeyStatus::Revoked);
        let bytes = codec.encode_key(&record).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let edited = text.replace("\"status\":\"revoked\"", "\"status\":\"active\"");
        assert_ne!(edited, text);
        let error = codec.decode_key(&record.id, edited.as_bytes()).unwrap_err();
        assert!(matches!(error, StoreError::Refused { .. }), "{error:?}");
        assert!(error.to_string().contains("key key_a"), "{error}");

        // Moved to another key's place, or replaced by the same record in clear: refused too.
        let other: KeyId = "key_b".parse().unwrap();
        assert!(matches!(
            codec.decode_key(&other, text.as_bytes()),
            Err(StoreError::Refused { .. })
        ));
        let clear = serde_json::to_vec(&record).unwrap();
        assert!(matches!(
            codec.decode_key(&record.id, &clear),
            Err(StoreError::Refused { .. })
        ));
    }

    #[test]
    fn rotation_opens_old_values_and_reseals_them_under_the_primary() {
        let old = Keyring::single("k1", [1; 32]).unwrap();
        let sealer = Sealer::new(&old);
        let codec = Codec::new(Some(sealer.clone()));
        let record = record("key_a", KeyStatus::Active);
        let under_k1 = codec.encode_key(&record).unwrap();

        let mut next = Keyring::single("k1", [1; 32]).unwrap();
        next.add("k2", [2; 32]).unwrap();
        next.promote("k2").unwrap();
        sealer.replace(&next);
        assert_eq!(codec.decode_key(&record.id, &under_k1).unwrap(), record);
        let Resealed::Replaced(under_k2) = codec
            .reseal(&Location::Key(record.id.clone()), &under_k1, false)
            .unwrap()
        else {
            panic!("a value under k1 is re-sealed")
        };
        assert_eq!(Codec::sealed_under(&under_k2), Some("k2"));
        assert!(matches!(
            codec
                .reseal(&Location::Key(record.id.clone()), &under_k2, false)
                .unwrap(),
            Resealed::Current
        ));

        // k1 dropped from the file: it still opens until no value needs it.
        next.remove("k1").unwrap();
        sealer.replace(&next);
        assert!(codec.decode_key(&record.id, &under_k1).is_ok());
        sealer.retire_unused(&BTreeMap::from([("k1".to_owned(), 1)]));
        assert!(codec.decode_key(&record.id, &under_k1).is_ok());
        sealer.retire_unused(&BTreeMap::from([("k2".to_owned(), 1)]));
        let error = codec.decode_key(&record.id, &under_k1).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("which the keyring does not hold"),
            "{error}"
        );
    }

    #[test]
    fn clear_values_are_sealed_only_while_migrating() {
        let codec = codec(&Keyring::single("k1", [1; 32]).unwrap());
        let scope = Scope::Key("key_a".parse().unwrap());
        let clear = b"[]";
        let location = Location::List(scope.clone());
        assert!(codec.reseal(&location, clear, false).is_err());
        let Resealed::Replaced(sealed) = codec.reseal(&location, clear, true).unwrap() else {
            panic!("migrated")
        };
        assert_eq!(codec.decode_list(&scope, &sealed).unwrap(), vec![]);
    }

    #[test]
    fn without_a_keyring_hmac_keys_cannot_be_stored() {
        let codec = Codec::new(None);
        let error = codec
            .encode_key(&record("key_a", KeyStatus::Active))
            .unwrap_err();
        assert!(matches!(error, StoreError::FailedPrecondition(_)));
        assert!(error.to_string().contains("--secrets-key-file"), "{error}");
    }

    #[test]
    fn the_key_file_parses_and_never_shows_its_keys() {
        let text = format!(
            "# comment\n\nk2 {}\nk1 {}\n",
            hex::encode([2u8; 32]),
            hex::encode([1u8; 32])
        );
        let keyring = Keyring::parse(&text).unwrap();
        assert_eq!(keyring.ids(), ["k2", "k1"]);
        assert_eq!(keyring.primary_id(), "k2");
        let debug = format!("{keyring:?} {:?}", Sealer::new(&keyring));
        assert!(!debug.contains(&hex::encode([2u8; 32])), "{debug}");
        assert_eq!(
            Keyring::parse(&keyring.to_file_text()).unwrap().ids(),
            ["k2", "k1"]
        );
        for (bad, expected) in [
            ("k1 abcd\n", "line 1"),
            ("\n", "holds no key"),
            (&format!("k/1 {}\n", hex::encode([1u8; 32])), "key id"),
            (
                &format!("k1 {0}\nk1 {0}\n", hex::encode([1u8; 32])),
                "twice",
            ),
        ] {
            let error = Keyring::parse(bad).unwrap_err().to_string();
            assert!(error.contains(expected), "{bad:?}: {error}");
            assert!(!error.contains("0101"), "{error}");
        }
        let mut keyring = keyring;
        assert!(matches!(
            keyring.remove("k2"),
            Err(KeyringError::RemovingPrimary(_))
        ));
    }
}
