//! Adaptive layer norms: the conditioning vector sets a per-channel shift, scale and gate
//! (diffusers' `AdaLayerNormZero`, `SD35AdaLayerNormZeroX`, `AdaLayerNormZeroSingle` and
//! `AdaLayerNormContinuous`).

use crate::nn::modulate::{add_gated, norm_modulate};
use crate::nn::{linear_with, Linear};
use candle_core::{DType, Device, Module, Result, Tensor, TensorId, D};
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

/// The LayerNorm epsilon of every MMDiT modulation.
const EPS: f64 = 1e-6;

/// One (shift, scale, gate) triple: a sub-layer `f` runs as `x + gate * f(norm(x) * (1 + scale) +
/// shift)`. Each tensor is (b, dim).
#[derive(Debug, Clone)]
pub struct ModulationOut {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModulationOut {
    /// The sub-layer's input: `layer_norm(x) * (1 + scale) + shift`. x: (b, n, dim)
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        norm_modulate(x, EPS, &self.shift, &self.scale)
    }

    /// The residual update with the sub-layer's output y: `x + gate * y`. x, y: (b, n, dim)
    pub fn gated(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        add_gated(x, y, &self.gate)
    }
}

/// `linear(silu(emb))`, the product every modulation layer starts from, with the rows it was
/// shown ahead ([`Self::remember`]): a request's timesteps are known before its first step, so
/// every step's product can be one product over all steps' embeddings, each weight read once per
/// request rather than once per step (on the CPU these layers stream their weights for two rows:
/// ~100 MB a step on sd3-bench, ~340 MB on flux-bench). A step embedding is looked up by its
/// tensor's id (the rows of the stacked embeddings it was remembered with); any other embedding
/// (another request's, a timestep outside the schedule) is computed as before.
#[derive(Debug, Clone)]
pub struct StepProduct {
    linear: Linear,
    width: usize,
    remembered: Arc<Mutex<Vec<Remembered>>>,
}

/// How many remembered sets of steps a [`StepProduct`] keeps.
const KEPT: usize = 2;

/// One request's steps, as a [`StepProduct`] keeps them.
#[derive(Debug)]
struct Remembered {
    token: u64,
    /// The ids of the steps' embeddings, each `rows` rows of `out`, in order.
    ids: Vec<TensorId>,
    rows: usize,
    out: Tensor,
}

impl StepProduct {
    /// The product of `linear`, `width` values a row.
    fn new(linear: Linear, width: usize) -> Self {
        Self {
            linear,
            width,
            remembered: Arc::default(),
        }
    }

    /// `linear(silu(emb))`: remembered where `emb` is one of the embeddings last remembered.
    pub fn forward(&self, emb: &Tensor) -> Result<Tensor> {
        for r in self.lock().iter() {
            if let Some(i) = r.ids.iter().position(|&id| id == emb.id()) {
                return r.out.narrow(0, i * r.rows, r.rows);
            }
        }
        self.linear.forward(&emb.silu()?)
    }

    /// Computes `linear(silu(all))` in one product and keeps it for `steps`, the embeddings whose
    /// rows `all` stacks in order (each of the same number of rows), under `token`. The last
    /// [`KEPT`] remembered are kept (a request's two streams when guidance runs them apart).
    pub fn remember(&self, token: u64, steps: &[Tensor], all: &Tensor) -> Result<()> {
        let rows = steps.first().map_or(Ok(0), |t| t.dim(0))?;
        if all.dim(0)? != rows * steps.len() {
            candle_core::bail!(
                "{} step embeddings of {rows} rows are not the {} rows stacked",
                steps.len(),
                all.dim(0)?
            );
        }
        let out = self.linear.forward(&all.silu()?)?;
        let mut kept = self.lock();
        if kept.len() == KEPT {
            kept.remove(0);
        }
        kept.push(Remembered {
            token,
            ids: steps.iter().map(Tensor::id).collect(),
            rows,
            out,
        });
        Ok(())
    }

    /// Drops what [`Self::remember`] kept under `token`.
    pub fn forget(&self, token: u64) {
        self.lock().retain(|r| r.token != token);
    }

    /// Whether `emb`'s product is kept (one of the embeddings remembered).
    pub fn is_remembered(&self, emb: &Tensor) -> bool {
        self.lock().iter().any(|r| r.ids.contains(&emb.id()))
    }

