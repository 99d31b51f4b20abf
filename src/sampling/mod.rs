//! Sampling: sigma schedules (pure functions), ODE solvers over a velocity callback, guidance.

pub mod schedule;
pub mod solvers;

pub use schedule::Schedule;
pub use solvers::{euler, Sampler, Velocity};
