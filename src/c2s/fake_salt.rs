//! The fake-salt secret (`data_dir/fake-salt.key`): SCRAM answers a name
//! that is not an account with a salt derived from it. Kept on disk (0600)
//! so those salts stay the same across restarts, as real accounts' do; a
//! salt that changed with every restart would tell the name is not real.

use anyhow::Context;
use natter_sasl::FakeSaltKey;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const FILE: &str = "fake-salt.key";

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Read the key, or create it on first start. A file in the way that is
/// not a key is an error naming it, never silently replaced (that would
/// change every unknown name's salt).
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<FakeSaltKey> {
    let path = path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = parse(text.trim()).with_context(|| {
                format!(
                    "{} is not a fake-salt key (64 hex digits); delete it to create a new one",
                    path.display()
                )
            })?;
            // Tighten a key left readable by others (older versions, a copy).
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot make {} private (0600)", path.display()))?;
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = FakeSaltKey::generate();
            create(data_dir, &key)
                .with_context(|| format!("cannot write the fake-salt key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn parse(hex: &str) -> Option<FakeSaltKey> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(FakeSaltKey::from_bytes(bytes))
}

fn create(data_dir: &Path, key: &FakeSaltKey) -> std::io::Result<()> {
    let hex: String = key.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    natter_store::files::write_private(data_dir, FILE, format!("{hex}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.as_bytes(), b.as_bytes());
        // A loosened file is tightened again.
        std::fs::set_permissions(path(dir.path()), std::fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "not hex\n").unwrap();
        let e = format!("{:#}", load_or_create(dir.path()).err().unwrap());
        assert!(e.contains(FILE) && e.contains("delete it"), "{e}");
    }
}
