//! How each format names a layer, down to a component and a name the model knows: diffusers'
//! (`transformer_blocks.0.attn.to_q`) or the original checkpoint's (`double_blocks.0.img_attn.qkv`,
//! which the single-file tables of [`crate::loader::single`] split into diffusers layers).

/// Where a module of a LoRA file points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    /// The component: `transformer`, or the index of a text encoder in the family's order
    /// (CLIP-L first).
    pub component: Component,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Transformer,
    /// The k-th text encoder of the family (kohya's `lora_te{k+1}_`).
    Text(usize),
    /// A text encoder by its folder (`text_encoder_2`), as PEFT names it.
    TextDir(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// diffusers' dotted name.
    Diffusers(String),
    /// The original checkpoint's dotted name.
    Original(String),
    /// diffusers' or the original's, whichever the model has (`diffusion_model.` keys).
    Either(String),
    /// A diffusers name with '_' for '.' (kohya), matched against the model's names.
    Underscored(String),
    /// An original name with '_' for '.' (kohya's `lora_unet_`).
    OriginalUnderscored(String),
}

/// Where the rest of a name after a prefix points.
type Points = fn(String) -> Name;

/// Prefixes of the file's module names and where they point, first match wins.
const PREFIXES: &[(&str, Points)] = &[
    ("transformer.", |r| {
        name(Component::Transformer, Kind::Diffusers(r))
    }),
    ("base_model.model.", |r| {
        name(Component::Transformer, Kind::Diffusers(r))
    }),
    ("text_encoder.", |r| {
        name(Component::TextDir("text_encoder"), Kind::Diffusers(r))
    }),
    ("text_encoder_2.", |r| {
        name(Component::TextDir("text_encoder_2"), Kind::Diffusers(r))
    }),
    ("text_encoder_3.", |r| {
        name(Component::TextDir("text_encoder_3"), Kind::Diffusers(r))
    }),
    ("lora_unet_", |r| {
        name(Component::Transformer, Kind::OriginalUnderscored(r))
    }),
    // LyCORIS' LoRA (LoCon) files name the same layers under their own prefix.
    ("lycoris_", |r| {
        name(Component::Transformer, Kind::OriginalUnderscored(r))
    }),
    ("lora_transformer_", |r| {
        name(Component::Transformer, Kind::Underscored(r))
    }),
    ("lora_te1_", |r| {
        name(Component::Text(0), Kind::Underscored(r))
    }),
    ("lora_te_", |r| {
        name(Component::Text(0), Kind::Underscored(r))
    }),
    ("lora_te2_", |r| {
        name(Component::Text(1), Kind::Underscored(r))
    }),
    ("lora_te3_", |r| {
        name(Component::Text(2), Kind::Underscored(r))
    }),
    ("text_encoders.clip_l.transformer.", |r| {
        name(Component::TextDir("text_encoder"), Kind::Diffusers(r))
    }),
    ("text_encoders.clip_g.transformer.", |r| {
        name(Component::TextDir("text_encoder_2"), Kind::Diffusers(r))
    }),
    ("text_encoders.t5xxl.transformer.", |r| {
        name(Component::TextDir("t5"), Kind::Diffusers(r))
    }),
    ("model.diffusion_model.", |r| {
        name(Component::Transformer, Kind::Either(r))
    }),
    ("diffusion_model.", |r| {
        name(Component::Transformer, Kind::Either(r))
    }),
];

fn name(component: Component, kind: Kind) -> Name {
    Name { component, kind }
}

/// Where a module name points.
pub fn parse(module: &str) -> Name {
    PREFIXES
        .iter()
        .find_map(|(p, f)| module.strip_prefix(p).map(|r| f(r.to_string())))
        .unwrap_or_else(|| name(Component::Transformer, Kind::Either(module.to_string())))
}

/// Whether a dotted name is an original (BFL/SAI) transformer name.
pub fn is_original(name: &str) -> bool {
    ORIGINAL_ROOTS.iter().any(|r| name.starts_with(r))
}

/// First parts of the original transformer names (BFL FLUX.1, SAI SD3).
const ORIGINAL_ROOTS: &[&str] = &[
    "double_blocks.",
    "single_blocks.",
    "img_in",
    "txt_in",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
    "joint_blocks.",
    "x_embedder.",
    "t_embedder.",
    "y_embedder.",
];

/// Parts of original names that hold an underscore themselves (kohya writes every '.' as '_').
const COMPOUNDS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "img_attn",
    "txt_attn",
    "img_mlp",
    "txt_mlp",
    "img_mod",
    "txt_mod",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "in_layer",
    "out_layer",
    // FLUX.2's shared modulations
    "double_stream_modulation_img",
    "double_stream_modulation_txt",
    "single_stream_modulation",
    // Chroma's approximator
    "distilled_guidance_layer",
    "in_proj",
    "out_proj",
    "final_layer",
    "adaLN_modulation",
    "query_norm",
    "key_norm",
    "joint_blocks",
    "x_block",
    "context_block",
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "context_embedder",
    "pos_embed",
    "ln_q",
    "ln_k",
];

