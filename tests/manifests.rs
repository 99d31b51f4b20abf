//! Issue 4: every tensor of the six real models (diffusers layout), from shape manifests written by
//! scripts/make_manifests.py with the real configs on the meta device, maps to exactly one parameter
//! of the right shape: nothing missing, nothing unexpected, nothing read twice. The VAE encoder is
//! the one part the engine deliberately does not read.

mod common;

use common::manifest_tensors;

use candle_nn::VarBuilder;
use mmdit::config::{
    ChromaTransformerConfig, ClipTextConfig, Flux2TransformerConfig, FluxTransformerConfig,
    Qwen3Config, Sd3TransformerConfig, VaeConfig,
};
use mmdit::loader::audit::{Audit, ShapeBackend, TensorMeta};
use mmdit::mmdit::{ChromaTransformer, Flux2Transformer, FluxTransformer, Sd3Transformer};
use mmdit::text::clip::ClipText;
use mmdit::text::lm::{LmEncoder, LmKind};
use mmdit::vae::{VaeDecoder, VaeEncoder};
use serde_json::json;
use std::collections::BTreeMap;

fn check(model: &str, comp: &str, a: Audit) {
    // FLUX.2's VAE statistics are read by both halves (the decoder and the encoder).
    let twice: Vec<_> = a
        .requested
        .iter()
        .filter(|(k, &n)| n != 1 && !(k.starts_with("bn.running_") && n == 2))
        .collect();
    assert!(
        a.missing.is_empty(),
        "{model}/{comp}: missing {:?}",
        &a.missing[..a.missing.len().min(5)]
    );
    assert!(
        a.wrong_shape.is_empty(),
        "{model}/{comp}: wrong shape {:?}",
        &a.wrong_shape[..a.wrong_shape.len().min(5)]
    );
    assert!(
        a.unexpected.is_empty(),
        "{model}/{comp}: unexpected {:?}",
        &a.unexpected[..a.unexpected.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "{model}/{comp}: read more than once {twice:?}"
    );
    println!(
        "{model}/{comp}: {} tensors, {} parameters, all mapped",
        a.requested.len(),
        a.params
    );
}

fn clip(
    hidden: usize,
    layers: usize,
    heads: usize,
    inter: usize,
    proj: usize,
    act: &str,
) -> ClipTextConfig {
    serde_json::from_value(json!({"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": inter,
        "projection_dim": proj, "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": act}))
    .unwrap()
}

fn t5() -> candle_transformers::models::t5::Config {
    serde_json::from_value(json!({"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
        "num_heads": 64, "relative_attention_num_buckets": 32, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": false,
        "pad_token_id": 0, "eos_token_id": 1}))
    .unwrap()
}

fn vae() -> VaeConfig {
    serde_json::from_value(json!({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "latent_channels": 16, "norm_num_groups": 32, "use_quant_conv": false, "use_post_quant_conv": false}))
    .unwrap()
}

/// Builds a component on a var builder and drops it.
type Build<'a> = Box<dyn Fn(VarBuilder) -> candle_core::Result<()> + 'a>;

#[test]
fn every_real_model_maps_every_tensor_exactly_once() {
    let (l, g) = (
        clip(768, 12, 12, 3072, 768, "quick_gelu"),
        clip(1280, 32, 20, 5120, 1280, "gelu"),
    );
    let l = &l;
    let clip_l =
        |projection| -> Build { Box::new(move |vb| ClipText::new(l, projection, vb).map(drop)) };
    let t5: Build =
        Box::new(|vb| candle_transformers::models::t5::T5EncoderModel::load(vb, &t5()).map(drop));
    for model in common::REAL_MODELS {
        let m = common::read_json(common::fixture("manifests").join(format!("{model}.json")));
        let tcfg = m["transformer_config"].clone();
        // FLUX.2's language models and the hidden states their pipelines take.
        let lm: Option<(LmKind, &[usize])> = match m["family"].as_str() {
            Some("flux2-klein") => Some((LmKind::Qwen3, &[9, 18, 27])),
            Some("flux2-dev") => Some((LmKind::Mistral3, &[10, 20, 30])),
            _ => None,
        };
        let parts: Vec<(&str, Build)> = if m["family"] == "sd3" {
            let cfg: Sd3TransformerConfig = serde_json::from_value(tcfg).unwrap();
            vec![
                (
                    "transformer",
                    Box::new(move |vb| Sd3Transformer::new(&cfg, vb).map(drop)),
                ),
                ("text_encoder", clip_l(true)),
                (
                    "text_encoder_2",
                    Box::new(|vb| ClipText::new(&g, true, vb).map(drop)),
                ),
                ("text_encoder_3", Box::new(&t5)),
            ]
        } else if let Some((kind, layers)) = lm {
            let cfg: Flux2TransformerConfig = serde_json::from_value(tcfg).unwrap();
            let q: Qwen3Config = serde_json::from_value(m["text_config"].clone()).unwrap();
            q.check_decoder(std::path::Path::new("text_encoder/config.json"))
                .unwrap();
            vec![
                (
                    "transformer",
                    Box::new(move |vb| Flux2Transformer::new(&cfg, vb).map(drop)),
                ),
                (
                    "text_encoder",
                    Box::new(move |vb| LmEncoder::new(&q, kind, layers, vb).map(drop)),
                ),
            ]
        } else if m["family"] == "chroma" {
            let cfg: ChromaTransformerConfig = serde_json::from_value(tcfg).unwrap();
            vec![
                (
                    "transformer",
                    Box::new(move |vb| ChromaTransformer::new(&cfg, vb).map(drop)),
                ),
                ("text_encoder", Box::new(&t5)),
            ]
        } else {
            let cfg: FluxTransformerConfig = serde_json::from_value(tcfg).unwrap();
            vec![
                (
                    "transformer",
                    Box::new(move |vb| FluxTransformer::new(&cfg, vb).map(drop)),
                ),
                ("text_encoder", clip_l(false)),
                ("text_encoder_2", Box::new(&t5)),
            ]
        };
        // Both halves of the VAE: the decoder for every image, the encoder for edits.
        let vae_cfg: VaeConfig = match m.get("vae_config") {
            Some(v) => serde_json::from_value(v.clone()).unwrap(),
            None => vae(),
        };
        vae_cfg
            .validate(std::path::Path::new("vae/config.json"))
            .unwrap();
        let vae: Build = Box::new(|vb| {
            VaeDecoder::new(&vae_cfg, vb.clone())?;
            VaeEncoder::new(&vae_cfg, vb).map(drop)
        });
        let text_config: Option<Qwen3Config> = m
            .get("text_config")
            .map(|t| serde_json::from_value(t.clone()).unwrap());
        for (comp, build) in parts.into_iter().chain([("vae", vae)]) {
            // A language model's layers after the last hidden state taken (and its head, and
            // Mistral 3's vision tower) are left unread.
            let ignore = |n: &str| {
                comp == "text_encoder"
                    && text_config
                        .as_ref()
                        .zip(lm)
                        .is_some_and(|(q, (kind, layers))| LmEncoder::unread(q, kind, layers, n))
            };
            let tensors = manifest_tensors(&m["components"][comp]);
            check(
                model,
                comp,
                ShapeBackend::audit(tensors, build, ignore).unwrap(),
            );
        }
    }
}

#[test]
fn audit_reports_missing_wrong_and_unexpected() {
    let mut t = BTreeMap::new();
    t.insert(
        "a.weight".to_string(),
        TensorMeta {
            shape: vec![4, 3],
            dtype: "F32".into(),
        },
    );
    t.insert(
        "b".to_string(),
        TensorMeta {
            shape: vec![2, 5],
            dtype: "F32".into(),
        },
    );
    t.insert(
        "extra".to_string(),
        TensorMeta {
            shape: vec![1],
            dtype: "F32".into(),
        },
    );
    let a = ShapeBackend::audit(
        t,
        |vb| {
            vb.get((4, 2), "a.weight")?;
            vb.get(4, "a.bias")?;
            vb.get((2, 5), "b")?;
            Ok(())
        },
        |_| false,
    )
    .unwrap();
    assert_eq!(a.missing, vec![("a.bias".to_string(), vec![4])]);
    assert_eq!(
        a.wrong_shape,
        vec![("a.weight".to_string(), vec![4, 2], vec![4, 3])]
    );
    assert_eq!(a.unexpected, vec!["extra".to_string()]);
    // In the files: 12 + 10 + 1 values; read at the right shape: the 10 of `b`.
    assert_eq!((a.params, a.read_params), (23, 10));
}
