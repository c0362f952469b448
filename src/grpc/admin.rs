//! `keyfence.v1.Admin`: keys and allowlists for internal tooling, on its own listener.
//!
//! Each mutation validates the whole request first, then runs as one store transaction, then
//! waits (briefly) until this replica's snapshot reflects it, so that a caller who writes and then
//! asks this replica sees its write.

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use rand::RngCore;
use tonic::{Request, Response, Status};

use super::{
    auth::actor,
    authorizer::{require_api_key, signed_request},
    convert::{self, MAX_NAME_CHARS},
    pb::{self, admin_server::Admin},
    status::invalid,
};
use crate::{
    access::{AccessLogStore, AccessQuery, AccessRecord, Frontend},
    authz::{Decider, Origin},
    policy::{
        allowlist::EntrySource,
        decision::{AuthzRequest, ClientAddress, KeySelector, Mode},
        model::{
            Audit, Enforcement, Environments, KeyId, KeyRecord, KeyStatus, MintedSecret, NewEntry,
            PreviousSecret, Scope, SignatureScheme, UnixMillis,
        },
    },
    store::{AllowlistEdit, Committed, KeyFilter, Store, ops},
};

/// The longest rotation grace period accepted.
pub const MAX_GRACE_SECS: u32 = 30 * 24 * 3600;
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

pub struct AdminService {
    store: Arc<dyn Store>,
    access_log: Arc<dyn AccessLogStore>,
    decider: Arc<Decider>,
    environments: Environments,
    /// How long a mutation waits for this replica's snapshot to include it.
    visibility_wait: Duration,
}

impl AdminService {
    pub fn new(
        store: Arc<dyn Store>,
        access_log: Arc<dyn AccessLogStore>,
        decider: Arc<Decider>,
        environments: Environments,
        visibility_wait: Duration,
    ) -> AdminService {
        AdminService {
            store,
            access_log,
            decider,
            environments,
            visibility_wait,
        }
    }

    /// Waits until the local snapshot includes `revision`.
    async fn visible<T>(&self, committed: Committed<T>) -> Committed<T> {
        if !self
            .decider
            .sync()
            .wait_for_revision(committed.revision, self.visibility_wait)
            .await
        {
            tracing::warn!(
                revision = committed.revision,
                "write committed but not yet applied locally"
            );
        }
        committed
    }

    /// Keys as the API shows them, with their last use.
    async fn api_keys(&self, records: &[KeyRecord]) -> Result<Vec<pb::ApiKey>, Status> {
        let ids: Vec<KeyId> = records.iter().map(|r| r.id.clone()).collect();
        let last_used = self.access_log.last_used(&ids).await?;
        Ok(records
            .iter()
            .zip(last_used)
            .map(|(record, last)| {
                let mut key = convert::api_key(record);
                if let Some(last) = last {
                    key.last_used_at = Some(convert::timestamp(last.at));
                    key.last_used_ip = last.client_ip;
                }
                key
            })
            .collect())
    }

    /// Runs one allowlist edit, waits until this replica sees it, logs it, and returns the list.
    async fn edit_allowlist(
        &self,
        scope: &Scope,
        edit: AllowlistEdit,
        audit: &Audit,
        count: usize,
        what: &'static str,
    ) -> Result<(Vec<pb::AllowlistEntry>, u64), Status> {
        let committed = self.store.modify_allowlist(scope, edit).await?;
        let committed = self.visible(committed).await;
        tracing::info!(%scope, actor = %audit.actor, count, revision = committed.revision, "{what}");
        Ok((convert::entries(&committed.value), committed.revision))
    }

    fn audit<T>(request: &Request<T>) -> Result<Audit, Status> {
        Ok(Audit {
            actor: actor(request)?,
            at: UnixMillis::now(),
        })
    }
}

fn key_id(field: &str, text: &str) -> Result<KeyId, Status> {
    text.parse().map_err(|e| invalid(field, e))
}

