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
    /// The Jinja chat template (`chat_template.jinja`, `chat_template.json` as processors save
    /// it, or `chat_template` in `tokenizer_config.json`), for text encoders that read prompts as
    /// chat messages.
    chat_template: Option<String>,
    /// The special tokens a chat template writes.
    bos: Option<String>,
    eos: Option<String>,
    /// `padding_side: "left"` (Mistral's): padding goes before the prompt.
    pad_left: bool,
}

/// One message for a chat template.
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub text: &'a str,
    /// The content as a list of one text block (`[{"type": "text", "text": ...}]`, what
    /// multimodal processors take) instead of a string.
    pub blocks: bool,
}

/// Token ids padded or truncated to a fixed length.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// Tokens cut off the end to fit (0 when the prompt fit).
    pub dropped: usize,
    /// How many of `ids` are the prompt's (special ones included), the rest padding: after them
    /// (the attention mask is 1 on `ids[..len]`), or before them for left-padding tokenizers
    /// ([`TextTokenizer::encode_chat`] says which).
    pub len: usize,
}

#[derive(serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    pad_token: Option<serde_json::Value>,
    #[serde(default)]
    eos_token: Option<serde_json::Value>,
    #[serde(default)]
    bos_token: Option<serde_json::Value>,
    #[serde(default)]
    unk_token: Option<serde_json::Value>,
    /// A template string, or a list of `{"name", "template"}` (the one named `default` is used).
    #[serde(default)]
    chat_template: Option<serde_json::Value>,
    #[serde(default)]
    padding_side: Option<String>,
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
    /// Loads `dir/tokenizer.json`, or, when a folder holds only the slow tokenizer's files, builds
    /// CLIP's byte-level BPE from `vocab.json` + `merges.txt` the way transformers' converter does.
    /// Special tokens come from `tokenizer_config.json` (or `special_tokens_map.json`); the pad token
    /// falls back to the EOS token as transformers' CLIP does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = TokenizerConfig::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let c: TokenizerConfig = crate::config::read_json(&p)?;
                cfg.pad_token = cfg.pad_token.or(c.pad_token);
                cfg.eos_token = cfg.eos_token.or(c.eos_token);
                cfg.bos_token = cfg.bos_token.or(c.bos_token);
                cfg.unk_token = cfg.unk_token.or(c.unk_token);
                cfg.chat_template = cfg.chat_template.or(c.chat_template);
                cfg.padding_side = cfg.padding_side.or(c.padding_side);
            }
        }
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else if json.is_file() {
            let v: serde_json::Value = crate::config::read_json(&json)?;
            v["chat_template"].as_str().map(str::to_owned)
        } else {
            match cfg.chat_template.take() {
                Some(serde_json::Value::String(s)) => Some(s),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_owned),
                _ => None,
            }
        };
        let file = dir.join("tokenizer.json");
        let err = |msg: String| Error::Tokenizer {
            path: file.clone(),
            msg,
        };
        let inner = if file.is_file() {
            tokenizers::Tokenizer::from_file(&file).map_err(|e| err(e.to_string()))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            clip_bpe(dir, &cfg)?
        } else {
            let hint = if dir.join("spiece.model").is_file() {
                " (a SentencePiece spiece.model alone is not read: the folder needs tokenizer.json)"
            } else if dir.join("tekken.json").is_file() {
                " (Mistral's own tekken.json is not read: the folder needs tokenizer.json)"
            } else {
                ""
            };
            return Err(Error::MissingFile(format!(
                "{}: no tokenizer.json (nor vocab.json + merges.txt){hint}; download the complete model",
                dir.display()
            )));
        };
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
            chat_template,
            bos: cfg.bos_token.as_ref().and_then(token_text),
            eos: cfg.eos_token.as_ref().and_then(token_text),
            pad_left: cfg.padding_side.as_deref() == Some("left"),
        })
    }

    /// The prompt as one user message through the tokenizer's chat template, with the assistant's
    /// turn opened and thinking off (transformers' `apply_chat_template(..., tokenize=False,
    /// add_generation_prompt=True, enable_thinking=False)`, whose Jinja environment trims blocks).
    pub fn apply_chat_template(&self, prompt: &str) -> Result<String> {
        let user = ChatMessage {
            role: "user",
            text: prompt,
            blocks: false,
        };
        self.render_chat(&[user], true)
    }

    /// `messages` through the tokenizer's chat template as transformers renders it: its Jinja
    /// environment (blocks trimmed, Python's string methods, `raise_exception`, `strftime_now`),
    /// the special tokens as `bos_token` / `eos_token`, thinking off.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let err = |msg: String| Error::Tokenizer {
            path: self.path.clone(),
            msg,
        };
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| err("the tokenizer has no chat template (chat_template.jinja or `chat_template` in tokenizer_config.json)".into()))?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template("chat", template)
            .map_err(|e| err(format!("chat template: {e}")))?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| match m.blocks {
                true => minijinja::context! {
                    role => m.role,
                    content => vec![minijinja::context! { type => "text", text => m.text }],
                },
                false => minijinja::context! { role => m.role, content => m.text },
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            enable_thinking => false,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| err(format!("chat template: {e}")))
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// A rendered chat as transformers' `apply_chat_template(..., tokenize=True, padding=
    /// "max_length", truncation=True, max_length)` tokenizes it: no special tokens added (the
    /// template wrote them), cut after `max_len` tokens, padded on the tokenizer's side. Returns
    /// the ids and which of them are the chat's (the attention mask).
    pub fn encode_chat(&self, text: &str, max_len: usize) -> Result<(Tokens, Vec<bool>)> {
        let err = |e: tokenizers::Error| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        };
        let mut tok = self.inner.clone();
        tok.with_padding(None);
        tok.with_truncation(None).map_err(err)?;
        let mut ids = tok.encode(text, false).map_err(err)?.get_ids().to_vec();
        let dropped = ids.len().saturating_sub(max_len);
        ids.truncate(max_len);
        let len = ids.len();
        let pads = vec![self.pad_id; max_len - len];
        let (ids, valid) = match self.pad_left {
            true => (
                [pads.clone(), ids].concat(),
                (0..max_len).map(|i| i >= max_len - len).collect(),
            ),
            false => (
                [ids, pads].concat(),
                (0..max_len).map(|i| i < len).collect(),
            ),
        };
        Ok((Tokens { ids, dropped, len }, valid))
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
        let len = ids.len().min(max_len);
        ids.resize(max_len, self.pad_id);
        Ok(Tokens { ids, dropped, len })
    }
}

