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
    // One line per sampler and cache.
    let key = |x: &super::report::Row| match x.cache.as_str() {
        "none" => x.sampler.clone(),
        c => format!("{} {c}", x.sampler),
    };
    let mut samplers: Vec<String> = Vec::new();
    for x in &r.rows {
        if !samplers.contains(&key(x)) {
            samplers.push(key(x));
        }
    }
    let series =
        |f: &dyn Fn(&super::report::Row) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
            samplers
                .iter()
                .map(|s| {
                    let pts = r
                        .rows
                        .iter()
                        .filter(|x| &key(x) == s)
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

/// PSNR against denoise seconds, one point per configuration (labelled `sampler steps cache`),
/// the Pareto front (no other point both faster and closer to the reference) joined by a line.
/// Rows without a PSNR (no reference) are left out.
pub fn pareto_svg(r: &Results) -> String {
    let pts: Vec<(f64, f64, String)> = r
        .rows
        .iter()
        .filter_map(|x| {
            let s = x.denoise_s?.median;
            // An identical image (infinite PSNR) is drawn at the top of the axis.
            let p = x.psnr_db?;
            Some((s, p, format!("{} {} {}", x.sampler, x.steps, x.cache)))
        })
        .collect();
    let finite = pts.iter().map(|p| p.1).filter(|p| p.is_finite());
    let top = finite.clone().fold(f64::NEG_INFINITY, f64::max);
    let top = if top.is_finite() { top + 5.0 } else { 60.0 };
    let bottom = finite.fold(f64::INFINITY, f64::min);
    let bottom = if bottom.is_finite() {
        (bottom - 2.0).min(top - 10.0)
    } else {
        0.0
    };
    let xmax = pts.iter().map(|p| p.0).fold(1e-9, f64::max) * 1.05;
    let (w, h, pad) = (720.0, 420.0, 60.0);
    let sx = |x: f64| pad + x / xmax * (w - 2.0 * pad);
    let sy = |y: f64| pad + (top - y.min(top)) / (top - bottom) * (h - 2.0 * pad);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif'>\n\
         <rect width='100%' height='100%' fill='white'/>\n\
         <rect x='{pad}' y='{pad}' width='{:.1}' height='{:.1}' fill='none' stroke='#888'/>\n\
         <text x='{:.1}' y='30' font-size='14' text-anchor='middle'>PSNR against the reference vs denoise seconds ({}, {})</text>\n\
         <text x='{:.1}' y='{:.1}' font-size='12' text-anchor='middle'>denoise seconds (max {xmax:.2})</text>\n\
         <text x='8' y='{:.1}' font-size='12'>{top:.0} dB</text>\n\
         <text x='8' y='{:.1}' font-size='12'>{bottom:.0} dB</text>\n",
        w - 2.0 * pad,
        h - 2.0 * pad,
        w / 2.0,
        r.model,
        r.dtype,
        w / 2.0,
        h - pad + 35.0,
        pad + 4.0,
        h - pad,
    );
    // The front: sorted by time, each point better than every faster one.
    let mut sorted: Vec<&(f64, f64, String)> = pts.iter().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut best = f64::NEG_INFINITY;
    let front: Vec<String> = sorted
        .iter()
        .filter(|p| {
            let on = p.1 > best;
            best = best.max(p.1);
            on
        })
        .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
        .collect();
    out.push_str(&format!(
        "<polyline fill='none' stroke='#2ca02c' stroke-width='2' points='{}'/>\n",
        front.join(" ")
    ));
    for (k, (s, p, label)) in pts.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        out.push_str(&format!(
            "<circle cx='{:.1}' cy='{:.1}' r='4' fill='{c}'/>\n<text x='{:.1}' y='{:.1}' font-size='10' fill='{c}'>{label}</text>\n",
            sx(*s),
            sy(*p),
            sx(*s) + 6.0,
            sy(*p) - 4.0
        ));
    }
    out.push_str("</svg>\n");
    out
}