fn signature_scheme(
    scheme: i32,
    public_key: Vec<u8>,
) -> Result<(SignatureScheme, Option<Vec<u8>>), Status> {
    let scheme = pb::SignatureScheme::try_from(scheme)
        .map_err(|_| invalid("signature_scheme", format!("unknown value {scheme}")))?;
    if scheme != pb::SignatureScheme::Ed25519 && !public_key.is_empty() {
        return Err(invalid(
            "public_key",
            "is only used with SIGNATURE_SCHEME_ED25519",
        ));
    }
    match scheme {
        pb::SignatureScheme::None => Ok((SignatureScheme::None, None)),
        pb::SignatureScheme::HmacSha256 => {
            let mut secret = vec![0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            Ok((
                SignatureScheme::HmacSha256 {
                    secret: secret.clone(),
                },
                Some(secret),
            ))
        }
        pb::SignatureScheme::Ed25519 => {
            let bytes: [u8; 32] = public_key.as_slice().try_into().map_err(|_| {
                invalid(
                    "public_key",
                    format!("must be 32 bytes, got {}", public_key.len()),
                )
            })?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| invalid("public_key", "is not a valid Ed25519 public key"))?;
            Ok((SignatureScheme::Ed25519 { public_key: bytes }, None))
        }
    }
}