    /// The product's output width.
    fn width(&self) -> usize {
        self.width
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Remembered>> {
        // A panic elsewhere while holding the lock leaves the value whole: take it anyway.
        self.remembered.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The most the remembered products of one request's steps may hold (flux-dev's 57 blocks hold
/// ~2 MB a row in bf16: 28 steps of two rows are ~120 MB).
const REMEMBERED_BYTES: usize = 512 << 20;

/// Every step's conditioning embedding, from `embed` (which returns the `steps` embeddings of
/// `rows` rows each stacked in order, in `dtype`), with the product of each of `products`
/// remembered for all of them under `token` ([`StepProduct::remember`]): each step's embedding (a
/// view of the stack), for the model's forward pass. None, and nothing computed, where the
/// products' outputs for all steps would take more than [`REMEMBERED_BYTES`].
pub fn remember_steps(
    token: u64,
    products: &[&StepProduct],
    (steps, rows): (usize, usize),
    dtype: DType,
    embed: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Vec<Tensor>>> {
    let width: usize = products.iter().map(|p| p.width()).sum();
    if steps * rows * width * dtype.size_in_bytes() > REMEMBERED_BYTES {
        return Ok(None);
    }
    let all = embed()?;
    let each = (0..steps)
        .map(|i| all.narrow(0, i * rows, rows))
        .collect::<Result<Vec<_>>>()?;
    for p in products {
        p.remember(token, &each, &all)?;
    }
    Ok(Some(each))
}

/// Each of `values` repeated for `rows` rows, in order: (values x rows,) f32, a batch's timesteps
/// for every step at once.
pub fn step_rows(values: impl Iterator<Item = f32>, rows: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = values.flat_map(|t| std::iter::repeat_n(t, rows)).collect();
    let n = v.len();
    Tensor::from_vec(v, n, dev)
}

/// A model whose modulation layers remember every step's product (its `remember_steps`): what it
/// kept is forgotten, and looked up, through the list of its [`StepProduct`]s.
pub trait RemembersSteps {
    /// The model's remembering modulation layers.
    fn step_products(&self) -> Vec<&StepProduct>;

    /// Drops what `remember_steps` kept under `token` ([`StepProduct::forget`]).
    fn forget_steps(&self, token: u64) {
        self.step_products().iter().for_each(|p| p.forget(token));
    }

    /// Whether every remembering layer keeps its product for the step embedding `temb`.
    fn steps_remembered(&self, temb: &Tensor) -> bool {
        self.step_products().iter().all(|p| p.is_remembered(temb))
    }
}

/// `linear(silu(emb))` cut into (shift, scale, gate) triples, in diffusers' order: one for
/// `AdaLayerNormZeroSingle` (Flux's single blocks), two for `AdaLayerNormZero` (msa, mlp), three for
/// `SD35AdaLayerNormZeroX` (msa, mlp, msa2).
#[derive(Debug, Clone)]
pub struct Modulation {
    product: StepProduct,
    triples: usize,
}

impl Modulation {
    pub fn new(dim: usize, triples: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_bias(dim, triples, true, vb)
    }

    /// [`Self::new`] with or without the layer's bias (FLUX.2's shared modulations have none).
    pub fn with_bias(dim: usize, triples: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            product: StepProduct::new(
                linear_with(dim, 3 * triples * dim, bias, vb.pp("linear"))?,
                3 * triples * dim,
            ),
            triples,
        })
    }

    /// The layer's product, to remember steps ahead ([`StepProduct::remember`]).
    pub fn product(&self) -> &StepProduct {
        &self.product
    }

    /// emb: (b, dim) -> the triples, in order.
    pub fn forward(&self, emb: &Tensor) -> Result<Vec<ModulationOut>> {
        let c = self
            .product
            .forward(emb)?
            .chunk(3 * self.triples, D::Minus1)?;
        Ok(c.chunks_exact(3)
            .map(|t| ModulationOut {
                shift: t[0].clone(),
                scale: t[1].clone(),
                gate: t[2].clone(),
            })
            .collect())
    }
}

/// What `AdaLayerNormZero` (and its MMDiT-X form) gives a joint block's stream.
#[derive(Debug, Clone)]
pub struct BlockModulation {
    /// Around the attention.
    pub msa: ModulationOut,
    /// Around the feed-forward.
    pub mlp: ModulationOut,
    /// Around the second, image-only attention of MMDiT-X layers.
    pub msa2: Option<ModulationOut>,
}

impl Modulation {
    /// The two or three triples of a joint block's stream.
    pub fn forward_block(&self, emb: &Tensor) -> Result<BlockModulation> {
        let mut t = self.forward(emb)?.into_iter();
        match (t.next(), t.next(), t.next()) {
            (Some(msa), Some(mlp), msa2) => Ok(BlockModulation { msa, mlp, msa2 }),
            _ => candle_core::bail!("a block's modulation has {} triples", self.triples),
        }
    }
}

/// Final `AdaLayerNormContinuous` (no affine, eps 1e-6): `norm(x) * (1 + scale) + shift`.
#[derive(Debug, Clone)]
pub struct AdaNormContinuous {
    product: StepProduct,
}

impl AdaNormContinuous {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_bias(dim, true, vb)
    }

    /// [`Self::new`] with or without the layer's bias (FLUX.2's has none).
    pub fn with_bias(dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            product: StepProduct::new(linear_with(dim, 2 * dim, bias, vb.pp("linear"))?, 2 * dim),
        })
    }

    /// The layer's product, to remember steps ahead ([`StepProduct::remember`]).
    pub fn product(&self) -> &StepProduct {
        &self.product
    }

    /// x: (b, n, d); emb: (b, d)
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        // diffusers orders this pair (scale, shift); the original checkpoints store (shift, scale).
        let c = self.product.forward(emb)?.chunk(2, D::Minus1)?;
        let (scale, shift) = (&c[0], &c[1]);
        norm_modulate(x, EPS, shift, scale)
    }
}