/// kohya's underscored original name back to dots: `double_blocks_0_img_attn_qkv` ->
/// `double_blocks.0.img_attn.qkv` (names of up to four words kept whole, the longest first).
pub fn original_from_underscored(s: &str) -> String {
    let parts: Vec<&str> = s.split('_').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let whole = (2..=4usize)
            .rev()
            .filter(|n| i + n <= parts.len())
            .map(|n| (n, parts[i..i + n].join("_")))
            .find(|(_, w)| COMPOUNDS.contains(&w.as_str()));
        match whole {
            Some((n, w)) => {
                out.push(w);
                i += n;
            }
            None => {
                out.push(parts[i].to_string());
                i += 1;
            }
        }
    }
    out.join(".")
}

/// XLabs' processor names as original names, or (for a single block's q/k/v, which has no
/// original layer of its own) the diffusers block they split into.
pub fn xlabs(name: &str) -> Option<Xlabs> {
    let (block, rest) = name.split_once(".processor.")?;
    if let Some(i) = block.strip_prefix("double_blocks.") {
        let layer = match rest {
            "qkv_lora1" => "img_attn.qkv",
            "proj_lora1" => "img_attn.proj",
            "qkv_lora2" => "txt_attn.qkv",
            "proj_lora2" => "txt_attn.proj",
            _ => return None,
        };
        return Some(Xlabs::Original(format!("double_blocks.{i}.{layer}")));
    }
    let i = block.strip_prefix("single_blocks.")?;
    match rest {
        "qkv_lora" => Some(Xlabs::SingleQkv(format!("single_transformer_blocks.{i}"))),
        "proj_lora" => Some(Xlabs::Original(format!("single_blocks.{i}.linear2"))),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Xlabs {
    Original(String),
    /// q, k and v of this diffusers single block, stacked.
    SingleQkv(String),
}

/// The family a set of module names was made for, when the names say it: `flux`, `chroma`,
/// `flux2`, `sd3`, or a UNet model's (SD 1.x / SDXL).
pub fn made_for<'a>(modules: impl Iterator<Item = &'a str>) -> Option<&'static str> {
    let modules: Vec<&str> = modules.collect();
    // Chroma keeps FLUX.1's block names; its approximator is its own.
    if modules
        .iter()
        .any(|m| m.contains("distilled_guidance_layer"))
    {
        return Some("chroma");
    }
    // FLUX.2's shared modulations, fused single-block projection and SwiGLU layers.
    let flux2 = [
        "stream_modulation",
        "to_qkv_mlp_proj",
        "linear_in",
        "linear_out",
    ];
    if modules.iter().any(|m| flux2.iter().any(|k| m.contains(k))) {
        return Some("flux2");
    }
    let mut found = None;
    for m in modules {
        let f = if [
            "double_blocks",
            "single_blocks",
            "single_transformer_blocks",
            "proj_mlp",
        ]
        .iter()
        .any(|k| m.contains(k))
        {
            "flux"
        } else if ["joint_blocks", "context_block", "x_block"]
            .iter()
            .any(|k| m.contains(k))
        {
            "sd3"
        } else if [
            "down_blocks",
            "up_blocks",
            "mid_block",
            "input_blocks",
            "output_blocks",
            "middle_block",
        ]
        .iter()
        .any(|k| m.contains(k))
        {
            "a UNet model (SD 1.x / SDXL)"
        } else {
            continue;
        };
        found.get_or_insert(f);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names_get_their_dots_back() {
        for (u, d) in [
            (
                "double_blocks_0_img_attn_qkv",
                "double_blocks.0.img_attn.qkv",
            ),
            (
                "single_blocks_37_modulation_lin",
                "single_blocks.37.modulation.lin",
            ),
            (
                "final_layer_adaLN_modulation_1",
                "final_layer.adaLN_modulation.1",
            ),
            ("time_in_in_layer", "time_in.in_layer"),
            (
                "joint_blocks_3_context_block_mlp_fc1",
                "joint_blocks.3.context_block.mlp.fc1",
            ),
            (
                "joint_blocks_0_x_block_attn2_qkv",
                "joint_blocks.0.x_block.attn2.qkv",
            ),
            (
                "distilled_guidance_layer_layers_4_out_layer",
                "distilled_guidance_layer.layers.4.out_layer",
            ),
            (
                "distilled_guidance_layer_in_proj",
                "distilled_guidance_layer.in_proj",
            ),
            (
                "double_stream_modulation_img_lin",
                "double_stream_modulation_img.lin",
            ),
            (
                "single_stream_modulation_lin",
                "single_stream_modulation.lin",
            ),
        ] {
            assert_eq!(original_from_underscored(u), d);
        }
    }

    #[test]
    fn prefixes_name_components() {
        assert_eq!(
            parse("lora_te1_text_model_encoder_layers_0_mlp_fc1"),
            name(
                Component::Text(0),
                Kind::Underscored("text_model_encoder_layers_0_mlp_fc1".into())
            )
        );
        assert_eq!(
            parse("diffusion_model.double_blocks.1.img_attn.qkv"),
            name(
                Component::Transformer,
                Kind::Either("double_blocks.1.img_attn.qkv".into())
            )
        );
        assert_eq!(
            xlabs("double_blocks.2.processor.qkv_lora2"),
            Some(Xlabs::Original("double_blocks.2.txt_attn.qkv".into()))
        );
        assert_eq!(
            made_for(["lora_unet_double_blocks_0_img_attn_qkv"].into_iter()),
            Some("flux")
        );
        assert_eq!(
            made_for(["transformer.transformer_blocks.0.attn.to_q"].into_iter()),
            None
        );
    }
}