fn entries_with_audit(
    entries: Vec<NewEntry>,
    audit: &Audit,
) -> Vec<crate::policy::model::AllowlistEntry> {
    entries
        .into_iter()
        .map(|e| e.into_entry(audit.clone()))
        .collect()
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let partner_id = request
            .partner_id
            .parse()
            .map_err(|e| invalid("partner_id", e))?;
        let environment = self
            .environments
            .parse(&request.environment)
            .map_err(|e| invalid("environment", e))?;
        let name = convert::text("name", request.name, MAX_NAME_CHARS, true)?;
        let (signature, hmac_secret) =
            signature_scheme(request.signature_scheme, request.public_key)?;
        let expires_at = request
            .expires_at
            .map(|t| convert::future_instant("expires_at", &t, audit.at))
            .transpose()?;
        let enforcement = convert::enforcement("enforcement", request.enforcement)?
            .unwrap_or(Enforcement::Enforce);
        let entries = convert::new_entries("allowlist", request.allowlist, audit.at)?;

        let minted = MintedSecret::generate(&environment);
        let record = KeyRecord {
            id: KeyId::generate(),
            partner_id,
            environment,
            name,
            display_prefix: minted.display_prefix,
            secret_hash: minted.hash,
            previous_secret: None,
            status: KeyStatus::Active,
            ip_allowlist_enabled: request.ip_allowlist_enabled,
            enforcement,
            signature,
            rate_limit: convert::rate_limit(request.rate_limit),
            expires_at,
            created: audit.clone(),
            updated: audit.clone(),
        };
        let entries = entries_with_audit(entries, &audit);
        let committed = self
            .visible(self.store.insert_key(record, entries).await?)
            .await;
        tracing::info!(key_id = %committed.value.id, actor = %audit.actor, revision = committed.revision, "key created");
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(convert::api_key(&committed.value)),
            secret: minted.full,
            signing_secret: hmac_secret
                .map(|s| base64::engine::general_purpose::STANDARD.encode(s))
                .unwrap_or_default(),
            revision: committed.revision,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let id = key_id("key_id", &request.get_ref().key_id)?;
        let record = self.store.get_key(&id).await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: self.api_keys(std::slice::from_ref(&record)).await?.pop(),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let request = request.into_inner();
        let filter = KeyFilter {
            partner_id: (!request.partner_id.is_empty())
                .then(|| {
                    request
                        .partner_id
                        .parse()
                        .map_err(|e| invalid("partner_id", e))
                })
                .transpose()?,
            environment: (!request.environment.is_empty())
                .then(|| {
                    self.environments
                        .parse(&request.environment)
                        .map_err(|e| invalid("environment", e))
                })
                .transpose()?,
        };
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE_SIZE}"),
                ));
            }
            n => n,
        };
        let after = (!request.page_token.is_empty())
            .then(|| key_id("page_token", &request.page_token))
            .transpose()?;
        let page = self
            .store
            .list_keys(&filter, after.as_ref(), page_size as usize)
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: self.api_keys(&page.keys).await?,
            next_page_token: page.next_after.map(String::from).unwrap_or_default(),
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::UpdateKeyResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let id = key_id("key_id", &request.key_id)?;
        let name = request
            .name
            .map(|n| convert::text("name", n, MAX_NAME_CHARS, true))
            .transpose()?;
        if request.expires_at.is_some() && request.clear_expires_at {
            return Err(invalid(
                "clear_expires_at",
                "cannot be combined with expires_at",
            ));
        }
        let expires_at = match (request.expires_at, request.clear_expires_at) {
            (Some(t), _) => Some(Some(convert::future_instant("expires_at", &t, audit.at)?)),
            (None, true) => Some(None),
            (None, false) => None,
        };
        let enforcement = convert::enforcement("enforcement", request.enforcement)?;
        let rate_limit = request.rate_limit.map(|r| convert::rate_limit(Some(r)));
        let enabled = request.enabled;
        let ip_allowlist_enabled = request.ip_allowlist_enabled;
        let nothing = name.is_none()
            && enabled.is_none()
            && ip_allowlist_enabled.is_none()
            && expires_at.is_none()
            && enforcement.is_none()
            && rate_limit.is_none();
        if nothing {
            return Err(Status::invalid_argument("no field to change was given"));
        }
        let edit_audit = audit.clone();
        let committed = self
            .store
            .modify_key(
                &id,
                Box::new(move |record| {
                    ops::ensure_not_revoked(record)?;
                    if let Some(name) = &name {
                        record.name = name.clone();
                    }
                    if let Some(enabled) = enabled {
                        record.status = if enabled {
                            KeyStatus::Active
                        } else {
                            KeyStatus::Disabled
                        };
                    }
                    if let Some(on) = ip_allowlist_enabled {
                        record.ip_allowlist_enabled = on;
                    }
                    if let Some(expires_at) = expires_at {
                        record.expires_at = expires_at;
                    }
                    if let Some(enforcement) = enforcement {
                        record.enforcement = enforcement;
                    }
                    if let Some(rate_limit) = rate_limit {
                        record.rate_limit = rate_limit;
                    }
                    ops::touch(record, edit_audit.clone());
                    Ok(())
                }),
            )
            .await?;
        let committed = self.visible(committed).await;
        tracing::info!(key_id = %id, actor = %audit.actor, revision = committed.revision, "key updated");
        Ok(Response::new(pb::UpdateKeyResponse {
            key: Some(convert::api_key(&committed.value)),
            revision: committed.revision,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let audit = Self::audit(&request)?;
        let id = key_id("key_id", &request.get_ref().key_id)?;
        let edit_audit = audit.clone();
        let committed = self
            .store
            .modify_key(
                &id,
                Box::new(move |record| {
                    record.status = KeyStatus::Revoked;
                    record.previous_secret = None;
                    ops::touch(record, edit_audit.clone());
                    Ok(())
                }),
            )
            .await?;
        let committed = self.visible(committed).await;
        tracing::info!(key_id = %id, actor = %audit.actor, revision = committed.revision, "key revoked");
        Ok(Response::new(pb::RevokeKeyResponse {
            key: Some(convert::api_key(&committed.value)),
            revision: committed.revision,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let id = key_id("key_id", &request.key_id)?;
        if request.grace_period_seconds > MAX_GRACE_SECS {
            return Err(invalid(
                "grace_period_seconds",
                format!("must be at most {MAX_GRACE_SECS}"),
            ));
        }
        let current = self.store.get_key(&id).await?;
        let minted = MintedSecret::generate(&current.environment);
        let (hash, prefix) = (minted.hash, minted.display_prefix.clone());
        let grace = i64::from(request.grace_period_seconds);
        let edit_audit = audit.clone();
        let committed = self
            .store
            .modify_key(
                &id,
                Box::new(move |record| {
                    ops::ensure_not_revoked(record)?;
                    record.previous_secret = (grace > 0).then(|| PreviousSecret {
                        hash: record.secret_hash,
                        valid_until: edit_audit.at.saturating_add_secs(grace),
                    });
                    record.secret_hash = hash;
                    record.display_prefix = prefix.clone();
                    ops::touch(record, edit_audit.clone());
                    Ok(())
                }),
            )
            .await?;
        let committed = self.visible(committed).await;
        tracing::info!(key_id = %id, actor = %audit.actor, grace_secs = grace, revision = committed.revision, "key rotated");
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(convert::api_key(&committed.value)),
            secret: minted.full,
            revision: committed.revision,
        }))
    }

    async fn get_allowlist(
        &self,
        request: Request<pb::GetAllowlistRequest>,
    ) -> Result<Response<pb::GetAllowlistResponse>, Status> {
        let scope = convert::scope(request.into_inner().scope, &self.environments)?;
        let committed = self.store.get_allowlist(&scope).await?;
        Ok(Response::new(pb::GetAllowlistResponse {
            entries: convert::entries(&committed.value),
            revision: committed.revision,
        }))
    }

    async fn add_allowlist_entries(
        &self,
        request: Request<pb::AddAllowlistEntriesRequest>,
    ) -> Result<Response<pb::AddAllowlistEntriesResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, &self.environments)?;
        if request.entries.is_empty() {
            return Err(invalid("entries", "is empty"));
        }
        let added = entries_with_audit(
            convert::new_entries("entries", request.entries, audit.at)?,
            &audit,
        );
        let count = added.len();
        let (entries, revision) = self
            .edit_allowlist(
                &scope,
                Box::new(move |list| ops::add_entries(list, added.clone())),
                &audit,
                count,
                "allowlist entries added",
            )
            .await?;
        Ok(Response::new(pb::AddAllowlistEntriesResponse {
            entries,
            revision,
        }))
    }

    async fn replace_allowlist(
        &self,
        request: Request<pb::ReplaceAllowlistRequest>,
    ) -> Result<Response<pb::ReplaceAllowlistResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, &self.environments)?;
        let replacement = entries_with_audit(
            convert::new_entries("entries", request.entries, audit.at)?,
            &audit,
        );
        let count = replacement.len();
        let (entries, revision) = self
            .edit_allowlist(
                &scope,
                Box::new(move |list| ops::replace_entries(list, replacement.clone())),
                &audit,
                count,
                "allowlist replaced",
            )
            .await?;
        Ok(Response::new(pb::ReplaceAllowlistResponse {
            entries,
            revision,
        }))
    }

    async fn remove_allowlist_entries(
        &self,
        request: Request<pb::RemoveAllowlistEntriesRequest>,
    ) -> Result<Response<pb::RemoveAllowlistEntriesResponse>, Status> {
        let audit = Self::audit(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, &self.environments)?;
        if request.cidrs.is_empty() {
            return Err(invalid("cidrs", "is empty"));
        }
        let removed = convert::cidrs("cidrs", request.cidrs)?;
        let count = removed.len();
        let (entries, revision) = self
            .edit_allowlist(
                &scope,
                Box::new(move |list| ops::remove_entries(list, &removed)),
                &audit,
                count,
                "allowlist entries removed",
            )
            .await?;
        Ok(Response::new(pb::RemoveAllowlistEntriesResponse {
            entries,
            revision,
        }))
    }

    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        let request = request.into_inner();
        let id;
        let selector = match &request.key {
            None => return Err(invalid("key", "is required: a key_id or an api_key")),
            Some(pb::check_access_request::Key::KeyId(text)) => {
                id = key_id("key_id", text)?;
                KeySelector::Id(&id)
            }
            Some(pb::check_access_request::Key::ApiKey(secret)) => {
                require_api_key("api_key", secret)?;
                KeySelector::Presented(secret)
            }
        };
        if request.client_ip.is_empty() {
            return Err(invalid("client_ip", "is empty"));
        }
        let question = AuthzRequest {
            key: selector,
            client_ip: ClientAddress::Text(&request.client_ip),
            signature: signed_request(request.signature.as_ref())?,
        };
        let origin = Origin {
            frontend: Frontend::Authorize,
            endpoint: None,
        };
        let decision = self
            .decider
            .decide(&question, 0, Mode::DryRun, origin)
            .await?;
        let key = decision.key.as_deref();
        let matched_entry = match (key, decision.matched) {
            (Some(key), Some(matched)) => {
                let scope = match matched.source {
                    EntrySource::Key => Scope::Key(key.id.clone()),
                    EntrySource::Partner => Scope::Partner(key.partner_scope()),
                };
                let list = self.store.get_allowlist(&scope).await?.value;
                list.iter()
                    .find(|e| e.cidr == matched.cidr)
                    .map(convert::entry)
            }
            _ => None,
        };
        let convert::DecisionFields {
            decision: verdict,
            reason,
            key_id,
            partner_id,
            environment,
        } = convert::decision_fields(&decision);
        Ok(Response::new(pb::CheckAccessResponse {
            decision: verdict,
            reason,
            key_id,
            partner_id,
            environment,
            ip_allowed: decision.ip_allowed,
            matched_entry,
            matched_scope: decision
                .matched
                .map(|m| m.source.as_str().to_owned())
                .unwrap_or_default(),
            policy_revision: decision.revision,
            would_deny: decision.would_deny.is_some(),
        }))
    }

    async fn list_access_logs(
        &self,
        request: Request<pb::ListAccessLogsRequest>,
    ) -> Result<Response<pb::ListAccessLogsResponse>, Status> {
        let request = request.into_inner();
        let key_id = key_id("key_id", &request.key_id)?;
        self.store.get_key(&key_id).await?;
        let limit = match request.limit {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(invalid("limit", format!("must be at most {MAX_PAGE_SIZE}")));
            }
            n => n,
        };
        let instant = |field: &str, t: Option<prost_types::Timestamp>| {
            t.map(|t| convert::instant(field, &t)).transpose()
        };
        let query = AccessQuery {
            key_id,
            limit: limit as usize,
            blocked_only: request.blocked_only,
            since: instant("since", request.since)?,
            until: instant("until", request.until)?,
            page_token: (!request.page_token.is_empty()).then_some(request.page_token),
        };
        if let (Some(since), Some(until)) = (query.since, query.until)
            && since > until
        {
            return Err(invalid("since", "is after until"));
        }
        let page = self.access_log.list(&query).await?;
        Ok(Response::new(pb::ListAccessLogsResponse {
            entries: page.records.iter().map(access_entry).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }
}

fn access_entry(record: &AccessRecord) -> pb::AccessLogEntry {
    let AccessRecord { key, entry } = record;
    let (method, path) = entry.endpoint.clone().unwrap_or_default();
    pb::AccessLogEntry {
        time: Some(convert::timestamp(entry.at)),
        key_id: key.key_id.to_string(),
        partner_id: key.partner_id.to_string(),
        environment: key.environment.to_string(),
        client_ip: entry.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        decision: if entry.allowed {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        } as i32,
        reason: convert::deny_reason(entry.reason) as i32,
        would_deny: entry.would_deny,
        method,
        path,
        matched_cidr: entry
            .matched_cidr()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        source: entry.frontend.as_str().to_owned(),
    }
}
