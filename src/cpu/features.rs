//! The one CPU feature switch: what this CPU has, read once, with the `MMDIT_AVX512`, `MMDIT_AVX2`
//! and `MMDIT_AMX` overrides applied. Every kernel choice reads it (the layers in `nn` pick a kernel
//! by it, and the vectorised passes compile their AVX-512 or AVX2 version in only when it says so),
//! so `MMDIT_AVX512=0 MMDIT_AVX2=0` really runs the generic code everywhere and `MMDIT_AMX=0`
//! never touches a tile. One choice is
//! measured rather than read: whether AVX512-BF16's dot product is fast enough here to carry bf16
//! ([`Features::bf16_dot`]).
//!
//! Kernel tests skip, with a line on stderr, where a feature is off; with `MMDIT_REQUIRE_AVX512=1`,
//! `MMDIT_REQUIRE_AMX=1`, `MMDIT_REQUIRE_VNNI=1` or `MMDIT_REQUIRE_AVX512_BF16=1` set (CI sets them where the CPU lists the feature) they fail instead.

use std::sync::OnceLock;

/// The features the kernels may use in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// AVX-512F: the f32 matrix product, attention, convolution and GroupNorm kernels, and the
    /// AVX-512 builds of the vectorised passes. `MMDIT_AVX512=0` turns it off.
    pub avx512: bool,
    /// AVX2 with FMA: the AVX2 builds of the vectorised passes where AVX-512 is off
    /// ([`super::vector_dispatch`]; the same values as the baseline build, computed 8 lanes at a
    /// time). `MMDIT_AVX2=0` turns it off.
    pub avx2: bool,
    /// AMX-BF16 tiles, granted to this process by the OS: the bf16 matrix product and attention.
    /// `MMDIT_AMX=0` turns it off.
    pub amx: bool,
    /// AVX-512 VNNI (with BW), under the AVX-512 switch: the products on GGML blocks
    /// ([`super::qgemm`]). `MMDIT_VNNI=0` turns it off alone.
    pub vnni: bool,
    /// AVX512-BF16 (`vdpbf16ps`) with AVX512BW and VL, under the AVX-512 switch: its kernel
    /// ([`super::dpbf16`]) can run. `MMDIT_AVX512_BF16=0` turns it off alone.
    pub avx512_bf16: bool,
    /// AVX512-BF16 whose dot product does at least 4/5 of the f32 FMA's multiply-adds per second
    /// on this core ([`bf16_dot_pays`], measured once): the bf16 layers, attention and the bf16
    /// VAE's convolutions then run on it where there is no AMX (with AMX, the convolutions whose
    /// c_in is not a multiple of 32 run on it whatever its speed). Where it is slower (Intel's
    /// Sapphire and Emerald Rapids without their AMX tiles: half the FMA's rate; AMD's Zen 4
    /// does twice it), bf16 runs on the f32 kernel with bf16 weights widened exactly, which keeps
    /// about 3/4 of the f32 rate. `MMDIT_BF16_DOT=1` or `=0` sets the choice instead.
    pub bf16_dot: bool,
}

/// This process's features (probed and read from the environment on the first call).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        let avx512_bf16 = enabled("MMDIT_AVX512")
            && enabled("MMDIT_AVX512_BF16")
            && detect_avx512()
            && detect_avx512_bf16();
        Features {
            avx512: enabled("MMDIT_AVX512") && detect_avx512(),
            avx2: enabled("MMDIT_AVX2") && detect_avx2(),
            amx: enabled("MMDIT_AMX") && detect_amx(),
            vnni: enabled("MMDIT_AVX512")
                && enabled("MMDIT_VNNI")
                && detect_avx512()
                && detect_vnni(),
            avx512_bf16,
            bf16_dot: avx512_bf16
                && match std::env::var("MMDIT_BF16_DOT").as_deref() {
                    Ok("1") => true,
                    Ok("0") => false,
                    _ => bf16_dot_pays(),
                },
        }
    })
}

/// An override is off only when set to `0`.
fn enabled(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v != "0")
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_vnni() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn detect_avx512_bf16() -> bool {
    // (With AVX512BW, VL and DQ, which every CPU with AVX512-BF16 has: the bf16 kernels' masked
    // 16-bit stores need the first two, the attention's exponentials `vreduceps`.)
    std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
    false
}

