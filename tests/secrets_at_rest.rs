//! Secrets at rest, through the real binary: the data directory is private whoever made it, and
//! the stored bytes of either backend never hold a signing secret.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path};

use common::Server;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `dir` with its mode.
fn modes_under(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.push((path.display().to_string(), mode(&path)));
        if path.is_dir() {
            out.extend(modes_under(&path));
        }
    }
    out
}

#[tokio::test]
async fn a_data_dir_made_0755_with_a_0644_file_ends_up_0700_and_0600() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stray = data.join("left-by-someone.txt");
    std::fs::write(&stray, "x").unwrap();
    std::fs::set_permissions(&stray, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut server = Server::start_in(temp.path(), &[]);
    let mut admin = server.admin().await;
    common::create_key(&mut admin, "acme", "production", &["10.0.0.0/8"]).await;

    assert_eq!(mode(&data), 0o700, "the data directory");
    let files = modes_under(&data);
    assert!(
        files.iter().any(|(p, _)| p.ends_with("keyfence.redb")),
        "{files:?}"
    );
    for (path, mode) in &files {
        assert_eq!(*mode, 0o600, "{path} (all: {files:?})");
    }
    assert!(server.log().contains("made private"), "{}", server.log());
    server.kill();
}
