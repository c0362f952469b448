//! The `keyfence` CLI against a real server: the README walkthrough exactly as printed, JSON for
//! scripts, CSV import, exit statuses, errors that exit non-zero with the server's message (each
//! cause once, naming the file), help on every flag and shell completions.

mod common;

use std::{
    path::Path,
    process::{Command, Output},
};

use common::{ALLOW, BIN, Server, admin_cli, authorize_request, decide, succeeded};

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
    assert!(out.ends_with("exit status 2\n"), "DENY exits 2: {out}");
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
    let denied = cli(
        &server,
        dir.path(),
        &["check", "--json", "--key-id", &id, "--ip", "192.0.2.1"],
    );
    assert_eq!(denied.status.code(), Some(2), "DENY exits 2");
    let check: serde_json::Value = serde_json::from_slice(&denied.stdout).unwrap();
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

#[test]
fn every_flag_argument_and_command_has_help() {
    use clap::CommandFactory;
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                let name = arg
                    .get_long()
                    .map(|long| format!("--{long}"))
                    .unwrap_or_else(|| format!("<{}>", arg.get_id()));
                missing.push(format!("{path} {name}"));
            }
        }
        for sub in command.get_subcommands() {
            let sub_path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(sub_path.clone());
            }
            walk(sub, &sub_path, missing);
        }
    }
    let mut missing = Vec::new();
    walk(&keyfence::cli::Cli::command(), "keyfence", &mut missing);
    assert!(missing.is_empty(), "without help text: {missing:#?}");
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_exits_2_on_deny_and_an_unchecked_ip_is_not_called_not_allowed() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| cli(&server, dir.path(), args);
    stdout(&run(&[
        "keys",
        "create",
        "--partner",
        "acme",
        "--env",
        "sandbox",
        "--name",
        "exit codes",
        "--allow",
        "203.0.113.0/24",
        "--secret-file",
        "acme.key",
    ]));

    let allowed = run(&["check", "--key-file", "acme.key", "--ip", "203.0.113.7"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", stderr(&allowed));
    let denied = run(&["check", "--key-file", "acme.key", "--ip", "198.51.100.7"]);
    assert_eq!(denied.status.code(), Some(2), "{}", stderr(&denied));
    assert!(stderr(&denied).is_empty(), "a denial is no error");
    let denied_json = run(&[
        "check",
        "--json",
        "--key-file",
        "acme.key",
        "--ip",
        "198.51.100.7",
    ]);
    assert_eq!(denied_json.status.code(), Some(2));

    // An unknown key stops before the allowlist: the listed IP was not checked, not refused.
    let unknown = run(&["check", "--key", "kf_test_unknown", "--ip", "203.0.113.7"]);
    assert_eq!(unknown.status.code(), Some(2));
    let text = String::from_utf8_lossy(&unknown.stdout);
    assert!(text.contains("reason    unknown_key"), "{text}");
    assert!(
        text.contains("ip        203.0.113.7 (not checked)"),
        "{text}"
    );
    assert!(!text.contains("not allowed"), "{text}");
    let unknown_json: serde_json::Value = serde_json::from_slice(
        &run(&[
            "check",
            "--json",
            "--key",
            "kf_test_unknown",
            "--ip",
            "203.0.113.7",
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(unknown_json["ip_allowed"], serde_json::Value::Null);

    // Errors, a bad command line among them, exit 1: 2 means DENY and nothing else.
    let no_server = Command::new(BIN)
        .args(["check", "--key", "kf_test_x", "--ip", "203.0.113.7"])
        .args(["--admin-addr", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(no_server.status.code(), Some(1));
    let usage = Command::new(BIN)
        .args(["check", "--ip", "203.0.113.7", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(1), "{}", stderr(&usage));
    assert!(stderr(&usage).contains("--no-such-flag"));
    let help = Command::new(BIN)
        .args(["check", "--help"])
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
}

#[test]
fn errors_name_the_file_and_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .env_remove("KEYFENCE_ADMIN_TOKEN")
            .env_remove("KEYFENCE_CONFIG")
            .output()
            .unwrap()
    };
    let cases: [(&[&str], &str); 4] = [
        (
            &["check", "--key-file", "missing.key", "--ip", "192.0.2.1"],
            "error: cannot read --key-file missing.key: No such file or directory (os error 2)",
        ),
        (
            &["serve", "--config", "missing.toml"],
            "error: invalid configuration: cannot read config file missing.toml: No such file or directory (os error 2)",
        ),
        (
            &["config", "check", "--config", "missing.toml"],
            "error: invalid configuration: cannot read config file missing.toml: No such file or directory (os error 2)",
        ),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
                "data",
                "--admin-tokens-file",
                "missing-tokens",
            ],
            "error: admin credentials: missing-tokens: No such file or directory (os error 2)",
        ),
    ];
    for (args, expected) in cases {
        let output = run(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let last = stderr(&output);
        let last = last.lines().last().unwrap_or_default();
        assert_eq!(last, expected, "{args:?}");
    }
}

#[test]
fn the_cli_pointed_at_the_data_plane_says_so() {
    let server = Server::start(&[]);
    let output = Command::new(BIN)
        .args(["keys", "list"])
        .env(
            "KEYFENCE_ADMIN_ADDR",
            format!("http://{}", server.data_addr),
        )
        .env("KEYFENCE_ADMIN_TOKEN_FILE", server.admin_token_file())
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(!message.contains("error: UNIMPLEMENTED"), "{message}");
    assert!(
        message.contains(&format!(
            "http://{} does not serve keyfence's Admin API",
            server.data_addr
        )) && message.contains("is it the data-plane port?")
            && message.contains("--admin-listen"),
        "{message}"
    );
}

#[test]
fn a_second_serve_on_the_same_port_says_what_holds_it() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--listen", &server.data_addr.to_string()])
        .args(["--admin-listen", "127.0.0.1:0", "--data-dir", "data"])
        .current_dir(dir.path())
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    let last = message.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("error: cannot bind {}: ", server.data_addr))
            && last.contains("is another `keyfence serve` running? Stop it")
            && last.matches("in use").count() == 1,
        "{message}"
    );
}

#[tokio::test]
async fn update_rotate_and_revoke_show_the_last_use_as_get_does() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| cli(&server, dir.path(), args);
    let json =
        |output: Output| -> serde_json::Value { serde_json::from_str(&stdout(&output)).unwrap() };
    let created = json(run(&[
        "keys",
        "create",
        "--json",
        "--partner",
        "acme",
        "--env",
        "production",
        "--name",
        "last use",
        "--allow",
        "203.0.113.0/24",
    ]));
    let id = created["key"]["id"].as_str().unwrap().to_owned();
    let secret = created["secret"].as_str().unwrap().to_owned();
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, authorize_request(&secret, "203.0.113.7")).await,
        ALLOW
    );
    // Last use is coalesced and written every few seconds.
    let started = std::time::Instant::now();
    let shown = loop {
        let got = json(run(&["keys", "get", "--json", &id]));
        if !got["key"]["last_used_at"].is_null() {
            break got;
        }
        assert!(started.elapsed().as_secs() < 20, "last use never shown");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let last_used = (
        shown["key"]["last_used_at"].clone(),
        shown["key"]["last_used_ip"].clone(),
    );
    assert_eq!(last_used.1, "203.0.113.7");
    let table_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("last used"))
            .map(str::to_owned)
    };
    let get_line = table_line(&stdout(&run(&["keys", "get", &id])));
    assert!(
        get_line
            .as_deref()
            .is_some_and(|l| l.contains("from 203.0.113.7"))
    );

    for args in [
        vec!["keys", "update", &id, "--name", "renamed"],
        vec!["keys", "rotate", &id, "--grace", "1h"],
        vec!["keys", "revoke", &id],
    ] {
        let mut with_json = args.clone();
        with_json.push("--json");
        let written = json(run(&with_json));
        assert_eq!(
            (
                written["key"]["last_used_at"].clone(),
                written["key"]["last_used_ip"].clone()
            ),
            last_used,
            "{args:?}"
        );
        if args[1] != "revoke" {
            assert_eq!(table_line(&stdout(&run(&args))), get_line, "{args:?}");
        }
    }
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    let generate = |shell: &str| {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success(), "{shell}: {}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let bash = generate("bash");
    let zsh = generate("zsh");
    let fish = generate("fish");
    assert!(zsh.starts_with("#compdef keyfence"), "{zsh}");
    assert!(fish.contains("complete -c keyfence"), "{fish}");
    for (shell, script) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
        for word in ["allowlist", "completions", "admin-addr", "key-file"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    // Bash loads it and completes keyfence's subcommands.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keyfence.bash"), &bash).unwrap();
    let completed = Command::new("bash")
        .args([
            "-c",
            "source ./keyfence.bash && COMP_WORDS=(keyfence al) COMP_CWORD=1 COMP_LINE='keyfence al' \
             COMP_POINT=11 && _keyfence keyfence al keyfence && echo \"${COMPREPLY[*]}\"",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(completed.status.success(), "{}", stderr(&completed));
    assert_eq!(
        String::from_utf8_lossy(&completed.stdout).trim(),
        "allowlist"
    );
    let unknown = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
}
