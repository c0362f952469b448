//! The `keyfence` CLI against a real server: the README walkthrough exactly as printed, JSON for
//! scripts, CSV import, and errors that exit non-zero with the server's message.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{BIN, Server, admin_cli, succeeded};

fn cli(server: &Server, dir: &Path, args: &[&str]) -> Output {
    admin_cli(server, dir, args)
}

fn stdout(output: &Output) -> String {
    succeeded(output)
}

/// The shell block after the walkthrough marker in README.md.
fn readme_walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let after = readme
        .split("<!-- walkthrough")
        .nth(1)
        .expect("walkthrough marker in README.md");
    let block = after
        .split("```sh\n")
        .nth(1)
        .expect("a sh block after the marker");
    block.split("```").next().unwrap().to_owned()
}

#[test]
fn readme_walkthrough_works_as_printed() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // The reader runs the CLI where `keyfence serve` ran, so ./keyfence-data is the server's data
    // directory and the CLI finds the admin token it generated there.
    std::os::unix::fs::symlink(
        server.data_dir.join("data"),
        dir.path().join("keyfence-data"),
    )
    .unwrap();
    let script = readme_walkthrough();
    assert!(script.contains("keyfence check"), "{script}");
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .env(
            "KEYFENCE_ADMIN_ADDR",
            format!("http://{}", server.admin_addr),
        )
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .env_remove("KEYFENCE_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    let out = stdout(&output);
    let decisions: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("decision") || l.starts_with("reason"))
        .collect();
    assert_eq!(
        decisions,
        [
            "decision  ALLOW",
            "decision  DENY",
            "reason    ip_not_allowed"
        ],
        "{out}"
    );
    assert!(
        out.contains("matched   203.0.113.0/24 on the partner allowlist, \"acme egress NAT\""),
        "{out}"
    );
    // The secret went to the file, not to the terminal.
    let secret = std::fs::read_to_string(dir.path().join("acme.key")).unwrap();
    assert!(secret.starts_with("kf_test_"));
    assert!(!out.contains(&secret));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("acme.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn json_output_import_and_errors() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let created: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &server,
        dir.path(),
        &[
            "keys",
            "create",
            "--json",
            "--partner",
            "globex",
            "--env",
            "production",
            "--name",
            "globex api",
            "--scheme",
            "hmac-sha256",
            "--allow",
            "192.0.2.0/24",
        ],
    )))
    .unwrap();
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    assert!(created["secret"].as_str().unwrap().starts_with("kf_live_"));
    assert!(created["signing_secret"].as_str().unwrap().len() >= 40);
    assert_eq!(created["key"]["created_by"], "admin/ci-bot");
    assert_eq!(
        created["key"]["ip_allowlist_enabled"], true,
        "the CLI enables the allowlist by default"
    );

    // An import with one bad line changes nothing and names the line.
    let csv = dir.path().join("entries.csv");
    std::fs::write(&csv, "cidr,description\n198.51.100.0/24,\"office, berlin\"\n2001:db8::/32,v6 egress\n010.0.0.1,typo\n").unwrap();
    let failed = cli(
        &server,
        dir.path(),
        &[
            "allowlist",
            "import",
            "--key-id",
            &id,
            "--file",
            "entries.csv",
        ],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(
            "INVALID_ARGUMENT: entries[2].cidr: \"010.0.0.1\" is not an IPv4 or IPv6 address"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("entries.csv:4"), "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &server,
        dir.path(),
        &["allowlist", "list", "--json", "--key-id", &id],
    )))
    .unwrap();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 1);

    std::fs::write(
        &csv,
        "cidr,description\n198.51.100.0/24,\"office, berlin\"\n2001:db8::/32,v6 egress\n",
    )
    .unwrap();
    let imported: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &server,
        dir.path(),
        &[
            "allowlist",
            "import",
            "--json",
            "--key-id",
            &id,
            "--file",
            "entries.csv",
        ],
    )))
    .unwrap();
    let entries = imported["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert!(entries.iter().any(|e| e["cidr"] == "198.51.100.0/24"
        && e["description"] == "office, berlin"
        && e["added_by"] == "admin/ci-bot"));

    // Errors exit non-zero with the server's message.
    let missing = cli(&server, dir.path(), &["keys", "get", "key_doesnotexist"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr).trim(),
        "error: NOT_FOUND: key key_doesnotexist not found"
    );
    let bad_env = cli(
        &server,
        dir.path(),
        &[
            "keys",
            "create",
            "--partner",
            "globex",
            "--env",
            "staging",
            "--name",
            "x",
        ],
    );
    assert!(!bad_env.status.success());
    assert!(
        String::from_utf8_lossy(&bad_env.stderr)
            .contains("INVALID_ARGUMENT: environment: \"staging\" is not a configured environment")
    );

    // Table output lists the key; revoke then shows it revoked.
    let table = stdout(&cli(
        &server,
        dir.path(),
        &["keys", "list", "--partner", "globex"],
    ));
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(table.contains(&id), "{table}");
    let revoked = stdout(&cli(&server, dir.path(), &["keys", "revoke", &id]));
    assert!(revoked.contains("revoked"), "{revoked}");
    let check: serde_json::Value = serde_json::from_str(&stdout(&cli(
        &server,
        dir.path(),
        &["check", "--json", "--key-id", &id, "--ip", "192.0.2.1"],
    )))
    .unwrap();
    assert_eq!(check["decision"], "deny");
    assert_eq!(check["reason"], "key_revoked");
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let output = Command::new(BIN)
        .args(["keys", "list", "--admin-addr", "http://127.0.0.1:1"])
        .env_remove("KEYFENCE_ADMIN_ADDR")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: cannot reach the admin service at http://127.0.0.1:1"),
        "{stderr}"
    );
}
