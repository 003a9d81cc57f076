//! Secret files: read only if no one else can, written only as 0600 and
//! never over an existing file; and the private directories that hold
//! them (0700).

#[cfg(feature = "files")]
use std::io::Write as _;
use std::path::Path;

use zeroize::Zeroizing;

/// Why a secret file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file is readable or writable by group or others.
    #[error("{path} has mode {mode:o}: a secret file must not be accessible to group or others (chmod 600)")]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// The file exists already (secret files are never overwritten).
    #[error("{0} exists; refusing to overwrite a secret file")]
    Exists(String),
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Reads a secret file, refusing one that group or others may access.
pub fn read(path: &Path) -> Result<Zeroizing<String>, SecretFileError> {
    let shown = path.display().to_string();
    let io = |source| SecretFileError::Io {
        path: shown.clone(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SecretFileError::Permissions {
                path: shown,
                mode: mode & 0o777,
            });
        }
    }
    Ok(Zeroizing::new(std::fs::read_to_string(path).map_err(io)?))
}

#[cfg(feature = "files")]
/// Creates `path` with mode 0600 holding `text`; fails if it exists.
///
/// Written atomically ([`write_atomic`] without overwriting): a reader
/// (an orchestrator starting, an agent) sees no file or the whole file,
/// never half a key, even if this process dies mid-write.
pub fn create(path: &Path, text: &str) -> Result<(), SecretFileError> {
    write_atomic(path, text.as_bytes(), Overwrite::Never)
}

#[cfg(feature = "files")]
/// Whether [`write_atomic`] may replace an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Fail with [`SecretFileError::Exists`] if `path` exists (keys,
    /// identities: never replaced by accident).
    Never,
    /// Replace it (a pinned key, a rotated credential): readers see the
    /// old or the new contents, never a mix.
    Replace,
}

#[cfg(feature = "files")]
/// Writes `contents` to `path` atomically, with mode 0600: a temporary
/// file in the same directory (made 0600 from the start, so the secret is
/// never readable by others even for a moment), written, fsynced, then
/// renamed over `path` (or linked to it without replacing, with
/// [`Overwrite::Never`]), and the directory fsynced so the rename survives
/// a power loss. If anything fails, the temporary file is removed and
/// `path` is as it was: there is never a half-written secret file.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    overwrite: Overwrite,
) -> Result<(), SecretFileError> {
    let shown = path.display().to_string();
    let io = |source| SecretFileError::Io {
        path: shown.clone(),
        source,
    };
    if overwrite == Overwrite::Never && std::fs::symlink_metadata(path).is_ok() {
        return Err(SecretFileError::Exists(shown));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    // The directory's own error first ("No such file or directory").
    std::fs::metadata(dir).map_err(|e| SecretFileError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    // tempfile makes the file with O_EXCL and mode 0600 on Unix.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| io(without_temp_path(e)))?;
    tmp.write_all(contents)
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(io)?;
    match overwrite {
        Overwrite::Replace => tmp.persist(path).map(|_| ()),
        Overwrite::Never => tmp.persist_noclobber(path).map(|_| ()),
    }
    .map_err(|e| {
        // `e` holds the temporary file, removed when dropped here.
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            SecretFileError::Exists(shown.clone())
        } else {
            io(e.error)
        }
    })?;
    sync_dir(dir).map_err(io)
}

#[cfg(feature = "files")]
/// tempfile's error without the temporary file's name (the target's is
/// the one a person needs).
fn without_temp_path(e: std::io::Error) -> std::io::Error {
    std::io::Error::from(e.kind())
}

#[cfg(feature = "files")]
/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` and its missing parents, each new one with mode 0700;
/// directories that exist are left as they are.
pub fn create_private_dirs(dir: &Path) -> Result<(), SecretFileError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_at(dir))
}

/// Narrows `path` to `mode` if group or others may access it (a file or
/// directory made by an older version, or under a loose umask). Returns
/// whether it had to.
fn narrow(path: &Path, mode: u32) -> Result<bool, SecretFileError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let current = std::fs::metadata(path)
            .map_err(io_at(path))?
            .permissions()
            .mode();
        if current & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io_at(path))?;
            return Ok(true);
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(false)
}

/// Makes `dir` a private directory, for a process's secrets and state:
/// created with mode 0700 if missing (parents too), narrowed to 0700 if
/// group or others may access it. Returns whether it was narrowed.
pub fn private_dir(dir: &Path) -> Result<bool, SecretFileError> {
    create_private_dirs(dir)?;
    narrow(dir, 0o700)
}

/// Narrows an existing file to 0600 if group or others may access it.
/// Returns whether it had to.
pub fn private_file(path: &Path) -> Result<bool, SecretFileError> {
    narrow(path, 0o600)
}

#[cfg(feature = "files")]
/// Writes `path` with mode 0600, replacing it if it exists (atomically:
/// see [`write_atomic`]): for files that are private, secret or not, such
/// as a pinned public key or a PIN file.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    write_atomic(path, contents, Overwrite::Replace)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn private_dirs_and_files_are_made_and_narrowed() {
        let base = tempfile::tempdir().expect("tempdir");
        let dir = base.path().join("a/b");
        assert!(!private_dir(&dir).expect("made"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.path().join("a")), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(private_dir(&dir).expect("narrowed"));
        assert_eq!(mode(&dir), 0o700);

        let file = dir.join("f");
        write_private(&file, b"x").expect("write");
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&file, b"y").expect("rewrite");
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read(&file).expect("read"), b"y");
        assert!(!private_file(&file).expect("already private"));
    }

    /// Names in `dir` other than `keep`.
    fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| !keep.contains(&n.as_str()))
            .collect()
    }

    #[test]
    fn secret_files_are_0600_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.key");
        // Made 0600 from the start (tempfile opens it so), whatever the
        // umask: it can only narrow a mode.
        create(&path, "secret\n").expect("create");
        assert_eq!(mode(&path), 0o600);
        assert!(matches!(
            create(&path, "other\n"),
            Err(SecretFileError::Exists(_))
        ));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret\n");
        assert!(leftovers(dir.path(), &["cluster.key"]).is_empty());
    }

    #[test]
    fn a_write_that_fails_leaves_no_half_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The target is a directory: the rename fails after the contents
        // were written to the temporary file.
        let target = dir.path().join("domain.key");
        std::fs::create_dir(&target).expect("mkdir");
        std::fs::write(target.join("inside"), b"x").expect("write");
        let err = write_atomic(&target, b"secret", Overwrite::Replace).expect_err("refused");
        assert!(matches!(err, SecretFileError::Io { .. }), "{err}");
        assert!(target.is_dir(), "the directory is untouched");
        assert!(
            leftovers(dir.path(), &["domain.key"]).is_empty(),
            "no temporary file left: {:?}",
            leftovers(dir.path(), &["domain.key"])
        );
        // A directory nobody may write to: nothing is made (unless root,
        // who may write anywhere; then the write must be whole).
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        let path = ro.join("pin");
        match write_private(&path, b"1234") {
            Err(_) => assert!(leftovers(&ro, &[]).is_empty()),
            Ok(()) => {
                assert_eq!(std::fs::read(&path).expect("read"), b"1234");
                assert_eq!(mode(&path), 0o600);
                assert!(leftovers(&ro, &["pin"]).is_empty());
            }
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }

    #[test]
    fn replacing_keeps_0600_and_the_whole_new_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pinned");
        std::fs::write(&path, b"old old old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, b"new").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(mode(&path), 0o600);
        assert!(leftovers(dir.path(), &["pinned"]).is_empty());
    }
}
