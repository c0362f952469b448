//! The decision path production runs, without gRPC: `authz::Decider::decide` (snapshot load,
//! engine, nonce settlement, decision metrics) against a compiled `PolicySnapshot` on the
//! embedded store's in-process nonce ledger, with the access log off; plus the cost of
//! recompiling one key and of building a whole snapshot.
//!
//! Snapshots:
//! - `100k_keys_x10`: 100,000 keys with 10 IPv4 allowlist entries each (prefix lengths 16..=32).
//!   Keys rotate through signature schemes by index (i % 3: none, HMAC-SHA256, Ed25519), so each
//!   request kind cycles through ~33,000 different keys, which is what makes the key map and the
//!   tries miss the cache the way they would in production.
//! - `1_key_x100k`: one key with 100,000 entries (one snapshot per signature scheme, each holding
//!   just that key), cycling through 1024 client addresses.
//!
//! Requests: presented secrets `kf_live_bench{i:08}`, one client address inside one of the key's
//! entries (allowed) or in 192.0.0.0/8, which no entry covers (denied: `ip_not_allowed`). Signed
//! requests use an empty nonce, so the nonce ledger is never touched (its cost is not measured
//! here), and a timestamp equal to `now`'s seconds. No partner lists, no rate limits.
//!
//! Every request list is decided once before timing and must give the expected verdict. The
//! decider reads a fixed clock (`NOW`), so signed timestamps stay inside the window.
//!
//! Run: `cargo bench --bench decision`.

use std::{hint::black_box, net::IpAddr, net::Ipv4Addr, time::Duration};

use base64::Engine as _;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main,
    measurement::WallTime,
};
use ed25519_dalek::{Signer, SigningKey};
use keyfence::{
    authz::{Decider, DeciderParts, Limits, Nonces, Origin},
    sync::PolicySync,
    telemetry::metrics::Metrics,
};
use keyfence_policy::{
    clock::FixedClock,
    decision::{AuthzRequest, DenyReason, Engine, KeySelector, Mode, Verdict},
    ip::Cidr,
    model::{
        AllowlistEntry, Audit, Enforcement, KeyRecord, KeyStatus, SecretHash, SignatureScheme,
        UnixMillis,
    },
    nonce::NonceLedger,
    signature::{SignedRequest, canonical_string, sign_hmac},
    snapshot::{KeyMaterial, PolicySnapshot, SharedPolicy},
};
use keyfence_store::{access_log::Frontend, embedded::EmbeddedStore};

const KEYS: usize = 100_000;
const ENTRIES_PER_KEY: usize = 10;
const BIG_LIST: usize = 100_000;
const BIG_LIST_ADDRS: usize = 1024;

const NOW_SECS: i64 = 1_700_000_000;
const NOW: UnixMillis = UnixMillis(NOW_SECS * 1000);
const METHOD: &str = "POST";
const PATH: &str = "/v1/payments?limit=10";
const BODY: &[u8] = br#"{"amount":1000,"currency":"EUR"}"#;
/// Client addresses in this /8 are never allowed: generated entries avoid its first octet.
const DENIED_OCTET: u8 = 192;

/// SplitMix64: tiny, seeded, deterministic.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn range(&mut self, lo: u8, hi: u8) -> u8 {
        lo + (self.next_u64() % (u64::from(hi - lo) + 1)) as u8
    }

    fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len as u64) as usize
    }
}

/// A random IPv4 network outside 192.0.0.0/8, prefix length 16..=32.
fn random_cidr(rng: &mut SplitMix64) -> Cidr {
    let mut bits = rng.next_u32();
    if (bits >> 24) as u8 == DENIED_OCTET {
        bits ^= 1 << 24;
    }
    let len = rng.range(16, 32);
    Cidr::from_parts(IpAddr::V4(Ipv4Addr::from(bits)), len).expect("valid IPv4 prefix")
}

/// An address inside `cidr`, host bits random.
fn addr_in(cidr: Cidr, rng: &mut SplitMix64) -> String {
    let IpAddr::V4(network) = cidr.net().network() else {
        unreachable!("benchmark entries are IPv4")
    };
    let IpAddr::V4(hostmask) = cidr.net().hostmask() else {
        unreachable!("benchmark entries are IPv4")
    };
    Ipv4Addr::from(u32::from(network) | (u32::from(hostmask) & rng.next_u32())).to_string()
}

fn denied_addr(rng: &mut SplitMix64) -> String {
    let bits = (u32::from(DENIED_OCTET) << 24) | (rng.next_u32() >> 8);
    Ipv4Addr::from(bits).to_string()
}

