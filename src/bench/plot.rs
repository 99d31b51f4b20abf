//! A small SVG plot: seconds and PSNR against model evaluations (NFE), one line per sampler.

use super::report::Results;

const W: f64 = 720.0;
const H: f64 = 300.0;
const PAD: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

fn panel(out: &mut String, x0: f64, title: &str, series: &[(String, Vec<(f64, f64)>)]) {
    let pw = W / 2.0 - PAD * 1.5;
    let ph = H - 2.0 * PAD;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, p)| p.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let (xmax, ymax) = pts
        .iter()
        .fold((1.0f64, 1e-9f64), |(a, b), p| (a.max(p.0), b.max(p.1)));
    let sx = |x: f64| x0 + PAD + x / xmax * pw;
    let sy = |y: f64| PAD + ph - y / ymax * ph;
    out.push_str(&format!(
        "<rect x='{:.1}' y='{PAD}' width='{pw:.1}' height='{ph:.1}' fill='none' stroke='#888'/>\n\
         <text x='{:.1}' y='{:.1}' font-size='13' text-anchor='middle'>{title}</text>\n\
         <text x='{:.1}' y='{:.1}' font-size='11' text-anchor='middle'>NFE (max {xmax:.0})</text>\n\
         <text x='{:.1}' y='{:.1}' font-size='11'>{ymax:.3}</text>\n",
        x0 + PAD,
        x0 + PAD + pw / 2.0,
        PAD - 10.0,
        x0 + PAD + pw / 2.0,
        H - PAD + 30.0,
        x0 + 4.0,
        PAD + 4.0
    ));
    for (k, (name, p)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let path: Vec<String> = p
            .iter()
            .filter(|q| q.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        out.push_str(&format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            path.join(" ")
        ));
        for q in p.iter().filter(|q| q.1.is_finite()) {
            out.push_str(&format!(
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{c}'/>\n",
                sx(q.0),
                sy(q.1)
            ));
        }
        out.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' font-size='11' fill='{c}'>{name}</text>\n",
            x0 + PAD + 6.0,
            PAD + 14.0 + 13.0 * k as f64
        ));
    }
}

/// Renders the two panels (denoise seconds vs NFE, PSNR vs NFE) as an SVG document.
pub fn svg(r: &Results) -> String {
    let mut samplers: Vec<String> = r.rows.iter().map(|x| x.sampler.clone()).collect();
    samplers.dedup();
    let series =
        |f: &dyn Fn(&super::report::Row) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            samplers
                .iter()
                .map(|s| {
                    let pts = r
                        .rows
                        .iter()
                        .filter(|x| &x.sampler == s)
                        .filter_map(|x| Some((x.nfe as f64, f(x)?)))
                        .collect();
                    (s.clone(), pts)
                })
                .collect()
        };
    let mut out = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='white'/>\n");
    panel(
        &mut out,
        0.0,
        "denoise seconds vs NFE",
        &series(&|x| x.denoise_s.map(|s| s.median)),
    );
    panel(
        &mut out,
        W / 2.0,
        "PSNR (dB) vs NFE",
        &series(&|x| x.psnr_db),
    );
    out.push_str("</svg>\n");
    out
}
