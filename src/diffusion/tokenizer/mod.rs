//! The CLIP prompt tokenizer of Stable Diffusion pipelines.
//!
//! Turns a prompt into the fixed-length id sequence the CLIP text encoders read, exactly as
//! diffusers does with transformers' `CLIPTokenizer(prompt, padding="max_length",
//! max_length=77, truncation=True)`: `BOS + tokens + EOS`, cut to `BOS + the first
//! max_length-2 tokens + EOS` when too long, then padded with the pipeline's pad token
//! (`<|endoftext|>` for SD 1.x, `!` (id 0) for SD 2.x and SDXL's `tokenizer_2`).
//!
//! A pipeline's `tokenizer/` folder holds either a `tokenizer.json` (saved by recent
//! transformers) or only the slow tokenizer's `vocab.json` + `merges.txt` (what the Hub's SD
//! repos ship). For the latter the fast tokenizer is built here with the normalizer,
//! pre-tokenizer, post-processor, decoder and BPE settings of the real CLIP `tokenizer.json`.
//! Special tokens come from `tokenizer_config.json` / `special_tokens_map.json` with the
//! precedence transformers uses.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use tokenizers::{AddedToken, Tokenizer};

/// The context length of every CLIP text encoder used by Stable Diffusion.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Above this a `model_max_length` is a "no limit" sentinel (transformers writes `int(1e30)`).
const MAX_SANE_MAX_LENGTH: u64 = 1_000_000;
/// transformers' slow CLIPTokenizer reads at most this many merges (`49152 - 256 - 2`).
const CLIP_MAX_MERGES: usize = 49152 - 256 - 2;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_UNK: &str = "<|endoftext|>";

/// CLIP's pre-tokenization pattern, as in the real `tokenizer.json`.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer with the special-token ids and length of one pipeline tokenizer.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// A prompt turned into text-encoder input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: BOS, the prompt's tokens, EOS, then padding.
    pub ids: Vec<u32>,
    /// The part of the prompt that did not fit and was cut off, decoded, for a warning.
    pub truncated_text: Option<String>,
}

/// The special tokens a tokenizer folder declares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: Option<String>,
    /// Entries of `added_tokens_decoder` in `tokenizer_config.json`: (content, special).
    added: Vec<(String, bool)>,
    max_length: usize,
}

