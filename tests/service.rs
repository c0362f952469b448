//! The real binary over gRPC: every deny reason, address forms, strict parsing, all-or-nothing
//! writes, persistence, partner scope, signatures, rotation, admin auth and read-your-writes.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use ed25519_dalek::{Signer, SigningKey};
use keyfence::grpc::pb::{self, DenyReason};
use keyfence_policy::signature::{canonical_string, sign_hmac};
use tonic::Code;

fn signed(
    api_key: &str,
    ip: &str,
    signature: String,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        api_key: api_key.into(),
        client_ip: ip.into(),
        signature: Some(pb::SignatureInput {
            signature,
            timestamp,
            nonce: nonce.into(),
            method: "POST".into(),
            path: "/v1/payments?currency=EUR".into(),
            body: body.to_vec(),
        }),
        min_revision: 0,
    }
}

#[tokio::test]
async fn ipv4_ipv6_cidr_mixed_and_mapped_addresses() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(
        &mut admin,
        "acme",
        "production",
        &[
            "203.0.113.0/24",
            "198.51.100.7",
            "2001:db8::/32",
            "2001:db8:ffff::1",
        ],
    )
    .await;
    let secret = &key.secret;
    for ip in [
        "203.0.113.1",
        "203.0.113.254",
        "198.51.100.7",
        "2001:db8:1::1",
        "2001:db8:ffff::1",
        "::ffff:203.0.113.9",
        "::ffff:198.51.100.7",
    ] {
        assert_eq!(
            decide(&mut authz, authorize_request(secret, ip)).await,
            ALLOW,
            "{ip}"
        );
    }
    for ip in [
        "203.0.114.1",
        "198.51.100.8",
        "2001:db9::1",
        "::ffff:198.51.100.8",
        "::1",
        "127.0.0.1",
    ] {
        assert_eq!(
            decide(&mut authz, authorize_request(secret, ip)).await,
            denied(DenyReason::IpNotAllowed),
            "{ip}"
        );
    }
    let mut request = authorize_request(secret, "2001:db8:5::9");
    request.min_revision = key.revision;
    let response = authz.authorize(request).await.unwrap().into_inner();
    assert_eq!(response.matched_cidr, "2001:db8::/32");
    assert_eq!(response.key_id, key.key.as_ref().unwrap().id);
    assert_eq!(response.partner_id, "acme");
    assert_eq!(response.environment, "production");
    assert_eq!(response.policy_revision, key.revision);
}

