//! `mmdit convert`: a model's transformer written as a GGUF file in the convention
//! stable-diffusion.cpp and ComfyUI-GGUF read (original BFL/SAI tensor names, no prefix,
//! `general.architecture` flux/sd3), its weights quantized to one GGML type.
//!
//! Which tensors take the type follows ComfyUI-GGUF's converter: 2-D weights whose rows are a
//! whole number of the type's blocks (a K type falling back as `--quantize` does,
//! [`crate::nn::quant::fit`]); everything else (biases, norms, SD3's position table and
//! patch convolution) and FLUX.1's embedders and final layer stay at full precision, as that
//! converter keeps them: F32, or the source's BF16/F16 where it has them (lossless, half the bytes).

use super::Spec;
use crate::error::{Error, Result};
use crate::loader::audit::TensorMeta;
use crate::loader::gguf::{self, Planned, Value};
use crate::loader::single::{self, Format, Transform};
use crate::lora::LoraSet;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// FLUX.1 layers ComfyUI-GGUF's converter keeps at full precision.
const KEEP_F32: &[&str] = &[
    "time_in.",
    "txt_in.",
    "vector_in.",
    "img_in.",
    "guidance_in.",
    "final_layer.",
];

/// What a conversion wrote.
#[derive(Debug, Clone, Default)]
pub struct Converted {
    /// Tensors per type name: (count, bytes).
    pub types: BTreeMap<&'static str, (usize, u64)>,
    /// The file's size.
    pub bytes: u64,
}

/// The type an original tensor is stored in when `want` is asked for; `source` is the dtype of
/// its weights (safetensors' `BF16`, `F16`, ...), kept for what is not quantized when that is
/// lossless (16-bit floats as they are, anything else F32).
pub fn storage_type(name: &str, shape: &[usize], source: &str, want: GgmlDType) -> GgmlDType {
    let weight = shape.len() == 2 && name.ends_with(".weight");
    let kept = KEEP_F32.iter().any(|k| name.starts_with(k));
    let float = matches!(want, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    let fit = match (weight && !kept, float) {
        (false, _) => None,
        (true, true) => Some(want),
        (true, false) => shape.last().and_then(|&c| crate::nn::quant::fit(want, c)),
    };
    fit.unwrap_or(match source.to_ascii_uppercase().as_str() {
        "BF16" => GgmlDType::BF16,
        "F16" | "FP16" => GgmlDType::F16,
        _ => GgmlDType::F32,
    })
}

/// A transformer (diffusers names and shapes, `metas`) laid out as a GGUF file of `format`
/// with weights in `want`: each original tensor, and the diffusers tensors it is made of.
#[allow(clippy::type_complexity)]
pub fn plan(
    format: Format,
    metas: &BTreeMap<String, TensorMeta>,
    want: GgmlDType,
) -> Result<(Vec<Planned>, Vec<Vec<(String, Transform)>>)> {
    let layout = single::original_layout(format, metas).map_err(|msg| Error::Tensor {
        name: "transformer".into(),
        msg: format!(
            "cannot be laid out as a {} checkpoint: {msg}",
            format.name()
        ),
    })?;
    Ok(layout
        .into_iter()
        .map(|(name, (meta, parts))| {
            let dtype = storage_type(&name, &meta.shape, &meta.dtype, want);
            let p = Planned {
                name,
                shape: meta.shape,
                dtype,
            };
            (p, parts)
        })
        .unzip())
}

/// The tensor bytes of a planned file (its header adds a few kilobytes).
pub fn planned_bytes(plan: &[Planned]) -> u64 {
    plan.iter().map(Planned::bytes).sum()
}

impl Spec {
    /// Writes the transformer to `out` as a GGUF file with its weights in `want` (F32, F16, BF16
    /// or a block type); `progress(done, total)` after each tensor. Nothing is left at `out` when
    /// it fails.
    pub fn write_gguf(
        &self,
        out: &Path,
        want: GgmlDType,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Converted> {
        let none = LoraSet::default();
        let w = self.weights(&none);
        let (_, metas) = w.headers("transformer")?;
        let format = self.entry.single_file;
        let (plan, parts) = plan(format, &metas, want)?;
        let vb = w.var_builder("transformer", DType::F32, &Device::Cpu)?;
        let total = plan.len();
        let metadata = [
            (
                "general.architecture",
                Value::Str(format.gguf_architecture().into()),
            ),
            ("general.quantization_version", Value::Int(2)),
            ("general.alignment", Value::Int(32)),
        ];
        let mut types: BTreeMap<&'static str, (usize, u64)> = BTreeMap::new();
        let bytes = gguf::write(out, &metadata, &plan, |i| {
            let t = assemble(&parts[i], &|n: &str| vb.get_unchecked_dtype(n, DType::F32))?;
            let q = QTensor::quantize(&t, plan[i].dtype)?;
            let data = q.data()?.into_owned();
            let e = types.entry(gguf::type_name(plan[i].dtype)).or_default();
            e.0 += 1;
            e.1 += data.len() as u64;
            progress(i + 1, total);
            Ok(data)
        })?;
        Ok(Converted { types, bytes })
    }
}

/// An original tensor from the diffusers tensors it is made of: slices of a fused projection put
/// back in row order, swapped halves swapped back.
fn assemble(
    parts: &[(String, Transform)],
    get: &dyn Fn(&str) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut rows: Vec<(usize, Tensor)> = Vec::new();
    for (name, t) in parts {
        let x = get(name)?;
        match t {
            Transform::Whole => return Ok(x),
            Transform::SwapHalves => {
                let half = x.dim(0)? / 2;
                return Tensor::cat(&[x.narrow(0, half, half)?, x.narrow(0, 0, half)?], 0);
            }
            Transform::Rows { start, .. } => rows.push((*start, x)),
            Transform::Squeeze1x1 | Transform::Identity(_) => {
                candle_core::bail!("{name}: not a transformer tensor")
            }
        }
    }
    rows.sort_by_key(|(s, _)| *s);
    let pieces: Vec<Tensor> = rows.into_iter().map(|(_, t)| t).collect();
    Tensor::cat(&pieces, 0)
}
