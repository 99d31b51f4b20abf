//! A LoRA file as stored: its tensors grouped into modules (down, up, alpha), its format told from
//! its keys, and the adapter metadata diffusers writes. Nothing here knows a model.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How a file names its layers (and so how its scales are read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// diffusers / PEFT / AI-toolkit: `transformer.<diffusers name>.lora_A.weight`, scale
    /// `lora_alpha / r` from the adapter metadata or `.alpha` keys, else 1.
    Peft,
    /// kohya sd-scripts: `lora_unet_<original name, '_' for '.'>.lora_down.weight`, text encoders
    /// under `lora_te1_`.., `lora_transformer_<diffusers name>` in its diffusers flavour; scale
    /// `alpha / rank` (alpha defaults to the rank).
    Kohya,
    /// XLabs: `double_blocks.N.processor.qkv_lora1.down.weight`; scale 1.
    Xlabs,
    /// The original model's names, as ComfyUI saves them: `diffusion_model.double_blocks.N.
    /// img_attn.qkv.lora_up.weight` (or `lora_A`/`lora_B`); scale `alpha / rank`.
    Original,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Peft => "diffusers/PEFT",
            Format::Kohya => "kohya sd-scripts",
            Format::Xlabs => "XLabs",
            Format::Original => "original names (BFL/SAI, ComfyUI)",
        }
    }
}

/// One adapted layer as the file names it (the key without its `.lora_A.weight`-like suffix).
#[derive(Debug, Clone)]
pub struct Module {
    /// (r, in) or, for a convolution, (r, in, kh, kw); f32 on the CPU.
    pub down: Tensor,
    /// (out, r) or (out, r, 1, 1); f32 on the CPU.
    pub up: Tensor,
    pub alpha: Option<f64>,
    /// DoRA's magnitude (out,): PEFT's `lora_magnitude_vector`, the norm each output row of
    /// `W + scale · up · down` is rescaled to.
    pub magnitude: Option<Tensor>,
    /// The file's keys of this module.
    pub keys: Vec<String>,
}

impl Module {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// (out, in) of the layer it adapts (in counts a convolution's kernel positions).
    pub fn dims(&self) -> (usize, usize) {
        let out = self.up.dims()[0];
        (out, self.down.elem_count() / self.rank().max(1))
    }
}

/// A LoRA file read and grouped.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: Format,
    /// By module name (the key without its role suffix).
    pub modules: BTreeMap<String, Module>,
    /// Keys that are not a LoRA factor, alpha or DoRA magnitude (kohya's `dora_scale`, bias or norm
    /// differences...).
    pub other: Vec<String>,
    /// diffusers' `lora_adapter_metadata` (PEFT's `LoraConfig` as JSON), when the file has it.
    pub adapter_metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
    Magnitude,
}

/// Key suffixes of a module's parts, longest first.
const ROLES: &[(&str, Role)] = &[
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".down.weight", Role::Down),
    (".up.weight", Role::Up),
    (".alpha", Role::Alpha),
    (".lora_magnitude_vector.default.weight", Role::Magnitude),
    (".lora_magnitude_vector.weight", Role::Magnitude),
    (".lora_magnitude_vector", Role::Magnitude),
];

/// Key parts of the LyCORIS methods that are not low-rank products (refused by name).
const LYCORIS: &[(&str, &str)] = &[
    (".hada_w1_a", "LoHa"),
    (".hada_w2_a", "LoHa"),
    (".lokr_w1", "LoKr"),
    (".lokr_w2", "LoKr"),
    (".lokr_w1_a", "LoKr"),
    (".lokr_w2_a", "LoKr"),
    (".oft_blocks", "OFT"),
    (".oft_diag", "OFT"),
];

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Lora {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl LoraFile {
    /// Reads and checks a `.safetensors` LoRA: header, LyCORIS methods, pairs, ranks, finite values.
    pub fn read(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !ext.eq_ignore_ascii_case("safetensors") {
            return Err(bad(
                path,
                "not a .safetensors file (pickle .ckpt/.pt/.bin files can run code and are not loaded); use the .safetensors version",
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// [`LoraFile::read`] on a file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        crate::loader::weights::check_safetensors_bytes(bytes, path).map_err(|_| {
            bad(
                path,
                "is not a valid safetensors file (damaged or truncated); download it again",
            )
        })?;
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
            bad(
                path,
                format!("invalid safetensors ({e}); the file is damaged, download it again"),
            )
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            bad(
                path,
                format!("invalid safetensors ({e}); the file is damaged, download it again"),
            )
        })?;
        let adapter_metadata = header
            .metadata()
            .as_ref()
            .and_then(|m: &HashMap<String, String>| m.get("lora_adapter_metadata"))
            .and_then(|s| serde_json::from_str(s).ok());
        let mut parts: BTreeMap<String, ([Option<Tensor>; 4], Vec<String>)> = BTreeMap::new();
        let mut other = Vec::new();
        let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, t) in tensors {
            if let Some((_, method)) = LYCORIS.iter().find(|(p, _)| key.contains(p)) {
                return Err(bad(path, format!(
                    "is a {method} (LyCORIS) file (key `{key}`); {method} is not supported, only LoRA (low-rank down/up pairs): use a LoRA version of it"
                )));
            }
            let Some((base, role)) = ROLES
                .iter()
                .find_map(|(suffix, role)| key.strip_suffix(suffix).map(|b| (b, *role)))
            else {
                other.push(key.clone());
                continue;
            };
            let t = t.to_dtype(DType::F32).map_err(|e| {
                bad(
                    path,
                    format!("tensor `{key}`: {e}; the file is damaged, download it again"),
                )
            })?;
            let entry = parts.entry(base.to_string()).or_default();
            entry.0[role as usize] = Some(t);
            entry.1.push(key.clone());
        }
        let mut modules = BTreeMap::new();
        for (name, ([down, up, alpha, magnitude], keys)) in parts {
            let (down, up) = match (down, up) {
                (Some(d), Some(u)) => (d, u),
                (None, None) if magnitude.is_none() => {
                    // An alpha alone (diffusers drops these too).
                    other.extend(keys);
                    continue;
                }
                (None, None) => {
                    return Err(bad(path, format!(
                        "module `{name}` has a DoRA magnitude but no down or up factor; the file is incomplete, download it again"
                    )));
                }
                (d, _) => {
                    let (has, lacks) = if d.is_some() {
                        ("down", "up")
                    } else {
                        ("up", "down")
                    };
                    return Err(bad(path, format!(
                        "module `{name}` has a {has} factor but no {lacks} factor; the file is incomplete, download it again"
                    )));
                }
            };
            let alpha = match alpha {
                Some(a) => Some(scalar(&a).map_err(|e| bad(path, format!("`{name}.alpha`: {e}")))?),
                None => None,
            };
            check_module(path, &name, &down, &up, alpha)?;
            if let Some(m) = &magnitude {
                check_magnitude(path, &name, m, &up)?;
            }
            modules.insert(
                name,
                Module {
                    down,
                    up,
                    alpha,
                    magnitude,
                    keys,
                },
            );
        }
        if modules.is_empty() {
            return Err(bad(path, format!(
                "has no LoRA tensors ({} keys, none a lora_A/lora_B, lora_down/lora_up or XLabs down/up pair); is it a model checkpoint rather than a LoRA?",
                other.len()
            )));
        }
        let format = detect(&modules);
        Ok(Self {
            path: path.to_path_buf(),
            format,
            modules,
            other,
            adapter_metadata,
        })
    }

    /// Every rank in the file.
    pub fn ranks(&self) -> std::collections::BTreeSet<usize> {
        self.modules.values().map(Module::rank).collect()
    }
}

