//! Reading and writing a key list file (`keys.json`).
//!
//! Every change happens under an exclusive lock on `<file>.lock` and is
//! written atomically (temporary file in the same directory, fsync, rename),
//! so concurrent runs never lose a change and readers never see half a file.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use keygate_core::config::KeyList;
use keygate_core::keylist::validate_key_list;

use crate::error::{Failure, Result};

/// Reads and validates the key list at `path`; `Ok(None)` if there is no file.
pub fn read(path: &Path) -> Result<Option<KeyList>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::because(
                format!("cannot read {}", path.display()),
                e,
            ))
        }
    };
    validate_key_list(&bytes)
        .map(Some)
        .map_err(|errors| Failure::config(Some(&path.display().to_string()), &errors))
}

/// Reads the key list at `path`, which must exist.
pub fn read_existing(path: &Path) -> Result<KeyList> {
    read(path)?.ok_or_else(|| Failure::new(format!("{} does not exist", path.display())))
}

/// Locks `path`, reads it (an empty list if missing and `create` is set),
/// lets `change` edit it, and if `change` returns `true` writes it back with
/// the version bumped. Returns the version on disk afterwards.
pub fn update(
    path: &Path,
    create: bool,
    change: impl FnOnce(&mut KeyList) -> Result<bool>,
) -> Result<u64> {
    let _lock = lock(path)?;
    let mut list = match read(path)? {
        Some(list) => list,
        None if create => KeyList::default(),
        None => return Err(Failure::new(format!("{} does not exist", path.display()))),
    };
    if !change(&mut list)? {
        return Ok(list.version);
    }
    list.version = list
        .version
        .checked_add(1)
        .ok_or_else(|| Failure::new(format!("{}: version cannot grow any more", path.display())))?;
    write(path, &list)?;
    Ok(list.version)
}

/// Takes the exclusive lock on `<path>.lock`, waiting for other holders.
/// The lock is released when the returned file is dropped.
fn lock(path: &Path) -> Result<File> {
    let mut name = OsString::from(path.as_os_str());
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Failure::because(format!("cannot open {}", lock_path.display()), e))?;
    file.lock()
        .map_err(|e| Failure::because(format!("cannot lock {}", lock_path.display()), e))?;
    Ok(file)
}

/// Validates `list` and writes it to `path` atomically.
fn write(path: &Path, list: &KeyList) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(list)
        .map_err(|e| Failure::because("cannot serialize the key list", e))?;
    bytes.push(b'\n');
    if let Err(errors) = validate_key_list(&bytes) {
        let mut failure = Failure::config(None, &errors);
        failure.lines.insert(
            0,
            format!(
                "refusing to write {}: the result would be invalid",
                path.display()
            ),
        );
        return Err(failure);
    }
    write_atomic(path, &bytes)
}

/// Replaces the file at `path` (the target, if it is a symbolic link) with
/// `bytes` atomically: a temporary file in the same directory, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // Replace the target of a symbolic link, not the link.
    let target = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path)
            .map_err(|e| Failure::because(format!("cannot resolve {}", path.display()), e))?,
        _ => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io_err =
        |e: std::io::Error| Failure::because(format!("cannot write {}", path.display()), e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".keygate-")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(io_err)?;
    // Keep the mode of the file replaced; a new file holds no secret (digests
    // only) and gets 0644 so that a control plane running as another user can read it.
    match fs::metadata(&target) {
        Ok(meta) => tmp.as_file().set_permissions(meta.permissions()),
        Err(_) => new_file_permissions(tmp.as_file()),
    }
    .map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(&target).map_err(|e| io_err(e.error))?;
    // Make the rename durable; not every file system lets a directory be synced.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(unix)]
fn new_file_permissions(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn new_file_permissions(_file: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::config::KeyConfig;

    fn key(id: &str) -> KeyConfig {
        KeyConfig {
            id: id.into(),
            sha256: "ab".repeat(32),
            ..KeyConfig::default()
        }
    }

    #[test]
    fn update_creates_bumps_and_refuses_invalid_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        assert!(read(&path).unwrap().is_none());
        assert!(update(&path, false, |_| Ok(true)).is_err());

        let v = update(&path, true, |l| {
            l.keys.push(key("a"));
            Ok(true)
        })
        .unwrap();
        assert_eq!(v, 1);
        let v = update(&path, true, |_| Ok(false)).unwrap();
        assert_eq!(v, 1);

        // Same digest twice: refused, file unchanged.
        let err = update(&path, true, |l| {
            l.keys.push(key("b"));
            Ok(true)
        })
        .unwrap_err();
        assert!(err.lines[0].starts_with("refusing to write"), "{err:?}");
        let list = read_existing(&path).unwrap();
        assert_eq!(list.version, 1);
        assert_eq!(list.keys.len(), 1);
        assert!(dir.path().join("keys.json.lock").exists());
    }

    #[test]
    fn a_broken_file_is_reported_with_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        fs::write(
            &path,
            r#"{"version":1,"keys":[{"id":"a","sha256":"nope"}]}"#,
        )
        .unwrap();
        let err = read(&path).unwrap_err();
        assert!(err.lines[0].ends_with(
            "keys.json: keys[0].sha256: must be 64 hex characters (the SHA-256 of the key, never the key)"
        ), "{err:?}");
    }
}
