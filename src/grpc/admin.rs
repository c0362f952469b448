//! `keyfence.v1.Admin`: keys and allowlists for internal tooling, on its own listener.
//!
//! A thin translation: each RPC reads its proto request into the admin layer's validated domain
//! input (naming the field of anything malformed), calls one command or query of
//! [`keyfence_admin::Admin`], and writes the domain result back as proto. No edit rule lives here.

use std::sync::Arc;

use base64::Engine as _;
use keyfence_admin::{
    Admin,
    input::MAX_NAME_CHARS,
    keys::{KeyChanges, KeyQuery, KeyView, NewKey, Signing},
};
use keyfence_policy::{
    decision::{AuthzRequest, KeySelector},
    model::{Enforcement, KeyId},
};
use keyfence_store::{
    KeyFilter,
    access_log::{AccessQuery, AccessRecord},
};
use tonic::{Request, Response, Status};

use super::{
    auth::principal,
    convert,
    decision_io::{client_ip, require_api_key, signed_request},
    pb::{self, admin_server::Admin as AdminRpc},
    status::{admin, admin_status, invalid},
};

pub struct AdminService {
    admin: Arc<Admin>,
}

impl AdminService {
    pub fn new(admin: Arc<Admin>) -> AdminService {
        AdminService { admin }
    }
}

fn key_id(field: &str, text: &str) -> Result<KeyId, Status> {
    text.parse().map_err(|e| invalid(field, e))
}

fn signing(scheme: i32, public_key: Vec<u8>) -> Result<Signing, Status> {
    let scheme = pb::SignatureScheme::try_from(scheme)
        .map_err(|_| invalid("signature_scheme", format!("unknown value {scheme}")))?;
    if scheme != pb::SignatureScheme::Ed25519 && !public_key.is_empty() {
        return Err(invalid(
            "public_key",
            "is only used with SIGNATURE_SCHEME_ED25519",
        ));
    }
    Ok(match scheme {
        pb::SignatureScheme::None => Signing::None,
        pb::SignatureScheme::HmacSha256 => Signing::HmacSha256,
        pb::SignatureScheme::Ed25519 => Signing::Ed25519 {
            public_key: public_key.as_slice().try_into().map_err(|_| {
                invalid(
                    "public_key",
                    format!("must be 32 bytes, got {}", public_key.len()),
                )
            })?,
        },
    })
}

