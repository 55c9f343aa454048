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
    /// A file of the home cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
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

/// The file that remembers which fixed codes (`receive --code`) this home has used, as
/// salted hashes.
pub const USED_CODES_FILE: &str = "used-codes";

/// Most codes remembered (the oldest are forgotten first).
const MAX_USED_CODES: usize = 1000;

/// Remember that `code` is used as a fixed code, and say whether it was used before.
///
/// Every pairing on a code gives its joiner one guess at it, and a receiver bounds guesses
/// per run, not across runs: a code used again and again gives a patient guesser more tries
/// than a fresh one would, so the user is warned. The code itself is not stored, only a
/// hash keyed with a random salt kept in the same file (mode 0600): reading the file does
/// not reveal past codes, nor whether two homes used the same one.
pub fn note_fixed_code(home: &Path, code: &str) -> Result<bool, HomeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.join(USED_CODES_FILE);
    let io = |source| HomeError::Read {
        path: path.clone(),
        source,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let fresh_salt;
    let salt = match lines.first().and_then(|l| l.strip_prefix("salt ")) {
        Some(salt) => salt,
        None => {
            lines.clear();
            fresh_salt = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 16]>());
            fresh_salt.as_str()
        }
    };
    let key = blake3::derive_key("qpunch used fixed codes v1", salt.as_bytes());
    let entry = blake3::keyed_hash(&key, code.trim().to_lowercase().as_bytes())
        .to_hex()
        .to_string();
    let used = lines.iter().skip(1).any(|l| *l == entry);
    if used {
        return Ok(true);
    }
    let mut kept: Vec<&str> = lines.iter().skip(1).copied().collect();
    let excess = (kept.len() + 1).saturating_sub(MAX_USED_CODES);
    kept.drain(..excess);
    let mut out = format!("salt {salt}\n");
    for line in kept {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&entry);
    out.push('\n');
    std::fs::create_dir_all(home).map_err(|source| HomeError::Write {
        path: home.to_path_buf(),
        source,
    })?;
    let tmp = home.join(format!(".{USED_CODES_FILE}.{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(out.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    written.map_err(|source| HomeError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(false)
}

/// What `config.toml` may say. A missing file is an empty configuration; unknown keys are
/// left alone (a newer qpunch may have written them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `rendezvous = "HOST[:PORT]"`: the rendezvous used when none is given.
    pub rendezvous: Option<String>,
    /// `port_mapping = false`: never ask the router to forward a port (PCP, NAT-PMP,
    /// UPnP). `None` when not said (the default: ask).
    pub port_mapping: Option<bool>,
    /// `stun = ["HOST[:PORT]", ...]`: STUN servers to learn our public address from (as a
    /// candidate when meeting by code) and to check the NAT against (`nat-check`). Empty
    /// when not said: then no STUN server is asked, except by `nat-check` with no
    /// rendezvous either (see [`crate::stun::DEFAULT_SERVERS`]).
    pub stun: Vec<String>,
    /// `[turn]` with `url = "turn:HOST:PORT"`, `username` and `password`: a TURN server of
    /// the user's own, relaying when no direct path is found (see [`TurnConfig`]).
    pub turn: Option<TurnConfig>,
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
        let port_mapping = match table.get("port_mapping") {
            None => None,
            Some(toml::Value::Boolean(on)) => Some(*on),
            Some(_) => return Err("`port_mapping` must be true or false".into()),
        };
        let stun = match table.get("stun") {
            None => Vec::new(),
            Some(toml::Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("`stun` must be a list of \"HOST[:PORT]\" strings")?,
            Some(_) => return Err("`stun` must be a list of \"HOST[:PORT]\" strings".into()),
        };
        let turn = match table.get("turn") {
            None => None,
            Some(toml::Value::Table(turn)) => Some(parse_turn(turn)?),
            Some(_) => return Err("`turn` must be a table: [turn]".into()),
        };
        Ok(Config {
            rendezvous,
            port_mapping,
            stun,
            turn,
        })
    }
}

