//! Bench results as data, and their table, JSON and CSV renderings.

use super::Stat;
use serde::{Deserialize, Serialize};

/// One (sampler, steps, cache) configuration's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub sampler: String,
    pub steps: usize,
    /// The step cache (`none`; absent in other engines' results).
    #[serde(default = "no_cache")]
    pub cache: String,
    /// Model evaluations per image (a second-order step costs two).
    pub nfe: usize,
    /// Of those, the ones that ran every block and the ones that ran the model without most of
    /// its blocks (a step cache's), per guidance branch, mean over prompts; the rest were
    /// predicted without running the model.
    #[serde(default)]
    pub nfe_full: Option<f64>,
    #[serde(default)]
    pub nfe_partial: Option<f64>,
    pub text_s: Option<Stat>,
    /// Seconds per step (all model evaluations of the step).
    pub step_s: Option<Stat>,
    pub denoise_s: Option<Stat>,
    pub decode_s: Option<Stat>,
    pub steps_per_s: Option<f64>,
    /// Mean over prompts of PSNR (dB, 8-bit image) against the reference; null for engines that do
    /// not measure it.
    pub psnr_db: Option<f64>,
    /// The lowest PSNR over prompts.
    #[serde(default)]
    pub psnr_min_db: Option<f64>,
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
    /// The warm-up: the first one-step run after loading, where weights that are read on first
    /// use (memory-mapped, or packed on a layer's first product) are read; absent in older results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_run_s: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of the weights the run holds, at the run's dtype (mmdit: the tensors text-to-image
    /// generation reads, unquantized runs only; diffusers: every parameter and buffer of the
    /// pipeline's modules); absent in older results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<u64>,
    /// Resident memory right after the warm-up run (Linux `VmRSS`): the weights, whatever stays
    /// loaded between runs and the runtime, without a run's activations; absent in older results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_bytes: Option<u64>,
    /// LoRAs as given (`SOURCE:SCALE`) and how they were applied (`merge`, `runtime`); absent in
    /// results of engines that record none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    pub rows: Vec<Row>,
}

fn no_cache() -> String {
    "none".into()
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

impl Row {
    /// The row's measurements in column order ([`ROW_COLUMNS`]), stats and numbers written by the
    /// given formatters (a number comes with its count of decimals).
    fn cells(
        &self,
        stat: impl Fn(&Option<Stat>) -> String,
        num: impl Fn(Option<f64>, usize) -> String,
    ) -> Vec<String> {
        vec![
            self.sampler.clone(),
            self.steps.to_string(),
            self.cache.clone(),
            self.nfe.to_string(),
            num(self.nfe_full, 1),
            num(self.nfe_partial, 1),
            stat(&self.text_s),
            stat(&self.step_s),
            stat(&self.denoise_s),
            stat(&self.decode_s),
            num(self.steps_per_s, 2),
            num(self.psnr_db, 2),
            num(self.psnr_min_db, 2),
            num(self.latent_rmse, 4),
        ]
    }
}

/// Column names of a row: (CSV, table).
const ROW_COLUMNS: [(&str, &str); 14] = [
    ("sampler", "sampler"),
    ("steps", "steps"),
    ("cache", "cache"),
    ("nfe", "NFE"),
    ("nfe_full", "NFE full"),
    ("nfe_partial", "NFE partial"),
    ("text_s", "text s"),
    ("step_s", "s/step median (min-max)"),
    ("denoise_s", "denoise s"),
    ("decode_s", "decode s"),
    ("steps_per_s", "steps/s"),
    ("psnr_db", "PSNR dB"),
    ("psnr_min_db", "PSNR min dB"),
    ("latent_rmse", "latent RMSE"),
];

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
                + &if self.loras.is_empty() {
                    String::new()
                } else {
                    format!(" | LoRA {}", self.loras.join(", "))
                }
        );
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        s += &line(ROW_COLUMNS.iter().map(|c| c.1.to_string()).collect());
        s += &line(vec!["---".into(); ROW_COLUMNS.len()]);
        for r in &self.rows {
            s += &line(r.cells(fmt_stat, fmt_opt));
        }
        s
    }

    pub fn csv(&self) -> String {
        let run = [
            "engine", "model", "device", "dtype", "threads", "width", "height",
        ];
        let header: Vec<&str> = run.into_iter().chain(ROW_COLUMNS.map(|c| c.0)).collect();
        let mut s = header.join(",") + "\n";
        let run = [
            self.engine.clone(),
            self.model.clone(),
            self.device.clone(),
            self.dtype.clone(),
            self.threads.to_string(),
            self.width.to_string(),
            self.height.to_string(),
        ];
        let med = |x: &Option<Stat>| x.map_or(String::new(), |s| format!("{:.6}", s.median));
        let opt = |x: Option<f64>, _| x.map_or(String::new(), |v| format!("{v:.6}"));
        for r in &self.rows {
            let cells: Vec<String> = run.iter().cloned().chain(r.cells(med, opt)).collect();
            s += &(cells.join(",") + "\n");
        }
        s
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }
}

/// Side-by-side per-phase medians of two runs (ours vs another engine's JSON) with the ratio ours/theirs,
/// matched on sampler and step count (uncached rows: other engines' runs have no cache).
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
    if let (Some(a), Some(b)) = (ours.first_run_s, theirs.first_run_s) {
        s += &format!(
            "| - | - | first run (1 step) | {a:.3} | {b:.3} | {:.2} |\n",
            a / b
        );
        let (a, b) = (ours.load_s + a, theirs.load_s + b);
        s += &format!(
            "| - | - | load + first run | {a:.3} | {b:.3} | {:.2} |\n",
            a / b
        );
    }
    for r in ours.rows.iter().filter(|r| r.cache == "none") {
        let Some(t) = theirs
            .rows
            .iter()
            .find(|t| t.sampler == r.sampler && t.steps == r.steps && t.cache == "none")
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
    s + &memory(ours, theirs)
}

