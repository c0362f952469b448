//! The data directory's permissions: it holds the stores and the secrets key file, so it is 0700
//! and everything in it 0600, whoever created them. [`prepare`] runs at start, before any store
//! opens: it creates the directory 0700, or fixes an existing one and every file and directory in
//! it, and refuses to start, naming the path and the command that fixes it, when it cannot.
//!
//! Invariant: nothing here follows a symbolic link; a link in the data directory is refused,
//! since fixing its target's mode could change a file outside the directory.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

/// Why the data directory cannot be made private.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create the data directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path} is a symbolic link; the data directory may hold only regular files and directories: replace it with the file it points to"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path} has mode {found:04o}, and it cannot be changed to {wanted:04o} ({source}); as its owner or root run: chown -R \"$(id -un)\" {dir} && chmod {wanted:o} {path}"
    )]
    Mode {
        path: PathBuf,
        dir: PathBuf,
        found: u32,
        wanted: u32,
        source: std::io::Error,
    },
}

/// The mode of the data directory and of every directory in it.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file in the data directory.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` 0700, or makes an existing `dir` 0700 and everything in it 0700 (directories)
/// or 0600 (files). Each mode it changes is logged.
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    match fs::symlink_metadata(dir) {
        Err(error) if error.kind() == ErrorKind::NotFound => create(dir),
        Err(source) => Err(DataDirError::Read {
            path: dir.to_owned(),
            source,
        }),
        Ok(meta) if meta.file_type().is_symlink() => {
            // The directory itself may be a link (a volume mounted elsewhere): follow it once.
            let target = fs::metadata(dir).map_err(|source| DataDirError::Read {
                path: dir.to_owned(),
                source,
            })?;
            if !target.is_dir() {
                return Err(DataDirError::NotADirectory {
                    path: dir.to_owned(),
                });
            }
            fix_tree(dir, dir)
        }
        Ok(meta) if !meta.is_dir() => Err(DataDirError::NotADirectory {
            path: dir.to_owned(),
        }),
        Ok(_) => fix_tree(dir, dir),
    }
}

fn create(dir: &Path) -> Result<(), DataDirError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder.create(dir).map_err(|source| DataDirError::Create {
        path: dir.to_owned(),
        source,
    })?;
    // The umask may have taken bits away, never added them; set the mode exactly all the same.
    set_mode(dir, dir, DIR_MODE)
}

/// Fixes `path` (a directory) and, depth first, everything under it.
fn fix_tree(root: &Path, path: &Path) -> Result<(), DataDirError> {
    set_mode(root, path, DIR_MODE)?;
    let read_error = |source| DataDirError::Read {
        path: path.to_owned(),
        source,
    };
    for entry in fs::read_dir(path).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let child = entry.path();
        let kind = entry.file_type().map_err(|source| DataDirError::Read {
            path: child.clone(),
            source,
        })?;
        if kind.is_symlink() {
            return Err(DataDirError::Symlink { path: child });
        } else if kind.is_dir() {
            fix_tree(root, &child)?;
        } else {
            set_mode(root, &child, FILE_MODE)?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(root: &Path, path: &Path, wanted: u32) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::symlink_metadata(path).map_err(|source| DataDirError::Read {
        path: path.to_owned(),
        source,
    })?;
    let found = meta.permissions().mode() & 0o7777;
    if found == wanted {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(wanted)).map_err(|source| {
        DataDirError::Mode {
            path: path.to_owned(),
            dir: root.to_owned(),
            found,
            wanted,
            source,
        }
    })?;
    tracing::warn!(
        path = %path.display(),
        from = format!("{found:04o}"),
        to = format!("{wanted:04o}"),
        "made private: the data directory holds signing secrets"
    );
    Ok(())
}

#[cfg(not(unix))]
fn set_mode(_root: &Path, _path: &Path, _wanted: u32) -> Result<(), DataDirError> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_a_missing_directory_private() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a/b");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn fixes_an_existing_tree() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("loose.txt"), "x").unwrap();
        fs::write(dir.join("sub/deeper"), "x").unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dir.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(dir.join("loose.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(dir.join("sub/deeper"), fs::Permissions::from_mode(0o4755)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert_eq!(mode(&dir.join("loose.txt")), 0o600);
        assert_eq!(mode(&dir.join("sub/deeper")), 0o600);
    }

    #[test]
    fn refuses_a_symlink_inside_and_a_file_in_place_of_the_directory() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        fs::create_dir(&dir).unwrap();
        fs::write(temp.path().join("outside"), "x").unwrap();
        std::os::unix::fs::symlink(temp.path().join("outside"), dir.join("link")).unwrap();
        let error = prepare(&dir).unwrap_err().to_string();
        assert!(
            error.contains("link") && error.contains("symbolic link"),
            "{error}"
        );

        let file = temp.path().join("plain");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            prepare(&file),
            Err(DataDirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn the_refusal_names_the_path_and_the_fix() {
        let error = DataDirError::Mode {
            path: "/var/lib/keyfence/keyfence.redb".into(),
            dir: "/var/lib/keyfence".into(),
            found: 0o644,
            wanted: 0o600,
            source: std::io::Error::from(ErrorKind::PermissionDenied),
        };
        let text = error.to_string();
        assert!(
            text.contains("/var/lib/keyfence/keyfence.redb has mode 0644"),
            "{text}"
        );
        assert!(
            text.contains("chown -R \"$(id -un)\" /var/lib/keyfence && chmod 600 /var/lib/keyfence/keyfence.redb"),
            "{text}"
        );
    }
}