impl ClipTokenizer {
    /// Loads the tokenizer of one pipeline tokenizer folder (`tokenizer/`, `tokenizer_2/`).
    ///
    /// Uses `tokenizer.json` when present; otherwise builds the CLIP BPE tokenizer from
    /// `vocab.json` + `merges.txt`. The pad token comes from `tokenizer_config.json` (a string
    /// or an object with `content`) and `special_tokens_map.json`, with transformers'
    /// precedence (for folders without `added_tokens_decoder` the map wins), falling back to
    /// the EOS token; the length from `model_max_length` (77 when absent or a "no limit"
    /// sentinel such as 1e30).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} does not exist", dir.display());
        }
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_if_exists(&dir.join("special_tokens_map.json"))?;
        let special = SpecialTokens::from_configs(config.as_ref(), special_map.as_ref())
            .with_context(|| format!("reading the tokenizer configuration in {}", dir.display()))?;

        let tokenizer_json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let mut tokenizer = if tokenizer_json.is_file() {
            Tokenizer::from_file(&tokenizer_json)
                .map_err(|e| anyhow!("cannot load {}: {e}", tokenizer_json.display()))?
        } else if vocab.is_file() && merges.is_file() {
            build_clip_bpe(&vocab, &merges, &special)?
        } else {
            bail!("tokenizer folder {} holds neither tokenizer.json nor vocab.json + merges.txt", dir.display());
        };
        Self::finish(&mut tokenizer, &special)
            .with_context(|| format!("setting up the tokenizer in {}", dir.display()))?;

        let id_of = |token: &str, role: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                anyhow!("{role} token {token:?} is not in the vocabulary of the tokenizer in {}", dir.display())
            })
        };
        let bos_id = id_of(&special.bos, "BOS")?;
        let eos_id = id_of(&special.eos, "EOS")?;
        let pad_id = match &special.pad {
            Some(pad) => id_of(pad, "pad")?,
            None => eos_id,
        };
        Ok(Self { tokenizer, bos_id, eos_id, pad_id, max_length: special.max_length })
    }

    /// Registers the special tokens as transformers does and turns off any truncation or
    /// padding a `tokenizer.json` may carry (this type does both itself).
    fn finish(tokenizer: &mut Tokenizer, special: &SpecialTokens) -> Result<()> {
        tokenizer.with_truncation(None).map_err(|e| anyhow!("cannot turn off truncation: {e}"))?;
        tokenizer.with_padding(None);
        let named = [&special.bos, &special.eos, &special.unk].into_iter().chain(special.pad.as_ref());
        let mut tokens: Vec<AddedToken> = Vec::new();
        for content in named {
            if !tokens.iter().any(|t| &t.content == content) {
                tokens.push(AddedToken::from(content.clone(), true).normalized(false));
            }
        }
        for (content, is_special) in &special.added {
            if !tokens.iter().any(|t| &t.content == content) {
                tokens.push(AddedToken::from(content.clone(), *is_special).normalized(false));
            }
        }
        // Tokens already in the vocabulary keep their ids; only their matching changes (a
        // special pad token such as `!` is then never merged into a word, as in transformers).
        tokenizer.add_special_tokens(tokens).map_err(|e| anyhow!("cannot register the special tokens: {e}"))?;
        Ok(())
    }

    /// The number of ids [`ClipTokenizer::encode`] returns.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id used to pad a prompt to [`ClipTokenizer::max_length`].
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of the end-of-text token, which follows the prompt's tokens.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of the start-of-text token, which opens every sequence.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Tokenizes a prompt as transformers' `CLIPTokenizer(prompt, padding="max_length",
    /// max_length=77, truncation=True)` does: BOS + tokens + EOS, truncated to BOS + the first
    /// `max_length - 2` tokens + EOS, then padded with the pad id.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| anyhow!("cannot tokenize the prompt {text:?}: {e}"))?;
        let tokens = encoding.get_ids();
        let room = self.max_length - 2;
        let (kept, cut) = tokens.split_at(tokens.len().min(room));
        let truncated_text = if cut.is_empty() { None } else { Some(self.decode(cut)?) };
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(kept);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt { ids, truncated_text })
    }

    /// Decodes ids to text the way transformers' CLIPTokenizerFast does (word ends become
    /// spaces), skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(|e| anyhow!("cannot decode token ids: {e}"))?;
        let text = text.replace("</w>", " ");
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

impl SpecialTokens {
    /// Reads the special tokens with transformers' precedence: a `tokenizer_config.json`
    /// with `added_tokens_decoder` (transformers >= 4.34) is authoritative on its own;
    /// for older folders the values of `special_tokens_map.json` override those of
    /// `tokenizer_config.json` (this is how SD 2.x gets its `!` pad token).
    fn from_configs(config: Option<&Value>, special_map: Option<&Value>) -> Result<Self> {
        let modern = config.is_some_and(|c| c.get("added_tokens_decoder").is_some());
        let lookup = |key: &str| -> Result<Option<String>> {
            if !modern {
                if let Some(v) = special_map.and_then(|m| m.get(key)) {
                    if let Some(s) = token_content(v)? {
                        return Ok(Some(s));
                    }
                }
            }
            match config.and_then(|c| c.get(key)) {
                Some(v) => token_content(v),
                None => Ok(None),
            }
        };
        let bos = lookup("bos_token")?.unwrap_or_else(|| DEFAULT_BOS.to_string());
        let eos = lookup("eos_token")?.unwrap_or_else(|| DEFAULT_EOS.to_string());
        let unk = lookup("unk_token")?.unwrap_or_else(|| DEFAULT_UNK.to_string());
        let pad = lookup("pad_token")?;

        let mut added = Vec::new();
        if let Some(decoder) = config.and_then(|c| c.get("added_tokens_decoder")) {
            let decoder = decoder.as_object().ok_or_else(|| anyhow!("`added_tokens_decoder` is not an object"))?;
            for (id, token) in decoder {
                let content = token
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("`added_tokens_decoder` entry {id} has no content"))?;
                let is_special = token.get("special").and_then(Value::as_bool).unwrap_or(false);
                added.push((content.to_string(), is_special));
            }
        }

