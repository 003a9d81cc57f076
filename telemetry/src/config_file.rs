//! `--config FILE`: a binary's flags from a TOML file.
//!
//! The file's keys are the binary's long option names with `-` replaced by
//! `_` (`--nats` is `nats`, `--pkcs11-token-label` is
//! `pkcs11_token_label`); values have the flag's type: strings, integers,
//! floats, booleans for switches, and arrays for options that may be
//! repeated. A key the binary does not know is refused, naming the key and
//! the file, so a typo never silently falls back to a default.
//!
//! Precedence: a command-line flag, then its environment variable, then the
//! file, then the built-in default. The file's values become the options'
//! *defaults* before clap parses, so clap's own order (argument > `env` >
//! default) gives exactly that, its `ArgMatches::value_source` stays
//! truthful, and there is one list of options: the clap definition. A
//! separate serde struct with `deny_unknown_fields` would have to repeat
//! every option and could drift from the flags.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("config file {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config file {file} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// A key that names no option of this binary.
    #[error("config file {file}: unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The keys this binary knows, comma-separated.
        known: String,
    },
    /// A value of the wrong shape for its option.
    #[error("config file {file}: `{key}` {expected}")]
    BadValue {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// What the option takes.
        expected: &'static str,
    },
}

/// The config key of an option: its long name with `-` replaced by `_`.
fn key_of(arg: &clap::Arg) -> Option<String> {
    arg.get_long().map(|l| l.replace('-', "_"))
}

/// Options a file may not set: the file itself, help and version.
const NOT_IN_FILE: [&str; 3] = ["config", "help", "version"];

/// One scalar as clap reads it on a command line.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(_) | toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// `cmd` with the options set in `table` (read from `file`) as defaults.
pub fn apply(
    mut cmd: clap::Command,
    table: &toml::Table,
    file: &Path,
) -> Result<clap::Command, ConfigFileError> {
    let bad = |key: &str, expected: &'static str| ConfigFileError::BadValue {
        file: file.to_path_buf(),
        key: key.to_string(),
        expected,
    };
    for (key, value) in table {
        let arg = cmd
            .get_arguments()
            .find(|a| key_of(a).as_deref() == Some(key.as_str()))
            .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()));
        let Some(arg) = arg else {
            let known: Vec<String> = cmd
                .get_arguments()
                .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
                .filter_map(key_of)
                .collect();
            return Err(ConfigFileError::UnknownKey {
                file: file.to_path_buf(),
                key: key.clone(),
                known: known.join(", "),
            });
        };
        let id = arg.get_id().clone();
        let values: Vec<String> = match arg.get_action() {
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse => match value {
                toml::Value::Boolean(b) => vec![b.to_string()],
                _ => return Err(bad(key, "is a switch: true or false")),
            },
            clap::ArgAction::Append => match value {
                toml::Value::Array(items) => {
                    items
                        .iter()
                        .map(scalar)
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| bad(key, "takes an array of strings or numbers"))?
                }
                other => vec![scalar(other).ok_or_else(|| bad(key, "takes a string or number"))?],
            },
            _ => match value {
                toml::Value::Array(_) => {
                    return Err(bad(
                        key,
                        "takes one value, not an array (it cannot be repeated)",
                    ))
                }
                other => vec![scalar(other).ok_or_else(|| bad(key, "takes a string or number"))?],
            },
        };
        // Required options are satisfied by the file: clap refuses a
        // required option with a default, so it stops being required. The
        // file's values stay out of `--help` (one may be a password).
        cmd = cmd.mut_arg(id, |a| {
            let takes_value = a.get_action().takes_values();
            let a = a.default_values(values).required(false);
            if takes_value {
                a.hide_default_value(true)
            } else {
                a
            }
        });
    }
    Ok(cmd)
}

/// The `--config FILE` (or `--config=FILE`) on a command line, if any.
/// Stops at `--`.
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(rest) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(PathBuf::from(rest));
        }
    }
    None
}

/// Reads `file` as a TOML table.
pub fn read(file: &Path) -> Result<toml::Table, ConfigFileError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigFileError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigFileError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string(),
        })
}

/// The error of [`try_parse_from`]: the file's, or clap's (help and
/// version included, which clap prints and exits 0 on).
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The config file.
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// The command line (after the file's defaults).
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// Parses `args` into `T`, with the file named by `--config` (if any) as
/// defaults.
pub fn try_parse_from<T: clap::Parser>(args: Vec<OsString>) -> Result<T, ParseError> {
    let mut cmd = T::command();
    if let Some(file) = config_path(&args) {
        let table = read(&file)?;
        cmd = apply(cmd, &table, &file)?;
    }
    let mut matches = cmd.try_get_matches_from_mut(args)?;
    Ok(T::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd))?)
}