fn entry(cidr: Cidr) -> AllowlistEntry {
    AllowlistEntry {
        cidr,
        description: String::new(),
        added: Audit {
            actor: "bench".into(),
            at: UnixMillis(0),
        },
        expires_at: None,
    }
}

fn presented(i: usize) -> String {
    format!("kf_live_bench{i:08}")
}

fn hmac_secret(i: usize) -> Vec<u8> {
    format!("hmac secret of key {i:08} .......").into_bytes()
}

fn ed25519_signer() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    None,
    Hmac,
    Ed25519,
}

/// `keyfence_policy::fixtures::record` with the benchmark's own ids, partners and schemes.
fn record(i: usize, scheme: Scheme) -> KeyRecord {
    let at = Audit {
        actor: "bench".into(),
        at: UnixMillis(0),
    };
    KeyRecord {
        id: format!("key_bench{i:08}").parse().expect("valid key id"),
        partner_id: format!("partner-{:04}", i % 1000)
            .parse()
            .expect("valid partner id"),
        environment: "production".parse().expect("valid environment"),
        name: format!("bench key {i}"),
        display_prefix: "kf_live_".into(),
        secret_hash: SecretHash::of(&presented(i)),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature: match scheme {
            Scheme::None => SignatureScheme::None,
            Scheme::Hmac => SignatureScheme::HmacSha256 {
                secret: hmac_secret(i),
            },
            Scheme::Ed25519 => SignatureScheme::Ed25519 {
                public_key: ed25519_signer().verifying_key().to_bytes(),
            },
        },
        require_nonce: false,
        rate_limit: None,
        expires_at: None,
        created: at.clone(),
        updated: at,
    }
}

fn scheme_of(i: usize) -> Scheme {
    match i % 3 {
        0 => Scheme::None,
        1 => Scheme::Hmac,
        _ => Scheme::Ed25519,
    }
}

fn ed25519_signature() -> String {
    let message = canonical_string(NOW_SECS, "", METHOD, PATH, BODY);
    base64::engine::general_purpose::STANDARD.encode(ed25519_signer().sign(&message).to_bytes())
}

/// One request to replay.
struct Case {
    secret: String,
    ip: String,
    signature: Option<String>,
}

impl Case {
    fn request(&self) -> AuthzRequest<'_> {
        AuthzRequest {
            key: KeySelector::Presented(&self.secret),
            // The edge parses the address; so does the benchmark, per request.
            client_ip: self.ip.parse().ok(),
            signature: self.signature.as_deref().map(|signature| SignedRequest {
                signature,
                timestamp: NOW_SECS,
                nonce: "",
                method: METHOD,
                path: PATH,
                body: BODY,
                body_complete: true,
            }),
        }
    }
}

/// The 100k-key snapshot's inputs, and requests against it.
struct ManyKeys {
    materials: Vec<KeyMaterial>,
    allowed_plain: Vec<Case>,
    denied_plain: Vec<Case>,
    allowed_hmac: Vec<Case>,
    allowed_ed25519: Vec<Case>,
}

fn clone_material(material: &KeyMaterial) -> KeyMaterial {
    KeyMaterial {
        record: material.record.clone(),
        entries: material.entries.clone(),
    }
}

fn many_keys() -> ManyKeys {
    let mut rng = SplitMix64(0x6B65_7966_656E_6365);
    let ed_signature = ed25519_signature();
    let mut out = ManyKeys {
        materials: Vec::with_capacity(KEYS),
        allowed_plain: Vec::new(),
        denied_plain: Vec::new(),
        allowed_hmac: Vec::new(),
        allowed_ed25519: Vec::new(),
    };
    for i in 0..KEYS {
        let scheme = scheme_of(i);
        let cidrs: Vec<Cidr> = (0..ENTRIES_PER_KEY)
            .map(|_| random_cidr(&mut rng))
            .collect();
        let allowed_ip = addr_in(cidrs[rng.index(cidrs.len())], &mut rng);
        let secret = presented(i);
        match scheme {
            Scheme::None => {
                out.denied_plain.push(Case {
                    secret: secret.clone(),
                    ip: denied_addr(&mut rng),
                    signature: None,
                });
                out.allowed_plain.push(Case {
                    secret,
                    ip: allowed_ip,
                    signature: None,
                });
            }
            Scheme::Hmac => out.allowed_hmac.push(Case {
                secret,
                ip: allowed_ip,
                signature: Some(sign_hmac(&hmac_secret(i), NOW_SECS, "", METHOD, PATH, BODY)),
            }),
            Scheme::Ed25519 => out.allowed_ed25519.push(Case {
                secret,
                ip: allowed_ip,
                signature: Some(ed_signature.clone()),
            }),
        }
        out.materials.push(KeyMaterial {
            record: record(i, scheme),
            entries: cidrs.into_iter().map(entry).collect(),
        });
    }
    out
}