/// Whether `vdpbf16ps` does at least 4/5 of `vfmadd231ps`'s multiply-adds per second here: each
/// timed on 16 independent chains (more than either needs to fill its units) of 4096 steps, best of
/// five alternated runs (a few hundred microseconds in all, once per process). A dot product is
/// two multiply-adds per lane, an FMA one. The rates seen (AMD Zen 4: 2x; Intel Emerald Rapids
/// without AMX: 0.5x) lie far on either side of the threshold, so load on the machine does not
/// move the choice. Only called where AVX-512F and AVX512-BF16 are available.
#[cfg(target_arch = "x86_64")]
fn bf16_dot_pays() -> bool {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    const CHAINS: usize = 16;
    const STEPS: usize = 4096;

    /// # Safety
    /// AVX-512F and AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dots(steps: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        // SAFETY: 512 bits reinterpreted as 32 bf16 (1.0 and 2^-7), which they are.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3c00_3c00)),
            )
        };
        for _ in 0..steps {
            for acc in acc.iter_mut() {
                *acc = _mm512_dpbf16_ps(*acc, a, b);
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)),
        )
    }

    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    unsafe fn fmas(steps: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        let (a, b) = (_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        for _ in 0..steps {
            for acc in acc.iter_mut() {
                *acc = _mm512_fmadd_ps(*acc, a, b);
            }
        }
        _mm512_reduce_add_ps(
            acc.iter()
                .fold(_mm512_setzero_ps(), |s, &v| _mm512_add_ps(s, v)),
        )
    }

    let time = |f: &dyn Fn() -> f32| {
        let t = std::time::Instant::now();
        black_box(f());
        t.elapsed()
    };
    let (mut dot, mut fma) = (std::time::Duration::MAX, std::time::Duration::MAX);
    for _ in 0..5 {
        // SAFETY: only called where both features are available (the caller checks).
        dot = dot.min(time(&|| unsafe { dots(black_box(STEPS)) }));
        // SAFETY: as above.
        fma = fma.min(time(&|| unsafe { fmas(black_box(STEPS)) }));
    }
    // dot rate / fma rate = 2 fma / dot >= 4/5.
    10 * fma.as_nanos() >= 4 * dot.as_nanos()
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_dot_pays() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_amx() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // cpuid is available on every x86_64 CPU (and safe to call since Rust 1.87).
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (amx_bf16, amx_tile) = (edx & (1 << 22) != 0, edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // Linux hands out the 8 KiB tile state only on request; the grant is for the whole process.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with integer arguments only changes this process's permission to use
    // the tile state; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_amx() -> bool {
    false
}

/// For kernel tests: whether `feature` (`"avx512"`, `"amx"`, `"vnni"` or `"avx512_bf16"`) is on. When it is off the test
/// should return early; this says so on stderr, or panics when `MMDIT_REQUIRE_<FEATURE>=1` asks for
/// the feature (a machine that has it must not skip its tests silently).
pub fn test_has(feature: &str) -> bool {
    let f = features();
    let on = match feature {
        "avx512" => f.avx512,
        "amx" => f.amx,
        "vnni" => f.vnni,
        "avx512_bf16" => f.avx512_bf16,
        other => panic!("unknown CPU feature {other:?}"),
    };
    if !on {
        let var = format!("MMDIT_REQUIRE_{}", feature.to_ascii_uppercase());
        assert!(
            std::env::var(&var).map_or(true, |v| v != "1"),
            "{var}=1 but {feature} is not available in this process ({f:?})"
        );
        eprintln!("{feature} not available here: test skipped");
    }
    on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_is_read_once_and_agrees_with_the_cpu() {
        let f = features();
        assert_eq!(f, features());
        assert!(!f.avx512 || detect_avx512());
        if std::env::var("MMDIT_AVX512").is_ok_and(|v| v == "0") {
            assert!(!f.avx512);
        }
        if std::env::var("MMDIT_AVX2").is_ok_and(|v| v == "0") {
            assert!(!f.avx2);
        }
        if std::env::var("MMDIT_AMX").is_ok_and(|v| v == "0") {
            assert!(!f.amx);
        }
        if std::env::var("MMDIT_VNNI").is_ok_and(|v| v == "0") {
            assert!(!f.vnni);
        }
        if std::env::var("MMDIT_AVX512_BF16").is_ok_and(|v| v == "0") {
            assert!(!f.avx512_bf16);
        }
        if std::env::var("MMDIT_BF16_DOT").is_ok_and(|v| v == "0") {
            assert!(!f.bf16_dot);
        }
        assert!(!f.vnni || f.avx512);
        assert!(!f.avx512_bf16 || f.avx512);
        assert!(!f.bf16_dot || f.avx512_bf16);
    }
}
