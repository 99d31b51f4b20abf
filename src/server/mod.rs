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
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
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
use tokio::sync::{oneshot, watch};
use worker::Progress;

/// The web page at `/`: a form over the jobs API, with the live progress and preview and a gallery
/// of the results.
const PAGE: &str = include_str!("page.html");

/// Largest request body accepted.
const BODY_LIMIT: usize = 1 << 20;
/// Largest `/v1/images/edits` body (the image and mask uploads).
const UPLOAD_LIMIT: usize = 64 << 20;
/// How long `url` images stay available, and how many are kept at most.
const URL_TTL: Duration = Duration::from_secs(3600);
const URL_MAX: usize = 256;
/// Bytes of `url` images kept at most.
const URL_BYTES: usize = 512 << 20;
/// Jobs kept (for an hour) at most.
const JOBS_MAX: usize = 1024;

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
    /// Steps between the previews of a job's progress (0: none).
    pub preview_every: usize,
    /// The origin whose pages may call the API from a browser (CORS); none by default.
    pub cors: Option<axum::http::HeaderValue>,
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
    jobs: Mutex<HashMap<String, JobEntry>>,
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
            preview_every: cfg.preview_every,
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
        jobs: Mutex::new(HashMap::new()),
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
    let app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/loras", get(loras))
        .route("/v1/images/generations", post(generations))
        .route(
            "/v1/images/edits",
            post(edits).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/v1/images/{file}", get(url_image))
        .route("/v1/jobs", post(create_job))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .fallback(no_endpoint)
        .method_not_allowed_fallback(not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), log))
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    // Outermost, so that a browser's preflight is answered before the key is asked for.
    let app = match state.cfg.cors.clone() {
        Some(origin) => app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([
                    axum::http::Method::GET,
                    axum::http::Method::POST,
                    axum::http::Method::DELETE,
                ])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        ),
        None => app,
    };
    app.with_state(state)
}

/// Reads and drops what a client still sends (an upload, up to [`UPLOAD_LIMIT`]) before it is
/// answered: a connection closed while it writes is a send error to the client, not our answer.
async fn drain(body: axum::body::Body) {
    let _ = axum::body::to_bytes(body, UPLOAD_LIMIT).await;
}

async fn no_endpoint(body: axum::body::Body) -> ApiError {
    drain(body).await;
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// A known path with another method: OpenAI's error shape, as every other answer. DALL-E 2's
/// variations (`POST /v1/images/variations`, which the image route's path also matches) are named.
async fn not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
    body: axum::body::Body,
) -> ApiError {
    drain(body).await;
    let path = uri.path();
    if path == "/v1/images/variations" {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "variations are not served; edit an image with POST /v1/images/edits (image and prompt)",
        );
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not served on {path}"),
    )
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

/// With an API key set, every endpoint but `/health`, the page (which holds no data; its calls
/// send the key) and the `url` images (whose names are unguessable) wants
/// `Authorization: Bearer KEY`; the key is compared by its SHA-256 digest, in constant time.
async fn authorize(State(s): State<Shared>, req: HttpRequest, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/health" || path == "/" || path.starts_with("/v1/images/img-");
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
    /// The request's path, for the log line.
    path: &'static str,
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
            log_line("POST", self.path, 499, self.t0);
        }
    }
}

/// A request checked (field by field, then against the model) and queued.
struct Queued {
    rx: oneshot::Receiver<mmdit::Result<worker::Images>>,
    progress: watch::Receiver<Progress>,
    cancel: Arc<AtomicBool>,
    format: Format,
    encoding: mmdit::output::Encoding,
    /// A streamed request's partial images and size.
    stream: Option<Streamed>,
}

/// What a streamed request's answer needs besides the images: its partial images (the channel
/// closes when its job ends) and the output's width and height.
struct Streamed {
    partials: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    size: (usize, usize),
}

fn enqueue(s: &Shared, body: Result<Json<Generation>, JsonRejection>) -> Result<Queued, ApiError> {
    let Json(g) = json_body(body)?;
    enqueue_checked(s, g, None)
}

/// The JSON body, or the reason it is not one.
fn json_body(body: Result<Json<Generation>, JsonRejection>) -> Result<Json<Generation>, ApiError> {
    body.map_err(|e| {
        // A body too large stays 413; everything else about the body is a 400, as OpenAI
        // answers (axum's 415 and 422 included).
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        api::undecodable(status, &e.body_text())
    })
}