#[tokio::test]
async fn every_deny_reason_over_grpc() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let ip = "203.0.113.10";

    // UNKNOWN_KEY
    assert_eq!(
        decide(&mut authz, authorize_request("kf_live_nosuchkey", ip)).await,
        denied(DenyReason::UnknownKey)
    );
    // INVALID_CLIENT_IP and IP_NOT_ALLOWED
    let plain = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    assert_eq!(
        decide(
            &mut authz,
            authorize_request(&plain.secret, "203.0.113.010")
        )
        .await,
        denied(DenyReason::InvalidClientIp)
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&plain.secret, "198.51.100.1")).await,
        denied(DenyReason::IpNotAllowed)
    );
    // KEY_DISABLED, then enabled again
    let id = plain.key.as_ref().unwrap().id.clone();
    admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id.clone(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&plain.secret, ip)).await,
        denied(DenyReason::KeyDisabled)
    );
    admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id.clone(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&plain.secret, ip)).await,
        ALLOW
    );
    // KEY_REVOKED, and revoked is final
    admin
        .revoke_key(pb::RevokeKeyRequest { key_id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&plain.secret, ip)).await,
        denied(DenyReason::KeyRevoked)
    );
    let status = admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id.clone(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    // KEY_EXPIRED: the expiry passes with no write
    let expiring = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "short-lived".into(),
            ip_allowlist_enabled: Some(false),
            expires_at: Some(prost_types::Timestamp {
                seconds: now_secs() + 2,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decide(&mut authz, authorize_request(&expiring.secret, ip)).await,
        ALLOW
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        decide(&mut authz, authorize_request(&expiring.secret, ip)).await,
        denied(DenyReason::KeyExpired)
    );
    // SIGNATURE_MISSING, SIGNATURE_INVALID, TIMESTAMP_OUT_OF_WINDOW, NONCE_REUSED
    let hmac = admin
        .create_key(hmac_key_request("signed", &["203.0.113.0/24"]))
        .await
        .unwrap()
        .into_inner();
    let signing_secret = signing_secret(&hmac);
    assert_eq!(signing_secret.len(), 32);
    assert_eq!(
        decide(&mut authz, authorize_request(&hmac.secret, ip)).await,
        denied(DenyReason::SignatureMissing)
    );
    let now = now_secs();
    let good = sign_hmac(
        &signing_secret,
        now,
        "nonce-1",
        "POST",
        "/v1/payments?currency=EUR",
        b"{}",
    );
    assert_eq!(
        decide(
            &mut authz,
            signed(&hmac.secret, ip, good.clone(), now, "nonce-1", b"{}")
        )
        .await,
        ALLOW
    );
    assert_eq!(
        decide(
            &mut authz,
            signed(&hmac.secret, ip, good.clone(), now, "nonce-1", b"{}")
        )
        .await,
        denied(DenyReason::NonceReused)
    );
    assert_eq!(
        decide(
            &mut authz,
            signed(&hmac.secret, ip, good, now, "nonce-2", b"{}")
        )
        .await,
        denied(DenyReason::SignatureInvalid)
    );
    let stale = now - 301;
    let old = sign_hmac(
        &signing_secret,
        stale,
        "nonce-3",
        "POST",
        "/v1/payments?currency=EUR",
        b"{}",
    );
    assert_eq!(
        decide(
            &mut authz,
            signed(&hmac.secret, ip, old, stale, "nonce-3", b"{}")
        )
        .await,
        denied(DenyReason::TimestampOutOfWindow)
    );
    // RATE_LIMITED
    let limited = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "limited".into(),
            ip_allowlist_enabled: Some(false),
            rate_limit: Some(pb::RateLimit {
                requests_per_second: 1,
                burst: 3,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(decide(&mut authz, authorize_request(&limited.secret, ip)).await);
    }
    assert_eq!(&outcomes[..3], &[ALLOW, ALLOW, ALLOW]);
    assert_eq!(outcomes[3], denied(DenyReason::RateLimited));
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let server = Server::start(&[]);
    let mut authz = server.authorizer().await;
    let status = authz
        .authorize(authorize_request("", "203.0.113.1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "api_key: is empty");
    let status = authz
        .authorize(authorize_request("kf_live_x", ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "client_ip: is empty");
}

#[tokio::test]
async fn strict_parsing_rejects_ambiguous_entries_naming_the_field() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let cases = [
        ("010.1.1.1/32", "not an IPv4 or IPv6 address"),
        ("010.1.1.1", "not an IPv4 or IPv6 address"),
        ("0x0a.0.0.1", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/08", "invalid prefix length"),
        ("fe80::1%eth0", "not an IPv4 or IPv6 address"),
        (
            "203.0.113.7/24",
            "has host bits set; did you mean 203.0.113.0/24?",
        ),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("", "is empty"),
    ];
    for (cidr, expected) in cases {
        let status = admin
            .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                scope: key_scope(&id),
                entries: vec![entry("192.0.2.1"), entry(cidr)],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{cidr}");
        assert!(
            status.message().starts_with("entries[1].cidr: "),
            "{cidr}: {}",
            status.message()
        );
        assert!(
            status.message().contains(expected),
            "{cidr}: {}",
            status.message()
        );
    }
    let list = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: key_scope(&id),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.entries.is_empty(), "nothing was written");
    // The same rules apply to create and remove.
    let status = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "n".into(),
            ip_allowlist_enabled: Some(true),
            allowlist: vec![entry("10.0.0.1/8")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "allowlist[0].cidr: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
    );
    let status = admin
        .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
            scope: key_scope(&id),
            cidrs: vec!["010.0.0.1".into()],
        })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("cidrs[0]: "),
        "{}",
        status.message()
    );
    let status = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "staging".into(),
            name: "n".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("environment: "),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn bulk_write_is_all_or_nothing() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["192.0.2.1"]).await;
    let id = key.key.unwrap().id;
    let before = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: key_scope(&id),
        })
        .await
        .unwrap()
        .into_inner();

    let mut entries: Vec<_> = (0..1000u32)
        .map(|i| entry(&format!("10.{}.{}.0/24", i / 256, i % 256)))
        .collect();
    entries.insert(637, entry("10.200.0.1/16"));
    for request in ["add", "replace"] {
        let status = match request {
            "add" => admin
                .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    entries: entries.clone(),
                })
                .await
                .unwrap_err(),
            _ => admin
                .replace_allowlist(pb::ReplaceAllowlistRequest {
                    scope: key_scope(&id),
                    entries: entries.clone(),
                })
                .await
                .unwrap_err(),
        };
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "entries[637].cidr: 10.200.0.1/16 has host bits set; did you mean 10.200.0.0/16?"
        );
        let after = admin
            .get_allowlist(pb::GetAllowlistRequest {
                scope: key_scope(&id),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after.entries, before.entries, "{request} changed nothing");
        assert_eq!(
            after.revision, before.revision,
            "{request} made no revision"
        );
        assert_eq!(
            decide(&mut authz, authorize_request(&key.secret, "10.0.0.1")).await,
            denied(DenyReason::IpNotAllowed)
        );
    }
    // A duplicate inside one request is rejected the same way.
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: vec![entry("10.0.0.0/8"), entry("10.0.0.0/8")],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "entries[1].cidr: 10.0.0.0/8 duplicates entries[0]"
    );
    // Removing one unlisted network among listed ones removes nothing.
    let status = admin
        .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
            scope: key_scope(&id),
            cidrs: vec!["192.0.2.1".into(), "192.0.2.2".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "cidrs[1]: 192.0.2.2/32 is not on this allowlist"
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "192.0.2.1")).await,
        ALLOW
    );

    // Without the bad entry, the thousand go in at once.
    entries.remove(637);
    let added = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.entries.len(), 1001);
    assert_eq!(added.revision, before.revision + 1);
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "10.3.231.9")).await,
        ALLOW
    );
}

