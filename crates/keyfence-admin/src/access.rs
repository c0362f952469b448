//! Queries about use: "test this key" (a dry-run decision) and the access log.

use keyfence_policy::{
    allowlist::EntrySource,
    decision::{AuthzRequest, Decision},
    model::{AllowlistEntry, KeyId, Scope, UnixMillis},
};
use keyfence_store::access_log::{AccessPage, AccessQuery};

use crate::{
    Admin,
    error::{AdminError, AdminResult, Field},
    keys::page_size,
};

/// A dry-run decision and the allowlist entry that matched, with who added it and why.
pub struct AccessCheck {
    pub decision: Decision,
    pub matched_entry: Option<AllowlistEntry>,
}

/// Which access records to list, newest first.
#[derive(Debug, Clone)]
pub struct LogQuery {
    pub key_id: KeyId,
    /// 0 means the default page size.
    pub limit: u32,
    pub blocked_only: bool,
    pub since: Option<UnixMillis>,
    pub until: Option<UnixMillis>,
    pub page_token: Option<String>,
}

impl Admin {
    /// Decides as the data plane would, without side effects.
    pub async fn check_access(&self, request: &AuthzRequest<'_>) -> AdminResult<AccessCheck> {
        let decision = self
            .decisions
            .dry_run(request)
            .await
            .map_err(AdminError::DecisionUnavailable)?;
        let matched_entry = match (decision.key.as_deref(), decision.matched) {
            (Some(key), Some(matched)) => {
                let scope = match matched.source {
                    EntrySource::Key => Scope::Key(key.id.clone()),
                    EntrySource::Partner => Scope::Partner(key.partner_scope()),
                };
                let list = self.store.get_allowlist(&scope).await?.value;
                list.into_iter().find(|e| e.cidr == matched.cidr)
            }
            _ => None,
        };
        Ok(AccessCheck {
            decision,
            matched_entry,
        })
    }

    pub async fn list_access_logs(&self, query: LogQuery) -> AdminResult<AccessPage> {
        self.store.get_key(&query.key_id).await?;
        let limit = page_size(Field::Limit, query.limit)?;
        if let (Some(since), Some(until)) = (query.since, query.until)
            && since > until
        {
            return Err(AdminError::invalid(Field::Since, "is after until"));
        }
        let LogQuery {
            key_id,
            limit: _,
            blocked_only,
            since,
            until,
            page_token,
        } = query;
        Ok(self
            .access_log
            .list(&AccessQuery {
                key_id,
                limit,
                blocked_only,
                since,
                until,
                page_token,
            })
            .await?)
    }
}
