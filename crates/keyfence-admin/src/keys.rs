//! Key commands and queries: create, read, list, update, rotate and revoke.

use keyfence_policy::model::{
    Audit, Enforcement, Environment, KeyId, KeyRecord, KeyStatus, MintedSecret, NewEntry,
    PartnerId, PreviousSecret, RateLimit, SignatureScheme, UnixMillis,
};
use keyfence_store::{Committed, KeyEdit, KeyFilter, access_log::LastUse};

use crate::{
    Admin,
    error::{AdminError, AdminResult, Field},
    input::{DEFAULT_PAGE_SIZE, MAX_GRACE_SECS, MAX_PAGE_SIZE},
    principal::Principal,
    rules::{self, RuleViolation},
};

/// How requests made with a new key must be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    None,
    /// keyfence mints the secret and shows it once.
    HmacSha256,
    /// The partner's public key; checked here for being a valid point.
    Ed25519 {
        public_key: [u8; 32],
    },
}

/// A key to create, validated by the edge.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub partner_id: PartnerId,
    pub environment: Environment,
    pub name: String,
    pub signing: Signing,
    /// Must lie in the future.
    pub expires_at: Option<UnixMillis>,
    pub enforcement: Enforcement,
    /// `None` (not said) means enabled: a key is unrestricted only when asked for explicitly, so
    /// a request that lists entries and forgets this flag cannot make an open key.
    pub ip_allowlist_enabled: Option<bool>,
    /// Signed requests must carry a nonce.
    pub require_nonce: bool,
    pub rate_limit: Option<RateLimit>,
    /// The key's own allowlist: distinct networks, expiries in the future.
    pub allowlist: Vec<NewEntry>,
}

/// A created key with what is shown once: the key itself and, for HMAC, the signing secret.
pub struct CreatedKey {
    pub record: KeyRecord,
    pub secret: String,
    pub signing_secret: Option<Vec<u8>>,
}

/// The changes an update makes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<String>,
    /// `false` disables the key, `true` enables it again.
    pub enabled: Option<bool>,
    pub ip_allowlist_enabled: Option<bool>,
    /// `Some(None)` clears the expiry; a new one must lie in the future.
    pub expires_at: Option<Option<UnixMillis>>,
    pub enforcement: Option<Enforcement>,
    /// `Some(None)` removes the limit.
    pub rate_limit: Option<Option<RateLimit>>,
    pub require_nonce: Option<bool>,
}

impl KeyChanges {
    fn is_empty(&self) -> bool {
        let KeyChanges {
            name,
            enabled,
            ip_allowlist_enabled,
            expires_at,
            enforcement,
            rate_limit,
            require_nonce,
        } = self;
        name.is_none()
            && enabled.is_none()
            && ip_allowlist_enabled.is_none()
            && expires_at.is_none()
            && enforcement.is_none()
            && rate_limit.is_none()
            && require_nonce.is_none()
    }
}

/// A rotated key and its new secret, shown once.
pub struct RotatedKey {
    pub record: KeyRecord,
    pub secret: String,
}

/// A key as the admin surfaces show it: the record and its last use.
pub struct KeyView {
    pub record: KeyRecord,
    pub last_use: Option<LastUse>,
}

/// One page of keys in id order.
pub struct KeysPage {
    pub keys: Vec<KeyView>,
    /// Where the next page starts, when more may follow.
    pub next_after: Option<KeyId>,
}

/// Which keys to list.
#[derive(Debug, Clone, Default)]
pub struct KeyQuery {
    pub filter: KeyFilter,
    /// 0 means the default page size.
    pub page_size: u32,
    pub after: Option<KeyId>,
}

/// An instant that must lie after `now` (an expiry).
pub(crate) fn in_future(field: Field, at: UnixMillis, now: UnixMillis) -> AdminResult<UnixMillis> {
    if at <= now {
        return Err(AdminError::invalid(field, "is not in the future"));
    }
    Ok(at)
}

/// A page size, bounded.
pub(crate) fn page_size(field: Field, requested: u32) -> AdminResult<usize> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n > MAX_PAGE_SIZE => Err(AdminError::invalid(
            field,
            format!("must be at most {MAX_PAGE_SIZE}"),
        )),
        n => Ok(n as usize),
    }
}

