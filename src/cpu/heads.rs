//! The attention's layout changes between token-major rows (b, n, h, d), as the projections write
//! them, and head-major ones (b, h, n, d), as the attention kernels read them, for several
//! sequences joined along the tokens (MMDiT's image and text streams): each one copy of each value,
//! in parallel, where the composed ops (split the heads, join the streams; merge the heads, split the
//! streams, make each contiguous) copy every value two or three times.

use candle_core::WithDType;
use std::mem::MaybeUninit;

/// Token-major parts `parts[p]` (b, lens[p], h, d) joined along the tokens into one head-major
/// (b, h, Σ lens, d). Panics unless each part holds b · lens[p] · h · d values.
pub fn join_heads<T: WithDType>(
    parts: &[&[T]],
    lens: &[usize],
    b: usize,
    h: usize,
    d: usize,
) -> Vec<T> {
    // SAFETY: every row is copied whole.
    unsafe {
        join_rows(
            parts,
            lens,
            (b, h, d),
            || (),
            |_, _, _, src, row| {
                row.write_copy_of_slice(src);
            },
        )
    }
}

/// What [`join_heads_with`] does to each row of d on its way: each part's RMSNorm (its f32 weight
/// of d, or `None` to leave the part's rows as they are) with `eps`, then the rotary embedding's
/// rotation by joined token (`cos`, `sin`: Σ lens x d/2 each, [`super::rope::rotate_pairs`]'s
/// tables), or none.
pub(crate) struct RowOps<'a> {
    pub norms: &'a [Option<&'a [f32]>],
    pub eps: f32,
    pub rope: Option<(&'a [f32], &'a [f32])>,
}

/// [`join_heads`] with each row normalised and rotated as it is copied ([`RowOps`]): the values of
/// the RMSNorm pass, the join and the rotation one after the other (the same row functions), in one
/// pass over the values instead of three. Panics unless the parts, weights and tables fit.
pub(crate) fn join_heads_with<T: super::rope::Pairs + super::elementwise::RowPasses>(
    parts: &[&[T]],
    lens: &[usize],
    (b, h, d): (usize, usize, usize),
    ops: &RowOps,
) -> Vec<T> {
    assert_eq!(ops.norms.len(), parts.len(), "one norm (or none) per part");
    assert!(
        ops.norms.iter().all(|w| w.is_none_or(|w| w.len() == d)),
        "a norm's weight is not the head width"
    );
    let total: usize = lens.iter().sum();
    let half = d / 2;
    if let Some((cos, sin)) = ops.rope {
        assert!(d.is_multiple_of(2), "rotary pairs need an even head width");
        assert!(
            cos.len() == total * half && sin.len() == total * half,
            "rotary tables are not (tokens, head width / 2)"
        );
    }
    let normed = || vec![T::zero(); d];
    // SAFETY: every row is written whole, by `rotate` (every value of its row) or copied.
    unsafe {
        join_rows(
            parts,
            lens,
            (b, h, d),
            normed,
            |normed, p, token, src, row| {
                let src = match ops.norms[p] {
                    Some(w) => {
                        T::rms_row(src, normed, w, ops.eps);
                        &normed[..]
                    }
                    None => src,
                };
                match ops.rope {
                    Some((cos, sin)) => {
                        let tab = token * half..(token + 1) * half;
                        T::rotate(src, row, &cos[tab.clone()], &sin[tab]);
                    }
                    None => {
                        row.write_copy_of_slice(src);
                    }
                }
            },
        )
    }
}

