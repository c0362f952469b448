//! What the deployment files rely on, through the real binary: `keyfence config check` accepts
//! every configuration in `deploy/` and names what is wrong in a bad one; `keyfence health`
//! (the image's HEALTHCHECK) tells a serving listener from one that is not; and the container
//! image's commands are ones the CLI accepts. `scripts/test` adds the checks that need outside
//! tools: hadolint, kustomize, kubernetes-validate and Envoy's config validation.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use clap::Parser;
use common::{BIN, Server, pki::Ca};
use keyfence::cli::Cli;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The binary with none of the caller's `KEYFENCE_*` settings.
fn keyfence(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .expect("run keyfence")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn last_error_line(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn config_check_accepts_every_config_in_deploy() {
    let mut configs = Vec::new();
    toml_files(Path::new(DEPLOY), &mut configs);
    configs.sort();
    let names: Vec<String> = configs
        .iter()
        .map(|p| p.strip_prefix(DEPLOY).unwrap().display().to_string())
        .collect();
    for expected in [
        "keyfence.toml",
        "kubernetes/overlays/single/keyfence.toml",
        "kubernetes/overlays/replicated/keyfence.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    for config in &configs {
        // The files these configurations name (TLS material, tokens) are mounted in a real
        // deployment and absent here, so only the settings are checked.
        let output = keyfence(&[
            "config",
            "check",
            "--settings-only",
            "--config",
            config.to_str().unwrap(),
        ]);
        assert!(
            output.status.success(),
            "{}: {}",
            config.display(),
            text(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).starts_with("configuration ok"),
            "{}",
            text(&output)
        );
    }
}

#[test]
fn config_check_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, contents: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let check = |args: &[&str]| {
        let mut all = vec!["config", "check"];
        all.extend_from_slice(args);
        keyfence(&all)
    };

    let typo = file("typo.toml", "lisen = \"0.0.0.0:50051\"\n");
    let output = check(&["--config", &typo]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: invalid configuration: config file {typo}: "
        )) && stderr.contains("unknown field `lisen`"),
        "{}",
        text(&output)
    );

    let open_admin = file("open.toml", "admin_listen = \"0.0.0.0:50052\"\n");
    let output = check(&["--config", &open_admin]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        last_error_line(&output).starts_with(
            "error: invalid configuration: admin_listen: 0.0.0.0:50052 is not on loopback"
        ),
        "{}",
        text(&output)
    );
    // A flag is checked the way serve takes it, and wins over the file.
    let output = check(&[
        "--config",
        &open_admin,
        "--admin-listen",
        "127.0.0.1:50052",
        "--signature-window-secs",
        "0",
    ]);
    assert_eq!(
        last_error_line(&output),
        "error: invalid configuration: signature_window_secs: must be at least 1"
    );

    // The files a configuration names are read, unless --settings-only.
    let missing_tls = file(
        "tls.toml",
        &format!(
            "tls_cert = \"{0}/missing.crt\"\ntls_key = \"{0}/missing.key\"\n",
            dir.path().display()
        ),
    );
    let output = check(&["--config", &missing_tls]);
    assert_eq!(output.status.code(), Some(1));
    let error = last_error_line(&output);
    assert!(
        error.starts_with(&format!(
            "error: data plane TLS: {}/missing.crt: ",
            dir.path().display()
        )),
        "{}",
        text(&output)
    );
    assert_eq!(error.matches("No such file").count(), 1, "{error}");
    let output = check(&["--config", &missing_tls, "--settings-only"]);
    assert!(output.status.success(), "{}", text(&output));

    let tokens = file("tokens", "alice sha256:nothex\n");
    let output = check(&["--admin-tokens-file", &tokens]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        last_error_line(&output)
            .starts_with(&format!("error: admin credentials: {tokens} line 1:")),
        "{}",
        text(&output)
    );

    // Real files pass, and checking them writes nothing.
    let ca = Ca::new(dir.path(), "ca");
    let data = ca.server(dir.path(), "data", "keyfence-data");
    let admin = ca.server(dir.path(), "admin", "keyfence-admin");
    let line = keyfence(&["admin-token", "new", "--name", "ci"]);
    let tokens_line = String::from_utf8_lossy(&line.stdout)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let tokens = file("good-tokens", &format!("{tokens_line}\n"));
    let data_dir = dir.path().join("data");
    let good = file(
        "good.toml",
        &format!(
            "listen = \"0.0.0.0:50051\"\nadmin_listen = \"0.0.0.0:50052\"\n\
             data_dir = \"{}\"\nadmin_tokens_file = \"{tokens}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n\
             admin_tls_cert = \"{}\"\nadmin_tls_key = \"{}\"\n",
            data_dir.display(),
            data.cert.display(),
            data.key.display(),
            ca.cert.display(),
            admin.cert.display(),
            admin.key.display(),
        ),
    );
    let output = check(&["--config", &good]);
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with(&format!(
            "configuration ok ({good}): settings valid; files checked: data plane TLS; admin TLS; admin tokens\n"
        )),
        "{stdout}"
    );
    assert!(
        !data_dir.exists(),
        "config check created the data directory"
    );
}