impl Admin {
    pub async fn create_key(
        &self,
        principal: &Principal,
        new: NewKey,
    ) -> AdminResult<Committed<CreatedKey>> {
        let audit = self.audit(principal);
        let (signature, signing_secret) = self.signature_scheme(new.signing)?;
        let expires_at = new
            .expires_at
            .map(|at| in_future(Field::ExpiresAt, at, audit.at))
            .transpose()?;
        // The same rules as an addition to an existing list.
        let entries = self.entries_with_audit(new.allowlist, &audit)?;
        rules::reject_duplicates(&entries)?;

        let minted = MintedSecret::generate(&new.environment, &*self.parts.random);
        let record = KeyRecord {
            id: KeyId::generate(&*self.parts.random),
            partner_id: new.partner_id,
            environment: new.environment,
            name: new.name,
            display_prefix: minted.display_prefix,
            secret_hash: minted.hash,
            previous_secret: None,
            status: KeyStatus::Active,
            ip_allowlist_enabled: new.ip_allowlist_enabled.unwrap_or(true),
            enforcement: new.enforcement,
            signature,
            require_nonce: new.require_nonce,
            rate_limit: new.rate_limit,
            expires_at,
            created: audit.clone(),
            updated: audit.clone(),
        };
        let committed = self
            .visible(self.parts.store.insert_key(record, entries).await?)
            .await;
        tracing::info!(key_id = %committed.value.id, actor = %audit.actor, revision = committed.revision, "key created");
        Ok(Committed {
            revision: committed.revision,
            value: CreatedKey {
                record: committed.value,
                secret: minted.full,
                signing_secret,
            },
        })
    }

    pub async fn get_key(&self, id: &KeyId) -> AdminResult<KeyView> {
        let record = self.parts.store.get_key(id).await?;
        let mut views = self.with_last_use(vec![record]).await?;
        Ok(views.pop().expect("one view per record"))
    }

    /// A key a command just wrote, with its last use as [`Admin::get_key`] shows it. The write
    /// has committed, so a last use that cannot be read is left out (and logged), never reported
    /// as the write's failure.
    pub async fn written_key_view(&self, record: KeyRecord) -> KeyView {
        let ids = [record.id.clone()];
        let last_use = match self.parts.access_log.last_used(&ids).await {
            Ok(mut uses) => uses.pop().flatten(),
            Err(error) => {
                tracing::warn!(key_id = %record.id, %error, "cannot read the key's last use");
                None
            }
        };
        KeyView { record, last_use }
    }

    pub async fn list_keys(&self, query: KeyQuery) -> AdminResult<KeysPage> {
        let limit = page_size(Field::PageSize, query.page_size)?;
        let page = self
            .parts
            .store
            .list_keys(&query.filter, query.after.as_ref(), limit)
            .await?;
        Ok(KeysPage {
            keys: self.with_last_use(page.keys).await?,
            next_after: page.next_after,
        })
    }

    pub async fn update_key(
        &self,
        principal: &Principal,
        id: &KeyId,
        changes: KeyChanges,
    ) -> AdminResult<Committed<KeyRecord>> {
        if changes.is_empty() {
            return Err(AdminError::NothingToChange);
        }
        let audit = self.audit(principal);
        if let Some(Some(at)) = changes.expires_at {
            in_future(Field::ExpiresAt, at, audit.at)?;
        }
        self.edit_key(id, &audit, "key updated", move |record| {
            rules::ensure_not_revoked(record)?;
            let KeyChanges {
                name,
                enabled,
                ip_allowlist_enabled,
                expires_at,
                enforcement,
                rate_limit,
                require_nonce,
            } = &changes;
            if let Some(name) = name {
                record.name = name.clone();
            }
            if let Some(enabled) = enabled {
                record.status = if *enabled {
                    KeyStatus::Active
                } else {
                    KeyStatus::Disabled
                };
            }
            if let Some(on) = ip_allowlist_enabled {
                record.ip_allowlist_enabled = *on;
            }
            if let Some(expires_at) = expires_at {
                record.expires_at = *expires_at;
            }
            if let Some(enforcement) = enforcement {
                record.enforcement = *enforcement;
            }
            if let Some(rate_limit) = rate_limit {
                record.rate_limit = *rate_limit;
            }
            if let Some(require_nonce) = require_nonce {
                record.require_nonce = *require_nonce;
            }
            Ok(())
        })
        .await
    }

    /// Revokes a key for good. Revoking a revoked key changes nothing: no write, no new
    /// revision, and the audit fields keep who revoked it first.
    pub async fn revoke_key(
        &self,
        principal: &Principal,
        id: &KeyId,
    ) -> AdminResult<Committed<KeyRecord>> {
        let current = self.parts.store.get_key(id).await?;
        if current.status == KeyStatus::Revoked {
            return Ok(Committed {
                value: current,
                revision: self.parts.decisions.current_revision(),
            });
        }
        let audit = self.audit(principal);
        self.edit_key(id, &audit, "key revoked", |record| {
            record.status = KeyStatus::Revoked;
            record.previous_secret = None;
            Ok(())
        })
        .await
    }

