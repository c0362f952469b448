//! Allowlist commands and queries, for a key's own list and a partner's list in one environment.

use keyfence_policy::{
    ip::Cidr,
    model::{AllowlistEntry, Audit, NewEntry, Scope},
};
use keyfence_store::{AllowlistEdit, Committed};

use crate::{
    Admin,
    error::{AdminError, AdminResult, EntryPart, Field},
    input,
    keys::in_future,
    principal::Principal,
    rules::{self, RuleViolation},
};

impl Admin {
    pub async fn get_allowlist(
        &self,
        scope: &Scope,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        Ok(self.parts.store.get_allowlist(scope).await?)
    }

    /// Adds entries; a network already listed is replaced (new description, expiry and audit).
    pub async fn add_entries(
        &self,
        principal: &Principal,
        scope: &Scope,
        entries: Vec<NewEntry>,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        if entries.is_empty() {
            return Err(AdminError::invalid(Field::Entries, "is empty"));
        }
        let audit = self.audit(principal);
        let added = self.entries_with_audit(entries, &audit)?;
        let count = added.len();
        self.edit_allowlist(
            scope,
            &audit,
            count,
            "allowlist entries added",
            move |list| rules::add_entries(list, added.clone()),
        )
        .await
    }

    /// Replaces the whole list, all or nothing.
    pub async fn replace_entries(
        &self,
        principal: &Principal,
        scope: &Scope,
        entries: Vec<NewEntry>,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        let audit = self.audit(principal);
        let replacement = self.entries_with_audit(entries, &audit)?;
        let count = replacement.len();
        self.edit_allowlist(scope, &audit, count, "allowlist replaced", move |list| {
            rules::replace_entries(list, replacement.clone())
        })
        .await
    }

    /// Removes entries by network; every network named must be listed.
    pub async fn remove_entries(
        &self,
        principal: &Principal,
        scope: &Scope,
        networks: Vec<Cidr>,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        if networks.is_empty() {
            return Err(AdminError::invalid(Field::Removals, "is empty"));
        }
        input::entry_count(networks.len(), self.parts.max_entries_per_request)
            .map_err(|reason| AdminError::invalid(Field::Removals, reason))?;
        let audit = self.audit(principal);
        let count = networks.len();
        self.edit_allowlist(
            scope,
            &audit,
            count,
            "allowlist entries removed",
            move |list| rules::remove_entries(list, &networks),
        )
        .await
    }

    /// Runs one allowlist edit in the store's transaction (refused for a revoked key's list),
    /// waits until this replica sees it, and logs it.
    async fn edit_allowlist(
        &self,
        scope: &Scope,
        audit: &Audit,
        count: usize,
        what: &'static str,
        edit: impl Fn(&mut Vec<AllowlistEntry>) -> Result<(), RuleViolation> + Send + Sync + 'static,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        let edit: AllowlistEdit = Box::new(move |owner, list| {
            rules::ensure_editable(owner)?;
            Ok(edit(list)?)
        });
        let committed = self.parts.store.modify_allowlist(scope, edit).await?;
        let committed = self.visible(committed).await;
        tracing::info!(%scope, actor = %audit.actor, count, revision = committed.revision, "{what}");
        Ok(committed)
    }

    /// Stamps entries with who adds them and when; every expiry must lie in the future.
    pub(crate) fn entries_with_audit(
        &self,
        entries: Vec<NewEntry>,
        audit: &Audit,
    ) -> AdminResult<Vec<AllowlistEntry>> {
        input::entry_count(entries.len(), self.parts.max_entries_per_request)
            .map_err(|reason| AdminError::invalid(Field::Entries, reason))?;
        entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                if let Some(at) = entry.expires_at {
                    let field = Field::Entry {
                        index,
                        part: EntryPart::ExpiresAt,
                    };
                    in_future(field, at, audit.at)?;
                }
                Ok(entry.into_entry(audit.clone()))
            })
            .collect()
    }
}