/// `[turn]` as config.toml says it. The URL is checked where it is used
/// (`crate::turn::TurnServer::from_config`): this room is a leaf, below the TURN client.
#[derive(Clone, PartialEq, Eq)]
pub struct TurnConfig {
    /// `turn:HOST:PORT`, `turn:HOST:PORT?transport=tcp` or `turns:HOST:PORT`.
    pub url: String,
    /// The long-term username.
    pub username: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for TurnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password: it ends up in logs.
        f.debug_struct("TurnConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `[turn]`: all three keys, strings.
fn parse_turn(turn: &toml::Table) -> Result<TurnConfig, String> {
    let key = |name: &str| match turn.get(name) {
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("`turn.{name}` must be a string")),
        None => Err(format!("[turn] needs `{name}`")),
    };
    Ok(TurnConfig {
        url: key("url")?,
        username: key("username")?,
        password: key("password")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_a_turn_server() {
        let config = Config::parse(
            "[turn]\nurl = \"turn:198.51.100.10:3478\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let turn = config.turn.unwrap();
        assert_eq!(turn.url, "turn:198.51.100.10:3478");
        assert_eq!((turn.username.as_str(), turn.password.as_str()), ("u", "p"));
        assert!(
            !format!("{turn:?}").contains("\"p\""),
            "no password in logs"
        );
        let err = Config::parse("[turn]\nurl = \"turn:x\"\nusername = \"u\"\n").unwrap_err();
        assert!(err.contains("password"), "{err}");
        let err = Config::parse("[turn]\nurl = 3\nusername = \"u\"\npassword = \"p\"").unwrap_err();
        assert!(err.contains("turn.url"), "{err}");
        assert!(Config::parse("turn = 3").is_err());
    }

    #[test]
    fn config_reads_the_rendezvous_and_ignores_unknown_keys() {
        let config = Config::parse("rendezvous = \"rv.example:9200\"\nfuture = 3\n").unwrap();
        assert_eq!(config.rendezvous.as_deref(), Some("rv.example:9200"));
        assert_eq!(config.port_mapping, None);
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let off = Config::parse("port_mapping = false\n").unwrap();
        assert_eq!(off.port_mapping, Some(false));
        let err = Config::parse("port_mapping = \"no\"").unwrap_err();
        assert!(err.contains("true or false"), "{err}");
    }

    #[test]
    fn config_reads_a_stun_list() {
        let config = Config::parse("stun = [\"stun.example\", \"192.0.2.1:3479\"]").unwrap();
        assert_eq!(config.stun, ["stun.example", "192.0.2.1:3479"]);
        assert!(Config::parse("").unwrap().stun.is_empty());
        assert!(Config::parse("stun = \"stun.example\"").is_err());
        assert!(Config::parse("stun = [3478]").is_err());
    }

    #[test]
    fn config_refuses_a_rendezvous_that_is_not_a_string() {
        let err = Config::parse("rendezvous = 7").unwrap_err();
        assert!(err.contains("must be a string"), "{err}");
        let err = Config::parse("rendezvous = ").unwrap_err();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn a_fixed_code_used_again_is_noticed_and_not_stored_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!note_fixed_code(dir.path(), "7-clockwork-crossover").unwrap());
        assert!(!note_fixed_code(dir.path(), "8-clockwork-crossover").unwrap());
        assert!(note_fixed_code(dir.path(), " 7-Clockwork-Crossover ").unwrap());
        let text = std::fs::read_to_string(dir.path().join(USED_CODES_FILE)).unwrap();
        assert!(!text.contains("clockwork"), "{text}");
        assert_eq!(text.lines().count(), 3, "salt and two codes: {text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(USED_CODES_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // Another home salts differently.
        let other = tempfile::tempdir().unwrap();
        note_fixed_code(other.path(), "7-clockwork-crossover").unwrap();
        let theirs = std::fs::read_to_string(other.path().join(USED_CODES_FILE)).unwrap();
        assert_ne!(theirs.lines().nth(1), text.lines().nth(1));
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
