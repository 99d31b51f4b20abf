//! Stop flags that pipelines check between steps, stopping with
//! [`Error::Interrupted`](crate::Error::Interrupted): one for the whole process (the CLI sets it on
//! Ctrl-C), and one per job that a thread runs ([`with_job_flag`]: the server cancels a request
//! without stopping the others).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static JOB: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Asks running pipelines to stop at the next step boundary.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested, for the process or for the job this thread runs.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
        || JOB.with(|j| {
            j.borrow()
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
        })
}

/// Fails with `Error::Interrupted` when a stop was requested.
pub fn check() -> crate::Result<()> {
    if requested() {
        Err(crate::Error::Interrupted)
    } else {
        Ok(())
    }
}

/// Runs `f` with `flag` as this thread's job flag: setting it (from any thread) stops the
/// pipeline `f` runs at its next step, as [`request`] would, but only that one.
pub fn with_job_flag<T>(flag: Arc<AtomicBool>, f: impl FnOnce() -> T) -> T {
    let outer = JOB.with(|j| j.replace(Some(flag)));
    let out = f();
    JOB.with(|j| *j.borrow_mut() = outer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_flag_stops_its_own_thread_only() {
        let flag = Arc::new(AtomicBool::new(false));
        with_job_flag(flag.clone(), || {
            assert!(check().is_ok());
            flag.store(true, Ordering::SeqCst);
            assert!(check().is_err());
            // Another thread, without the flag, runs on.
            assert!(std::thread::spawn(|| check().is_ok()).join().unwrap());
        });
        assert!(check().is_ok());
    }
}
