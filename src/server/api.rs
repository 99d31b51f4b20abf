//! The OpenAI images API as this server speaks it: the request body of
//! `POST /v1/images/generations` (OpenAI's fields and ours), turned into a [`Request`], and errors
//! in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mmdit::{Param, Request};
use serde::Deserialize;
use std::path::Path;

/// Most images one request may ask for.
pub const MAX_N: usize = 8;

/// `POST /v1/images/generations`. Unknown fields are refused by name (a misspelt `stpes` would
/// otherwise be ignored); OpenAI's fields that do not apply ([`IGNORED`]) are accepted and
/// ignored.
#[derive(Deserialize, Debug)]
pub struct Generation {
    pub prompt: Option<String>,
    pub n: Option<i64>,
    /// "WxH", or "auto" for the model's size.
    pub size: Option<String>,
    /// `b64_json` (the default) or `url`.
    pub response_format: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: Option<i64>,
    pub guidance: Option<f64>,
    pub seed: Option<u64>,
    pub sampler: Option<String>,
    /// Step caching, as `--cache` (`fbcache:0.08`, ...).
    pub cache: Option<String>,
    pub loras: Option<Vec<LoraRef>>,
    /// Editing (`/v1/images/edits`): the share of the schedule that runs.
    pub strength: Option<f64>,
    /// `png` (the default, with the generation parameters in text chunks), `jpeg` or `webp`
    /// (lossless), as OpenAI's.
    pub output_format: Option<String>,
    /// JPEG's quality, 0-100 (default 100, as OpenAI's); PNG and the lossless WebP take none.
    pub output_compression: Option<i64>,
    /// OpenAI's streaming: Server-Sent Events, `partial_images` (0-3) previews of the image on
    /// the way and then each image.
    pub stream: Option<bool>,
    pub partial_images: Option<i64>,
    /// OpenAI's fields with no meaning here (this server serves one model): accepted and
    /// ignored.
    #[serde(flatten)]
    pub ignored: std::collections::HashMap<String, serde_json::Value>,
}

/// OpenAI's request fields that have no meaning here: this server serves one model, opaque.
pub const IGNORED: &[&str] = &[
    "model",
    "quality",
    "style",
    "user",
    "background",
    "moderation",
    "safety_identifier",
    "complexity",
    "input_fidelity",
];

/// A LoRA by its file name in `--lora-dir` (with or without `.safetensors`), and its weight.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    pub name: String,
    pub scale: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    B64Json,
    Url,
}

/// A checked generation request: the library request, the image count, the answer's format and
/// the images' file format.
pub struct Checked {
    pub req: Request,
    pub n: usize,
    pub format: Format,
    pub encoding: mmdit::output::Encoding,
    /// Streamed (`"stream": true`): how many partial images to send before the images.
    pub stream: Option<usize>,
}

/// The most partial images a streamed request may ask for, as OpenAI's.
pub const MAX_PARTIAL_IMAGES: i64 = 3;

