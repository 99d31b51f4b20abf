//! Where the layers of a component read their weights' bytes when the files are mapped: a
//! [`Source`] set around a component's building ([`with_source`]). A layer that packs its weight
//! for a CPU kernel (a linear layer, a convolution) then packs it straight from those bytes, with
//! no tensor copy in between, on its first use: building the layer reads the source once for the
//! dtype and shape only (no byte is touched), and the first use reads it again and packs
//! ([`deferred`]). Loading then reads no weight bytes of these layers, as diffusers'
//! memory-mapped loading does not.

use candle_core::DType;
use std::cell::RefCell;
use std::sync::Arc;

/// `read(name, pages, f)` calls `f(dtype, shape, bytes, done)` with the bytes the weight files
/// store for tensor `name` and returns whether they had it (f32, bf16 or f16). A layer without a
/// packing kernel (CPUs without AVX-512) may read the bytes where they lie on every product. A
/// source must hand out the same bytes every time; [`Pages`] says what becomes of their pages
/// after a visit.
pub type Source = Arc<dyn Fn(&str, Pages, &mut Visit) -> bool + Send + Sync>;

/// What a [`Source`] does with the pages of a weight's bytes once a visit returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Drops them from memory (a file mapping reads them again if they are touched again): the
    /// layer packed a copy, or reads them too rarely to keep them.
    Release,
    /// Keeps them: the layer reads the bytes where they lie on every product.
    Keep,
}

/// What a [`Source`] calls with a weight's dtype, shape and bytes, and `done`: the visitor passes
/// it each part of the bytes it will not read again in this visit, and the source may drop that
/// part's pages from memory (the bytes stay readable: a file mapping reads them again).
pub type Visit<'a> = dyn FnMut(DType, &[usize], &[u8], &dyn Fn(&[u8])) + 'a;

thread_local! {
    static SOURCE: RefCell<Option<Source>> = const { RefCell::new(None) };
}

/// Runs `build` with every layer it makes that packs its weight for a CPU kernel reading the
/// weight's bytes from `source` (when it has them) rather than from its `VarBuilder`, when the
/// layer is first used.
pub fn with_source<T>(source: Option<Source>, build: impl FnOnce() -> T) -> T {
    let outer = SOURCE.with(|s| s.replace(source));
    let out = build();
    SOURCE.with(|s| *s.borrow_mut() = outer);
    out
}

/// The source of the [`with_source`] being built in, if any.
pub(crate) fn current() -> Option<Source> {
    SOURCE.with(|s| s.borrow().clone())
}

/// How a weight is packed on first use: None when its source no longer hands out its bytes.
pub(crate) type Pack<P> = Box<dyn FnOnce() -> Option<P> + Send>;

/// Packing of weight `name` from `source`'s bytes by `pack(dtype, bytes, done)`, for when it is
/// first used (`done` as in [`Visit`]).
pub(crate) fn deferred<P: Send + 'static>(
    source: Source,
    name: String,
    pack: impl FnOnce(DType, &[u8], &dyn Fn(&[u8])) -> Option<P> + Send + 'static,
) -> Pack<P> {
    Box::new(move || {
        let (mut pack, mut out) = (Some(pack), None);
        source(&name, Pages::Release, &mut |dtype, _, bytes, done| {
            out = pack.take().and_then(|p| p(dtype, bytes, done));
        });
        out
    })
}

/// What a layer says when its source no longer hands out the weight it was built from.
pub(crate) fn changed() -> candle_core::Error {
    candle_core::Error::Msg(
        "a weight file changed while the model was loaded; load the model again".into(),
    )
}
