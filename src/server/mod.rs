//! `mmdit serve`: the model loaded once behind OpenAI's images API (axum on tokio).
//!
//! The HTTP side checks each request (field by field, then against the model's configs, before
//! it queues) and waits for its images; the model's own thread ([`worker`]) runs one job at a time
//! from a bounded queue. A client that goes away cancels its job at the next step.

pub mod api;
mod metrics;
mod worker;

use api::{ApiError, Format, Generation};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use metrics::{Metrics, Status};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Largest request body accepted.
const BODY_LIMIT: usize = 1 << 20;
/// How long `url` images stay available, and how many are kept at most.
const URL_TTL: Duration = Duration::from_secs(3600);
const URL_MAX: usize = 256;

pub struct Config {
    pub host: String,
    pub port: u16,
    /// Jobs that may wait while one runs.
    pub queue: usize,
    pub api_key: Option<String>,
    pub lora_dir: Option<PathBuf>,
    /// The model's name (as `--model` gave it) and dtype, for `/v1/models` and the PNGs.
    pub model: String,
    pub dtype: String,
    /// The preset's defaults, filled into each request as `generate` does.
    pub preset: Option<mmdit::presets::Preset>,
}

/// Loads the pipeline, on the model's thread.
pub type Load = Box<dyn FnOnce() -> mmdit::Result<mmdit::Pipeline> + Send>;

struct AppState {
    cfg: Config,
    /// The model's configs: requests are checked against them before they queue.
    spec: mmdit::Spec,
    queue: worker::Queue,
    ready: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    images: Mutex<UrlImages>,
    created: u64,
    key: Option<[u8; 32]>,
}

type Shared = Arc<AppState>;

/// Serves until SIGTERM or Ctrl-C: then it stops accepting, refuses the jobs still queued,
/// finishes the running one and returns. Fails if the address cannot be bound or the model does
/// not load.
pub fn run(cfg: Config, spec: mmdit::Spec, load: Load) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg, spec, load))
}

async fn serve(cfg: Config, spec: mmdit::Spec, load: Load) -> anyhow::Result<()> {
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
        mmdit::Error::request(format!(
            "--host/--port {addr}: cannot listen there ({e}); pick another port or host"
        ))
    })?;
    let metrics = Arc::new(Metrics::new());
    let stopping = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let (queue, worker) = worker::spawn(
        load,
        cfg.queue,
        metrics.clone(),
        worker::Recorded {
            model: cfg.model.clone(),
            dtype: cfg.dtype.clone(),
        },
        stopping.clone(),
        ready.clone(),
        loaded_tx,
    );
    eprintln!("listening on http://{}", listener.local_addr()?);
    let key = cfg
        .api_key
        .as_ref()
        .map(|k| Sha256::digest(k.as_bytes()).into());
    let state = Arc::new(AppState {
        cfg,
        spec,
        queue,
        ready,
        stopping: stopping.clone(),
        metrics,
        images: Mutex::new(UrlImages::default()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        key,
    });
    let (failed_tx, failed_rx) = oneshot::channel::<String>();
    tokio::spawn(async move {
        if let Ok(Err(e)) = loaded_rx.await {
            let _ = failed_tx.send(e);
        }
    });
    let app = router(state.clone());
    let load_error = Arc::new(Mutex::new(None));
    let on_stop = {
        let load_error = load_error.clone();
        async move {
            tokio::select! {
                _ = stop_signal() => eprintln!("stopping: finishing the running job"),
                Ok(e) = failed_rx => {
                    *load_error.lock().expect("not poisoned") = Some(e);
                }
            }
            stopping.store(true, Ordering::SeqCst);
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(on_stop)
        .await?;
    // The last queue handle goes with the state: the model's thread then ends.
    drop(state);
    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    if let Some(e) = load_error.lock().expect("not poisoned").take() {
        anyhow::bail!("loading the model: {e}");
    }
    eprintln!("stopped");
    Ok(())
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/loras", get(loras))
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/{file}", get(url_image))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), log))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// One JSON line per request on stderr, and the request counters.
async fn log(State(s): State<Shared>, req: HttpRequest, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    s.metrics.requests.get_or_create(&Status { status }).inc();
    if path == "/v1/images/generations" {
        s.metrics
            .request_seconds
            .observe(t0.elapsed().as_secs_f64());
    }
    log_line(method.as_str(), &path, status, t0);
    resp
}

fn log_line(method: &str, path: &str, status: u16, t0: Instant) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    eprintln!(
        "{}",
        serde_json::json!({
            "time": now,
            "method": method,
            "path": path,
            "status": status,
            "ms": (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0,
        })
    );
}

/// With an API key set, every endpoint but `/health` and the `url` images (whose names are
/// unguessable) wants `Authorization: Bearer KEY`; the key is compared by its SHA-256 digest, in
/// constant time.
async fn authorize(State(s): State<Shared>, req: HttpRequest, next: Next) -> Response {
    let open = req.uri().path() == "/health" || req.uri().path().starts_with("/v1/images/img-");
    if let (Some(want), false) = (s.key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| -> [u8; 32] { Sha256::digest(k.trim().as_bytes()).into() });
        let ok = given.is_some_and(|g| g.iter().zip(&want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0);
        if !ok {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send the header `Authorization: Bearer KEY`",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
            return r;
        }
    }
    next.run(req).await
}

async fn ready(State(s): State<Shared>) -> Response {
    let (code, state) = if !s.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    } else if s.stopping.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping")
    } else if s.queue.is_full() {
        (StatusCode::SERVICE_UNAVAILABLE, "queue full")
    } else {
        (StatusCode::OK, "ready")
    };
    (
        code,
        Json(serde_json::json!({"status": state, "queued": s.queue.waiting()})),
    )
        .into_response()
}

async fn metrics_text(State(s): State<Shared>) -> Response {
    s.metrics.queue_depth.set(s.queue.waiting() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

async fn models(State(s): State<Shared>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": s.cfg.model,
            "object": "model",
            "created": s.created,
            "owned_by": "mmdit",
        }],
    }))
}

