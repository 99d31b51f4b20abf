//! Issue 4: the Hub download path against a loopback server that answers the way the Hub does
//! (`/{repo}/resolve/{revision}/{file}`, relative redirects, ETag and commit headers, range requests),
//! started and stopped inside each test. No test reaches the network.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// How the fake Hub misbehaves.
#[derive(Clone, Default)]
struct Faults {
    /// Repos that answer 401 without a token.
    gated: bool,
    /// Cut the connection half-way through the first full download of this file.
    cut_once: Option<String>,
    /// Serve this file shorter than it is.
    truncate: Option<String>,
}

struct Hub {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    /// Serves `root` (a diffusers folder) as repo `org/tiny` at any revision.
    fn start(root: PathBuf, faults: Faults) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let cut_done = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), requests.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        r.fetch_add(1, Ordering::SeqCst);
                        conn.set_nonblocking(false).unwrap();
                        let _ = serve(conn, &root, &faults, &cut_done);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Hub {
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

fn serve(
    mut conn: TcpStream,
    root: &Path,
    f: &Faults,
    cut_done: &AtomicBool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (mut range, mut auth) = (None, false);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().trim_start_matches("bytes=").to_string()),
            "authorization" => auth = v.trim().starts_with("Bearer "),
            _ => {}
        }
    }
    // /org/tiny/resolve/<rev>/<file>  ->  relative redirect to /cdn/<file> (as the Hub does for LFS)
    if let Some(rest) = path.strip_prefix("/org/tiny/resolve/") {
        if f.gated && !auth {
            return respond(
                &mut conn,
                "401 Unauthorized",
                &[("X-Error-Code".into(), "GatedRepo".into())],
                b"gated",
            );
        }
        let file = rest.split_once('/').map(|x| x.1).unwrap_or("");
        if !root.join(file).is_file() {
            return respond(
                &mut conn,
                "404 Not Found",
                &[("X-Error-Code".into(), "EntryNotFound".into())],
                b"",
            );
        }
        return respond(
            &mut conn,
            "302 Found",
            &[("Location".into(), format!("/cdn/{file}"))],
            b"",
        );
    }
    if path.starts_with("/org/") {
        return respond(
            &mut conn,
            "404 Not Found",
            &[("X-Error-Code".into(), "RepositoryNotFound".into())],
            b"",
        );
    }
    let Some(file) = path.strip_prefix("/cdn/") else {
        return respond(&mut conn, "404 Not Found", &[], b"");
    };
    let mut data = std::fs::read(root.join(file))?;
    if f.truncate.as_deref() == Some(file) {
        data.truncate(data.len() / 2);
    }
    let total = data.len();
    let etag = format!(
        "\"{:x}{:08x}\"",
        total,
        file.bytes()
            .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32))
    );
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(total.saturating_sub(1));
            (a.min(total), (b + 1).min(total))
        }
        None => (0, total),
    };
    let headers = vec![
        ("ETag".to_string(), etag),
        ("X-Repo-Commit".to_string(), COMMIT.to_string()),
        (
            "Content-Range".to_string(),
            format!("bytes {start}-{}/{total}", end.saturating_sub(1)),
        ),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    let body = &data[start..end];
    if f.cut_once.as_deref() == Some(file)
        && start == 0
        && body.len() > 1
        && !cut_done.swap(true, Ordering::SeqCst)
    {
        // Announce the whole body, send half, hang up.
        let mut head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in &headers {
            head += &format!("{k}: {v}\r\n");
        }
        conn.write_all(format!("{head}\r\n").as_bytes())?;
        conn.write_all(&body[..body.len() / 2])?;
        return conn.shutdown(std::net::Shutdown::Both);
    }
    respond(&mut conn, "206 Partial Content", &headers, body)
}

/// `mmdit generate --model org/tiny` with the Hub environment pointed at the loopback server.
fn generate(
    endpoint: &str,
    hf_home: &Path,
    extra_env: &[(&str, &str)],
    test: &str,
) -> (Option<i32>, String, PathBuf) {
    let out = common::tmp(&format!("hub-{test}")).join("img.png");
    let mut cmd = common::mmdit();
    cmd.args([
        "generate",
        "--model",
        "org/tiny",
        "--prompt",
        "a red circle",
        "--steps",
        "1",
        "--output",
    ])
    .arg(&out)
    .env("HF_ENDPOINT", endpoint)
    .env("HF_HOME", hf_home)
    .env_remove("HF_TOKEN")
    .env_remove("HF_HUB_OFFLINE");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        out,
    )
}

#[test]
fn download_then_cache_then_offline() {
    let home = common::tmp("hub-home");
    let mut hub = Hub::start(common::fixture("sd3-dummy"), Faults::default());
    let (code, err, out) = generate(&hub.endpoint(), &home, &[], "first");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.exists());
    let served = hub.requests.load(Ordering::SeqCst);
    assert!(served > 10, "only {served} requests");
    hub.stop();

    // Second run: the server is gone, everything comes from the cache.
    let (code, err, _) = generate("http://127.0.0.1:9", &home, &[], "second");
    assert_eq!(code, Some(0), "served from cache: {err}");

    // Offline with the cache: works. Offline without: a clear error naming HF_HUB_OFFLINE.
    let (code, err, _) = generate(
        "http://127.0.0.1:9",
        &home,
        &[("HF_HUB_OFFLINE", "1")],
        "offline",
    );
    assert_eq!(code, Some(0), "{err}");
    let empty = common::tmp("hub-empty");
    let (code, err, out) = generate(
        "http://127.0.0.1:9",
        &empty,
        &[("HF_HUB_OFFLINE", "1")],
        "offline-empty",
    );
    common::assert_clean_error(code, &err, &["HF_HUB_OFFLINE=1", "model_index.json"]);
    assert!(!out.exists());
}

