//! The model's thread: it owns the loaded pipeline and runs one job at a time from a bounded FIFO
//! queue. A job is cancelled through its flag (`interrupt::with_job_flag`), at the next step.

use super::metrics::Metrics;
use mmdit::pipeline::preview::Preview;
use mmdit::{Pipeline, Request};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, watch};

/// Images of one job: files in the job's encoding (a PNG with the parameters that made it).
pub type Images = Vec<Vec<u8>>;

/// One request for `n` images (seeds `req.seed`, +1, ...).
pub struct Job {
    pub req: Request,
    pub n: usize,
    /// Sampling steps per image, as the request resolved (for the progress).
    pub steps: usize,
    /// The images' file format.
    pub encoding: mmdit::output::Encoding,
    pub cancel: Arc<AtomicBool>,
    pub reply: oneshot::Sender<mmdit::Result<Images>>,
    /// Where the job reports its state at each step.
    pub progress: watch::Sender<Progress>,
    /// A streamed request's partial images, where it asked for some.
    pub partials: Option<Partials>,
}

/// Partial images of a streamed request: previews of its first image at `count` steps spread
/// over the run (never its last), at the output size, in the job's encoding. Sent as they are
/// made; the channel closes when the job ends.
pub struct Partials {
    pub count: usize,
    /// The output's width and height.
    pub size: (usize, usize),
    pub tx: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

impl Partials {
    /// Whether the partial images go out after step `i` (0-based) of `steps`: the steps
    /// `ceil(steps * j / (count + 1))` for j = 1..=count, short of the last (fewer where the run
    /// has fewer steps).
    pub fn at(&self, i: usize, steps: usize) -> bool {
        let done = i + 1;
        done < steps && (1..=self.count).any(|j| (steps * j).div_ceil(self.count + 1) == done)
    }
}

/// A job's state as `GET /v1/jobs/{id}` and its event stream report it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    /// queued, running, done, failed or cancelled.
    pub status: &'static str,
    /// Steps done over all the job's images, of `total`.
    pub step: usize,
    pub total: usize,
    /// Seconds since the job started running.
    pub elapsed: f64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The latest preview of the image (a PNG at latent resolution, base64), every few steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

impl Progress {
    pub fn queued(total: usize) -> Self {
        Self {
            status: "queued",
            step: 0,
            total,
            elapsed: 0.0,
            error: None,
            preview: None,
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self.status, "done" | "failed" | "cancelled")
    }
}

/// The sending end of the queue, shared by the handlers.
pub struct Queue {
    tx: SyncSender<Job>,
    /// Jobs waiting (not the one running).
    waiting: Arc<AtomicUsize>,
    capacity: usize,
}

/// The queue was full: the job is handed back.
pub struct Full;

impl Queue {
    /// Queues a job, or refuses it when `capacity` jobs are waiting already.
    pub fn submit(&self, job: Job) -> Result<(), Full> {
        // Counted before the send, so that the worker's decrement never runs first.
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Full);
        }
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(Full)
            }
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    pub fn is_full(&self) -> bool {
        self.waiting() >= self.capacity
    }
}

/// What the worker records in each image, and how often it previews.
pub struct Recorded {
    pub model: String,
    pub dtype: String,
    /// Steps between previews (0: none).
    pub preview_every: usize,
}

/// Starts the model's thread: it loads the pipeline (`ready` is set once it has, and `loaded`
/// told either way), then runs the jobs of a queue of `capacity` waiting jobs. Jobs that arrive
/// after `stopping` is set are answered with `Error::Interrupted` without running; the thread
/// ends when every [`Queue`] is dropped.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    load: super::Load,
    capacity: usize,
    metrics: Arc<Metrics>,
    recorded: Recorded,
    stopping: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    loaded: oneshot::Sender<Result<(), String>>,
) -> (Queue, std::thread::JoinHandle<()>) {
    let (tx, rx) = sync_channel::<Job>(capacity);
    let waiting = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        waiting: waiting.clone(),
        capacity,
    };
    let handle = std::thread::Builder::new()
        .name("mmdit-model".into())
        .spawn(move || {
            let t0 = Instant::now();
            let mut pipe = match load() {
                Ok(p) => p,
                Err(e) => {
                    let _ = loaded.send(Err(e.render(&super::api::api_name)));
                    return;
                }
            };
            let preview = match recorded.preview_every {
                0 => None,
                _ => match mmdit::pipeline::preview::Preview::fit(&mut pipe) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        let _ = loaded.send(Err(format!(
                            "fitting the previews: {}",
                            e.render(&super::api::api_name)
                        )));
                        return;
                    }
                },
            };
            eprintln!("model loaded in {:.1}s", t0.elapsed().as_secs_f64());
            ready.store(true, Ordering::SeqCst);
            let _ = loaded.send(Ok(()));
            run(
                &mut pipe,
                preview.as_ref(),
                rx,
                &waiting,
                &metrics,
                &recorded,
                &stopping,
            )
        })
        .expect("spawning the model thread");
    (queue, handle)
}

