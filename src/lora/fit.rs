//! Fitting a LoRA file to a model: each module's layer(s) found by the file's naming scheme, the
//! shapes checked against the model's, the format's scale computed, fused layers (q/k/v, FLUX.1's
//! `linear1`) split as the single-file tables split the weights.

use super::file::{Format, LoraFile, Module};
use super::names::{self, Component, Kind, Xlabs};
use crate::error::{Error, Result};
use crate::loader::audit::TensorMeta;
use crate::loader::single::{self, Transform};
use candle_core::Tensor;
use std::collections::{BTreeMap, BTreeSet};

/// A model's layers as a LoRA sees them: each component's tensor names and shapes (diffusers names).
#[derive(Debug, Clone)]
pub struct ModelLayers {
    /// `flux`, `chroma`, `flux2` or `sd3`.
    pub family: &'static str,
    pub transformer: BTreeMap<String, Vec<usize>>,
    /// The text encoders in the family's order (CLIP-L first).
    pub text: Vec<TextLayers>,
}

/// A text encoder's folder, whether it is T5, and its tensors' shapes.
pub type TextLayers = (&'static str, bool, BTreeMap<String, Vec<usize>>);

impl ModelLayers {
    /// From header listings (name -> meta) of the transformer and the text encoders.
    pub fn new(
        transformer: &BTreeMap<String, TensorMeta>,
        text: Vec<(&'static str, bool, BTreeMap<String, TensorMeta>)>,
    ) -> Self {
        let shapes = |m: &BTreeMap<String, TensorMeta>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.shape.clone()))
                .collect()
        };
        let family = if transformer
            .keys()
            .any(|k| k.starts_with("double_stream_modulation_img."))
        {
            "flux2"
        } else if transformer
            .keys()
            .any(|k| k.starts_with("distilled_guidance_layer."))
        {
            "chroma"
        } else if transformer
            .keys()
            .any(|k| k.starts_with("single_transformer_blocks."))
        {
            "flux"
        } else {
            "sd3"
        };
        Self {
            family,
            transformer: shapes(transformer),
            text: text
                .into_iter()
                .map(|(d, t5, m)| (d, t5, shapes(&m)))
                .collect(),
        }
    }

    fn component(&self, dir: &str) -> Option<&BTreeMap<String, Vec<usize>>> {
        if dir == "transformer" {
            return Some(&self.transformer);
        }
        self.text
            .iter()
            .find(|(d, _, _)| *d == dir)
            .map(|(_, _, m)| m)
    }
}

/// One adapter's contribution to one layer: `scale · up · down`.
#[derive(Debug, Clone)]
pub struct Piece {
    /// The file's module it comes from.
    pub module: String,
    /// (r, in), in flattened for a convolution.
    pub down: Tensor,
    /// (out, r): the rows of this layer (a slice of a fused layer's).
    pub up: Tensor,
    /// The format's scale (alpha / rank and the like), not the user's weight.
    pub scale: f64,
    /// DoRA's magnitude for these rows (out,), when the module has one.
    pub magnitude: Option<Tensor>,
}

/// A LoRA file fitted to a model.
#[derive(Debug, Clone)]
pub struct Fitted {
    pub path: std::path::PathBuf,
    pub format: Format,
    pub ranks: BTreeSet<usize>,
    /// (component folder, weight name) -> pieces.
    pub layers: BTreeMap<(String, String), Vec<Piece>>,
    /// File keys that fit no layer of the model.
    pub unmatched: Vec<String>,
    /// The family the file's names say it was made for, when they say.
    pub made_for: Option<&'static str>,
}

fn bad(file: &LoraFile, msg: String) -> Error {
    Error::Lora {
        path: file.path.clone(),
        msg,
    }
}

/// Where one module lands: (component, weight name, rows transform) for each layer.
type Targets = Vec<(String, String, Transform)>;