/// CreateKey used to bypass the allowlist rules and store a duplicate network; it now goes
/// through the same admin-layer rule as AddAllowlistEntries, and creates nothing.
#[tokio::test]
async fn create_key_rejects_a_duplicate_network_as_additions_do() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let request = pb::CreateKeyRequest {
        partner_id: "acme".into(),
        environment: "production".into(),
        name: "duplicate networks".into(),
        ip_allowlist_enabled: Some(true),
        allowlist: vec![entry("192.0.2.1"), entry("10.0.0.0/8"), entry("10.0.0.0/8")],
        ..Default::default()
    };
    let status = admin.create_key(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "allowlist[2].cidr: 10.0.0.0/8 duplicates allowlist[1]"
    );
    let keys = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(keys.keys.is_empty(), "nothing was created: {:?}", keys.keys);

    // The same entries, added to an existing key, are refused for the same reason.
    let key = create_key(&mut admin, "acme", "production", &["192.0.2.1"]).await;
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&key.key.unwrap().id),
            entries: vec![entry("192.0.2.1"), entry("10.0.0.0/8"), entry("10.0.0.0/8")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "entries[2].cidr: 10.0.0.0/8 duplicates entries[1]"
    );
}

#[tokio::test]
async fn add_replace_remove_and_list() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["192.0.2.1"]).await;
    let id = key.key.unwrap().id;
    let mut request = tonic::Request::new(pb::AddAllowlistEntriesRequest {
        scope: key_scope(&id),
        entries: vec![entry("198.51.100.0/24")],
    });
    request
        .metadata_mut()
        .insert("x-keyfence-actor", "alice".parse().unwrap());
    let added = admin
        .add_allowlist_entries(request)
        .await
        .unwrap()
        .into_inner();
    let entry_by_alice = added
        .entries
        .iter()
        .find(|e| e.cidr == "198.51.100.0/24")
        .unwrap();
    // The authenticated principal first; the caller's actor header only adds detail.
    assert_eq!(entry_by_alice.added_by, "admin/alice");
    assert_eq!(entry_by_alice.description, "test entry 198.51.100.0/24");
    assert!(entry_by_alice.added_at.is_some());
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.77")).await,
        ALLOW
    );

    let replaced = admin
        .replace_allowlist(pb::ReplaceAllowlistRequest {
            scope: key_scope(&id),
            entries: vec![entry("2001:db8::/48")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replaced.entries.len(), 1);
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.77")).await,
        denied(DenyReason::IpNotAllowed)
    );
    assert_eq!(
        decide(
            &mut authz,
            authorize_request(&key.secret, "2001:db8:0:1::1")
        )
        .await,
        ALLOW
    );

    let removed = admin
        .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
            scope: key_scope(&id),
            cidrs: vec!["2001:db8::/48".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(removed.entries.is_empty());
    assert_eq!(
        decide(
            &mut authz,
            authorize_request(&key.secret, "2001:db8:0:1::1")
        )
        .await,
        denied(DenyReason::IpNotAllowed)
    );

    // Disabling the allowlist lets any IP through; enabling it again restores the check.
    admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id.clone(),
            ip_allowlist_enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "8.8.8.8")).await,
        ALLOW
    );
    admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id.clone(),
            ip_allowlist_enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "8.8.8.8")).await,
        denied(DenyReason::IpNotAllowed)
    );

    let missing = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: key_scope("key_doesnotexist"),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn temporary_entries_stop_matching_without_a_write() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let expires_at = prost_types::Timestamp {
        seconds: now_secs() + 2,
        nanos: 0,
    };
    let added = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: vec![pb::AllowlistEntryInput {
                cidr: "192.0.2.0/24".into(),
                description: "migration".into(),
                expires_at: Some(expires_at),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "192.0.2.5")).await,
        ALLOW
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "192.0.2.5")).await,
        denied(DenyReason::IpNotAllowed)
    );
    let now = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: key_scope(&id),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.revision, added.revision, "no write was needed");
    let past = pb::AllowlistEntryInput {
        cidr: "192.0.2.0/24".into(),
        description: String::new(),
        expires_at: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
    };
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: vec![past],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.message(),
        "entries[0].expires_at: is not in the future"
    );
}