        let max_length = match config.and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => parse_max_length(v)?,
        };
        Ok(Self { bos, eos, unk, pad, added, max_length })
    }
}

/// `model_max_length` as a usable length: huge "no limit" sentinels mean CLIP's 77.
fn parse_max_length(value: &Value) -> Result<usize> {
    let n = if let Some(n) = value.as_u64() {
        n
    } else if let Some(f) = value.as_f64() {
        if f.is_finite() && f >= 0.0 && f < MAX_SANE_MAX_LENGTH as f64 {
            f as u64
        } else {
            MAX_SANE_MAX_LENGTH
        }
    } else {
        bail!("`model_max_length` is not a number: {value}");
    };
    if n >= MAX_SANE_MAX_LENGTH {
        return Ok(DEFAULT_MAX_LENGTH);
    }
    if n < 2 {
        bail!("`model_max_length` {n} leaves no room for the start and end tokens");
    }
    Ok(n as usize)
}

/// A special-token entry: a plain string, or an object with `content`; `null` means unset.
fn token_content(value: &Value) -> Result<Option<String>> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("special token entry without a string `content`: {value}"),
        },
        _ => bail!("special token entry is neither a string nor an object: {value}"),
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(value))
}

/// Builds the fast CLIP tokenizer from the slow tokenizer's files, with the exact settings of
/// the real CLIP `tokenizer.json` (what transformers' CLIPConverter produces).
fn build_clip_bpe(vocab_path: &Path, merges_path: &Path, special: &SpecialTokens) -> Result<Tokenizer> {
    let vocab_text =
        std::fs::read_to_string(vocab_path).with_context(|| format!("cannot read {}", vocab_path.display()))?;
    let vocab: Map<String, Value> = serde_json::from_str(&vocab_text)
        .with_context(|| format!("{} is not a JSON object of token ids", vocab_path.display()))?;
    if let Some((token, _)) = vocab.iter().find(|(_, id)| id.as_u64().is_none()) {
        bail!("{}: the id of {token:?} is not an integer", vocab_path.display());
    }
    let merges = read_merges(merges_path)?;
    let id_in_vocab = |token: &str| -> Result<u64> {
        vocab
            .get(token)
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("{}: special token {token:?} is missing", vocab_path.display()))
    };
    let bos_id = id_in_vocab(&special.bos)?;
    let eos_id = id_in_vocab(&special.eos)?;
    let added_token = |id: u64, content: &str| {
        json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added_token(bos_id, &special.bos), added_token(eos_id, &special.eos)],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": CLIP_SPLIT_PATTERN},
                    "behavior": "Removed",
                    "invert": true
                },
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]
        },
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [special.eos, eos_id],
            "cls": [special.bos, bos_id],
            "trim_offsets": false,
            "add_prefix_space": false
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": special.unk,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    });
    let bytes = serde_json::to_vec(&spec)?;
    Tokenizer::from_bytes(bytes).map_err(|e| {
        anyhow!("cannot build the CLIP tokenizer from {} and {}: {e}", vocab_path.display(), merges_path.display())
    })
}

/// The merges of a slow BPE `merges.txt`: `#version` header and blank lines skipped, at most
/// as many as transformers' CLIPTokenizer reads.
fn read_merges(path: &Path) -> Result<Vec<[String; 2]>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || (n == 0 && line.starts_with("#version")) {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push([a.to_string(), b.to_string()]);
            }
            _ => bail!("{} line {}: expected two tokens separated by a space, found {line:?}", path.display(), n + 1),
        }
        if merges.len() == CLIP_MAX_MERGES {
            break;
        }
    }
    Ok(merges)
}

/// The reference fixtures (`tests/fixtures`, copied from the project's shared fixtures);
/// `SD_RBEE_FIXTURES` points elsewhere.
#[cfg(test)]
pub(crate) fn fixtures_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("SD_RBEE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    assert!(
        dir.join("tiny-sd15/tokenizer/tokenizer.json").is_file(),
        "reference fixtures not found in {} (set SD_RBEE_FIXTURES)",
        dir.display()
    );
    dir
}

#[cfg(test)]
mod tests;