/// Fits `file` to `model`; refuses a file made for another family, one that fits no layer, and a
/// module whose shape does not fit the layer it names.
pub fn fit(file: &LoraFile, model: &ModelLayers) -> Result<Fitted> {
    let made_for = names::made_for(file.modules.keys().map(String::as_str));
    // Chroma and FLUX.2 keep FLUX.1's block names: their LoRAs may name themselves as FLUX.1's do
    // (the layers' names and shapes then decide).
    let fits =
        |f: &str| f == model.family || (f == "flux" && matches!(model.family, "chroma" | "flux2"));
    if let Some(f) = made_for.filter(|f| !fits(f)) {
        // A name that says so.
        let example = file
            .modules
            .keys()
            .find(|k| names::made_for(std::iter::once(k.as_str())) == Some(f))
            .map_or("", String::as_str);
        return Err(bad(file, format!(
            "is made for {f} (its layer names, e.g. `{example}`), but the model is {}; use a LoRA trained for this model",
            model.family
        )));
    }
    let format_table = match model.family {
        "flux" => single::Format::Flux,
        "chroma" => single::Format::Chroma,
        "flux2" => single::Format::Flux2,
        _ => single::Format::Sd3,
    };
    // The original names in the file, with the shape their layer would have, for the single-file
    // table (which splits fused layers by these shapes).
    let mut originals: BTreeMap<String, TensorMeta> = BTreeMap::new();
    let parsed: Vec<(&String, &Module, String, Kind)> = file
        .modules
        .iter()
        .filter_map(|(name, m)| {
            let n = names::parse(name);
            let dir = component_dir(n.component, model)?;
            Some((name, m, dir, n.kind))
        })
        .collect();
    for (_, m, dir, kind) in &parsed {
        if dir != "transformer" {
            continue;
        }
        if let Some(o) = original_name(kind, &model.transformer) {
            let (out, inp) = m.dims();
            originals.insert(
                format!("{o}.weight"),
                TensorMeta {
                    shape: vec![out, inp],
                    dtype: "F32".into(),
                },
            );
        }
    }
    let last_block = model
        .transformer
        .keys()
        .filter_map(|k| {
            k.strip_prefix("transformer_blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max();
    let mut by_original: BTreeMap<String, Vec<(String, Transform)>> = BTreeMap::new();
    for (diffusers, src) in single::transformer_table(format_table, &originals, last_block) {
        if diffusers.ends_with(".weight") {
            by_original
                .entry(src.key)
                .or_default()
                .push((diffusers, src.transform));
        }
    }
    let mut underscored: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut layers: BTreeMap<(String, String), Vec<Piece>> = BTreeMap::new();
    let mut unmatched: Vec<String> = file.other.clone();
    let alphas = Alphas::new(file);
    for (name, m) in &file.modules {
        let target = parsed
            .iter()
            .find(|(n, ..)| *n == name)
            .and_then(|(_, _, dir, kind)| {
                let layers = model.component(dir)?;
                let t = resolve(kind, dir, layers, &by_original, &mut underscored, m);
                (!t.is_empty()).then_some(t)
            });
        let Some(targets) = target else {
            unmatched.extend(m.keys.iter().cloned());
            continue;
        };
        let scale = alphas.scale(file.format, name, m);
        for (dir, weight, t) in targets {
            let shape = model
                .component(&dir)
                .and_then(|l| l.get(&weight))
                .cloned()
                .unwrap_or_default();
            let piece = piece(file, name, m, &weight, &shape, &t, scale)?;
            layers.entry((dir, weight)).or_default().push(piece);
        }
    }
    if layers.is_empty() {
        let hint = made_for.map_or(
            "no layer name of it is one this model has".to_string(),
            |f| format!("it looks made for {f}"),
        );
        return Err(bad(
            file,
            format!(
            "matches no layer of the model (a {} model; {hint}); use a LoRA trained for this model",
            model.family
        ),
        ));
    }
    Ok(Fitted {
        path: file.path.clone(),
        format: file.format,
        ranks: file.ranks(),
        layers,
        unmatched,
        made_for,
    })
}

/// The folder of a component the model has.
fn component_dir(c: Component, model: &ModelLayers) -> Option<String> {
    match c {
        Component::Transformer => Some("transformer".into()),
        Component::Text(k) => model.text.get(k).map(|(d, _, _)| d.to_string()),
        Component::TextDir("t5") => model
            .text
            .iter()
            .find(|(_, t5, _)| *t5)
            .map(|(d, _, _)| d.to_string()),
        Component::TextDir(d) => model
            .text
            .iter()
            .any(|(x, _, _)| *x == d)
            .then(|| d.to_string()),
    }
}

/// The original (dotted) name a module's kind stands for, if it is one.
fn original_name(kind: &Kind, transformer: &BTreeMap<String, Vec<usize>>) -> Option<String> {
    match kind {
        Kind::Original(o) => Some(o.clone()),
        Kind::Either(n) if !transformer.contains_key(&format!("{n}.weight")) => {
            match names::xlabs(n) {
                Some(Xlabs::Original(o)) => Some(o),
                Some(Xlabs::SingleQkv(_)) => None,
                None => Some(n.clone()),
            }
        }
        Kind::OriginalUnderscored(u) => Some(names::original_from_underscored(u)),
        _ => None,
    }
}

/// The layers a module lands on.
fn resolve(
    kind: &Kind,
    dir: &str,
    layers: &BTreeMap<String, Vec<usize>>,
    by_original: &BTreeMap<String, Vec<(String, Transform)>>,
    underscored: &mut BTreeMap<String, BTreeMap<String, String>>,
    m: &Module,
) -> Targets {
    let whole = |w: String| vec![(dir.to_string(), w, Transform::Whole)];
    // CLIP's names are under `text_model.` in files saved by transformers 4 and not in those saved
    // by transformers 5; a LoRA of either fits a model of either.
    let text = dir != "transformer";
    let diffusers = |n: &str| {
        let mut names = vec![n.to_string()];
        if text {
            names.push(match n.strip_prefix("text_model.") {
                Some(r) => r.to_string(),
                None => format!("text_model.{n}"),
            });
        }
        names
            .into_iter()
            .map(|n| format!("{n}.weight"))
            .find(|w| layers.contains_key(w))
            .map(whole)
            .unwrap_or_default()
    };
    let original = |o: &str| -> Targets {
        by_original
            .get(&format!("{o}.weight"))
            .map(|v| {
                v.iter()
                    .map(|(w, t)| (dir.to_string(), w.clone(), t.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut by_underscore = |u: &str| -> Targets {
        let index = underscored.entry(dir.to_string()).or_insert_with(|| {
            layers
                .keys()
                .filter_map(|k| k.strip_suffix(".weight"))
                .map(|k| (k.replace('.', "_"), k.to_string()))
                .collect()
        });
        let alt = match u.strip_prefix("text_model_") {
            Some(r) => r.to_string(),
            None => format!("text_model_{u}"),
        };
        index
            .get(u)
            .or_else(|| if text { index.get(&alt) } else { None })
            .map(|n| whole(format!("{n}.weight")))
            .unwrap_or_default()
    };
    match kind {
        Kind::Diffusers(n) => diffusers(n),
        Kind::Original(o) => original(o),
        Kind::Underscored(u) => by_underscore(u),
        Kind::OriginalUnderscored(u) => {
            let t = original(&names::original_from_underscored(u));
            if t.is_empty() {
                by_underscore(u)
            } else {
                t
            }
        }
        Kind::Either(n) => {
            let t = diffusers(n);
            if !t.is_empty() {
                return t;
            }
            match names::xlabs(n) {
                Some(Xlabs::Original(o)) => original(&o),
                Some(Xlabs::SingleQkv(block)) => {
                    let len = m.dims().0 / 3;
                    ["to_q", "to_k", "to_v"]
                        .iter()
                        .enumerate()
                        .map(|(k, p)| {
                            let t = Transform::Rows {
                                start: k * len,
                                len,
                            };
                            (dir.to_string(), format!("{block}.attn.{p}.weight"), t)
                        })
                        .filter(|(_, w, _)| layers.contains_key(w))
                        .collect()
                }
                None => original(n),
            }
        }
    }
}

/// The module's factors for one layer, its shape checked against the layer's.
fn piece(
    file: &LoraFile,
    name: &str,
    m: &Module,
    weight: &str,
    shape: &[usize],
    t: &Transform,
    scale: f64,
) -> Result<Piece> {
    let (out, inp) = m.dims();
    let up2 = m.up.reshape((out, m.rank())).map_err(Error::Candle)?;
    let down2 = m.down.reshape((m.rank(), inp)).map_err(Error::Candle)?;
    // The layer's rows of a (out, ...) tensor: the up factor's, DoRA's magnitude's.
    let rows = |x: Tensor| match t {
        Transform::Whole => Ok(x),
        Transform::Rows { start, len } if start + len <= out => x.narrow(0, *start, *len),
        Transform::SwapHalves if out % 2 == 0 => {
            let h = out / 2;
            x.narrow(0, h, h)
                .and_then(|b| Tensor::cat(&[b, x.narrow(0, 0, h)?], 0))
        }
        _ => Err(candle_core::Error::Msg("rows out of range".into())),
    };
    let up = rows(up2);
    let magnitude = match &m.magnitude {
        Some(v) => Some(v.flatten_all().and_then(rows).map_err(Error::Candle)?),
        None => None,
    };
    let layer_in: usize = shape.iter().skip(1).product();
    let ok_up = up.as_ref().ok().map(|u| u.dims()[0]) == shape.first().copied();
    let layer = weight.strip_suffix(".weight").unwrap_or(weight);
    if shape.is_empty() {
        return Err(bad(file, format!(
            "module `{name}` names the layer `{layer}`, which this model does not have; the LoRA was trained for another model (a FLUX.1 LoRA on its modulation layers, on Chroma, say)"
        )));
    }
    let (Ok(up), true, true) = (up, ok_up, layer_in == inp && shape.len() >= 2) else {
        return Err(bad(file, format!(
            "module `{name}` (up {:?}, down {:?}: a {out}x{inp} layer) does not fit the model's layer `{layer}` of shape {shape:?}; the LoRA was trained for another model or model size",
            m.up.dims(),
            m.down.dims()
        )));
    };
    Ok(Piece {
        module: name.to_string(),
        down: down2,
        up,
        scale,
        magnitude,
    })
}

/// How a file's scales are read.
struct Alphas {
    /// PEFT's `LoraConfig` from the adapter metadata.
    meta: Option<serde_json::Value>,
    /// The most common `.alpha` value (PEFT's `lora_alpha` when the metadata is absent).
    common: Option<f64>,
}

impl Alphas {
    fn new(file: &LoraFile) -> Self {
        let mut counts: BTreeMap<u64, (usize, f64)> = BTreeMap::new();
        for a in file.modules.values().filter_map(|m| m.alpha) {
            counts.entry(a.to_bits()).or_insert((0, a)).0 += 1;
        }
        let common = counts.values().max_by_key(|(n, _)| *n).map(|(_, a)| *a);
        Self {
            meta: file.adapter_metadata.clone(),
            common,
        }
    }

    /// The scale of `module` (its name in the file) under `format`.
    fn scale(&self, format: Format, module: &str, m: &Module) -> f64 {
        let r = m.rank() as f64;
        match format {
            Format::Xlabs => 1.0,
            Format::Kohya | Format::Original => m.alpha.map_or(1.0, |a| a / r),
            Format::Peft => {
                if let Some(meta) = &self.meta {
                    if let Some(s) = peft_scale(meta, module, r) {
                        return s;
                    }
                }
                match (m.alpha, self.common) {
                    (Some(a), _) | (None, Some(a)) => a / r,
                    (None, None) => 1.0,
                }
            }
        }
    }
}

/// The scale PEFT's `LoraConfig` (diffusers' `lora_adapter_metadata`, whole or prefixed by the
/// component) gives `module`: `lora_alpha / r`, the alpha from `alpha_pattern` when a key of it
/// names the module, over `sqrt(r)` with `use_rslora`.
fn peft_scale(meta: &serde_json::Value, module: &str, r: f64) -> Option<f64> {
    let (component, layer) = module.split_once('.').unwrap_or(("", module));
    let field = |f: &str| meta.get(format!("{component}.{f}")).or_else(|| meta.get(f));
    let alpha = field("lora_alpha")?.as_f64()?;
    let pattern = field("alpha_pattern")
        .and_then(|p| p.as_object())
        .and_then(|p| {
            p.iter().find_map(|(k, v)| {
                (layer == k || layer.ends_with(&format!(".{k}")))
                    .then(|| v.as_f64())
                    .flatten()
            })
        });
    let alpha = pattern.unwrap_or(alpha);
    let rslora = field("use_rslora")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Some(if rslora { alpha / r.sqrt() } else { alpha / r })
}
