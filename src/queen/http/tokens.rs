//! The API tokens: loaded from `--token-file` and `SD_RBEE_API_TOKENS` ([`load_tokens`]), held in a
//! [`TokenTable`] the authentication reads, and read again when the file changes or the queen gets SIGHUP
//! ([`watch`]), so a token is added or revoked without a restart. A file that no longer reads (or leaves no
//! token at all) leaves the table as it was, said in the log: a typo never locks everyone out nor lets
//! everyone in.

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
    /// The tokens' digests, made once per table rather than at every request.
    digests: Vec<[u8; 32]>,
}

impl Tokens {
    pub fn new(tokens: Vec<String>, policies: HashMap<String, TokenPolicy>) -> Self {
        let digests = tokens.iter().map(|t| digest(t.as_bytes())).collect();
        Self { tokens, policies, digests }
    }

    /// The table of `loaded` tokens ([`load_tokens`]).
    pub fn from_loaded(loaded: Vec<(String, TokenPolicy)>) -> Self {
        let mut policies = HashMap::new();
        let mut tokens = Vec::with_capacity(loaded.len());
        for (token, policy) in loaded {
            if policy != TokenPolicy::default() {
                policies.insert(token.clone(), policy);
            }
            tokens.push(token);
        }
        Self::new(tokens, policies)
    }

    /// Whether a token's digest is `wanted`: every digest compared, in constant time, so neither the match
    /// nor the tokens' lengths leak.
    pub fn holds(&self, wanted: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        let mut matched = subtle::Choice::from(0);
        for d in &self.digests {
            matched |= d.ct_eq(wanted);
        }
        matched.into()
    }
}

/// SHA-256 of `text`.
pub fn digest(text: &[u8]) -> [u8; 32] {
    <sha2::Sha256 as sha2::Digest>::digest(text).into()
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
    let text = match file {
        Some(path) => Some(std::fs::read_to_string(path).with_context(|| format!("--token-file {}", path.display()))?),
        None => None,
    };
    parse_tokens(file.zip(text.as_deref()), env)
}

/// [`load_tokens`] of the token file's `text` as read from its path.
fn parse_tokens(file: Option<(&Path, &str)>, env: Option<&str>) -> anyhow::Result<Vec<(String, TokenPolicy)>> {
    // Each token with where it came from (errors name the place, never any of the secret) and its policy.
    let mut tokens: Vec<(String, String, TokenPolicy)> = Vec::new();
    if let Some((path, text)) = file {
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

/// The token file's metadata, to tell a read that a writer cut short (it changed while being read).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// The token file as last read, by the digest of its bytes: read again every few seconds (it is small),
/// applied when they change.
struct Watched {
    source: TokenSource,
    read: Option<[u8; 32]>,
    /// The file did not read at the last look (said in the log once, not at every look).
    unreadable: bool,
}

impl Watched {
    /// Reads the file, and applies it to `table` when its bytes changed since the last read. A file that
    /// does not read, or leaves no token at all (counting `SD_RBEE_API_TOKENS`), changes nothing, said in
    /// the log once (until it changes, or reads again); so does one that changed while it was read (tried
    /// again at the next look). Returns whether the table was replaced.
    fn look(&mut self, table: &TokenTable) -> bool {
        let Some(file) = self.source.file.clone() else { return false };
        let before = stamp(&file);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                // Gone for a moment (a Secret being replaced) or for good: the tokens in force stay.
                if !std::mem::replace(&mut self.unreadable, true) {
                    tracing::error!(file = %file.display(), error = %e, "the token file does not read now: the tokens in force are kept");
                }
                self.read = None;
                return false;
            }
        };
        self.unreadable = false;
        if stamp(&file) != before || before.is_none_or(|(len, _)| len != text.len() as u64) {
            return false;
        }
        let digest = digest(text.as_bytes());
        if self.read.replace(digest) == Some(digest) {
            return false;
        }
        match parse_tokens(Some((&file, &text)), self.source.env.as_deref()) {
            Ok(loaded) if loaded.is_empty() => {
                tracing::error!(file = %file.display(), "the token file leaves no token now: the tokens in force are kept");
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
}

/// SIGHUP, for [`watch`]: listened to from the queen's start when it has a token file to read again (then
/// SIGHUP reads it and no longer stops the process; without a file it keeps its default, and stops it).
pub fn hangups(source: &TokenSource) -> Hangups {
    source.file.as_ref()?;
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    None
}

/// SIGHUP's stream, where there is one.
#[cfg(unix)]
pub type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangups = Option<std::convert::Infallible>;

/// Reads the token file again whenever its bytes change (read every few seconds) or the process gets
/// SIGHUP (`hangups`), until `stop`. The first look is at once: the file may have changed while the queen
/// started.
pub async fn watch(
    table: TokenTable,
    source: TokenSource,
    mut hangups: Hangups,
    stop: tokio_util::sync::CancellationToken,
) {
    if source.file.is_none() {
        return;
    }
    let mut watched = Watched { source, read: None, unreadable: false };
    loop {
        watched.look(&table);
        let hup = async {
            match &mut hangups {
                #[cfg(unix)]
                Some(signal) => signal.recv().await,
                #[cfg(not(unix))]
                Some(never) => match *never {},
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = hup => {
                tracing::info!("SIGHUP: reading the token file again");
                // Read again even when its bytes are the same (an operator asked).
                watched.read = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_applied_and_one_that_does_not_read_keeps_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "first-token-0123456789 tenant=acme\n").unwrap();
        let source = TokenSource { file: Some(file.clone()), env: Some("env-token-0123456789".into()) };
        let table = TokenTable::new(Tokens::from_loaded(load_tokens(Some(&file), source.env.as_deref()).unwrap()));
        assert_eq!(table.current().tokens, ["first-token-0123456789", "env-token-0123456789"]);
        assert_eq!(table.current().policies["first-token-0123456789"].tenant.as_deref(), Some("acme"));
        let mut watched = Watched { source, read: None, unreadable: false };
        assert!(watched.look(&table), "the first look applies the file");
        assert!(!watched.look(&table), "the same bytes are not applied again");

        // Rotated for a token of the same length, within the same second: the bytes tell.
        std::fs::write(&file, "other-token-0123456789 tenant=acme\n").unwrap();
        assert!(watched.look(&table));
        assert_eq!(table.current().tokens, ["other-token-0123456789", "env-token-0123456789"]);
        std::fs::write(&file, "second-token-0123456789\n").unwrap();
        assert!(watched.look(&table));
        assert_eq!(table.current().tokens, ["second-token-0123456789", "env-token-0123456789"]);
        assert!(table.current().policies.is_empty());
        for broken in ["short\n", "second-token-0123456789 tenant=Acme\n"] {
            std::fs::write(&file, broken).unwrap();
            assert!(!watched.look(&table), "{broken}");
            assert_eq!(table.current().tokens[0], "second-token-0123456789", "kept");
        }
        std::fs::remove_file(&file).unwrap();
        assert!(!watched.look(&table));
        // A file emptied revokes its tokens when others are left (the environment's)...
        std::fs::write(&file, "# nobody\n").unwrap();
        assert!(watched.look(&table));
        assert_eq!(table.current().tokens, ["env-token-0123456789"]);
        // ...and leaves the tokens in force when none would be.
        let source = TokenSource { file: Some(file.clone()), env: None };
        let mut alone = Watched { source, read: None, unreadable: false };
        std::fs::write(&file, "# still nobody\n").unwrap();
        assert!(!alone.look(&table));
        assert_eq!(table.current().tokens.len(), 1);
    }
}