#[tokio::test]
async fn partner_entries_apply_to_every_partner_key_in_one_environment_only() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let prod_a = create_key(&mut admin, "acme", "production", &[]).await;
    let prod_b = create_key(&mut admin, "acme", "production", &["198.51.100.1"]).await;
    let sandbox = create_key(&mut admin, "acme", "sandbox", &[]).await;
    let other = create_key(&mut admin, "globex", "production", &[]).await;
    admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: partner_scope("acme", "production"),
            entries: vec![entry("192.0.2.0/24")],
        })
        .await
        .unwrap();
    let ip = "192.0.2.44";
    assert_eq!(
        decide(&mut authz, authorize_request(&prod_a.secret, ip)).await,
        ALLOW
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&prod_b.secret, ip)).await,
        ALLOW
    );
    assert_eq!(
        decide(
            &mut authz,
            authorize_request(&prod_b.secret, "198.51.100.1")
        )
        .await,
        ALLOW,
        "own entries still apply"
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&sandbox.secret, ip)).await,
        denied(DenyReason::IpNotAllowed)
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&other.secret, ip)).await,
        denied(DenyReason::IpNotAllowed)
    );
    // A key created later inherits the partner list.
    let later = create_key(&mut admin, "acme", "production", &[]).await;
    assert_eq!(
        decide(&mut authz, authorize_request(&later.secret, ip)).await,
        ALLOW
    );
    // CheckAccess says which list matched.
    let check = admin
        .check_access(pb::CheckAccessRequest {
            key: Some(pb::check_access_request::Key::KeyId(later.key.unwrap().id)),
            client_ip: ip.into(),
            signature: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.matched_scope, "partner");
    assert_eq!(check.matched_entry.unwrap().cidr, "192.0.2.0/24");
    // Removing the partner entry revokes it for all of them at once.
    admin
        .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
            scope: partner_scope("acme", "production"),
            cidrs: vec!["192.0.2.0/24".into()],
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&prod_a.secret, ip)).await,
        denied(DenyReason::IpNotAllowed)
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&prod_b.secret, ip)).await,
        denied(DenyReason::IpNotAllowed)
    );
}

