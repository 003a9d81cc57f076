//! Secret files: read only if no one else can, written only as 0600 and
//! never over an existing file.

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
