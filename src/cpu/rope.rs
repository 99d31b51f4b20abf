//! Rotary position embedding of adjacent channel pairs (Flux's, diffusers'
//! `repeat_interleave_real=True`) on the CPU in one pass: each bf16 or f32 value widened, rotated in
//! f32 and rounded once to its type: the values of candle's f32 `rope_i` on the widened tensor (the
//! same products and sums in the same order; Rust forms no fused multiply-add from them), where that
//! composed path (widen, rotate, round) reads and writes every value three times.

use super::Lane;
use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `x` (planes x s x d, head-major: each plane one (batch, head)) rotated by token: the pair
/// (x0, x1) at channels (2i, 2i + 1) of token t becomes (x0 c - x1 s, x0 s + x1 c) with c, s =
/// `cos[t · d/2 + i]`, `sin[t · d/2 + i]`, in f32, rounded once to T. Panics unless d is even, the
/// tables hold s x d/2 values each and x whole planes of s x d.
pub fn rotate_pairs<T: Pairs>(x: &[T], cos: &[f32], sin: &[f32], s: usize, d: usize) -> Vec<T> {
    assert!(d.is_multiple_of(2), "rotary pairs need an even head width");
    let half = d / 2;
    assert!(
        cos.len() == s * half && sin.len() == s * half,
        "rotary tables are not (tokens, head width / 2)"
    );
    let plane = s * d;
    assert!(
        x.is_empty() || (plane > 0 && x.len().is_multiple_of(plane)),
        "rotary input is not whole planes of tokens x head width"
    );
    if x.is_empty() {
        return Vec::new();
    }
    // A task per run of about 16 Ki values (whole tokens) of one plane, so that one plane (batch 1,
    // one head) still spreads over the threads. Within a run, the pair j of the run's first token
    // t0 takes the tables' entry t0 · d/2 + j.
    let run = (16_384 / d).max(1) * d;
    // SAFETY: each plane's runs partition it, and `rotate` writes every value of its run.
    unsafe {
        super::par_written(x.len(), plane, |p, o| {
            let x = &x[p * plane..][..plane];
            o.par_chunks_mut(run)
                .zip(x.par_chunks(run))
                .enumerate()
                .for_each(|(r, (o, x))| {
                    let first = r * run / 2;
                    let pairs = o.len() / 2;
                    T::rotate(x, o, &cos[first..first + pairs], &sin[first..first + pairs]);
                });
        })
    }
}

/// The element types [`rotate_pairs`] runs on, each with its vectorised row.
pub trait Pairs: Lane {
    /// `o` = the pairs of `x` rotated by `cos`, `sin` (one entry per pair), every value written.
    fn rotate(x: &[Self], o: &mut [MaybeUninit<Self>], cos: &[f32], sin: &[f32]);
}

impl Pairs for f32 {
    fn rotate(x: &[f32], o: &mut [MaybeUninit<f32>], cos: &[f32], sin: &[f32]) {
        rotate_f32(x, o, cos, sin)
    }
}

impl Pairs for bf16 {
    fn rotate(x: &[bf16], o: &mut [MaybeUninit<bf16>], cos: &[f32], sin: &[f32]) {
        rotate_bf16(x, o, cos, sin)
    }
}

super::vector_dispatch!(rotate_f32, rotate_generic::<f32>, (x: &[f32], o: &mut [MaybeUninit<f32>], cos: &[f32], sin: &[f32]));
super::vector_dispatch!(rotate_bf16, rotate_generic::<bf16>, (x: &[bf16], o: &mut [MaybeUninit<bf16>], cos: &[f32], sin: &[f32]));

#[inline(always)]
fn rotate_generic<T: Lane>(x: &[T], o: &mut [MaybeUninit<T>], cos: &[f32], sin: &[f32]) {
    for (((o, x), &c), &s) in o
        .chunks_exact_mut(2)
        .zip(x.chunks_exact(2))
        .zip(cos)
        .zip(sin)
    {
        let (x0, x1) = (x[0].widen(), x[1].widen());
        o[0].write(T::narrow(x0 * c - x1 * s));
        o[1].write(T::narrow(x0 * s + x1 * c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the rotation written out per index, for bf16 and f32, runs that split a plane
    /// (d = 6: 2730 tokens a run) and an odd token count.
    #[test]
    fn rotate_pairs_equals_the_rotation_by_index() {
        let (planes, s, d) = (3, 2731, 6);
        let half = d / 2;
        let angle = |t: usize, i: usize| t as f32 * 0.37 + i as f32;
        let cos: Vec<f32> = (0..s * half)
            .map(|j| angle(j / half, j % half).cos())
            .collect();
        let sin: Vec<f32> = (0..s * half)
            .map(|j| angle(j / half, j % half).sin())
            .collect();
        let x: Vec<f32> = (0..planes * s * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let (got, gotb) = (
            rotate_pairs(&x, &cos, &sin, s, d),
            rotate_pairs(&xb, &cos, &sin, s, d),
        );
        for p in 0..planes {
            for t in 0..s {
                for i in 0..half {
                    let at = (p * s + t) * d + 2 * i;
                    let (c, sn) = (cos[t * half + i], sin[t * half + i]);
                    let (x0, x1) = (x[at], x[at + 1]);
                    assert_eq!(got[at], x0 * c - x1 * sn, "plane {p} token {t} pair {i}");
                    assert_eq!(got[at + 1], x0 * sn + x1 * c);
                    let (b0, b1) = (xb[at].to_f32(), xb[at + 1].to_f32());
                    assert_eq!(gotb[at], bf16::from_f32(b0 * c - b1 * sn));
                    assert_eq!(gotb[at + 1], bf16::from_f32(b0 * sn + b1 * c));
                }
            }
        }
    }
}
