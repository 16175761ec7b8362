//! The API tokens: loaded from `--token-file` and `SD_RBEE_API_TOKENS` ([`load_tokens`]), held in a
//! [`TokenTable`] the authentication reads, and read again when the file changes or the queen gets SIGHUP
//! ([`watch`]), so a token is added or revoked without a restart. A file that no longer reads (or names no
//! token) leaves the table as it was, said in the log: a typo never locks everyone out nor lets everyone in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use parking_lot::RwLock;

use super::TokenPolicy;

/// The shortest API token accepted, in bytes.
const MIN_TOKEN_BYTES: usize = 16;

/// How often the token file's metadata is looked at for a change.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Where the tokens come from, to read them again.
#[derive(Clone, Debug)]
pub struct TokenSource {
    pub file: Option<PathBuf>,
    /// `SD_RBEE_API_TOKENS` as the queen started with it (the environment does not change).
    pub env: Option<String>,
}

/// The tokens in force, and the policies of those that have one.
#[derive(Debug, Default)]
pub struct Tokens {
    pub tokens: Vec<String>,
    pub policies: HashMap<String, TokenPolicy>,
}

impl Tokens {
    /// The table of `loaded` tokens ([`load_tokens`]).
    pub fn from_loaded(loaded: Vec<(String, TokenPolicy)>) -> Self {
        let mut table = Self::default();
        for (token, policy) in loaded {
            if policy != TokenPolicy::default() {
                table.policies.insert(token.clone(), policy);
            }
            table.tokens.push(token);
        }
        table
    }
}

/// The tokens in force, shared by every request; replaced whole on a reload.
#[derive(Clone, Debug, Default)]
pub struct TokenTable(Arc<RwLock<Arc<Tokens>>>);

impl TokenTable {
    pub fn new(tokens: Tokens) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(tokens))))
    }

    pub fn current(&self) -> Arc<Tokens> {
        self.0.read().clone()
    }

    fn replace(&self, tokens: Tokens) {
        *self.0.write() = Arc::new(tokens);
    }
}

/// The API tokens from `file` and `env` (`SD_RBEE_API_TOKENS`), with the policy a file line gives after its
/// token (`TOKEN [default_priority=P] [max_priority=P] [tenant=NAME] [submit_rate=N/s|N/min|N/h]`); the
/// others get the default policy (an operator's token, not limited).
pub fn load_tokens(file: Option<&Path>, env: Option<&str>) -> anyhow::Result<Vec<(String, TokenPolicy)>> {
    // Each token with where it came from (errors name the place, never any of the secret) and its policy.
    let mut tokens: Vec<(String, String, TokenPolicy)> = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("--token-file {}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            let Some(t) = words.next().filter(|t| !t.starts_with('#')) else { continue };
            let at = format!("line {} of --token-file {}", i + 1, path.display());
            let policy = TokenPolicy::parse(words).map_err(|e| anyhow::anyhow!("the API token at {at}: {e}"))?;
            tokens.push((t.to_string(), at, policy));
        }
    }
    if let Some(list) = env {
        for (i, t) in list.split(',').map(str::trim).enumerate() {
            if !t.is_empty() {
                tokens.push((t.to_string(), format!("entry {} of SD_RBEE_API_TOKENS", i + 1), TokenPolicy::default()));
            }
        }
    }
    // Counted in bytes (what an attacker guesses).
    if let Some((short, at, _)) = tokens.iter().find(|(t, _, _)| t.len() < MIN_TOKEN_BYTES) {
        bail!("the API token at {at} is {} bytes; use at least {MIN_TOKEN_BYTES}", short.len());
    }
    if let Some((_, at, _)) = tokens.iter().find(|(t, _, _)| t.chars().any(|c| !c.is_ascii_graphic())) {
        bail!(
            "the API token at {at} has characters an Authorization header cannot carry; use visible ASCII (letters, digits, punctuation)"
        );
    }
    // A token given twice with different options: one of them (a tenant) would silently give way.
    for (i, (token, at, policy)) in tokens.iter().enumerate() {
        if let Some((_, first, _)) = tokens[..i].iter().find(|(t, _, p)| t == token && p != policy) {
            bail!(
                "the API token at {at} is also at {first}, with other options; give each token once, with all its \
                 options on one line"
            );
        }
    }
    Ok(tokens.into_iter().map(|(t, _, policy)| (t, policy)).collect())
}

/// What tells a changed file: its length, modification time and inode (a file replaced by a rename, as
/// Kubernetes updates a mounted Secret, has another).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Some((meta.len(), meta.modified().ok()?, ino))
}

/// Reads the tokens again into `table`, when `source` has a file; a file that does not read, or leaves no
/// token, changes nothing. Returns whether the table was replaced.
pub fn reload(table: &TokenTable, source: &TokenSource) -> bool {
    let Some(file) = &source.file else { return false };
    match load_tokens(Some(file), source.env.as_deref()) {
        Ok(loaded) if loaded.is_empty() => {
            tracing::error!(file = %file.display(), "the token file names no token now: the tokens in force are kept");
            false
        }
        Ok(loaded) => {
            let tokens = Tokens::from_loaded(loaded);
            tracing::info!(file = %file.display(), tokens = tokens.tokens.len(), "API tokens read again");
            table.replace(tokens);
            true
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the token file does not read now: the tokens in force are kept");
            false
        }
    }
}

/// Reads the token file again whenever it changes (looked at every few seconds) or the process gets SIGHUP,
/// until `stop`.
pub async fn watch(table: TokenTable, source: TokenSource, stop: tokio_util::sync::CancellationToken) {
    let Some(file) = source.file.clone() else { return };
    let mut seen = stamp(&file);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hup = async {
            match &mut hangup {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let asked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => false,
            _ = hup => true,
        };
        let now = stamp(&file);
        if asked || now != seen {
            seen = now;
            reload(&table, &source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_takes_a_changed_file_and_keeps_the_tokens_when_it_does_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "first-token-0123456789 tenant=acme\n").unwrap();
        let source = TokenSource { file: Some(file.clone()), env: Some("env-token-0123456789".into()) };
        let table = TokenTable::new(Tokens::from_loaded(load_tokens(Some(&file), source.env.as_deref()).unwrap()));
        assert_eq!(table.current().tokens, ["first-token-0123456789", "env-token-0123456789"]);
        assert_eq!(table.current().policies["first-token-0123456789"].tenant.as_deref(), Some("acme"));

        std::fs::write(&file, "second-token-0123456789\n").unwrap();
        assert!(reload(&table, &source));
        assert_eq!(table.current().tokens, ["second-token-0123456789", "env-token-0123456789"]);
        assert!(table.current().policies.is_empty());
        for broken in ["short\n", "second-token-0123456789 tenant=Acme\n"] {
            std::fs::write(&file, broken).unwrap();
            assert!(!reload(&table, &source), "{broken}");
            assert_eq!(table.current().tokens[0], "second-token-0123456789", "kept");
        }
        std::fs::remove_file(&file).unwrap();
        assert!(!reload(&table, &source));
        // A file emptied leaves the tokens in force (with no environment tokens, none would be left).
        std::fs::write(&file, "# nobody\n").unwrap();
        let no_env = TokenSource { file: Some(file), env: None };
        assert!(!reload(&table, &no_env));
        assert_eq!(table.current().tokens.len(), 2);
    }
}