/// A key as the API shows it, with its last use.
fn api_key(view: &KeyView) -> pb::ApiKey {
    let mut key = convert::api_key(&view.record);
    if let Some(last) = &view.last_use {
        key.last_used_at = Some(convert::timestamp(last.at));
        key.last_used_ip = last.client_ip.clone();
    }
    key
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let new = NewKey {
            partner_id: request
                .partner_id
                .parse()
                .map_err(|e| invalid("partner_id", e))?,
            environment: self
                .admin
                .environments()
                .parse(&request.environment)
                .map_err(|e| invalid("environment", e))?,
            name: convert::text("name", request.name, MAX_NAME_CHARS, true)?,
            signing: signing(request.signature_scheme, request.public_key)?,
            expires_at: request
                .expires_at
                .map(|t| convert::instant("expires_at", &t))
                .transpose()?,
            enforcement: convert::enforcement("enforcement", request.enforcement)?
                .unwrap_or(Enforcement::Enforce),
            ip_allowlist_enabled: request.ip_allowlist_enabled,
            require_nonce: request.require_nonce,
            rate_limit: convert::rate_limit(request.rate_limit),
            allowlist: convert::new_entries("allowlist", request.allowlist)?,
        };
        let created = self
            .admin
            .create_key(&principal, new)
            .await
            .map_err(|e| admin_status(e, "allowlist"))?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(convert::api_key(&created.value.record)),
            secret: created.value.secret,
            signing_secret: created
                .value
                .signing_secret
                .map(|s| base64::engine::general_purpose::STANDARD.encode(s))
                .unwrap_or_default(),
            revision: created.revision,
        }))
    }

    async fn get_key(
        &self,
        request: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let id = key_id("key_id", &request.get_ref().key_id)?;
        let view = self.admin.get_key(&id).await.map_err(admin)?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(api_key(&view)),
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
                    self.admin
                        .environments()
                        .parse(&request.environment)
                        .map_err(|e| invalid("environment", e))
                })
                .transpose()?,
        };
        let after = (!request.page_token.is_empty())
            .then(|| key_id("page_token", &request.page_token))
            .transpose()?;
        let page = self
            .admin
            .list_keys(KeyQuery {
                filter,
                page_size: request.page_size,
                after,
            })
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: page.keys.iter().map(api_key).collect(),
            next_page_token: page.next_after.map(String::from).unwrap_or_default(),
        }))
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::UpdateKeyResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let id = key_id("key_id", &request.key_id)?;
        if request.expires_at.is_some() && request.clear_expires_at {
            return Err(invalid(
                "clear_expires_at",
                "cannot be combined with expires_at",
            ));
        }
        let changes = KeyChanges {
            name: request
                .name
                .map(|n| convert::text("name", n, MAX_NAME_CHARS, true))
                .transpose()?,
            enabled: request.enabled,
            ip_allowlist_enabled: request.ip_allowlist_enabled,
            expires_at: match (request.expires_at, request.clear_expires_at) {
                (Some(t), _) => Some(Some(convert::instant("expires_at", &t)?)),
                (None, true) => Some(None),
                (None, false) => None,
            },
            enforcement: convert::enforcement("enforcement", request.enforcement)?,
            rate_limit: request.rate_limit.map(|r| convert::rate_limit(Some(r))),
            require_nonce: request.require_nonce,
        };
        let committed = self
            .admin
            .update_key(&principal, &id, changes)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::UpdateKeyResponse {
            key: Some(api_key(&self.admin.written_key_view(committed.value).await)),
            revision: committed.revision,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let principal = principal(&request)?;
        let id = key_id("key_id", &request.get_ref().key_id)?;
        let committed = self
            .admin
            .revoke_key(&principal, &id)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::RevokeKeyResponse {
            key: Some(api_key(&self.admin.written_key_view(committed.value).await)),
            revision: committed.revision,
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let id = key_id("key_id", &request.key_id)?;
        let rotated = self
            .admin
            .rotate_key(&principal, &id, request.grace_period_seconds)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::RotateKeyResponse {
            key: Some(api_key(
                &self.admin.written_key_view(rotated.value.record).await,
            )),
            secret: rotated.value.secret,
            revision: rotated.revision,
        }))
    }

    async fn get_allowlist(
        &self,
        request: Request<pb::GetAllowlistRequest>,
    ) -> Result<Response<pb::GetAllowlistResponse>, Status> {
        let scope = convert::scope(request.into_inner().scope, self.admin.environments())?;
        let committed = self.admin.get_allowlist(&scope).await.map_err(admin)?;
        Ok(Response::new(pb::GetAllowlistResponse {
            entries: convert::entries(&committed.value),
            revision: committed.revision,
        }))
    }

    async fn add_allowlist_entries(
        &self,
        request: Request<pb::AddAllowlistEntriesRequest>,
    ) -> Result<Response<pb::AddAllowlistEntriesResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, self.admin.environments())?;
        let entries = convert::new_entries("entries", request.entries)?;
        let committed = self
            .admin
            .add_entries(&principal, &scope, entries)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::AddAllowlistEntriesResponse {
            entries: convert::entries(&committed.value),
            revision: committed.revision,
        }))
    }

    async fn replace_allowlist(
        &self,
        request: Request<pb::ReplaceAllowlistRequest>,
    ) -> Result<Response<pb::ReplaceAllowlistResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, self.admin.environments())?;
        let entries = convert::new_entries("entries", request.entries)?;
        let committed = self
            .admin
            .replace_entries(&principal, &scope, entries)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::ReplaceAllowlistResponse {
            entries: convert::entries(&committed.value),
            revision: committed.revision,
        }))
    }

    async fn remove_allowlist_entries(
        &self,
        request: Request<pb::RemoveAllowlistEntriesRequest>,
    ) -> Result<Response<pb::RemoveAllowlistEntriesResponse>, Status> {
        let principal = principal(&request)?;
        let request = request.into_inner();
        let scope = convert::scope(request.scope, self.admin.environments())?;
        let networks = convert::cidrs("cidrs", request.cidrs)?;
        let committed = self
            .admin
            .remove_entries(&principal, &scope, networks)
            .await
            .map_err(admin)?;
        Ok(Response::new(pb::RemoveAllowlistEntriesResponse {
            entries: convert::entries(&committed.value),
            revision: committed.revision,
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
        let question = AuthzRequest {
            key: selector,
            client_ip: client_ip("client_ip", &request.client_ip)?,
            signature: signed_request(request.signature.as_ref())?,
        };
        let check = self.admin.check_access(&question).await.map_err(admin)?;
        let decision = &check.decision;
        let convert::DecisionFields {
            decision: verdict,
            reason,
            key_id,
            partner_id,
            environment,
        } = convert::decision_fields(decision);
        Ok(Response::new(pb::CheckAccessResponse {
            decision: verdict,
            reason,
            key_id,
            partner_id,
            environment,
            ip_allowed: decision.ip_allowed,
            matched_entry: check.matched_entry.as_ref().map(convert::entry),
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
        let instant = |field: &str, t: Option<prost_types::Timestamp>| {
            t.map(|t| convert::instant(field, &t)).transpose()
        };
        let query = AccessQuery {
            key_id: key_id("key_id", &request.key_id)?,
            limit: request.limit as usize,
            blocked_only: request.blocked_only,
            since: instant("since", request.since)?,
            until: instant("until", request.until)?,
            page_token: (!request.page_token.is_empty()).then_some(request.page_token),
        };
        let page = self.admin.list_access_logs(query).await.map_err(admin)?;
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