/// CLIP's fast tokenizer built from the slow tokenizer's `vocab.json` and `merges.txt`: NFC, runs of
/// whitespace to one space, lowercase; CLIP's split pattern then byte-level; BPE with `</w>` word ends;
/// BOS and EOS around every sequence (transformers' `CLIPConverter`).
fn clip_bpe(dir: &Path, cfg: &TokenizerConfig) -> Result<tokenizers::Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let err = |path: &Path, msg: String| Error::Tokenizer {
        path: path.to_path_buf(),
        msg,
    };
    let vocab: serde_json::Map<String, serde_json::Value> = crate::config::read_json(&vocab_path)?;
    let text = std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
    let merges: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .collect();
    if let Some(bad) = merges.iter().find(|m| m.split(' ').count() != 2) {
        return Err(err(&merges_path, format!("bad merge line {bad:?}")));
    }
    let special = |v: &Option<serde_json::Value>, default: &str| {
        v.as_ref()
            .and_then(token_text)
            .unwrap_or_else(|| default.to_string())
    };
    let bos = special(&cfg.bos_token, "<|startoftext|>");
    let eos = special(&cfg.eos_token, "<|endoftext|>");
    let unk = special(&cfg.unk_token, &eos);
    let id = |t: &str| {
        vocab.get(t).and_then(|v| v.as_u64()).ok_or_else(|| {
            err(
                &vocab_path,
                format!("special token {t:?} is not in the vocabulary"),
            )
        })
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    let added: Vec<serde_json::Value> = [(&bos, bos_id), (&eos, eos_id)]
        .iter()
        .map(|(t, i)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": format!(
                "{}|{}|'s|'t|'re|'ve|'m|'ll|'d|[\\p{{L}}]+|[\\p{{N}}]|[^\\s\\p{{L}}\\p{{N}}]+",
                regex_escape(&bos), regex_escape(&eos))},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
        .map_err(|e| err(&vocab_path, e.to_string()))
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$#&-~".contains(c);
            special
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// transformers' `strftime_now` for chat templates: the current UTC time through a `strftime`
/// format (%Y %m %d %H %M %S %y %B %b %A %a %j %%; others are kept as written).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    format_time(fmt, secs)
}

fn format_time(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem / 60 % 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some('j') => out += &format!("{yday:03}"),
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('A') => out += DAYS[days.rem_euclid(7) as usize],
            Some('a') => out += &DAYS[days.rem_euclid(7) as usize][..3],
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn strftime_formats_a_known_instant() {
        // 2026-11-30 03:06:46 UTC, a Monday, day 334 of the year.
        let t = 1_796_008_006;
        assert_eq!(
            super::format_time("%Y-%m-%d %H:%M:%S %A %a %B %b %j %y %% %Q", t),
            "2026-11-30 03:06:46 Monday Mon November Nov 334 26 % %Q"
        );
        assert_eq!(
            super::format_time("%d %B %Y", 951_782_400),
            "29 February 2000"
        );
    }
}