#[tokio::test]
async fn decisions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let mut admin = server.admin().await;
    let allowed = create_key(
        &mut admin,
        "acme",
        "production",
        &["203.0.113.0/24", "2001:db8::/32"],
    )
    .await;
    let revoked = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    admin
        .revoke_key(pb::RevokeKeyRequest {
            key_id: revoked.key.as_ref().unwrap().id.clone(),
        })
        .await
        .unwrap();
    admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: partner_scope("acme", "production"),
            entries: vec![entry("192.0.2.0/24")],
        })
        .await
        .unwrap();
    let questions = [
        (allowed.secret.clone(), "203.0.113.1"),
        (allowed.secret.clone(), "2001:db8::1"),
        (allowed.secret.clone(), "192.0.2.1"),
        (allowed.secret.clone(), "198.51.100.1"),
        (revoked.secret.clone(), "203.0.113.1"),
        ("kf_live_unknown".into(), "203.0.113.1"),
    ];
    let mut authz = server.authorizer().await;
    let mut before = Vec::new();
    for (secret, ip) in &questions {
        before.push(
            authz
                .authorize(authorize_request(secret, ip))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let keys_before = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    server.kill();

    let server = Server::start_in(dir.path(), &[]);
    let mut authz = server.authorizer().await;
    let mut admin = server.admin().await;
    for ((secret, ip), expected) in questions.iter().zip(&before) {
        let after = authz
            .authorize(authorize_request(secret, ip))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&after, expected, "{ip}");
    }
    assert_eq!(
        before.iter().map(|r| r.decision()).collect::<Vec<_>>(),
        [
            pb::Decision::Allow,
            pb::Decision::Allow,
            pb::Decision::Allow,
            pb::Decision::Deny,
            pb::Decision::Deny,
            pb::Decision::Deny
        ]
    );
    let keys_after = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys_after, keys_before);
}

#[tokio::test]
async fn ed25519_signatures_over_grpc() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let signer = SigningKey::from_bytes(&[9u8; 32]);
    let key = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "ed".into(),
            ip_allowlist_enabled: Some(true),
            allowlist: vec![entry("203.0.113.0/24")],
            signature_scheme: pb::SignatureScheme::Ed25519 as i32,
            public_key: signer.verifying_key().to_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(key.signing_secret.is_empty());
    let sign = |ts: i64, nonce: &str, body: &[u8]| {
        let message = canonical_string(ts, nonce, "POST", "/v1/payments?currency=EUR", body);
        base64::engine::general_purpose::STANDARD.encode(signer.sign(&message).to_bytes())
    };
    let ip = "203.0.113.3";
    let now = now_secs();
    let good = sign(now, "n1", b"{\"amount\":10}");
    assert_eq!(
        decide(
            &mut authz,
            signed(&key.secret, ip, good.clone(), now, "n1", b"{\"amount\":10}")
        )
        .await,
        ALLOW
    );
    assert_eq!(
        decide(
            &mut authz,
            signed(&key.secret, ip, good.clone(), now, "n1", b"{\"amount\":10}")
        )
        .await,
        denied(DenyReason::NonceReused)
    );
    let fresh = sign(now, "n2", b"{\"amount\":10}");
    assert_eq!(
        decide(
            &mut authz,
            signed(&key.secret, ip, fresh, now, "n2", b"{\"amount\":99}")
        )
        .await,
        denied(DenyReason::SignatureInvalid)
    );
    let stale_ts = now - 3600;
    let stale = sign(stale_ts, "n3", b"");
    assert_eq!(
        decide(
            &mut authz,
            signed(&key.secret, ip, stale, stale_ts, "n3", b"")
        )
        .await,
        denied(DenyReason::TimestampOutOfWindow)
    );
    // A valid signature never bypasses the IP check.
    let other_ip = sign(now, "n4", b"");
    assert_eq!(
        decide(
            &mut authz,
            signed(&key.secret, "198.51.100.1", other_ip, now, "n4", b"")
        )
        .await,
        denied(DenyReason::IpNotAllowed)
    );

    let status = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "bad".into(),
            signature_scheme: pb::SignatureScheme::Ed25519 as i32,
            public_key: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.message(), "public_key: must be 32 bytes, got 3");
}

