//! Tokenizers as the SD3/Flux pipelines call them: pad to a fixed length with the tokenizer's own pad
//! token, truncate keeping the special tokens, and report how many tokens were dropped.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

/// A tokenizer folder: `tokenizer.json` plus `tokenizer_config.json` (pad token, max length).
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    path: PathBuf,
}

/// Token ids padded or truncated to a fixed length.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Tokens cut off the end to fit (0 when the prompt fit).
    pub dropped: usize,
}

#[derive(serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    pad_token: Option<serde_json::Value>,
    #[serde(default)]
    eos_token: Option<serde_json::Value>,
}

/// A special token in `tokenizer_config.json` is a string or `{"content": "..."}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => {
            o.get("content").and_then(|c| c.as_str()).map(str::to_owned)
        }
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`; the pad token comes from `tokenizer_config.json` (or
    /// `special_tokens_map.json`), falling back to the EOS token as transformers' CLIP does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let err = |msg: String| Error::Tokenizer {
            path: file.clone(),
            msg,
        };
        if !file.is_file() {
            return Err(Error::MissingFile(format!(
                "{} is missing; this model folder has no tokenizer.json, download the complete model",
                file.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| err(e.to_string()))?;
        let mut cfg = TokenizerConfig::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let c: TokenizerConfig = crate::config::read_json(&p)?;
                if cfg.pad_token.is_none() {
                    cfg.pad_token = c.pad_token;
                }
                if cfg.eos_token.is_none() {
                    cfg.eos_token = c.eos_token;
                }
            }
        }
        let pad = cfg
            .pad_token
            .as_ref()
            .and_then(token_text)
            .or_else(|| cfg.eos_token.as_ref().and_then(token_text))
            .ok_or_else(|| err("no pad_token or eos_token in tokenizer_config.json".into()))?;
        let pad_id = inner
            .token_to_id(&pad)
            .ok_or_else(|| err(format!("pad token {pad:?} is not in the vocabulary")))?;
        Ok(Self {
            inner,
            pad_id,
            path: file,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids with special tokens, truncated to `max_len` (specials kept) and right-padded to it.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<Tokens> {
        let err = |e: tokenizers::Error| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        };
        let mut tok = self.inner.clone();
        tok.with_padding(None);
        tok.with_truncation(None).map_err(err)?;
        let full = tok.encode(text, true).map_err(err)?.get_ids().len();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(err)?;
        let mut ids = tok.encode(text, true).map_err(err)?.get_ids().to_vec();
        let dropped = full.saturating_sub(ids.len());
        ids.resize(max_len, self.pad_id);
        Ok(Tokens { ids, dropped })
    }
}
