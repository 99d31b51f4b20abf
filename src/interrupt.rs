//! A process-wide interrupt flag: the CLI sets it on Ctrl-C, pipelines check it between steps and stop
//! with [`Error::Interrupted`](crate::Error::Interrupted).

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks running pipelines to stop at the next step boundary.
pub fn request() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with `Error::Interrupted` when a stop was requested.
pub fn check() -> crate::Result<()> {
    if requested() {
        Err(crate::Error::Interrupted)
    } else {
        Ok(())
    }
}