/// Snapshots of one key with `BIG_LIST` entries (one per scheme), and requests against them.
struct OneBigKey {
    snapshots: [(Scheme, PolicySnapshot); 3],
    allowed_ips: Vec<String>,
    denied_ips: Vec<String>,
}

fn one_big_key() -> OneBigKey {
    let mut rng = SplitMix64(0x6269_676C_6973_7421);
    let cidrs: Vec<Cidr> = (0..BIG_LIST).map(|_| random_cidr(&mut rng)).collect();
    let allowed_ips = (0..BIG_LIST_ADDRS)
        .map(|_| addr_in(cidrs[rng.index(cidrs.len())], &mut rng))
        .collect();
    let denied_ips = (0..BIG_LIST_ADDRS).map(|_| denied_addr(&mut rng)).collect();
    let entries: Vec<AllowlistEntry> = cidrs.into_iter().map(entry).collect();
    let build = |scheme| {
        let material = KeyMaterial {
            record: record(0, scheme),
            entries: entries.clone(),
        };
        let snapshot = PolicySnapshot::build(1, vec![material], vec![]);
        eprintln!(
            "1_key_x100k ({}): {} key, {} entries",
            scheme_name(scheme),
            snapshot.key_count(),
            snapshot.entry_count()
        );
        assert_eq!(snapshot.key_count(), 1);
        assert_eq!(snapshot.entry_count(), BIG_LIST);
        (scheme, snapshot)
    };
    OneBigKey {
        snapshots: [
            build(Scheme::None),
            build(Scheme::Hmac),
            build(Scheme::Ed25519),
        ],
        allowed_ips,
        denied_ips,
    }
}

fn scheme_name(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::None => "unsigned",
        Scheme::Hmac => "hmac",
        Scheme::Ed25519 => "ed25519",
    }
}

/// The decision service as `server::run` builds it for the embedded store, serving `snapshot`
/// at a fixed clock, with the access log off. The store behind the sync is empty and never read:
/// the snapshot is published directly.
struct BenchDecider {
    decider: Decider,
    runtime: tokio::runtime::Runtime,
    _data_dir: tempfile::TempDir,
}

fn decider(snapshot: &PolicySnapshot) -> BenchDecider {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(
        data_dir.path(),
        keyfence_store::sealing::Sealer::ephemeral(),
    )
    .expect("embedded store");
    let policy = std::sync::Arc::new(SharedPolicy::default());
    policy.publish(snapshot.clone());
    let decider = Decider::new(DeciderParts {
        engine: Engine {
            signature_window_secs: 300,
            require_nonce: false,
        },
        clock: std::sync::Arc::new(FixedClock(NOW)),
        sync: PolicySync::new(std::sync::Arc::new(store), policy),
        nonces: Nonces::Local(NonceLedger::default()),
        min_revision_wait: Duration::from_secs(2),
        min_revision_max_waiters: 256,
        max_staleness: None,
        limits: Limits {
            max_inflight: 1024,
            decision_timeout: Duration::from_secs(3),
        },
        metrics: std::sync::Arc::new(Metrics::new(None)),
        access: None,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    BenchDecider {
        decider,
        runtime,
        _data_dir: data_dir,
    }
}

const ORIGIN: Origin<'static> = Origin {
    frontend: Frontend::Authorize,
    endpoint: None,
};

/// Decides every case once and checks the verdict, then times `decide` cycling through them.
fn bench_cases(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    snapshot: &PolicySnapshot,
    cases: &[Case],
    expected: Verdict,
) {
    let BenchDecider {
        decider, runtime, ..
    } = &decider(snapshot);
    runtime.block_on(async {
        for case in cases {
            let decision = decider
                .decide(&case.request(), 0, Mode::Enforce, ORIGIN)
                .await
                .expect("a decision");
            assert_eq!(
                decision.verdict, expected,
                "{name}: unexpected verdict for {} from {}",
                case.secret, case.ip
            );
        }
    });
    group.bench_function(name, |b| {
        let mut i = 0usize;
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let started = std::time::Instant::now();
                for _ in 0..iterations {
                    let case = &cases[i % cases.len()];
                    i = i.wrapping_add(1);
                    let request = case.request();
                    black_box(
                        decider
                            .decide(black_box(&request), 0, Mode::Enforce, ORIGIN)
                            .await
                            .expect("a decision"),
                    );
                }
                started.elapsed()
            })
        });
    });
}

