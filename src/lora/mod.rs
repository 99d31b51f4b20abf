//! LoRA adapters: files in every common naming scheme ([`file`] reads and groups them, [`names`]
//! says where each name points, [`fit`] fits them to a model), combined with per-adapter weights
//! as diffusers' `set_adapters` does, and applied either merged into the weights as they are read
//! ([`MergeBackend`]) or at run time as a term of each layer ([`crate::nn::lora`]).

pub mod file;
pub mod fit;
pub mod names;

pub use file::{Format, LoraFile};
pub use fit::{fit, Fitted, ModelLayers, Piece};

use crate::cpu::sgemm::{self, PackedF32};
use crate::error::{Error, Message, Param, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest adapter weight accepted; beyond it an image is noise (diffusers takes any).
pub const MAX_SCALE: f64 = 100.0;

/// A LoRA as the user names it: a local `.safetensors` file or a Hub `org/name[/file]`, and its
/// weight (`:SCALE`, default 1).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub source: String,
    pub scale: f64,
}

impl LoraSpec {
    /// `SOURCE[:SCALE]`.
    pub fn parse(s: &str) -> Result<Self> {
        let (source, scale) = match s.rsplit_once(':') {
            Some((src, tail)) if !tail.contains('/') => {
                let v: f64 = tail.trim().parse().map_err(|_| {
                    Error::invalid(
                        Param::Lora,
                        format!(" {s}: the scale after ':' must be a number, e.g. my_lora.safetensors:0.8"),
                    )
                })?;
                (src, v)
            }
            _ => (s, 1.0),
        };
        if source.is_empty() {
            return Err(Error::invalid(
                Param::Lora,
                " is empty; give a .safetensors file or a Hub repo org/name[/file.safetensors], optionally with :SCALE",
            ));
        }
        let spec = Self {
            source: source.to_string(),
            scale,
        };
        spec.check()?;
        Ok(spec)
    }

    /// The weight must be finite and at most [`MAX_SCALE`] in size.
    pub fn check(&self) -> Result<()> {
        if !self.scale.is_finite() || self.scale.abs() > MAX_SCALE {
            return Err(Error::invalid(
                Param::Lora,
                format!(
                    " {}: scale {} is out of range; use a number between -{MAX_SCALE} and {MAX_SCALE} (typically 0.5 to 1.2)",
                    self.source, self.scale
                ),
            ));
        }
        Ok(())
    }

    /// `SOURCE:SCALE`, as `parse` reads it back.
    pub fn display(&self) -> String {
        format!("{}:{}", self.source, self.scale)
    }

    /// The local file: the path itself, or the file downloaded from (or found in the cache of)
    /// the Hub; diffusers' `pytorch_lora_weights.safetensors` when the spec names no file.
    pub fn local_file(&self) -> Result<PathBuf> {
        let p = Path::new(&self.source);
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        if p.exists() {
            return Err(Error::invalid(
                Param::Lora,
                format!(
                    " {}: is a folder; give the .safetensors file in it",
                    self.source
                ),
            ));
        }
        let parts: Vec<&str> = self.source.split('/').collect();
        // A path whose folder exists here is a missing local file, not a Hub file.
        let local_dir = p
            .parent()
            .is_some_and(|d| !d.as_os_str().is_empty() && d.is_dir());
        let hub_like = parts.len() >= 2
            && !local_dir
            && !self.source.starts_with('.')
            && !self.source.starts_with('/')
            && crate::loader::ModelRef::parse(&parts[..2].join("/"), None).is_ok();
        if !hub_like {
            return Err(Error::invalid(
                Param::Lora,
                format!(
                    " {}: no such file, and not a Hub repo org/name[/file.safetensors]",
                    self.source
                ),
            ));
        }
        let repo = parts[..2].join("/");
        let rel = if parts.len() > 2 {
            parts[2..].join("/")
        } else {
            "pytorch_lora_weights.safetensors".to_string()
        };
        use crate::loader::FileSource;
        let src = crate::loader::hub::HubSource::new(&repo, "main")?;
        let found = src.file(&rel).map_err(|e| {
            Error::InvalidRequest(Message::about(Param::Lora).text(format!(
                " {}: not a local file, so read as the Hub repo {repo}'s `{rel}`: {e}",
                self.source
            )))
        })?;
        found.ok_or_else(|| {
            Error::InvalidRequest(Message::about(Param::Lora).text(format!(
                " {}: the Hub repo {repo} has no file `{rel}`{}; name the file as {repo}/FILE.safetensors",
                self.source,
                src.missing_hint()
            )))
        })
    }
}

