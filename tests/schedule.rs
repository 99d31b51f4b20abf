//! Sigma schedules against diffusers' FlowMatchEulerDiscreteScheduler (tests/fixtures/schedules.json,
//! from scripts/make_sd3_fixtures.py). Tolerance: sigmas within 1e-6, timesteps within 1e-3 (= 1e-6 x 1000).

mod common;

use mmdit::config::SchedulerConfig;
use mmdit::sampling::Schedule;

#[test]
fn sigmas_match_diffusers() {
    let s = std::fs::read_to_string(common::fixture("schedules.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() > 30);
    let mut worst = 0f32;
    for c in cases {
        let cfg: SchedulerConfig = serde_json::from_value(c["config"].clone()).unwrap();
        let mu = c["mu"].as_f64();
        let ours = match c.get("custom_sigmas") {
            Some(cs) => {
                let cs: Vec<f64> = serde_json::from_value(cs.clone()).unwrap();
                Schedule::flow_match_custom(&cfg, &cs, mu)
            }
            None => Schedule::flow_match(&cfg, c["steps"].as_u64().unwrap() as usize, mu),
        };
        let sig: Vec<f32> = serde_json::from_value(c["sigmas"].clone()).unwrap();
        let ts: Vec<f32> = serde_json::from_value(c["timesteps"].clone()).unwrap();
        assert_eq!(ours.sigmas.len(), sig.len(), "{c}");
        for (a, b) in ours.sigmas.iter().zip(&sig) {
            worst = worst.max((a - b).abs());
            assert!((a - b).abs() <= 1e-6, "sigma {a} vs {b} in {}", c["config"]);
        }
        for (a, b) in ours.timesteps.iter().zip(&ts) {
            assert!(
                (a - b).abs() <= 1e-3,
                "timestep {a} vs {b} in {}",
                c["config"]
            );
        }
    }
    println!(
        "worst sigma difference over {} cases: {worst:.2e}",
        cases.len()
    );
}
