//! Files only natter's own user may read: the database (SCRAM keys, every archive), its
//! WAL and SHM, the data directory and what natter keeps in it. Modes are set explicitly
//! (0700 directories, 0600 files) so they don't depend on the umask, and files found with
//! group or other permissions are tightened, with a warning naming them.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents 0700; an existing directory is left as it is
/// (it may be the operator's, e.g. the parent of a configured database path).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    // mkdir's mode goes through the umask; set it exactly.
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Creates `dir` 0700, or takes group and other permissions away from it.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    create_dir(dir)?;
    tighten(dir)
}

/// Creates an empty `path` 0600, or takes group and other permissions away from it.
pub fn private_file(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => f.set_permissions(Permissions::from_mode(FILE_MODE)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => tighten(path),
        Err(e) => Err(e),
    }
}

/// Writes `contents` to `dir/name` 0600, replacing it atomically: through a temporary
/// file, synced, then renamed, so a crash never leaves a torn or readable secret.
pub fn write_private(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    create_dir(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    // The umask may have narrowed the mode; never widened it.
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))
}

/// Takes group and other permissions away from `path` if it exists, warning when there
/// were any (someone may have read it meanwhile).
pub fn tighten(path: &Path) -> io::Result<()> {
    let mode = match fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let private = mode & !0o077;
    fs::set_permissions(path, Permissions::from_mode(private))?;
    tracing::warn!(
        path = %path.display(),
        was = format!("{mode:04o}"),
        now = format!("{private:04o}"),
        "took group and other permissions away from a private file"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn created_private_and_existing_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("f");
        private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);

        fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        fs::write(&file, b"kept").unwrap();
        private_file(&file).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!((mode(&dir), mode(&file)), (0o700, 0o600));
        assert_eq!(
            fs::read(&file).unwrap(),
            b"kept",
            "an existing file keeps its data"
        );

        // Stricter modes stay; an operator's existing directory is not touched.
        fs::set_permissions(&file, Permissions::from_mode(0o400)).unwrap();
        tighten(&file).unwrap();
        assert_eq!(mode(&file), 0o400);
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o755);
        tighten(&dir.join("missing")).unwrap();
    }
}
