//! Queries about use: "test this key" (a dry-run decision) and the access log.

use keyfence_policy::{
    allowlist::EntrySource,
    decision::{AuthzRequest, Decision},
    model::{AllowlistEntry, Scope},
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

impl Admin {
    /// Decides as the data plane would, without side effects.
    pub async fn check_access(&self, request: &AuthzRequest<'_>) -> AdminResult<AccessCheck> {
        let decision = self
            .parts
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
                let list = self.parts.store.get_allowlist(&scope).await?.value;
                list.into_iter().find(|e| e.cidr == matched.cidr)
            }
            _ => None,
        };
        Ok(AccessCheck {
            decision,
            matched_entry,
        })
    }

    /// Access records of one key, newest first. A `limit` of 0 means the default page size.
    pub async fn list_access_logs(&self, mut query: AccessQuery) -> AdminResult<AccessPage> {
        self.parts.store.get_key(&query.key_id).await?;
        let requested = u32::try_from(query.limit).unwrap_or(u32::MAX);
        query.limit = page_size(Field::Limit, requested)?;
        if let (Some(since), Some(until)) = (query.since, query.until)
            && since > until
        {
            return Err(AdminError::invalid(Field::Since, "is after until"));
        }
        Ok(self.parts.access_log.list(&query).await?)
    }
}