#[test]
fn health_exits_0_only_when_serving() {
    let server = Server::start(&[]);
    let data = server.data_addr.to_string();
    let admin = server.admin_addr.to_string();

    let output = keyfence(&["health", "--addr", &data]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "SERVING\n");
    for (addr, service) in [
        (&data, "keyfence.v1.Authorizer"),
        (&data, "envoy.service.auth.v3.Authorization"),
        (&admin, "keyfence.v1.Admin"),
    ] {
        let output = keyfence(&["health", "--addr", addr, "--service", service]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{service}: {}",
            text(&output)
        );
    }

    let output = keyfence(&["health", "--addr", &data, "--service", "no.such.Service"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        last_error_line(&output),
        format!("error: http://{data} reports no health for service no.such.Service")
    );

    let output = keyfence(&["health", "--addr", "127.0.0.1:1", "--timeout", "2s"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        last_error_line(&output).starts_with("error: cannot reach http://127.0.0.1:1: "),
        "{}",
        text(&output)
    );
}

#[test]
fn health_speaks_tls_to_a_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let data = ca.server(dir.path(), "data", "keyfence-data");
    let server = Server::start(&[
        "--tls-cert",
        data.cert.to_str().unwrap(),
        "--tls-key",
        data.key.to_str().unwrap(),
    ]);
    let addr = format!("https://localhost:{}", server.data_addr.port());
    let output = keyfence(&[
        "health",
        "--addr",
        &addr,
        "--ca-cert",
        ca.cert.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let output = keyfence(&["health", "--addr", &addr]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        last_error_line(&output).contains("give --ca-cert"),
        "{}",
        text(&output)
    );
}

/// The Containerfile's instructions, continuation lines joined, comments left out.
fn instructions(containerfile: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut current = String::new();
    for line in containerfile.lines().map(str::trim) {
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                all.push(std::mem::take(&mut current));
            }
        }
    }
    all
}

/// The last instruction `name` (the runtime stage's), in exec form, as its argument list.
fn exec_form(containerfile: &str, name: &str) -> Vec<String> {
    let instruction = instructions(containerfile)
        .into_iter()
        .rev()
        .find(|i| i.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in deploy/Containerfile"));
    let json = &instruction[instruction
        .find('[')
        .unwrap_or_else(|| panic!("{name} is not in exec form: {instruction}"))..];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{name}: {e}: {json}"))
}

#[test]
fn the_image_runs_commands_the_cli_accepts() {
    let containerfile = std::fs::read_to_string(format!("{DEPLOY}/Containerfile")).unwrap();
    let entrypoint = exec_form(&containerfile, "ENTRYPOINT");
    let cmd = exec_form(&containerfile, "CMD");
    let healthcheck = exec_form(&containerfile, "HEALTHCHECK");
    assert_eq!(entrypoint, ["/usr/local/bin/keyfence"]);
    assert_eq!(
        healthcheck[0], "/usr/local/bin/keyfence",
        "the binary itself"
    );
    assert!(
        containerfile.contains("COPY --from=build /out/keyfence /usr/local/bin/keyfence"),
        "the binary is where ENTRYPOINT and HEALTHCHECK look"
    );
    let serve: Vec<&str> = std::iter::once("keyfence")
        .chain(cmd.iter().map(String::as_str))
        .collect();
    Cli::try_parse_from(&serve).unwrap_or_else(|e| panic!("CMD {cmd:?}: {e}"));
    let health: Vec<&str> = std::iter::once("keyfence")
        .chain(healthcheck[1..].iter().map(String::as_str))
        .collect();
    Cli::try_parse_from(&health).unwrap_or_else(|e| panic!("HEALTHCHECK {healthcheck:?}: {e}"));
    assert_eq!(healthcheck[1], "health");
}