fn run(
    pipe: &mut Pipeline,
    preview: Option<&Preview>,
    rx: Receiver<Job>,
    waiting: &AtomicUsize,
    metrics: &Metrics,
    recorded: &Recorded,
    stopping: &AtomicBool,
) {
    while let Ok(job) = rx.recv() {
        waiting.fetch_sub(1, Ordering::SeqCst);
        metrics
            .queue_depth
            .set(waiting.load(Ordering::SeqCst) as i64);
        let total = job.n * job.steps;
        if stopping.load(Ordering::SeqCst) || job.cancel.load(Ordering::SeqCst) {
            job.progress.send_replace(Progress {
                status: "cancelled",
                ..Progress::queued(total)
            });
            let _ = job.reply.send(Err(mmdit::Error::Interrupted));
            continue;
        }
        let t0 = Instant::now();
        let out = mmdit::interrupt::with_job_flag(job.cancel.clone(), || {
            run_job(pipe, preview, &job, metrics, t0, recorded)
        });
        let last = job.progress.borrow().step;
        let (status, error) = match &out {
            Ok(_) => ("done", None),
            Err(mmdit::Error::Interrupted) => ("cancelled", None),
            Err(e) => ("failed", Some(e.render(&super::api::api_name))),
        };
        let preview = job.progress.borrow().preview.clone();
        job.progress.send_replace(Progress {
            status,
            step: last,
            total,
            elapsed: t0.elapsed().as_secs_f64(),
            error,
            preview,
        });
        let _ = job.reply.send(out);
    }
}

/// Sees a job's steps: its progress, the step-time histogram and the previews.
struct Steps<'a> {
    job: &'a Job,
    metrics: &'a Metrics,
    preview: Option<&'a Preview>,
    every: usize,
    /// Steps of the job's earlier images.
    done: usize,
    /// Images of the running batch: each step advances them all.
    batch: usize,
    steps: usize,
    last: Instant,
    t0: Instant,
    image: Option<String>,
}

impl Steps<'_> {
    /// Whether step `i` of the running batch sends a partial image: the job's first image only.
    fn partial_at(&self, i: usize) -> bool {
        self.preview.is_some()
            && self.done == 0
            && self
                .job
                .partials
                .as_ref()
                .is_some_and(|p| p.at(i, self.job.steps))
    }

    fn preview_at(&self, i: usize) -> bool {
        self.preview.is_some() && self.every > 0 && (i + 1).is_multiple_of(self.every)
    }
}

impl Steps<'_> {
    fn report(&self) {
        self.job.progress.send_replace(Progress {
            status: "running",
            step: self.done + self.steps * self.batch,
            total: self.job.n * self.job.steps,
            elapsed: self.t0.elapsed().as_secs_f64(),
            error: None,
            preview: self.image.clone(),
        });
    }
}

impl mmdit::pipeline::sample::Observer for Steps<'_> {
    fn step(&mut self, _: usize) {
        self.metrics
            .step_seconds
            .observe(self.last.elapsed().as_secs_f64());
        self.last = Instant::now();
        self.steps += 1;
        self.report();
    }

    fn wants_prediction(&self, i: usize) -> bool {
        self.preview_at(i) || self.partial_at(i)
    }

    fn prediction(&mut self, i: usize, x0: &candle_core::Tensor) {
        use base64::Engine;
        let Some(Ok(img)) = self.preview.map(|p| p.image(x0)) else {
            return;
        };
        if self.partial_at(i) {
            if let Some(p) = &self.job.partials {
                let (w, h) = p.size;
                let full = mmdit::image_io::lanczos_resize(&img, w, h);
                if let Ok(file) = self.job.encoding.bytes(&full, &[]) {
                    // A client gone away closes the channel; its job is cancelled elsewhere.
                    let _ = p.tx.send(file);
                }
            }
        }
        if self.preview_at(i) {
            if let Ok(png) = mmdit::output::png_bytes(&img, &[]) {
                self.image = Some(base64::engine::general_purpose::STANDARD.encode(png));
            }
        }
    }
}

fn run_job(
    pipe: &mut Pipeline,
    preview: Option<&Preview>,
    job: &Job,
    metrics: &Metrics,
    t0: Instant,
    recorded: &Recorded,
) -> mmdit::Result<Images> {
    let seed = job.req.seed.unwrap_or(0);
    let mut images = Vec::with_capacity(job.n);
    let mut obs = Steps {
        job,
        metrics,
        preview,
        every: recorded.preview_every,
        done: 0,
        batch: 1,
        steps: 0,
        last: Instant::now(),
        t0,
        image: None,
    };
    obs.report();
    // Batched forwards where the size allows ([`Pipeline::batch_size`]).
    let batch = pipe.batch_size(&pipe.resolve(&job.req)?);
    for first in (0..job.n).step_by(batch) {
        let len = batch.min(job.n - first);
        let req = Request {
            seed: Some(seed.wrapping_add(first as u64)),
            ..job.req.clone()
        };
        obs.done = first * job.steps;
        obs.batch = len;
        obs.steps = 0;
        obs.last = Instant::now();
        let out = pipe.generate_batch(&req, len, &mut obs);
        if let Err(mmdit::Error::Interrupted) = out {
            eprintln!(
                "{}",
                serde_json::json!({"event": "cancelled", "image": first, "steps_run": obs.steps})
            );
        }
        for g in out? {
            let text = g.request.parameters(&recorded.model, &recorded.dtype);
            images.push(job.encoding.bytes(&g.image, &text)?);
            metrics.images.inc();
        }
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Partial images spread over the run, never at its last step, fewer where it is short.
    #[test]
    fn partial_images_spread_over_the_steps() {
        let at = |count: usize, steps: usize| -> Vec<usize> {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let p = Partials {
                count,
                size: (8, 8),
                tx,
            };
            (0..steps)
                .filter(|&i| p.at(i, steps))
                .map(|i| i + 1)
                .collect()
        };
        assert_eq!(at(2, 6), [2, 4]);
        assert_eq!(at(3, 8), [2, 4, 6]);
        assert_eq!(at(3, 28), [7, 14, 21]);
        assert_eq!(at(1, 5), [3]);
        assert_eq!(at(3, 2), [1]);
        assert_eq!(at(3, 1), Vec::<usize>::new());
        assert_eq!(at(0, 10), Vec::<usize>::new());
    }
}