fn benches(c: &mut Criterion) {
    // 100,000 keys x 10 entries.
    let many = many_keys();
    let started = std::time::Instant::now();
    let snapshot = PolicySnapshot::build(1, many.materials.iter().map(clone_material), vec![]);
    eprintln!(
        "100k_keys_x10: {} keys, {} entries, built in {:.2?} (untimed warm-up build), compiled allowlists {:.1} MiB",
        snapshot.key_count(),
        snapshot.entry_count(),
        started.elapsed(),
        allowlist_bytes(&snapshot, &many.materials) as f64 / (1024.0 * 1024.0),
    );
    assert_eq!(snapshot.key_count(), KEYS);
    assert_eq!(snapshot.entry_count(), KEYS * ENTRIES_PER_KEY);

    let allow = Verdict::Allow;
    let deny = Verdict::Deny(DenyReason::IpNotAllowed);
    {
        let mut group = c.benchmark_group("decide/100k_keys_x10");
        bench_cases(
            &mut group,
            "allow_unsigned",
            &snapshot,
            &many.allowed_plain,
            allow,
        );
        bench_cases(&mut group, "deny_ip", &snapshot, &many.denied_plain, deny);
        bench_cases(
            &mut group,
            "allow_hmac",
            &snapshot,
            &many.allowed_hmac,
            allow,
        );
        bench_cases(
            &mut group,
            "allow_ed25519",
            &snapshot,
            &many.allowed_ed25519,
            allow,
        );
        group.finish();
    }

    // 1 key x 100,000 entries.
    {
        let big = one_big_key();
        let ed_signature = ed25519_signature();
        let hmac_signature = sign_hmac(&hmac_secret(0), NOW_SECS, "", METHOD, PATH, BODY);
        let cases = |ips: &[String], signature: Option<&String>| -> Vec<Case> {
            ips.iter()
                .map(|ip| Case {
                    secret: presented(0),
                    ip: ip.clone(),
                    signature: signature.cloned(),
                })
                .collect()
        };
        let mut group = c.benchmark_group("decide/1_key_x100k");
        for (scheme, snapshot) in &big.snapshots {
            match scheme {
                Scheme::None => {
                    let allowed = cases(&big.allowed_ips, None);
                    bench_cases(&mut group, "allow_unsigned", snapshot, &allowed, allow);
                    let denied = cases(&big.denied_ips, None);
                    bench_cases(&mut group, "deny_ip", snapshot, &denied, deny);
                }
                Scheme::Hmac => {
                    let allowed = cases(&big.allowed_ips, Some(&hmac_signature));
                    bench_cases(&mut group, "allow_hmac", snapshot, &allowed, allow);
                }
                Scheme::Ed25519 => {
                    let allowed = cases(&big.allowed_ips, Some(&ed_signature));
                    bench_cases(&mut group, "allow_ed25519", snapshot, &allowed, allow);
                }
            }
        }
        group.finish();
    }

    // Recompiling one key of the 100k-key snapshot: clone (persistent maps, O(1)) + upsert.
    {
        let mut rng = SplitMix64(0x7570_7365_7274_2121);
        let new_entries: Vec<AllowlistEntry> = (0..ENTRIES_PER_KEY)
            .map(|_| entry(random_cidr(&mut rng)))
            .collect();
        let record0 = many.materials[0].record.clone();
        let mut group = c.benchmark_group("snapshot");
        group.bench_function("upsert_one_key_10_entries_in_100k", |b| {
            b.iter_batched(
                || KeyMaterial {
                    record: record0.clone(),
                    entries: new_entries.clone(),
                },
                |material| {
                    let mut next = snapshot.clone();
                    next.upsert_key(material);
                    next
                },
                BatchSize::SmallInput,
            );
        });
        group.finish();
    }

    // The full build of 100k keys x 10 entries. Cloning the inputs and dropping the result are
    // outside the timing.
    {
        let mut group = c.benchmark_group("snapshot");
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(10));
        group.bench_function("build_100k_keys_x10", |b| {
            b.iter_batched(
                || {
                    many.materials
                        .iter()
                        .map(clone_material)
                        .collect::<Vec<_>>()
                },
                |materials| PolicySnapshot::build(1, materials, vec![]),
                BatchSize::PerIteration,
            );
        });
        group.finish();
    }
}

/// Trie bytes of every key's compiled allowlist (the IPv4 and IPv6 tables it has).
fn allowlist_bytes(snapshot: &PolicySnapshot, materials: &[KeyMaterial]) -> usize {
    materials
        .iter()
        .map(|m| {
            snapshot
                .key_by_id(&m.record.id)
                .expect("every key was compiled")
                .allowlist
                .mem_size()
        })
        .sum()
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = decision;
    config = config();
    targets = benches
}
criterion_main!(decision);