/// An upload of `/v1/images/edits`: the image to edit and the optional mask.
struct Uploads {
    /// The image to edit and, for FLUX.2, further references.
    images: Vec<mmdit::RgbImage>,
    mask: Option<mmdit::RgbImage>,
}

/// Checks a request (field by field, then against the model) and queues it.
fn enqueue_checked(
    s: &Shared,
    g: Generation,
    uploads: Option<Uploads>,
) -> Result<Queued, ApiError> {
    let mut checked = g.check(s.cfg.lora_dir.as_deref())?;
    if let Some(u) = uploads {
        let mut images = u.images.into_iter();
        checked.req.image = images.next();
        checked.req.reference_images = images.collect();
        checked.req.mask = u.mask;
    }
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
    let steps = resolved.steps_to_run();
    let (progress_tx, progress) = watch::channel(Progress::queued(checked.n * steps));
    let size = (resolved.width, resolved.height);
    let (partials, stream) = match checked.stream {
        Some(count) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (
                Some(worker::Partials { count, size, tx }),
                Some(Streamed { partials: rx, size }),
            )
        }
        None => (None, None),
    };
    let job = worker::Job {
        req,
        n: checked.n,
        steps,
        encoding: checked.encoding,
        cancel: cancel.clone(),
        reply: tx,
        progress: progress_tx,
        partials,
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
    Ok(Queued {
        rx,
        progress,
        cancel,
        format: checked.format,
        encoding: checked.encoding,
        stream,
    })
}

/// The host a request was sent to, for the `url`s of the answer.
fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

/// The images (files of `format`) as `url`s this server serves for an hour.
fn urls(
    s: &Shared,
    host: &str,
    images: worker::Images,
    format: mmdit::output::Format,
) -> Vec<String> {
    let mut store = s.images.lock().expect("not poisoned");
    images
        .into_iter()
        .map(|file| {
            let id = store.put(file, format);
            format!("http://{host}/v1/images/{id}.{}", format.name())
        })
        .collect()
}

/// `POST /v1/images/edits` (multipart, as OpenAI's): `image` and optional `mask` files, and the
/// generation fields as text (`prompt`, `strength`, `n`, `size`, ...); answered as generations.
async fn edits(
    State(s): State<Shared>,
    headers: HeaderMap,
    form: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not a multipart form: {}", e.body_text()),
        )
    })?;
    let mut fields = serde_json::Map::new();
    let (mut images, mut mask) = (Vec::new(), None);
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(
            e.status(),
            format!("the form cannot be read: {}", e.body_text()),
        )
    };
    while let Some(field) = form.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" | "mask" => {
                let file = field.file_name().unwrap_or(&name).to_string();
                let bytes = field.bytes().await.map_err(bad_form)?;
                let what = if name == "mask" {
                    mmdit::Param::Mask
                } else {
                    mmdit::Param::Image
                };
                let img = mmdit::image_io::read_rgb_bytes(&bytes, &file, what)
                    .map_err(|e| ApiError::from_library(&e))?;
                if name == "mask" {
                    mask = Some(img);
                } else if images.len() == mmdit::request::MAX_IMAGES {
                    return Err(ApiError::bad(
                        "image",
                        format!("give at most {} images", mmdit::request::MAX_IMAGES),
                    ));
                } else {
                    images.push(img);
                }
            }
            _ => {
                let text = field.text().await.map_err(bad_form)?;
                fields.insert(name.clone(), api::form_value(&name, &text)?);
            }
        }
    }
    if images.is_empty() {
        return Err(ApiError::bad(
            "image",
            "image is required: the file to edit",
        ));
    }
    let g: Generation = serde_path_to_error::deserialize(serde_json::Value::Object(fields))
        .map_err(|e| api::undecodable(StatusCode::BAD_REQUEST, &e.to_string()))?;
    let q = enqueue_checked(&s, g, Some(Uploads { images, mask }))?;
    if q.stream.is_some() {
        return Ok(streamed(&s, q, "image_edit", "/v1/images/edits"));
    }
    answer(&s, &headers, q).await
}

async fn generations(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<Generation>, JsonRejection>,
) -> Result<Response, ApiError> {
    let q = enqueue(&s, body)?;
    if q.stream.is_some() {
        return Ok(streamed(
            &s,
            q,
            "image_generation",
            "/v1/images/generations",
        ));
    }
    answer(&s, &headers, q).await
}