#[tokio::test]
async fn rotation_keeps_the_old_secret_for_the_grace_period() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    let ip = "203.0.113.1";
    let rotated = admin
        .rotate_key(pb::RotateKeyRequest {
            key_id: id.clone(),
            grace_period_seconds: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, key.secret);
    assert!(rotated.key.unwrap().previous_secret_expires_at.is_some());
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, ip)).await,
        ALLOW,
        "old secret inside grace"
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&rotated.secret, ip)).await,
        ALLOW
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, ip)).await,
        denied(DenyReason::KeyExpired)
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&rotated.secret, ip)).await,
        ALLOW
    );
    // Without grace, the old secret stops at once.
    let again = admin
        .rotate_key(pb::RotateKeyRequest {
            key_id: id.clone(),
            grace_period_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decide(&mut authz, authorize_request(&rotated.secret, ip)).await,
        denied(DenyReason::UnknownKey)
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&again.secret, ip)).await,
        ALLOW
    );
    let status = admin
        .rotate_key(pb::RotateKeyRequest {
            key_id: id,
            grace_period_seconds: 31 * 24 * 3600,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn report_only_allows_and_reports() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "rollout".into(),
            ip_allowlist_enabled: Some(true),
            allowlist: vec![entry("203.0.113.0/24")],
            enforcement: pb::Enforcement::ReportOnly as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let response = authz
        .authorize(authorize_request(&key.secret, "198.51.100.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.decision(), pb::Decision::Allow);
    assert!(response.would_deny);
    assert_eq!(response.reason(), DenyReason::IpNotAllowed);
    let id = key.key.unwrap().id;
    admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id,
            enforcement: pb::Enforcement::Enforce as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.1")).await,
        denied(DenyReason::IpNotAllowed)
    );
}

#[tokio::test]
async fn admin_token_is_enforced() {
    let server = Server::start(&["--admin-token", "a-very-long-admin-token"]);
    let mut admin = server.admin_unauthenticated().await;
    let status = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(pb::ListKeysRequest::default());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-token".parse().unwrap());
    assert_eq!(
        admin.list_keys(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut right = tonic::Request::new(pb::ListKeysRequest::default());
    right.metadata_mut().insert(
        "authorization",
        "Bearer a-very-long-admin-token".parse().unwrap(),
    );
    assert!(admin.list_keys(right).await.is_ok());
}

#[tokio::test]
async fn admin_on_a_public_address_needs_tls() {
    let output = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ])
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "admin_listen: 0.0.0.0:0 is not on loopback, so the admin plane needs TLS: give admin_tls_cert and admin_tls_key"
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn min_revision_reads_your_writes_or_is_unavailable() {
    let server = Server::start(&["--min-revision-wait-ms", "300"]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let mut request = authorize_request(&key.secret, "203.0.113.1");
    request.min_revision = key.revision;
    let response = authz.authorize(request.clone()).await.unwrap().into_inner();
    assert_eq!(response.decision(), pb::Decision::Allow);
    assert!(response.policy_revision >= key.revision);
    request.min_revision = key.revision + 1000;
    let started = std::time::Instant::now();
    let status = authz.authorize(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("not reached"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn check_access_is_a_dry_run() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let mut request = hmac_key_request("signed", &["203.0.113.0/24"]);
    request.allowlist[0].description = "acme NAT".into();
    let key = admin.create_key(request).await.unwrap().into_inner();
    let secret = signing_secret(&key);
    let now = now_secs();
    let signature = pb::SignatureInput {
        signature: sign_hmac(&secret, now, "once", "GET", "/", b""),
        timestamp: now,
        nonce: "once".into(),
        method: "GET".into(),
        path: "/".into(),
        body: vec![],
    };
    for _ in 0..3 {
        let check = admin
            .check_access(pb::CheckAccessRequest {
                key: Some(pb::check_access_request::Key::ApiKey(key.secret.clone())),
                client_ip: "203.0.113.9".into(),
                signature: Some(signature.clone()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(check.decision(), pb::Decision::Allow);
        assert!(check.ip_allowed);
        let matched = check.matched_entry.unwrap();
        assert_eq!(matched.description, "acme NAT");
        assert_eq!(check.matched_scope, "key");
    }
    // The nonce was not consumed by the dry runs.
    let request = pb::AuthorizeRequest {
        api_key: key.secret.clone(),
        client_ip: "203.0.113.9".into(),
        signature: Some(signature),
        min_revision: 0,
    };
    assert_eq!(decide(&mut authz, request.clone()).await, ALLOW);
    assert_eq!(
        decide(&mut authz, request).await,
        denied(DenyReason::NonceReused)
    );
    // Without a signature the IP answer still comes back.
    let check = admin
        .check_access(pb::CheckAccessRequest {
            key: Some(pb::check_access_request::Key::ApiKey(key.secret.clone())),
            client_ip: "198.51.100.1".into(),
            signature: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.reason(), DenyReason::IpNotAllowed);
    assert!(!check.ip_allowed);
}

#[tokio::test]
async fn list_keys_pages_and_filters() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    for i in 0..5 {
        create_key(
            &mut admin,
            if i % 2 == 0 { "acme" } else { "globex" },
            "production",
            &[],
        )
        .await;
    }
    create_key(&mut admin, "acme", "sandbox", &[]).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_keys(pb::ListKeysRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= 2);
        seen.extend(page.keys.into_iter().map(|k| k.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 6);
    let acme_prod = admin
        .list_keys(pb::ListKeysRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme_prod.keys.len(), 3);
    assert!(
        acme_prod
            .keys
            .iter()
            .all(|k| k.partner_id == "acme" && k.environment == "production")
    );
    assert_eq!(
        admin
            .list_keys(pb::ListKeysRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        admin
            .get_key(pb::GetKeyRequest {
                key_id: "key_nope".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn health_reports_serving() {
    let server = Server::start(&[]);
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(Server::channel(server.data_addr).await);
    for service in [
        "",
        "keyfence.v1.Authorizer",
        "envoy.service.auth.v3.Authorization",
    ] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    let mut admin_health = tonic_health::pb::health_client::HealthClient::new(
        Server::channel(server.admin_addr).await,
    );
    let response = admin_health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keyfence.v1.Admin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test]
async fn secrets_are_never_logged() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    decide(&mut authz, authorize_request(&key.secret, "203.0.113.1")).await;
    decide(
        &mut authz,
        authorize_request("kf_live_guessing_attempt", "203.0.113.1"),
    )
    .await;
    let log = server.log();
    assert!(log.contains("key created"), "the log was captured");
    assert!(!log.contains(&key.secret));
    assert!(!log.contains("kf_live_guessing_attempt"));
}

#[tokio::test]
async fn revoking_a_revoked_key_changes_nothing() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let first = admin
        .revoke_key(pb::RevokeKeyRequest { key_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut again = tonic::Request::new(pb::RevokeKeyRequest { key_id: id.clone() });
    again
        .metadata_mut()
        .insert("x-keyfence-actor", "someone-else".parse().unwrap());
    let second = admin.revoke_key(again).await.unwrap().into_inner();
    assert_eq!(second.revision, first.revision, "no new revision");
    assert_eq!(
        second.key, first.key,
        "the audit fields name the first revocation"
    );
    let list = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: key_scope(&id),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.revision, first.revision, "the store made no write");
}
