//! The `mmdit` binary end to end on a fixture model.

mod common;

use std::process::Command;

fn mmdit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mmdit"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mmdit-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn generate_writes_a_png_of_the_requested_size_with_metadata() {
    let dir = tmp("gen");
    let out = dir.join("img.png");
    let st = mmdit()
        .args(["generate", "--model"])
        .arg(common::fixture("sd35-tiny"))
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "7",
        ])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let (img, text) = mmdit::output::read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (48, 32));
    let get = |k: &str| text.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a red circle"));
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("steps").as_deref(), Some("2"));

    // Same seed, same image; and the existing file is not overwritten without --overwrite.
    let again = mmdit()
        .args(["generate", "--model"])
        .arg(common::fixture("sd35-tiny"))
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "7",
        ])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let st = mmdit()
        .args(["generate", "--overwrite", "--model"])
        .arg(common::fixture("sd35-tiny"))
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "48",
            "--height",
            "32",
            "--seed",
            "7",
        ])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success());
    assert_eq!(mmdit::output::read_png(&out).unwrap().0, img);
}

#[test]
fn bad_size_is_refused_before_loading_with_the_nearest_valid_sizes() {
    let dir = tmp("size");
    let out = dir.join("img.png");
    let st = mmdit()
        .args(["generate", "--model"])
        .arg(common::fixture("sd35-tiny"))
        .args(["--prompt", "x", "--width", "50"])
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&st.stderr);
    assert_eq!(st.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--width 50") && err.contains("48 or 52"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert!(!out.exists());
}

#[test]
fn generate_runs_both_tiny_flux_variants() {
    let dir = tmp("flux");
    for (name, extra) in [
        ("flux-schnell-tiny", vec!["--guidance", "2"]),
        (
            "flux-dev-tiny",
            vec!["--negative-prompt", "blurry", "--true-cfg", "2"],
        ),
    ] {
        let out = dir.join(format!("{name}.png"));
        let st = mmdit()
            .args(["generate", "--model"])
            .arg(common::fixture(name))
            .args([
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--width",
                "40",
                "--height",
                "24",
                "--seed",
                "1",
            ])
            .args(&extra)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(st.status.success(), "{name}: {err}");
        let (img, _) = mmdit::output::read_png(&out).unwrap();
        assert_eq!((img.width, img.height), (40, 24), "{name}");
        if name == "flux-schnell-tiny" {
            assert!(err.contains("--guidance 2 is ignored"), "{err}");
        }
    }
}