#[test]
fn gated_repo_says_accept_the_licence_and_set_hf_token() {
    let home = common::tmp("hub-gated");
    let hub = Hub::start(
        common::fixture("sd3-dummy"),
        Faults {
            gated: true,
            ..Default::default()
        },
    );
    let (code, err, _) = generate(&hub.endpoint(), &home, &[], "gated");
    common::assert_clean_error(code, &err, &["accept the licence", "HF_TOKEN"]);
    // With a token the same repo downloads.
    let (code, err, _) = generate(
        &hub.endpoint(),
        &home,
        &[("HF_TOKEN", "hf_test")],
        "gated-token",
    );
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn missing_repo_or_file_is_named() {
    let home = common::tmp("hub-404");
    let hub = Hub::start(common::fixture("sd3-dummy"), Faults::default());
    let out = common::tmp("hub-404-out").join("x.png");
    let o = common::mmdit()
        .args([
            "generate",
            "--model",
            "org/absent",
            "--prompt",
            "x",
            "--output",
        ])
        .arg(&out)
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    common::assert_clean_error(
        o.status.code(),
        &String::from_utf8_lossy(&o.stderr),
        &["org/absent", "model_index.json", "repo id"],
    );

    let no_vae = common::copy_fixture("sd3-dummy", "hubsrc-novae");
    std::fs::remove_file(no_vae.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let hub2 = Hub::start(no_vae, Faults::default());
    let (code, err, _) = generate(
        &hub2.endpoint(),
        &common::tmp("hub-novae-home"),
        &[],
        "novae",
    );
    common::assert_clean_error(code, &err, &["vae/"]);
}

/// `generate` from a fresh cache against a loopback Hub serving sd3-dummy that cuts the first
/// download of `cut_once` and serves `truncate` short.
fn generate_with(
    cut_once: Option<&str>,
    truncate: Option<&str>,
    test: &str,
) -> (Option<i32>, String, PathBuf) {
    let faults = Faults {
        cut_once: cut_once.map(Into::into),
        truncate: truncate.map(Into::into),
        ..Default::default()
    };
    let hub = Hub::start(common::fixture("sd3-dummy"), faults);
    let home = common::tmp(&format!("hub-{test}-home"));
    generate(&hub.endpoint(), &home, &[], test)
}

#[test]
fn a_cut_connection_is_retried_to_completion() {
    let file = "transformer/diffusion_pytorch_model.safetensors";
    let (code, err, out) = generate_with(Some(file), None, "cut");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.exists());
}

#[test]
fn a_short_file_is_refused_before_use() {
    let file = "vae/diffusion_pytorch_model.safetensors";
    let (code, err, out) = generate_with(None, Some(file), "short");
    common::assert_clean_error(
        code,
        &err,
        &["diffusion_pytorch_model.safetensors", "download it again"],
    );
    assert!(!out.exists());
}

/// `--lora org/name` takes diffusers' `pytorch_lora_weights.safetensors`, `--lora org/name/FILE:S`
/// that file, both downloaded through the Hub client into the cache and then read offline.
#[test]
fn loras_come_from_the_hub_and_its_cache() {
    let repo = common::tmp("hub-lora-repo");
    let lora = common::fixture("lora").join("flux_xlabs.safetensors");
    std::fs::copy(&lora, repo.join("pytorch_lora_weights.safetensors")).unwrap();
    std::fs::copy(
        common::fixture("lora").join("flux_peft.safetensors"),
        repo.join("style.safetensors"),
    )
    .unwrap();
    let home = common::tmp("hub-lora-home");
    let run = |endpoint: &str, offline: bool, test: &str| {
        let out = common::tmp(&format!("hub-lora-{test}")).join("img.png");
        let mut cmd = common::mmdit();
        cmd.args([
            "generate",
            "--prompt",
            "a red circle",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
        ])
        .arg("--model")
        .arg(common::fixture("flux-dev-tiny"))
        .args([
            "--lora",
            "org/tiny",
            "--lora",
            "org/tiny/style.safetensors:0.5",
            "--output",
        ])
        .arg(&out)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", &home)
        .env_remove("HF_TOKEN");
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        } else {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        let o = cmd.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            out,
        )
    };
    let mut hub = Hub::start(repo, Faults::default());
    let (code, err, out) = run(&hub.endpoint(), false, "online");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("LoRA org/tiny (XLabs"), "{err}");
    assert!(
        err.contains("LoRA org/tiny/style.safetensors (diffusers/PEFT"),
        "{err}"
    );
    let (_, text) = mmdit::output::read_png(&out).unwrap();
    let loras = text.iter().find(|(k, _)| k == "lora").unwrap().1.clone();
    assert_eq!(loras, "org/tiny:1\norg/tiny/style.safetensors:0.5");
    hub.stop();
    let (code, err, _) = run("http://127.0.0.1:9", true, "offline");
    assert_eq!(code, Some(0), "from the cache: {err}");
}
