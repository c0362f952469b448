//! The architecture invariants ARCHITECTURE.md states, checked: crate dependencies through
//! `cargo tree`, and the few that live inside this package through its source text. Each check
//! names the file or crate that broke it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The crates `package` depends on (normal dependencies), to `depth` levels (None: all).
fn dependencies(package: &str, depth: Option<u32>) -> BTreeSet<String> {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(ROOT)
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["-p", package]);
    if let Some(depth) = depth {
        command.args(["--depth", &depth.to_string()]);
    }
    let output = command.output().expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != package)
        .map(str::to_owned)
        .collect()
}

fn assert_none_of(package: &str, found: &BTreeSet<String>, forbidden: &[&str]) {
    let present: Vec<&&str> = forbidden
        .iter()
        .filter(|name| found.contains(**name))
        .collect();
    assert!(
        present.is_empty(),
        "{package} must not depend on {present:?} (ARCHITECTURE.md)"
    );
}

/// Per crate: a dependency `cargo tree` must list (so an empty answer cannot pass), the crates
/// it must not depend on at any depth, and those it must not name directly.
const CRATE_BOUNDARIES: [(&str, &str, &[&str], &[&str]); 3] = [
    (
        "keyfence-policy",
        "ipnet",
        &[
            "tokio",
            "tonic",
            "prost",
            "redb",
            "redis",
            "rand",
            "hyper",
            "getrandom",
        ],
        &[],
    ),
    (
        "keyfence-store",
        "redb",
        &["tonic", "prost", "hyper", "http", "keyfence-admin", "rand"],
        &[],
    ),
    // The admin layer reaches storage only through the store's trait.
    (
        "keyfence-admin",
        "keyfence-store",
        &["tonic", "prost", "hyper", "http", "rand"],
        &["redb", "redis", "tokio"],
    ),
];

#[test]
fn each_crate_depends_only_on_what_its_layer_allows() {
    for (package, expected, forbidden, forbidden_directly) in CRATE_BOUNDARIES {
        let all = dependencies(package, None);
        assert!(
            all.contains(expected),
            "cargo tree -p {package} listed {all:?}"
        );
        assert_none_of(package, &all, forbidden);
        assert_none_of(package, &dependencies(package, Some(1)), forbidden_directly);
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Source files under `dir` (relative to the repository) with their text, comments included.
fn sources(dir: &str) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&Path::new(ROOT).join(dir), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable source");
            let relative = path
                .strip_prefix(ROOT)
                .expect("under the root")
                .display()
                .to_string();
            (relative, text)
        })
        .collect()
}

/// Lines that are code, not comments.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|line| {
        let trimmed = line.trim_start();
        !trimmed.starts_with("//")
    })
}

fn offenders(dir: &str, allowed: &[&str], needles: &[&str]) -> Vec<String> {
    sources(dir)
        .into_iter()
        .filter(|(path, _)| !allowed.iter().any(|prefix| path.starts_with(prefix)))
        .filter_map(|(path, text)| {
            let hit = code_lines(&text)
                .find(|line| needles.iter().any(|needle| line.contains(needle)))?
                .trim()
                .to_owned();
            Some(format!("{path}: {hit}"))
        })
        .collect()
}

#[test]
fn only_the_grpc_edge_and_the_cli_name_generated_types_or_statuses() {
    let found = offenders(
        "src",
        &["src/grpc", "src/cli", "src/main.rs"],
        &[
            "pb::",
            "tonic::Status",
            "tonic::Code",
            "Server<",
            "NamedService",
        ],
    );
    assert!(found.is_empty(), "outside src/grpc and src/cli: {found:#?}");
}

#[test]
fn only_the_ext_authz_adapter_names_envoys_types() {
    let found = offenders("src", &["src/grpc/ext_authz"], &["envoy_types"]);
    assert!(found.is_empty(), "outside src/grpc/ext_authz: {found:#?}");
}

#[test]
fn errors_become_statuses_in_one_table() {
    let found = offenders(
        "src",
        &["src/grpc/status.rs"],
        &["for Status", "for tonic::Status"],
    );
    assert!(
        found.is_empty(),
        "status conversions outside grpc/status.rs: {found:#?}"
    );
}

#[test]
fn the_policy_core_never_reads_the_clock_or_the_os_generator() {
    let found = offenders(
        "crates/keyfence-policy/src",
        &[],
        &[
            "SystemTime::now",
            "Instant::now",
            "OsRng",
            "thread_rng",
            "rand::",
        ],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn metrics_is_a_leaf_that_access_reports_to() {
    let found = offenders(
        "src/telemetry",
        &[],
        &["crate::access", "crate::authz", "crate::grpc"],
    );
    assert!(found.is_empty(), "telemetry imports a reporter: {found:#?}");
}

#[test]
fn the_server_wires_and_names_no_generated_type() {
    let (_, text) = sources("src")
        .into_iter()
        .find(|(path, _)| path == "src/server.rs")
        .expect("src/server.rs");
    for needle in [
        "AuthorizerServer",
        "AdminServer",
        "AuthorizationServer",
        "set_serving::<",
    ] {
        assert!(!text.contains(needle), "src/server.rs names {needle}");
    }
}