async fn loras(State(s): State<Shared>) -> Json<serde_json::Value> {
    let names = s
        .cfg
        .lora_dir
        .as_deref()
        .map(api::lora_names)
        .unwrap_or_default();
    Json(serde_json::json!({"object": "list", "data": names}))
}

/// Cancels a job when the handler waiting for it is dropped before the answer (the client went
/// away), and counts that as a 499.
struct CancelOnDrop {
    cancel: Arc<AtomicBool>,
    armed: bool,
    state: Shared,
    t0: Instant,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.cancel.store(true, Ordering::SeqCst);
            self.state
                .metrics
                .requests
                .get_or_create(&Status { status: 499 })
                .inc();
            log_line("POST", "/v1/images/generations", 499, self.t0);
        }
    }
}

async fn generations(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<Generation>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(g) = body.map_err(|e| {
        // A body too large stays 413 and a missing JSON content type 415; everything else
        // about the body is a 400, as OpenAI answers (axum's 422 included).
        let status = match e.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        ApiError::new(
            status,
            format!("the body is not a valid request: {}", e.body_text()),
        )
    })?;
    let mut checked = g.check(s.cfg.lora_dir.as_deref())?;
    if let Some(p) = &s.cfg.preset {
        p.apply(&mut checked.req);
    }
    if s.stopping.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let resolved = s
        .spec
        .resolve(&checked.req)
        .map_err(|e| ApiError::from_library(&e))?;
    let req = mmdit::Request {
        seed: Some(resolved.seed),
        ..checked.req
    };
    let (tx, rx) = oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = worker::Job {
        req,
        n: checked.n,
        cancel: cancel.clone(),
        reply: tx,
    };
    if s.queue.submit(job).is_err() {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue is full ({} requests waiting); retry later",
                s.queue.waiting()
            ),
        );
        e.retry_after = Some(5);
        return Err(e);
    }
    s.metrics.queue_depth.set(s.queue.waiting() as i64);
    let mut guard = CancelOnDrop {
        cancel,
        armed: true,
        state: s.clone(),
        t0: Instant::now(),
    };
    let answer = rx.await;
    guard.armed = false;
    let images = answer
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model thread ended"))?
        .map_err(|e| ApiError::from_library(&e))?;
    let data: Vec<serde_json::Value> = match checked.format {
        Format::B64Json => images
            .iter()
            .map(|png| {
                serde_json::json!({
                    "b64_json": base64::engine::general_purpose::STANDARD.encode(png)
                })
            })
            .collect(),
        Format::Url => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1")
                .to_string();
            let mut store = s.images.lock().expect("not poisoned");
            images
                .into_iter()
                .map(|png| {
                    let id = store.put(png);
                    serde_json::json!({"url": format!("http://{host}/v1/images/{id}.png")})
                })
                .collect()
        }
    };
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Json(serde_json::json!({"created": created, "data": data})).into_response())
}

async fn url_image(State(s): State<Shared>, UrlPath(file): UrlPath<String>) -> Response {
    let id = file.strip_suffix(".png").unwrap_or(&file);
    match s.images.lock().expect("not poisoned").get(id) {
        Some(png) => ([(header::CONTENT_TYPE, "image/png")], png).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {file}: `url` images are kept for an hour"),
        )
        .into_response(),
    }
}

/// Images answered by `url`: kept for [`URL_TTL`], at most [`URL_MAX`] (the oldest go first).
#[derive(Default)]
struct UrlImages {
    images: HashMap<String, (Instant, Vec<u8>)>,
}

impl UrlImages {
    fn put(&mut self, png: Vec<u8>) -> String {
        self.images.retain(|_, (t, _)| t.elapsed() < URL_TTL);
        while self.images.len() >= URL_MAX {
            let oldest = self
                .images
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.images.remove(&k),
                None => break,
            };
        }
        let id = format!("img-{:032x}", rand::random::<u128>());
        self.images.insert(id.clone(), (Instant::now(), png));
        id
    }

    fn get(&self, id: &str) -> Option<Vec<u8>> {
        self.images
            .get(id)
            .filter(|(t, _)| t.elapsed() < URL_TTL)
            .map(|(_, png)| png.clone())
    }
}
