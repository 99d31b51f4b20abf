//! Bench results as data, and their table, JSON and CSV renderings.

use super::Stat;
use serde::{Deserialize, Serialize};

/// One (sampler, steps) configuration's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub sampler: String,
    pub steps: usize,
    /// Model evaluations per image (a second-order step costs two).
    pub nfe: usize,
    pub text_s: Option<Stat>,
    /// Seconds per step (all model evaluations of the step).
    pub step_s: Option<Stat>,
    pub denoise_s: Option<Stat>,
    pub decode_s: Option<Stat>,
    pub steps_per_s: Option<f64>,
    /// Mean over prompts of PSNR (dB, 8-bit image) against the reference; null for engines that do
    /// not measure it.
    pub psnr_db: Option<f64>,
    /// Mean over prompts of latent RMSE against the reference.
    pub latent_rmse: Option<f64>,
}

/// A whole bench run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub engine: String,
    pub commit: String,
    pub device: String,
    pub dtype: String,
    pub threads: usize,
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub reference_steps: usize,
    pub repeat: usize,
    pub load_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub rows: Vec<Row>,
}

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!("{:.3} ({:.3}-{:.3})", s.median, s.min, s.max),
        None => "-".into(),
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_infinite() => "inf".into(),
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    }
}

impl Results {
    /// A Markdown table: one row per sampler and step count.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} | {} | {} | {} | {} threads | {}x{} | load {:.2}s | peak RSS {}\n\n",
            self.engine,
            self.model,
            self.device,
            self.dtype,
            self.threads,
            self.width,
            self.height,
            self.load_s,
            self.peak_rss_bytes
                .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1048576.0))
        );
        s += "| sampler | steps | NFE | text s | s/step median (min-max) | denoise s | decode s | steps/s | PSNR dB | latent RMSE |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|\n";
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.sampler,
                r.steps,
                r.nfe,
                fmt_stat(&r.text_s),
                fmt_stat(&r.step_s),
                fmt_stat(&r.denoise_s),
                fmt_stat(&r.decode_s),
                fmt_opt(r.steps_per_s, 2),
                fmt_opt(r.psnr_db, 2),
                fmt_opt(r.latent_rmse, 4)
            );
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut s = String::from(
            "engine,model,device,dtype,threads,width,height,sampler,steps,nfe,text_s,step_s,denoise_s,decode_s,steps_per_s,psnr_db,latent_rmse\n",
        );
        let med = |x: &Option<Stat>| x.map_or(String::new(), |s| format!("{:.6}", s.median));
        let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6}"));
        for r in &self.rows {
            s += &format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                self.engine,
                self.model,
                self.device,
                self.dtype,
                self.threads,
                self.width,
                self.height,
                r.sampler,
                r.steps,
                r.nfe,
                med(&r.text_s),
                med(&r.step_s),
                med(&r.denoise_s),
                med(&r.decode_s),
                opt(r.steps_per_s),
                opt(r.psnr_db),
                opt(r.latent_rmse)
            );
        }
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }
}

/// Side-by-side per-phase medians of two runs (ours vs another engine's JSON) with the ratio ours/theirs,
/// matched on sampler and step count.
pub fn compare(ours: &Results, theirs: &Results) -> String {
    let mut s = format!(
        "{} vs {} | {} | {} | {} threads | {}x{}\n\n| sampler | steps | phase | {} s | {} s | ratio |\n|---|---|---|---|---|---|\n",
        ours.engine, theirs.engine, ours.model, ours.dtype, ours.threads, ours.width, ours.height, ours.engine, theirs.engine
    );
    s += &format!(
        "| - | - | load | {:.3} | {:.3} | {:.2} |\n",
        ours.load_s,
        theirs.load_s,
        ours.load_s / theirs.load_s
    );
    for r in &ours.rows {
        let Some(t) = theirs
            .rows
            .iter()
            .find(|t| t.sampler == r.sampler && t.steps == r.steps)
        else {
            continue;
        };
        for (phase, a, b) in [
            ("text", &r.text_s, &t.text_s),
            ("step", &r.step_s, &t.step_s),
            ("decode", &r.decode_s, &t.decode_s),
        ] {
            if let (Some(a), Some(b)) = (a, b) {
                s += &format!(
                    "| {} | {} | {phase} | {:.3} | {:.3} | {:.2} |\n",
                    r.sampler,
                    r.steps,
                    a.median,
                    b.median,
                    a.median / b.median
                );
            }
        }
    }
    s
}