impl Generation {
    /// The library request, checked field by field (the model's own checks follow, in
    /// `Spec::resolve`).
    pub fn check(self, lora_dir: Option<&Path>) -> Result<Checked, ApiError> {
        if let Some(k) = self.ignored.keys().find(|k| !IGNORED.contains(&k.as_str())) {
            return Err(ApiError::bad(
                k,
                format!("unknown field {k:?}; the fields are prompt, n, size, response_format, output_format, output_compression, stream, partial_images, negative_prompt, steps, guidance, seed, sampler, cache, loras (and for edits image, mask and strength)"),
            ));
        }
        let prompt = self
            .prompt
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| ApiError::bad("prompt", "prompt is required and must not be empty"))?;
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::bad(
                    "n",
                    format!("n {n}: must be between 1 and {MAX_N}"),
                ))
            }
        };
        let (width, height) = match self.size.as_deref() {
            None | Some("auto") => (None, None),
            Some(s) => {
                let parsed = s.split_once('x').and_then(|(w, h)| {
                    Some((
                        w.trim().parse::<usize>().ok()?,
                        h.trim().parse::<usize>().ok()?,
                    ))
                });
                match parsed {
                    Some((w, h)) => (Some(w), Some(h)),
                    None => {
                        return Err(ApiError::bad(
                            "size",
                            format!(
                            "size {s:?}: write it as WIDTHxHEIGHT, e.g. \"1024x1024\", or \"auto\""
                        ),
                        ))
                    }
                }
            }
        };
        let format = match self.response_format.as_deref() {
            None | Some("b64_json") => Format::B64Json,
            Some("url") => Format::Url,
            Some(f) => {
                return Err(ApiError::bad(
                    "response_format",
                    format!("response_format {f:?}: use \"b64_json\" or \"url\""),
                ))
            }
        };
        let image_format = match self.output_format.as_deref() {
            None => mmdit::output::Format::Png,
            Some(f) => mmdit::output::Format::named(f).ok_or_else(|| {
                ApiError::bad(
                    "output_format",
                    format!("output_format {f:?}: use \"png\", \"jpeg\" or \"webp\""),
                )
            })?,
        };
        let quality = match self.output_compression {
            None => 100,
            Some(q) if (0..=100).contains(&q) => q as u8,
            Some(q) => {
                return Err(ApiError::bad(
                    "output_compression",
                    format!("output_compression {q}: must be between 0 and 100 (JPEG's quality)"),
                ))
            }
        };
        let partials = match self.partial_images {
            None => 0,
            Some(p) if (0..=MAX_PARTIAL_IMAGES).contains(&p) => p as usize,
            Some(p) => {
                return Err(ApiError::bad(
                    "partial_images",
                    format!("partial_images {p}: must be between 0 and {MAX_PARTIAL_IMAGES}"),
                ))
            }
        };
        let stream = self.stream.unwrap_or(false).then_some(partials);
        let steps = match self.steps {
            None => None,
            Some(s) if s >= 1 => Some(s as usize),
            Some(s) => {
                return Err(ApiError::bad(
                    "steps",
                    format!("steps {s}: must be at least 1"),
                ))
            }
        };
        let sampler = self
            .sampler
            .as_deref()
            .map(mmdit::sampling::Sampler::parse)
            .transpose()
            .map_err(|e| ApiError::from_library(&e))?;
        let cache = match self.cache.as_deref() {
            Some(c) => mmdit::cache::CacheSpec::parse(c).map_err(|e| ApiError::from_library(&e))?,
            None => None,
        };
        let loras = match self.loras {
            None => Vec::new(),
            Some(list) => {
                let dir = lora_dir.ok_or_else(|| {
                    ApiError::bad(
                        "loras",
                        "this server has no LoRA folder; start it with --lora-dir DIR",
                    )
                })?;
                list.into_iter()
                    .map(|l| lora_spec(dir, l))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(Checked {
            req: Request {
                prompt,
                negative_prompt: self.negative_prompt,
                steps,
                guidance: self.guidance,
                width,
                height,
                seed: self.seed,
                sampler,
                cache,
                loras,
                strength: self.strength,
                ..Request::default()
            },
            n,
            format,
            encoding: mmdit::output::Encoding {
                format: image_format,
                quality,
            },
            stream,
        })
    }
}

/// A LoRA named in a request: a plain file name inside `dir`, never a path.
fn lora_spec(dir: &Path, l: LoraRef) -> Result<mmdit::lora::LoraSpec, ApiError> {
    let name = l.name.trim();
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c));
    if !plain {
        return Err(ApiError::bad(
            "loras",
            format!("LoRA {name:?}: give the file name of a LoRA in the server's LoRA folder (letters, digits, - _ . and spaces), not a path"),
        ));
    }
    let file = if name.ends_with(".safetensors") {
        name.to_string()
    } else {
        format!("{name}.safetensors")
    };
    let path = dir.join(&file);
    if !path.is_file() {
        return Err(ApiError::bad(
            "loras",
            format!(
                "LoRA {name:?}: no such LoRA in the server's LoRA folder; GET /v1/loras lists them"
            ),
        ));
    }
    let scale = l.scale.unwrap_or(1.0);
    if !scale.is_finite() || scale.abs() > 100.0 {
        return Err(ApiError::bad(
            "loras",
            format!(
                "LoRA {name:?}: scale {} is out of range; use a weight between -100 and 100",
                mmdit::request::shown(scale)
            ),
        ));
    }
    Ok(mmdit::lora::LoraSpec {
        source: path.display().to_string(),
        scale,
    })
}

/// The LoRA files in `dir`, by the names requests give.
pub fn lora_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_suffix(".safetensors").map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The answer to a JSON body or form that is not a [`Generation`]: the decoder's reason in the API's
/// words ([`decoder_reason`]), led by the field it names, whose top-level name (`loras` for
/// `loras[0].scale`) is the `param`.
pub fn undecodable(status: StatusCode, reason: &str) -> ApiError {
    let reason = [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
    ]
    .iter()
    .find_map(|p| reason.strip_prefix(p))
    .unwrap_or(reason);
    match decoder_reason(reason) {
        (Some(field), text) => ApiError {
            status,
            ..ApiError::bad(field, text)
        },
        (None, text) => ApiError::new(status, format!("the request is not valid: {text}")),
    }
}