/// One adapter's term for one weight: `scale · up · down`; with DoRA's `magnitude`, the rows of
/// the weight with the term rescaled (PEFT's `DoraLinearLayer`, below).
#[derive(Debug, Clone)]
pub struct Term {
    /// (r, in).
    pub down: Tensor,
    /// (out, r).
    pub up: Tensor,
    /// The format's scale times the adapter's weight.
    pub scale: f64,
    /// DoRA's magnitude (out,).
    pub magnitude: Option<Tensor>,
    /// The LoRA as the user named it.
    pub source: String,
}

/// A layer's run-time LoRA: `(down, up, scale)` pieces whose term is added to the layer's output,
/// and, with DoRA, the output's per-row affine `(g, c)`: the layer's output y (term included)
/// becomes `g · y + c`.
pub type RuntimeTerms = (Vec<(Tensor, Tensor, f64)>, Option<(Tensor, Tensor)>);

/// `terms` of one layer, in order, as a run-time term. Without DoRA, the pieces as they are. With
/// DoRA: PEFT's forward applies the adapters one after the other to the bias-free output z, a LoRA
/// as `z += s ΔW x`, a DoRA as `z = f ⊙ (z + s ΔW x)` with `f = m / ‖W0 + s ΔW‖` per row (W0 the
/// weight without adapters, `base` reads it and the bias, in f32). So
/// `z = g0 ⊙ W0 x + Σ_k g_k ⊙ s_k ΔW_k x`, `g_k` the product of the DoRA factors from adapter k on,
/// `g0` of all: each up factor's rows are scaled by `g_k / g0`, and the layer's output y (term and
/// bias b included) becomes `g0 ⊙ y + (1 - g0) ⊙ b`.
pub fn runtime_terms(
    terms: &[Term],
    base: impl FnOnce() -> Result<(Tensor, Option<Tensor>)>,
) -> Result<RuntimeTerms> {
    let plain = |t: &Term, up: Tensor| (t.down.clone(), up, t.scale);
    if terms.iter().all(|t| t.magnitude.is_none()) {
        return Ok((terms.iter().map(|t| plain(t, t.up.clone())).collect(), None));
    }
    let (w0, bias) = base()?;
    let rows = w0.dim(0)?;
    let w0 = w0.to_dtype(DType::F32)?.reshape((rows, ()))?;
    // g_k, from the last adapter back.
    let mut g = Tensor::ones((rows, 1), DType::F32, &Device::Cpu)?;
    let mut after = vec![g.clone(); terms.len()];
    for (k, t) in terms.iter().enumerate().rev() {
        if let Some(m) = &t.magnitude {
            let delta = (&t.up * t.scale)?.matmul(&t.down)?;
            let norm = (&w0 + delta)?.sqr()?.sum_keepdim(1)?.sqrt()?;
            g = (g * m.reshape((rows, 1))?.div(&norm)?)?;
        }
        after[k] = g.clone();
    }
    let g0 = g;
    let factors = g0.flatten_all()?.to_vec1::<f32>()?;
    let dora = terms.iter().find(|t| t.magnitude.is_some());
    if let Some(t) = dora.filter(|_| factors.iter().any(|f| *f == 0.0 || !f.is_finite())) {
        return Err(Error::InvalidRequest(Message::about(Param::Lora).text(format!(
            " {}: its DoRA magnitudes make a row of a layer zero or infinite, which the run-time term cannot express; load the model with it merged (`--lora`)",
            t.source
        ))));
    }
    let pieces = terms
        .iter()
        .zip(&after)
        .map(|(t, gk)| Ok(plain(t, t.up.broadcast_mul(&gk.div(&g0)?)?)))
        .collect::<Result<Vec<_>>>()?;
    let g0 = g0.flatten_all()?;
    let c = match bias {
        Some(b) => ((1.0 - &g0)? * b.to_dtype(DType::F32)?.flatten_all()?)?,
        None => g0.zeros_like()?,
    };
    Ok((pieces, Some((g0, c))))
}

/// How a pipeline applies its LoRAs to the transformer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Apply {
    /// Added to the weights as they are read (no cost per step; the text encoders always so).
    #[default]
    Merge,
    /// A term of each layer's output, switched between requests without reloading.
    Runtime,
}

/// LoRAs fitted to one model, each with its weight.
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    pub adapters: Vec<(LoraSpec, Arc<Fitted>)>,
}