/// Peak RSS, the weights' bytes, what the peak holds beyond the weights (activations, buffers,
/// the runtime), and what is held between runs and beyond the weights then (no activations),
/// ours and theirs in MiB with the ratio, for the rows both runs recorded.
fn memory(ours: &Results, theirs: &Results) -> String {
    let beyond = |r: &Results| Some(r.peak_rss_bytes?.saturating_sub(r.weight_bytes?));
    let held_beyond = |r: &Results| Some(r.held_bytes?.saturating_sub(r.weight_bytes?));
    let rows = [
        ("peak RSS", ours.peak_rss_bytes, theirs.peak_rss_bytes),
        (
            "weights at the run's dtype",
            ours.weight_bytes,
            theirs.weight_bytes,
        ),
        ("peak RSS beyond the weights", beyond(ours), beyond(theirs)),
        ("held between runs", ours.held_bytes, theirs.held_bytes),
        (
            "held between runs beyond the weights",
            held_beyond(ours),
            held_beyond(theirs),
        ),
    ];
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut s = String::new();
    for (what, a, b) in rows {
        if let (Some(a), Some(b)) = (a, b) {
            s += &format!(
                "| {what} | {:.0} | {:.0} | {:.2} |\n",
                mib(a),
                mib(b),
                a as f64 / b as f64
            );
        }
    }
    if s.is_empty() {
        return s;
    }
    format!(
        "\n| memory | {} MiB | {} MiB | ratio |\n|---|---|---|---|\n{s}",
        ours.engine, theirs.engine
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_csv_list_every_column_once_per_row() {
        let stat = Stat::of(&[1.0, 2.0]);
        let row = Row {
            sampler: "euler".into(),
            steps: 4,
            cache: "none".into(),
            nfe: 4,
            nfe_full: Some(4.0),
            nfe_partial: Some(0.0),
            text_s: stat,
            step_s: stat,
            denoise_s: stat,
            decode_s: None,
            steps_per_s: Some(0.5),
            psnr_db: Some(f64::INFINITY),
            psnr_min_db: None,
            latent_rmse: None,
        };
        let r = Results {
            engine: "mmdit".into(),
            commit: "c".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            threads: 2,
            model: "m".into(),
            width: 64,
            height: 32,
            reference_steps: 100,
            repeat: 1,
            load_s: 0.5,
            first_run_s: Some(1.0),
            peak_rss_bytes: Some(3 << 20),
            weight_bytes: Some(1 << 20),
            held_bytes: Some(3 << 19),
            loras: Vec::new(),
            rows: vec![row],
        };
        let csv = r.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "engine,model,device,dtype,threads,width,height,sampler,steps,cache,nfe,nfe_full,nfe_partial,text_s,step_s,denoise_s,decode_s,steps_per_s,psnr_db,psnr_min_db,latent_rmse");
        assert_eq!(
            lines[1],
            "mmdit,m,cpu,f32,2,64,32,euler,4,none,4,4.000000,0.000000,1.500000,1.500000,1.500000,,0.500000,inf,,"
        );
        let table = r.table();
        assert!(
            table.contains("| sampler | steps | cache | NFE | NFE full | NFE partial | text s |"),
            "{table}"
        );
        assert!(table.contains("| euler | 4 | none | 4 | 4.0 | 0.0 | 1.500 (1.000-2.000) | 1.500 (1.000-2.000) | 1.500 (1.000-2.000) | - | 0.50 | inf | - | - |"), "{table}");
        // Other engines' results (no cache columns) still read.
        let theirs = r.json().replace("\"cache\": \"none\",", "");
        let back: Results = serde_json::from_str(&theirs).unwrap();
        assert_eq!(back.rows[0].cache, "none");
        // The memory rows: 3 MiB peak, 1 MiB weights, 2 MiB beyond, 1.5 MiB held between runs,
        // 0.5 beyond the weights; theirs 6, 2, 4, 4 and 2.
        let mut other = back.clone();
        other.engine = "other".into();
        other.peak_rss_bytes = Some(6 << 20);
        other.weight_bytes = Some(2 << 20);
        other.held_bytes = Some(4 << 20);
        let c = compare(&r, &other);
        assert!(
            c.contains("| memory | mmdit MiB | other MiB | ratio |"),
            "{c}"
        );
        assert!(c.contains("| peak RSS | 3 | 6 | 0.50 |"), "{c}");
        assert!(
            c.contains("| weights at the run's dtype | 1 | 2 | 0.50 |"),
            "{c}"
        );
        assert!(
            c.contains("| peak RSS beyond the weights | 2 | 4 | 0.50 |"),
            "{c}"
        );
        assert!(c.contains("| held between runs | 2 | 4 | 0.38 |"), "{c}");
        assert!(
            c.contains("| held between runs beyond the weights | 0 | 2 | 0.25 |"),
            "{c}"
        );
        // Results without weights (older runs, quantized runs) leave those rows out.
        other.weight_bytes = None;
        let c = compare(&r, &other);
        assert!(
            c.contains("| peak RSS | 3 | 6 | 0.50 |")
                && c.contains("| held between runs | 2 | 4 | 0.38 |")
                && !c.contains("weights"),
            "{c}"
        );
    }
}