/// [`try_parse_from`] on this process's arguments; prints the error and
/// exits 2 on a bad file or bad arguments, as clap does.
pub fn parse<T: clap::Parser>() -> T {
    match try_parse_from(std::env::args_os().collect()) {
        Ok(t) => t,
        Err(ParseError::Args(e)) => e.exit(),
        Err(ParseError::File(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Each test uses its own environment variable names: tests run in
    /// parallel in one process.
    #[derive(Debug, Parser)]
    struct Args {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(
            long,
            env = "KEYSYNC_CFGTEST_NATS",
            default_value = "nats://127.0.0.1:4222"
        )]
        nats: String,
        #[arg(long, env = "KEYSYNC_CFGTEST_ID")]
        id: String,
        #[arg(long, default_value_t = 1.0)]
        heartbeat_interval: f64,
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long)]
        verbose: bool,
        #[arg(long = "route")]
        routes: Vec<String>,
        #[arg(long)]
        pkcs11_token_label: Option<String>,
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write as _;
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    fn parse(args: &[&str]) -> Result<Args, ParseError> {
        try_parse_from(
            std::iter::once("bin")
                .chain(args.iter().copied())
                .map(Into::into)
                .collect(),
        )
    }

    #[test]
    fn the_file_sets_every_kind_of_value_and_satisfies_required_options() {
        let f = file(
            "id = \"hsm-1\"\nheartbeat_interval = 0.5\nreplicas = 3\nverbose = true\n\
             route = [\"a\", \"b\"]\npkcs11_token_label = \"tok\"\n",
        );
        let path = f.path().to_str().expect("utf-8 path");
        let a = parse(&["--config", path]).expect("parses");
        assert_eq!(a.id, "hsm-1");
        assert_eq!(a.heartbeat_interval, 0.5);
        assert_eq!(a.replicas, 3);
        assert!(a.verbose);
        assert_eq!(a.routes, ["a", "b"]);
        assert_eq!(a.pkcs11_token_label.as_deref(), Some("tok"));
        // Not in the file: the built-in default.
        assert_eq!(a.nats, "nats://127.0.0.1:4222");
        // `--config=FILE` works too.
        let b = parse(&[&format!("--config={path}")]).expect("parses");
        assert_eq!(b.id, "hsm-1");
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
        let f = file("nats = \"nats://file:4222\"\nid = \"from-file\"\nroute = [\"file\"]\n");
        let path = f.path().to_str().expect("utf-8 path");
        // File over default.
        let a = parse(&["--config", path]).expect("parses");
        assert_eq!(a.nats, "nats://file:4222");
        // Flag over file; a repeated option given on the command line
        // replaces the file's list, it does not add to it.
        let a = parse(&[
            "--config",
            path,
            "--nats",
            "nats://flag:4222",
            "--route",
            "flag",
        ])
        .expect("parses");
        assert_eq!(a.nats, "nats://flag:4222");
        assert_eq!(a.routes, ["flag"]);
        // Environment over file, flag over environment: with a struct of
        // its own whose variable no other test reads (tests run in
        // parallel in one process).
        #[derive(Debug, Parser)]
        struct EnvArgs {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(
                long,
                env = "KEYSYNC_CFGTEST_ENV_NATS",
                default_value = "nats://default:4222"
            )]
            nats: String,
        }
        let env_parse = |args: &[&str]| {
            try_parse_from::<EnvArgs>(
                std::iter::once("bin")
                    .chain(args.iter().copied())
                    .map(Into::into)
                    .collect(),
            )
            .map(|a| a.nats)
        };
        let f2 = file("nats = \"nats://file:4222\"\n");
        let path2 = f2.path().to_str().expect("utf-8 path");
        assert_eq!(
            env_parse(&["--config", path2]).expect("parses"),
            "nats://file:4222"
        );
        std::env::set_var("KEYSYNC_CFGTEST_ENV_NATS", "nats://env:4222");
        let from_env = env_parse(&["--config", path2]);
        let from_flag = env_parse(&["--config", path2, "--nats", "nats://flag:4222"]);
        std::env::remove_var("KEYSYNC_CFGTEST_ENV_NATS");
        assert_eq!(from_env.expect("parses"), "nats://env:4222");
        assert_eq!(from_flag.expect("parses"), "nats://flag:4222");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_key_and_the_file() {
        let f = file("id = \"x\"\nnats_url = \"nats://typo:4222\"\n");
        let err = parse(&["--config", f.path().to_str().expect("utf-8")]).expect_err("refused");
        let msg = err.to_string();
        assert!(
            matches!(err, ParseError::File(ConfigFileError::UnknownKey { ref key, .. }) if key == "nats_url"),
            "{msg}"
        );
        assert!(
            msg.contains("`nats_url`") && msg.contains(&f.path().display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains("heartbeat_interval"),
            "lists the known keys: {msg}"
        );
    }

    #[test]
    fn values_of_the_wrong_shape_and_bad_toml_are_refused() {
        for (text, key) in [
            ("id = [\"a\", \"b\"]\n", "id"),
            ("verbose = \"yes\"\n", "verbose"),
            ("id = { a = 1 }\n", "id"),
            ("config = \"other.toml\"\n", "config"),
        ] {
            let f = file(text);
            let err = parse(&["--config", f.path().to_str().expect("utf-8")]).expect_err(text);
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{text}: {err}"
            );
        }
        let f = file("id = \n");
        let err = parse(&["--config", f.path().to_str().expect("utf-8")]).expect_err("bad toml");
        assert!(
            matches!(err, ParseError::File(ConfigFileError::Syntax { .. })),
            "{err}"
        );
        // A value clap cannot parse is clap's error, naming the option.
        let f = file("id = \"x\"\nreplicas = \"three\"\n");
        let err = parse(&["--config", f.path().to_str().expect("utf-8")]).expect_err("bad value");
        assert!(err.to_string().contains("--replicas"), "{err}");
        // A missing file says which.
        let err = parse(&["--config", "/nonexistent/keysync.toml"]).expect_err("missing");
        assert!(
            err.to_string().contains("/nonexistent/keysync.toml"),
            "{err}"
        );
    }

    #[test]
    fn without_a_file_required_options_stay_required() {
        let err = parse(&[]).expect_err("--id missing");
        assert!(matches!(err, ParseError::Args(_)));
        assert!(err.to_string().contains("--id"), "{err}");
    }
}