impl LoraSet {
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The specs, in order.
    pub fn specs(&self) -> Vec<LoraSpec> {
        self.adapters.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Every adapter's terms for one component, by weight name, in the adapters' order, each
    /// scale times its adapter's weight.
    pub fn deltas(&self, dir: &str) -> BTreeMap<String, Vec<Term>> {
        let mut out: BTreeMap<String, Vec<Term>> = BTreeMap::new();
        for (spec, f) in &self.adapters {
            for ((d, w), pieces) in &f.layers {
                if d == dir {
                    let v = out.entry(w.clone()).or_default();
                    v.extend(pieces.iter().map(|p| Term {
                        down: p.down.clone(),
                        up: p.up.clone(),
                        scale: p.scale * spec.scale,
                        magnitude: p.magnitude.clone(),
                        source: spec.source.clone(),
                    }));
                }
            }
        }
        out
    }

    /// The adapters that change a text encoder, with only those parts.
    pub fn text_only(&self) -> LoraSet {
        self.part(|dir| dir != "transformer")
    }

    /// The specs of the adapters that change the transformer.
    pub fn transformer_specs(&self) -> Vec<LoraSpec> {
        self.part(|dir| dir == "transformer").specs()
    }

    /// The adapters with layers in the components `keep` accepts, with only those layers.
    fn part(&self, keep: impl Fn(&str) -> bool) -> LoraSet {
        let adapters = self
            .adapters
            .iter()
            .filter_map(|(spec, f)| {
                let layers: BTreeMap<_, _> = f
                    .layers
                    .iter()
                    .filter(|((d, _), _)| keep(d))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (!layers.is_empty()).then(|| {
                    let mut g = (**f).clone();
                    g.layers = layers;
                    (spec.clone(), Arc::new(g))
                })
            })
            .collect();
        LoraSet { adapters }
    }

    /// Whether any adapter changes a component other than the transformer.
    pub fn touches_text(&self) -> bool {
        self.adapters
            .iter()
            .any(|(_, f)| f.layers.keys().any(|(d, _)| d != "transformer"))
    }

    /// What the user should know: keys that fit nothing, a LoRA given twice.
    pub fn notices(&self) -> Vec<Message> {
        let mut out = Vec::new();
        for (i, (spec, f)) in self.adapters.iter().enumerate() {
            let (dora, rest): (Vec<&String>, Vec<&String>) =
                f.unmatched.iter().partition(|k| k.ends_with(".dora_scale"));
            if !dora.is_empty() {
                out.push(Message::about(Param::Lora).text(format!(
                    " {}: {} `dora_scale` key{} (kohya's DoRA) ignored, as diffusers ignores them: the image is the plain LoRA's",
                    spec.source,
                    dora.len(),
                    if dora.len() == 1 { "" } else { "s" }
                )));
            }
            if !rest.is_empty() {
                let keys = f.unmatched.len() + f.layers.values().map(Vec::len).sum::<usize>();
                out.push(Message::about(Param::Lora).text(format!(
                    " {}: {} of its keys fit no layer of the model and are ignored (e.g. `{}`); `mmdit inspect --lora FILE --model M` lists them",
                    spec.source,
                    rest.len(),
                    rest[0]
                ) + &format!(" ({keys} keys in all)")));
            }
            if self.adapters[..i].iter().any(|(_, g)| g.path == f.path) {
                out.push(Message::about(Param::Lora).text(format!(
                    " {}: given more than once; its scales add up",
                    spec.source
                )));
            }
        }
        out
    }
}

/// Serves a component's weights with its LoRA deltas added: `W + Σ scale · up · down`, computed
/// in f32 and rounded once to the run dtype; a DoRA term rescales the rows as PEFT does.
pub struct MergeBackend {
    pub inner: Box<dyn SimpleBackend>,
    /// Weight name -> its terms, in the adapters' order.
    pub deltas: BTreeMap<String, Vec<Term>>,
}

impl MergeBackend {
    fn merged(
        &self,
        w: Tensor,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(terms) = self.deltas.get(name) else {
            return Ok(w);
        };
        let shape = w.shape().clone();
        let out = shape.dims()[0];
        let w = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .reshape((out, ()))?;
        let merged = if terms.iter().any(|t| t.magnitude.is_some()) {
            dora_merged(&w, terms)?
        } else if crate::cpu::features().avx512 {
            // W += (scale · up) · down on the packed kernel, in place in one f32 copy of W.
            let inp = w.dim(1)?;
            let mut acc = w.flatten_all()?.to_vec1::<f32>()?;
            for t in terms {
                let r = t.down.dim(0)?;
                let up = (&t.up * t.scale)?.contiguous()?;
                let down_t = t.down.t()?.contiguous()?; // (in, r): the kernel's (n, k)
                let b = crate::cpu::with_slice(&down_t, |d| PackedF32::from_nk(d, inp, r))?;
                crate::cpu::with_slice(&up, |u| sgemm::matmul_add(u, out, r, &b, &mut acc, inp))?;
            }
            Tensor::from_vec(acc, (out, inp), &Device::Cpu)?
        } else {
            let mut acc = w;
            for t in terms {
                acc = (acc + (&t.up * t.scale)?.matmul(&t.down)?)?;
            }
            acc
        };
        merged.reshape(shape)?.to_dtype(dtype)?.to_device(dev)
    }
}

/// `w` (out, in) with `terms` merged in order, as PEFT's forward applies its adapters one after
/// the other: a LoRA term adds `ΔW = scale · up · down`; a DoRA term makes the rows
/// `magnitude / ‖W0 + ΔW‖ · (W + ΔW)`, where W0 is the weight without any adapter and W the
/// weight so far (each row's L2 norm over its inputs, `DoraLinearLayer.get_weight_norm`).
fn dora_merged(w: &Tensor, terms: &[Term]) -> candle_core::Result<Tensor> {
    let mut acc = w.clone();
    for t in terms {
        let delta = (&t.up * t.scale)?.matmul(&t.down)?;
        acc = (acc + &delta)?;
        if let Some(m) = &t.magnitude {
            let norm = (w + &delta)?.sqr()?.sum_keepdim(1)?.sqrt()?; // (out, 1)
            let factor = m.reshape((m.elem_count(), 1))?.div(&norm)?;
            acc = acc.broadcast_mul(&factor)?;
        }
    }
    Ok(acc)
}

impl SimpleBackend for MergeBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.deltas.contains_key(name) {
            return self.inner.get(s, name, h, dtype, dev);
        }
        let w = self.inner.get(s, name, h, DType::F32, &Device::Cpu)?;
        self.merged(w, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        if !self.deltas.contains_key(name) {
            return self.inner.get_unchecked(name, dtype, dev);
        }
        let w = self.inner.get_unchecked(name, DType::F32, &Device::Cpu)?;
        self.merged(w, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::{max_diff, normal};

    fn term(k: u64, dora: bool, scale: f64) -> Term {
        let magnitude = dora.then(|| (normal(6, 0.5, 40 + k).abs().unwrap() + 0.5).unwrap());
        Term {
            down: normal((2, 5), 1.0, 10 + k),
            up: normal((6, 2), 1.0, 20 + k),
            scale,
            magnitude,
            source: format!("a{k}"),
        }
    }

    /// LoRA and DoRA terms in every order: the run-time form (up factors rescaled, the output's
    /// affine) gives the merged weight's output, and a DoRA term rescales the weight's rows.
    #[test]
    fn dora_at_run_time_is_the_merged_weight() {
        let (w0, b) = (normal((6, 5), 1.0, 1), normal(6, 1.0, 2));
        let x = normal((3, 5), 1.0, 3);
        for kinds in [
            vec![true],
            vec![false, true],
            vec![true, false],
            vec![true, true],
            vec![false, true, false, true],
        ] {
            let terms: Vec<Term> = kinds
                .iter()
                .enumerate()
                .map(|(k, &d)| term(k as u64, d, 0.8 - 0.3 * k as f64))
                .collect();
            let merged = dora_merged(&w0, &terms).unwrap();
            let want = x
                .matmul(&merged.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let (pieces, affine) =
                runtime_terms(&terms, || Ok((w0.clone(), Some(b.clone())))).unwrap();
            let (g, c) = affine.unwrap();
            let mut y = x
                .matmul(&w0.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            for (down, up, scale) in &pieces {
                let t = (x
                    .matmul(&down.t().unwrap())
                    .unwrap()
                    .matmul(&up.t().unwrap())
                    .unwrap()
                    * *scale)
                    .unwrap();
                y = (y + t).unwrap();
            }
            let got = y.broadcast_mul(&g).unwrap().broadcast_add(&c).unwrap();
            let err = max_diff(&got, &want);
            assert!(err < 1e-4, "{kinds:?}: {err}");
        }
        // One DoRA term alone: each row of the merged weight has its magnitude's norm.
        let t = term(0, true, 0.8);
        let merged = dora_merged(&w0, std::slice::from_ref(&t)).unwrap();
        let norms = merged.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        assert!(max_diff(&norms, t.magnitude.as_ref().unwrap()) < 1e-5);
        // Without DoRA: the pieces as they are, no affine.
        let (pieces, affine) = runtime_terms(&[term(1, false, 0.5)], || unreachable!()).unwrap();
        assert!(affine.is_none() && pieces.len() == 1 && pieces[0].2 == 0.5);
    }

    #[test]
    fn specs_parse_with_and_without_scale() {
        let s = LoraSpec::parse("a/b.safetensors:0.7").unwrap();
        assert_eq!((s.source.as_str(), s.scale), ("a/b.safetensors", 0.7));
        let s = LoraSpec::parse("org/name").unwrap();
        assert_eq!((s.source.as_str(), s.scale), ("org/name", 1.0));
        let s = LoraSpec::parse("x.safetensors:-0.3").unwrap();
        assert_eq!(s.scale, -0.3);
        for bad in [
            "x.safetensors:NaN",
            "x.safetensors:101",
            "x.safetensors:inf",
            "x.safetensors:abc",
            ":1",
            "",
        ] {
            assert!(LoraSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