/// A streamed request's answer, as OpenAI streams images: Server-Sent Events, a
/// `{kind}.partial_image` event per partial image, then a `{kind}.completed` event per image
/// (each `b64_json`); an `error` event if the job fails. A client that goes away cancels the job.
fn streamed(s: &Shared, mut q: Queued, kind: &'static str, path: &'static str) -> Response {
    let Streamed {
        partials,
        size: (width, height),
    } = q.stream.take().expect("a streamed request");
    let guard = CancelOnDrop {
        cancel: q.cancel.clone(),
        armed: true,
        state: s.clone(),
        t0: Instant::now(),
        path,
    };
    let output_format = q.encoding.format.name();
    let event = move |kind: String, fields: serde_json::Value| {
        let mut data = serde_json::json!({
            "type": kind,
            "created_at": unix_now(),
            "size": format!("{width}x{height}"),
            "quality": "auto",
            "background": "opaque",
            "output_format": output_format,
        });
        if let (Some(d), serde_json::Value::Object(f)) = (data.as_object_mut(), fields) {
            d.extend(f);
        }
        Ok::<_, std::convert::Infallible>(
            Event::default()
                .event(kind)
                .json_data(data)
                .expect("serialisable"),
        )
    };
    /// Where the stream is: sending partial images (until the job ends), or its images.
    enum Phase {
        Partials(
            tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
            usize,
            oneshot::Receiver<mmdit::Result<worker::Images>>,
        ),
        Images(std::vec::IntoIter<Vec<u8>>),
    }
    let b64 = |file: &[u8]| base64::engine::general_purpose::STANDARD.encode(file);
    let stream = futures_util::stream::unfold(
        (Phase::Partials(partials, 0, q.rx), guard),
        move |(mut phase, mut guard)| async move {
            loop {
                match phase {
                    Phase::Partials(mut partials, index, rx) => {
                        if let Some(file) = partials.recv().await {
                            let e = event(
                                format!("{kind}.partial_image"),
                                serde_json::json!({"b64_json": b64(&file), "partial_image_index": index}),
                            );
                            return Some((e, (Phase::Partials(partials, index + 1, rx), guard)));
                        }
                        // The job has ended: its images, or why there are none.
                        let answer = rx.await;
                        guard.armed = false;
                        let failed = match answer {
                            Ok(Ok(images)) => {
                                phase = Phase::Images(images.into_iter());
                                continue;
                            }
                            Ok(Err(e)) => ApiError::from_library(&e),
                            Err(_) => ApiError::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "the model thread ended",
                            ),
                        };
                        let ended = Phase::Images(Vec::new().into_iter());
                        return Some((error_event(&failed), (ended, guard)));
                    }
                    Phase::Images(mut images) => {
                        let file = images.next()?;
                        let e = event(
                            format!("{kind}.completed"),
                            serde_json::json!({"b64_json": b64(&file), "usage": usage()}),
                        );
                        return Some((e, (Phase::Images(images), guard)));
                    }
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// OpenAI's token usage of an image event: this server counts none.
fn usage() -> serde_json::Value {
    serde_json::json!({
        "input_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0
    })
}

/// A failure inside a stream, as OpenAI's clients read one: an `error` event whose data is the
/// error body.
fn error_event(e: &ApiError) -> Result<Event, std::convert::Infallible> {
    Ok(Event::default()
        .event("error")
        .json_data(e.body())
        .expect("serialisable"))
}

/// Waits for a queued request's images (cancelling it if the client goes away) and answers them
/// as OpenAI does.
async fn answer(s: &Shared, headers: &HeaderMap, q: Queued) -> Result<Response, ApiError> {
    let mut guard = CancelOnDrop {
        cancel: q.cancel,
        armed: true,
        state: s.clone(),
        t0: Instant::now(),
        path: "/v1/images/generations",
    };
    let answer = q.rx.await;
    guard.armed = false;
    let images = answer
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the model thread ended"))?
        .map_err(|e| ApiError::from_library(&e))?;
    let data: Vec<serde_json::Value> = match q.format {
        Format::B64Json => images
            .iter()
            .map(|file| {
                serde_json::json!({
                    "b64_json": base64::engine::general_purpose::STANDARD.encode(file)
                })
            })
            .collect(),
        Format::Url => urls(s, &host(headers), images, q.encoding.format)
            .into_iter()
            .map(|u| serde_json::json!({ "url": u }))
            .collect(),
    };
    let output_format = q.encoding.format.name();
    Ok(Json(serde_json::json!({
        "created": unix_now(),
        "data": data,
        "output_format": output_format
    }))
    .into_response())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A job started by `POST /v1/jobs`.
#[derive(Clone)]
struct JobEntry {
    created: Instant,
    progress: watch::Receiver<Progress>,
    /// Set once the job has ended and its images are served.
    finished: watch::Receiver<Option<Finished>>,
    cancel: Arc<AtomicBool>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Finished {
    status: &'static str,
    /// The images' `url`s.
    data: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
}

/// `POST /v1/jobs`: the generation body, queued; answers 202 with the job's id at once. The
/// images are served as `url`s when it is done.
async fn create_job(
    State(s): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<Generation>, JsonRejection>,
) -> Result<Response, ApiError> {
    let q = enqueue(&s, body)?;
    let id = format!("job-{:032x}", rand::random::<u128>());
    let (finished_tx, finished) = watch::channel(None);
    {
        let mut jobs = s.jobs.lock().expect("not poisoned");
        jobs.retain(|_, j| j.created.elapsed() < URL_TTL);
        if jobs.len() >= JOBS_MAX {
            let oldest = jobs
                .iter()
                .filter(|(_, j)| j.finished.borrow().is_some())
                .min_by_key(|(_, j)| j.created)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                jobs.remove(&k);
            }
        }
        jobs.insert(
            id.clone(),
            JobEntry {
                created: Instant::now(),
                progress: q.progress.clone(),
                finished,
                cancel: q.cancel.clone(),
            },
        );
    }
    let (state, host, format) = (s.clone(), host(&headers), q.encoding.format);
    tokio::spawn(async move {
        let done = match q.rx.await {
            Ok(Ok(images)) => Finished {
                status: "done",
                data: urls(&state, &host, images, format)
                    .into_iter()
                    .map(|u| serde_json::json!({ "url": u }))
                    .collect(),
                error: None,
            },
            Ok(Err(mmdit::Error::Interrupted)) => Finished {
                status: "cancelled",
                data: Vec::new(),
                error: None,
            },
            Ok(Err(e)) => Finished {
                status: "failed",
                data: Vec::new(),
                error: Some(error_body(&ApiError::from_library(&e))),
            },
            Err(_) => Finished {
                status: "failed",
                data: Vec::new(),
                error: Some(serde_json::json!({"message": "the model thread ended"})),
            },
        };
        finished_tx.send_replace(Some(done));
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{id}"))],
        Json(serde_json::json!({"id": id, "status": "queued"})),
    )
        .into_response())
}

fn error_body(e: &ApiError) -> serde_json::Value {
    serde_json::json!({"message": e.message, "param": e.param, "code": e.status.as_u16()})
}

/// The job `id`'s handles (404 when there is none).
fn job(s: &Shared, id: &str) -> Result<JobEntry, ApiError> {
    s.jobs
        .lock()
        .expect("not poisoned")
        .get(id)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no job {id}: jobs are kept for an hour"),
            )
        })
}

/// A job's state: its progress while it runs, then its end and images.
fn job_view(id: &str, progress: &Progress, finished: Option<&Finished>) -> serde_json::Value {
    let mut v = serde_json::json!({"id": id});
    let fields = match finished {
        Some(f) => serde_json::json!({
            "status": f.status, "step": progress.step, "total": progress.total,
            "elapsed": progress.elapsed, "data": f.data, "error": f.error,
            "preview": progress.preview,
        }),
        // The worker's last word comes before the images are served: still running until then.
        None if progress.is_final() => serde_json::json!({
            "status": "running", "step": progress.step, "total": progress.total,
            "elapsed": progress.elapsed, "preview": progress.preview,
        }),
        None => serde_json::to_value(progress).expect("serialisable"),
    };
    if let (Some(v), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        v.extend(f);
    }
    v
}

async fn get_job(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let j = job(&s, &id)?;
    let p = j.progress.borrow().clone();
    let f = j.finished.borrow().clone();
    Ok(Json(job_view(&id, &p, f.as_ref())).into_response())
}

/// `DELETE /v1/jobs/{id}`: cancels the job (at its next step, or before it starts).
async fn cancel_job(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let j = job(&s, &id)?;
    j.cancel.store(true, Ordering::SeqCst);
    let p = j.progress.borrow().clone();
    let f = j.finished.borrow().clone();
    Ok(Json(job_view(&id, &p, f.as_ref())).into_response())
}

/// `GET /v1/jobs/{id}/events`: Server-Sent Events, a `progress` event at every step (status,
/// step, total, elapsed), then one `done`, `failed` or `cancelled` event with the job's state and
/// images, and the stream ends.
async fn job_events(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let j = job(&s, &id)?;
    let stream = futures_util::stream::unfold(
        (j.progress, j.finished, id, false),
        |(mut progress, mut finished, id, ended)| async move {
            if ended {
                return None;
            }
            // The job's end, once its images are served.
            let end = finished.borrow_and_update().clone();
            if let Some(f) = end {
                let p = progress.borrow().clone();
                let event = Event::default()
                    .event(f.status)
                    .json_data(job_view(&id, &p, Some(&f)))
                    .expect("serialisable");
                return Some((Ok(event), (progress, finished, id, true)));
            }
            let p = progress.borrow_and_update().clone();
            if p.is_final() {
                // Wait for the images, then report the end.
                let _ = finished.changed().await;
                let f = finished.borrow_and_update().clone()?;
                let event = Event::default()
                    .event(f.status)
                    .json_data(job_view(&id, &p, Some(&f)))
                    .expect("serialisable");
                return Some((Ok(event), (progress, finished, id, true)));
            }
            let event = Event::default()
                .event("progress")
                .json_data(job_view(&id, &p, None))
                .expect("serialisable");
            // The next change of either; a closed channel ends the wait too.
            tokio::select! {
                _ = progress.changed() => {}
                _ = finished.changed() => {}
            }
            Some((Ok(event), (progress, finished, id, false)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn url_image(State(s): State<Shared>, UrlPath(file): UrlPath<String>) -> Response {
    // The id without its extension (ids have no dot), served in the format it was made in.
    let id = file.split_once('.').map_or(file.as_str(), |(id, _)| id);
    match s.images.lock().expect("not poisoned").get(id) {
        Some((bytes, format)) => ([(header::CONTENT_TYPE, format.mime())], bytes).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no image {file}: `url` images are kept for an hour"),
        )
        .into_response(),
    }
}

/// Images answered by `url`: kept for [`URL_TTL`], at most [`URL_MAX`] of them and [`URL_BYTES`]
/// in all (the oldest go first).
#[derive(Default)]
struct UrlImages {
    images: HashMap<String, UrlImage>,
}

/// An image file kept for its `url`: when it was made, its bytes and their format.
type UrlImage = (Instant, Vec<u8>, mmdit::output::Format);

impl UrlImages {
    fn put(&mut self, file: Vec<u8>, format: mmdit::output::Format) -> String {
        self.images.retain(|_, (t, _, _)| t.elapsed() < URL_TTL);
        let bytes =
            |m: &HashMap<String, UrlImage>| m.values().map(|(_, f, _)| f.len()).sum::<usize>();
        while !self.images.is_empty()
            && (self.images.len() >= URL_MAX || bytes(&self.images) + file.len() > URL_BYTES)
        {
            let oldest = self
                .images
                .iter()
                .min_by_key(|(_, (t, _, _))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.images.remove(&k),
                None => break,
            };
        }
        let id = format!("img-{:032x}", rand::random::<u128>());
        self.images
            .insert(id.clone(), (Instant::now(), file, format));
        id
    }

    fn get(&self, id: &str) -> Option<(Vec<u8>, mmdit::output::Format)> {
        self.images
            .get(id)
            .filter(|(t, _, _)| t.elapsed() < URL_TTL)
            .map(|(_, file, format)| (file.clone(), *format))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `url` images stay within both caps, the oldest going first.
    #[test]
    fn url_images_keep_within_their_count_and_bytes() {
        let mut store = UrlImages::default();
        let first = store.put(vec![0; 10], mmdit::output::Format::Png);
        for _ in 0..URL_MAX {
            store.put(vec![0; 10], mmdit::output::Format::Png);
        }
        assert_eq!(store.images.len(), URL_MAX);
        assert!(store.get(&first).is_none(), "the oldest went first");
        let big = store.put(vec![0; URL_BYTES / 2], mmdit::output::Format::Png);
        let bigger = store.put(vec![0; URL_BYTES / 2 + 1], mmdit::output::Format::Png);
        assert!(store.get(&big).is_none() && store.get(&bigger).is_some());
        let total: usize = store.images.values().map(|(_, f, _)| f.len()).sum();
        assert!(total <= URL_BYTES);
    }
}
