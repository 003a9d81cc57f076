//! Secret files: read only if no one else can, written only as 0600 and
//! never over an existing file; and the private directories that hold
//! them (0700).

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

/// Creates `path` with mode 0600 holding `text`; fails if it exists.
pub fn create(path: &Path, text: &str) -> Result<(), SecretFileError> {
    let shown = path.display().to_string();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            SecretFileError::Exists(shown.clone())
        } else {
            SecretFileError::Io {
                path: shown.clone(),
                source,
            }
        }
    })?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|source| SecretFileError::Io {
            path: shown,
            source,
        })
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

/// Opens `path` for writing, creating it with mode 0600 if missing
/// (truncating it otherwise, and narrowing a looser mode): for files that
/// are private but not secret, such as a pinned public key.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut file = opts.open(path).map_err(io_at(path))?;
    private_file(path)?;
    file.write_all(contents)
        .and_then(|_| file.sync_all())
        .map_err(io_at(path))
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
}