/// serde's reason a value is not a [`Generation`] (`loras[0].scale: invalid type: string "a",
/// expected f64`) in the API's words (`expected a number`, not `expected f64`), and the top-level
/// field its path names, if it names one.
pub fn decoder_reason(reason: &str) -> (Option<&str>, String) {
    let (path, detail) = match reason.split_once(": ") {
        Some((path, detail)) if is_field_path(path) => (Some(path), detail),
        _ => (None, reason),
    };
    let mut detail = detail.to_string();
    for (rust, api) in [
        (
            "expected struct Generation",
            "expected a JSON object of the request's fields",
        ),
        (
            "expected struct LoraRef",
            "expected an object {\"name\", \"scale\"}",
        ),
        ("expected a sequence", "expected a list"),
        ("expected i64", "expected an integer"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected f64", "expected a number"),
    ] {
        detail = detail.replace(rust, api);
    }
    match path {
        Some(path) => (path.split(['.', '[']).next(), format!("{path}: {detail}")),
        None => (None, detail),
    }
}

/// Whether `s` is a field path as the decoder writes it: `seed`, `loras[0].scale`.
fn is_field_path(s: &str) -> bool {
    s.split('.').all(|segment| {
        let (name, mut rest) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return false;
        }
        while let Some(tail) = rest.strip_prefix('[') {
            let Some((index, after)) = tail.split_once(']') else {
                return false;
            };
            if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            rest = after;
        }
        rest.is_empty()
    })
}

/// An error answer in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// A 400 about request field `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// A library error: bad input (400, its parameter named as the API names it) or a failure
    /// of the server's (500).
    pub fn from_library(e: &mmdit::Error) -> Self {
        let text = e.render(&api_name);
        let text = text.lines().next().unwrap_or_default().to_string();
        match e {
            mmdit::Error::InvalidRequest(m) => Self {
                param: m.first_param().map(api_name),
                ..Self::new(StatusCode::BAD_REQUEST, text)
            },
            // Named as the request names it, not by the server's path to the file.
            mmdit::Error::Lora { path, msg } => {
                let name = path.file_stem().unwrap_or_default().to_string_lossy();
                let msg = msg.lines().next().unwrap_or_default();
                Self::bad("loras", format!("LoRA {name:?}: {msg}"))
            }
            mmdit::Error::Interrupted => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request was cancelled (the server is shutting down, or the job was cancelled)",
            ),
            _ => Self::new(StatusCode::INTERNAL_SERVER_ERROR, text),
        }
    }
}

/// A library parameter by the API field that sets it.
pub fn api_name(p: Param) -> String {
    match p {
        Param::Width | Param::Height => format!("size ({})", p.name()),
        Param::Lora => "loras".into(),
        p => p.name().into(),
    }
}

impl ApiError {
    /// The answer's body, `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Fields of `/v1/images/edits` (multipart) that are numbers; the others are text.
const NUMBERS: &[&str] = &[
    "n",
    "steps",
    "guidance",
    "seed",
    "strength",
    "output_compression",
    "partial_images",
];

/// A multipart text field as the JSON value the generation body would hold.
pub fn form_value(name: &str, text: &str) -> Result<serde_json::Value, ApiError> {
    if NUMBERS.contains(&name) {
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .map_err(|_| ApiError::bad(name, format!("{name} {text:?}: must be a number")))?;
        if !v.is_number() {
            return Err(ApiError::bad(
                name,
                format!("{name} {text:?}: must be a number"),
            ));
        }
        Ok(v)
    } else if name == "stream" {
        match text.trim() {
            "true" => Ok(serde_json::Value::Bool(true)),
            "false" => Ok(serde_json::Value::Bool(false)),
            _ => Err(ApiError::bad(
                name,
                format!("stream {text:?}: use true or false"),
            )),
        }
    } else if name == "loras" {
        serde_json::from_str(text).map_err(|_| {
            ApiError::bad(
                "loras",
                "loras: give a JSON list, e.g. [{\"name\": \"x\", \"scale\": 0.8}]",
            )
        })
    } else {
        Ok(serde_json::Value::String(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoder's field paths are recognised (and nothing else is taken for one), the
    /// top-level field is the `param`, and Rust's type names become the API's words.
    #[test]
    fn undecodable_bodies_name_their_field() {
        for p in ["seed", "loras[0].scale", "loras[12]", "a_b.c[1][2]"] {
            assert!(is_field_path(p), "{p}");
        }
        for p in [
            "",
            "invalid type",
            "loras[]",
            "loras[x]",
            "[0]",
            "a.",
            "a[0",
            "a[0]b",
        ] {
            assert!(!is_field_path(p), "{p}");
        }
        let e = undecodable(
            StatusCode::BAD_REQUEST,
            "Failed to deserialize the JSON body into the target type: loras[0].scale: invalid type: string \"a\", expected f64 at line 1 column 46",
        );
        assert_eq!(e.param.as_deref(), Some("loras"));
        assert_eq!(
            e.message,
            "loras[0].scale: invalid type: string \"a\", expected a number at line 1 column 46"
        );
        let e = undecodable(
            StatusCode::BAD_REQUEST,
            "Failed to deserialize the JSON body into the target type: invalid type: null, expected struct Generation at line 1 column 4",
        );
        assert_eq!(e.param, None);
        assert!(e
            .message
            .starts_with("the request is not valid: invalid type: null, expected a JSON object"));
    }
}