/// The join of [`join_heads`] and [`join_heads_with`], one (batch, head) plane of Σ lens x d per
/// task: `row(scratch, p, token, src, dst)` writes the joined row `dst` from `src`, part p's row of
/// d for that batch, head and token (`token` counting along the joined sequence); `scratch` is made
/// by `init` once per plane. Panics unless there is one length per part and each part holds
/// b · lens[p] · h · d values.
///
/// # Safety
/// `row` must write every value of `dst`: the result's values are read as initialised.
unsafe fn join_rows<T: Copy + Send + Sync, S>(
    parts: &[&[T]],
    lens: &[usize],
    (b, h, d): (usize, usize, usize),
    init: impl Fn() -> S + Sync,
    row: impl Fn(&mut S, usize, usize, &[T], &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    assert_eq!(parts.len(), lens.len(), "one length per part");
    for (part, &n) in parts.iter().zip(lens) {
        assert_eq!(part.len(), b * n * h * d, "a part's length");
    }
    let total: usize = lens.iter().sum();
    let len = b * h * total * d;
    if len == 0 {
        return Vec::new();
    }
    // SAFETY: each task writes its whole plane: Σ lens = total rows of d, each by `row` (the
    // caller's contract).
    unsafe {
        super::par_written(len, total * d, |plane, dst| {
            let (bi, hi) = (plane / h, plane % h);
            let mut rows = dst.chunks_exact_mut(d);
            let mut scratch = init();
            let mut token = 0;
            for (p, (part, &n)) in parts.iter().zip(lens).enumerate() {
                for t in 0..n {
                    let at = ((bi * n + t) * h + hi) * d;
                    let dst = rows.next().expect("total rows per plane");
                    row(&mut scratch, p, token, &part[at..at + d], dst);
                    token += 1;
                }
            }
        })
    }
}

/// Head-major `x` (b, h, Σ lens, d) split along the tokens into token-major parts (b, lens[p], h,
/// d). Panics unless x holds b · h · Σ lens · d values.
pub fn split_tokens<T: WithDType>(
    x: &[T],
    lens: &[usize],
    b: usize,
    h: usize,
    d: usize,
) -> Vec<Vec<T>> {
    let total: usize = lens.iter().sum();
    assert_eq!(x.len(), b * h * total * d, "the joined length");
    let mut first = 0;
    lens.iter()
        .map(|&n| {
            // One token's row of h x d per task.
            // SAFETY: each task writes its whole row: h heads of d values.
            let out = unsafe {
                super::par_written(b * n * h * d, h * d, |row, dst| {
                    let (bi, t) = (row / n, row % n);
                    for (hi, dst) in dst.chunks_exact_mut(d).enumerate() {
                        let at = ((bi * h + hi) * total + first + t) * d;
                        dst.write_copy_of_slice(&x[at..at + d]);
                    }
                })
            };
            first += n;
            out
        })
        .collect()
}

/// Head-major `x` (b, h, n, d) merged to token-major rows with `extra` (b, n, e) appended to each:
/// (b, n, h·d + e), Flux's single blocks' `cat([merge_heads(attn), mlp], -1)` in one copy. Panics
/// unless x holds b · h · n · d values and extra b · n · e.
pub fn merge_heads_with<T: WithDType>(
    x: &[T],
    extra: &[T],
    (b, h, n, d): (usize, usize, usize, usize),
    e: usize,
) -> Vec<T> {
    assert_eq!(x.len(), b * h * n * d, "the head-major length");
    assert_eq!(extra.len(), b * n * e, "the appended length");
    let width = h * d + e;
    // One token's row per task.
    // SAFETY: each task writes its whole row: h heads of d values, then e values.
    unsafe {
        super::par_written(b * n * width, width, |row, dst| {
            let (bi, t) = (row / n, row % n);
            let (heads, tail) = dst.split_at_mut(h * d);
            for (hi, dst) in heads.chunks_exact_mut(d.max(1)).enumerate() {
                let at = ((bi * h + hi) * n + t) * d;
                dst.write_copy_of_slice(&x[at..at + d]);
            }
            tail.write_copy_of_slice(&extra[row * e..][..e]);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the index arithmetic written out, for odd sizes and an empty part; the two are
    /// inverses.
    #[test]
    fn join_and_split_move_each_value_to_its_place() {
        let (b, h, d) = (2, 3, 5);
        let lens = [4, 0, 7];
        let parts: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                (0..(b * n * h * d) as u32)
                    .map(|i| i + 1000 * p as u32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[u32]> = parts.iter().map(|p| p.as_slice()).collect();
        let joined = join_heads(&refs, &lens, b, h, d);
        let total: usize = lens.iter().sum();
        let mut first = 0;
        for (p, &n) in lens.iter().enumerate() {
            for (bi, hi, t, e) in indices(b, h, n, d) {
                let want = parts[p][((bi * n + t) * h + hi) * d + e];
                assert_eq!(joined[((bi * h + hi) * total + first + t) * d + e], want);
            }
            first += n;
        }
        assert_eq!(split_tokens(&joined, &lens, b, h, d), parts);
    }

    /// Against the index arithmetic written out, for odd sizes.
    #[test]
    fn merge_heads_with_puts_heads_then_the_extra_values() {
        let (b, h, n, d, e) = (2, 3, 5, 4, 7);
        let x: Vec<u32> = (0..(b * h * n * d) as u32).collect();
        let extra: Vec<u32> = (0..(b * n * e) as u32).map(|v| v + 10_000).collect();
        let got = merge_heads_with(&x, &extra, (b, h, n, d), e);
        let width = h * d + e;
        assert_eq!(got.len(), b * n * width);
        for bi in 0..b {
            for t in 0..n {
                let row = &got[(bi * n + t) * width..][..width];
                for hi in 0..h {
                    for k in 0..d {
                        assert_eq!(row[hi * d + k], x[((bi * h + hi) * n + t) * d + k]);
                    }
                }
                assert_eq!(&row[h * d..], &extra[(bi * n + t) * e..][..e]);
            }
        }
        assert_eq!(
            merge_heads_with::<u32>(&[], &[], (0, 3, 5, 4), 7),
            Vec::<u32>::new()
        );
    }

    /// Every (batch, head, token, element) index, in order.
    fn indices(
        b: usize,
        h: usize,
        n: usize,
        d: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..b).flat_map(move |bi| {
            (0..h).flat_map(move |hi| (0..n).flat_map(move |t| (0..d).map(move |e| (bi, hi, t, e))))
        })
    }
}
