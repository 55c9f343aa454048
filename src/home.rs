//! The qpunch home: the one directory that holds this machine's identity, the peers it
//! trusts, the tree cache and `config.toml`.
//!
//! It has a room of its own because every front end needs it (the CLI, an app that embeds
//! qpunch and wants the same identity as the command line), while none of the things kept in
//! it needs to know where it is: [`crate::identity`] and [`crate::known_peers`] take a path.

use std::path::{Path, PathBuf};

/// The environment variable that overrides where the home is (tests give every process role
/// a home of its own this way).
pub const HOME_ENV: &str = "QPUNCH_HOME";

/// The configuration file inside the home.
pub const CONFIG_FILE: &str = "config.toml";

/// Errors finding or reading the home.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No home directory could be determined.
    #[error("no config directory: set QPUNCH_HOME, XDG_CONFIG_HOME or HOME")]
    NoHome,
    /// `config.toml` exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `config.toml` is not what qpunch understands.
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The home: `$QPUNCH_HOME`, else `$XDG_CONFIG_HOME/qpunch`, else `~/.config/qpunch`. It may
/// not exist yet ([`crate::identity::Identity::load_or_create`] creates it, mode 0700).
pub fn dir() -> Result<PathBuf, HomeError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(home) = var(HOME_ENV) {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = var("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(xdg).join("qpunch"));
    }
    var("HOME")
        .map(|home| PathBuf::from(home).join(".config").join("qpunch"))
        .ok_or(HomeError::NoHome)
}

/// Where the sender remembers the trees of files it hashed.
pub fn cache_dir(home: &Path) -> PathBuf {
    home.join("cache")
}

/// What `config.toml` may say. A missing file is an empty configuration; unknown keys are
/// left alone (a newer qpunch may have written them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `rendezvous = "HOST[:PORT]"`: the rendezvous used when none is given.
    pub rendezvous: Option<String>,
}

impl Config {
    /// Read `config.toml` in `home`.
    pub fn load(home: &Path) -> Result<Config, HomeError> {
        let path = home.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(source) => return Err(HomeError::Read { path, source }),
        };
        Config::parse(&text).map_err(|what| HomeError::Invalid { path, what })
    }

    /// Parse the text of a `config.toml`.
    pub fn parse(text: &str) -> Result<Config, String> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| format!("not valid TOML: {e}"))?;
        let rendezvous = match table.get("rendezvous") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("`rendezvous` must be a string".into()),
        };
        Ok(Config { rendezvous })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_the_rendezvous_and_ignores_unknown_keys() {
        let config = Config::parse("rendezvous = \"rv.example:9200\"\nfuture = 3\n").unwrap();
        assert_eq!(config.rendezvous.as_deref(), Some("rv.example:9200"));
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn config_refuses_a_rendezvous_that_is_not_a_string() {
        let err = Config::parse("rendezvous = 7").unwrap_err();
        assert!(err.contains("must be a string"), "{err}");
        let err = Config::parse("rendezvous = ").unwrap_err();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn a_missing_config_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Config::load(dir.path()).unwrap(), Config::default());
        std::fs::write(dir.path().join(CONFIG_FILE), "rendezvous = \"x\"").unwrap();
        assert_eq!(
            Config::load(dir.path()).unwrap().rendezvous.as_deref(),
            Some("x")
        );
    }
}