    /// Issues a new secret; the old one keeps working for `grace_period_secs` (0: not at all).
    pub async fn rotate_key(
        &self,
        principal: &Principal,
        id: &KeyId,
        grace_period_secs: u32,
    ) -> AdminResult<Committed<RotatedKey>> {
        if grace_period_secs > MAX_GRACE_SECS {
            return Err(AdminError::invalid(
                Field::GracePeriod,
                format!("must be at most {MAX_GRACE_SECS}"),
            ));
        }
        let audit = self.audit(principal);
        let current = self.parts.store.get_key(id).await?;
        let minted = MintedSecret::generate(&current.environment, &*self.parts.random);
        let (hash, prefix) = (minted.hash, minted.display_prefix.clone());
        let grace = i64::from(grace_period_secs);
        let grace_ends = audit.at.saturating_add_secs(grace);
        tracing::info!(key_id = %id, actor = %audit.actor, grace_secs = grace, "rotating key");
        let committed = self
            .edit_key(id, &audit, "key rotated", move |record| {
                rules::ensure_not_revoked(record)?;
                record.previous_secret = (grace > 0).then_some(PreviousSecret {
                    hash: record.secret_hash,
                    valid_until: grace_ends,
                });
                record.secret_hash = hash;
                record.display_prefix = prefix.clone();
                Ok(())
            })
            .await?;
        Ok(Committed {
            revision: committed.revision,
            value: RotatedKey {
                record: committed.value,
                secret: minted.full,
            },
        })
    }

    /// The stored scheme and, for HMAC, the freshly minted secret to show once.
    fn signature_scheme(
        &self,
        signing: Signing,
    ) -> AdminResult<(SignatureScheme, Option<Vec<u8>>)> {
        match signing {
            Signing::None => Ok((SignatureScheme::None, None)),
            Signing::HmacSha256 => {
                let mut secret = vec![0u8; 32];
                self.parts.random.fill(&mut secret);
                Ok((
                    SignatureScheme::HmacSha256 {
                        secret: secret.clone(),
                    },
                    Some(secret),
                ))
            }
            Signing::Ed25519 { public_key } => {
                let key = ed25519_dalek::VerifyingKey::from_bytes(&public_key).map_err(|_| {
                    AdminError::invalid(Field::PublicKey, "is not a valid Ed25519 public key")
                })?;
                // A point of small order verifies signatures no private key made (or none at
                // all): a key nobody can sign for correctly, or anyone can.
                if key.is_weak() {
                    return Err(AdminError::invalid(
                        Field::PublicKey,
                        "is a weak Ed25519 public key (a point of small order)",
                    ));
                }
                Ok((SignatureScheme::Ed25519 { public_key }, None))
            }
        }
    }

    /// Edits a key in the store's transaction, stamps who changed it and when, waits until this
    /// replica sees the edit, and logs it as `what`.
    async fn edit_key(
        &self,
        id: &KeyId,
        audit: &Audit,
        what: &'static str,
        edit: impl Fn(&mut KeyRecord) -> Result<(), RuleViolation> + Send + Sync + 'static,
    ) -> AdminResult<Committed<KeyRecord>> {
        let stamp = audit.clone();
        let edit: KeyEdit = Box::new(move |record| {
            edit(record)?;
            rules::touch(record, stamp.clone());
            Ok(())
        });
        let committed = self.parts.store.modify_key(id, edit).await?;
        let committed = self.visible(committed).await;
        tracing::info!(key_id = %id, actor = %audit.actor, revision = committed.revision, "{what}");
        Ok(committed)
    }

    async fn with_last_use(&self, records: Vec<KeyRecord>) -> AdminResult<Vec<KeyView>> {
        let ids: Vec<KeyId> = records.iter().map(|r| r.id.clone()).collect();
        let last_used = self.parts.access_log.last_used(&ids).await?;
        Ok(records
            .into_iter()
            .zip(last_used)
            .map(|(record, last_use)| KeyView { record, last_use })
            .collect())
    }

    pub(crate) fn audit(&self, principal: &Principal) -> Audit {
        Audit {
            actor: principal.name().to_owned(),
            at: self.parts.clock.now(),
        }
    }
}