/// A one-element tensor's value.
fn scalar(t: &Tensor) -> std::result::Result<f64, String> {
    if t.elem_count() != 1 {
        return Err(format!(
            "an alpha must be one number, found shape {:?}",
            t.dims()
        ));
    }
    let v = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?[0];
    Ok(v as f64)
}

/// Shapes that make a product, matching ranks, finite values.
fn check_module(
    path: &Path,
    name: &str,
    down: &Tensor,
    up: &Tensor,
    alpha: Option<f64>,
) -> Result<()> {
    let (dd, ud) = (down.dims(), up.dims());
    let conv_up = ud.len() == 4 && ud[2] == 1 && ud[3] == 1;
    if !(dd.len() == 2 || dd.len() == 4) || !(ud.len() == 2 || conv_up) {
        return Err(bad(path, format!(
            "module `{name}`: down {dd:?} and up {ud:?} are not the factors of a linear layer or convolution; the file is damaged or not a LoRA"
        )));
    }
    if dd[0] != ud[1] {
        return Err(bad(path, format!(
            "module `{name}`: the down factor has rank {} ({dd:?}) but the up factor rank {} ({ud:?}); the ranks must match, the file is damaged",
            dd[0], ud[1]
        )));
    }
    if dd[0] == 0 {
        return Err(bad(
            path,
            format!("module `{name}` has rank 0; the file is damaged"),
        ));
    }
    for (part, t) in [("down", down), ("up", up)] {
        if !all_finite(t) {
            return Err(bad(path, format!(
                "module `{name}`: the {part} factor holds NaN or infinite values; the LoRA is broken (a diverged training run), use another file"
            )));
        }
    }
    if let Some(a) = alpha {
        if !a.is_finite() {
            return Err(bad(
                path,
                format!("module `{name}`: alpha is {a}; the file is damaged"),
            ));
        }
    }
    Ok(())
}

/// Whether every value of `t` is finite (false when it cannot be read as f32).
fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map(|v| v.iter().all(|x| x.is_finite()))
        .unwrap_or(false)
}

/// A DoRA magnitude: one finite value per output row of the up factor (PEFT stores it flat).
fn check_magnitude(path: &Path, name: &str, m: &Tensor, up: &Tensor) -> Result<()> {
    let rows = up.dims()[0];
    if m.elem_count() != rows || m.dims().iter().filter(|&&d| d != 1).count() > 1 {
        return Err(bad(path, format!(
            "module `{name}`: the DoRA magnitude has shape {:?} but the up factor {} rows; the file is damaged",
            m.dims(),
            rows
        )));
    }
    if !all_finite(m) {
        return Err(bad(path, format!(
            "module `{name}`: the DoRA magnitude holds NaN or infinite values; the LoRA is broken, use another file"
        )));
    }
    Ok(())
}

/// The format, from the module names (diffusers' order of checks: kohya, XLabs, then names).
fn detect(modules: &BTreeMap<String, Module>) -> Format {
    let any = |f: &dyn Fn(&str) -> bool| modules.keys().any(|k| f(k));
    if any(&|k| {
        k.starts_with("lora_unet_")
            || k.starts_with("lycoris_")
            || k.starts_with("lora_te")
            || k.starts_with("lora_transformer_")
    }) {
        Format::Kohya
    } else if any(&|k| k.contains(".processor.")) {
        Format::Xlabs
    } else if any(&|k| {
        let rest = k
            .strip_prefix("model.diffusion_model.")
            .or_else(|| k.strip_prefix("diffusion_model."))
            .unwrap_or(k);
        super::names::is_original(rest) || k.starts_with("text_encoders.")
    }) {
        Format::Original
    } else {
        Format::Peft
    }
}
