//! Allowlist commands and queries, for a key's own list and a partner's list in one environment.

use keyfence_policy::{
    ip::Cidr,
    model::{AllowlistEntry, Audit, NewEntry, Scope},
};
use keyfence_store::{AllowlistEdit, Committed};

use crate::{
    Admin,
    error::{AdminError, AdminResult, EntryPart, Field},
    keys::in_future,
    principal::Principal,
    rules,
};

impl Admin {
    pub async fn get_allowlist(
        &self,
        scope: &Scope,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        Ok(self.store.get_allowlist(scope).await?)
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
        let edit: AllowlistEdit = Box::new(move |key, list| {
            rules::ensure_editable(key)?;
            Ok(rules::add_entries(list, added.clone())?)
        });
        self.edit_allowlist(scope, edit, &audit, count, "allowlist entries added")
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
        let edit: AllowlistEdit = Box::new(move |key, list| {
            rules::ensure_editable(key)?;
            Ok(rules::replace_entries(list, replacement.clone())?)
        });
        self.edit_allowlist(scope, edit, &audit, count, "allowlist replaced")
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
        let audit = self.audit(principal);
        let count = networks.len();
        let edit: AllowlistEdit = Box::new(move |key, list| {
            rules::ensure_editable(key)?;
            Ok(rules::remove_entries(list, &networks)?)
        });
        self.edit_allowlist(scope, edit, &audit, count, "allowlist entries removed")
            .await
    }

    /// Runs one allowlist edit, waits until this replica sees it, and logs it.
    async fn edit_allowlist(
        &self,
        scope: &Scope,
        edit: AllowlistEdit,
        audit: &Audit,
        count: usize,
        what: &'static str,
    ) -> AdminResult<Committed<Vec<AllowlistEntry>>> {
        let committed = self.store.modify_allowlist(scope, edit).await?;
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
