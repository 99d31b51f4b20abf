//! The one CPU feature switch: what this CPU has, read once, with the `MMDIT_AVX512` and `MMDIT_AMX`
//! overrides applied. Every kernel choice reads it (the layers in `nn` pick a kernel by it, and the
//! vectorised passes compile their AVX-512 version in only when it says so), so `MMDIT_AVX512=0`
//! really runs the generic code everywhere and `MMDIT_AMX=0` never touches a tile.
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
    /// AMX-BF16 tiles, granted to this process by the OS: the bf16 matrix product and attention.
    /// `MMDIT_AMX=0` turns it off.
    pub amx: bool,
    /// AVX-512 VNNI (with BW), under the AVX-512 switch: the products on GGML blocks
    /// ([`super::qgemm`]). `MMDIT_VNNI=0` turns it off alone.
    pub vnni: bool,
    /// AVX512-BF16 (`vdpbf16ps`), under the AVX-512 switch: the bf16 matrix product and attention
    /// where there is no AMX ([`super::dpbf16`]). `MMDIT_AVX512_BF16=0` turns it off alone.
    pub avx512_bf16: bool,
}

/// This process's features (probed and read from the environment on the first call).
pub fn features() -> Features {
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| Features {
        avx512: enabled("MMDIT_AVX512") && detect_avx512(),
        amx: enabled("MMDIT_AMX") && detect_amx(),
        vnni: enabled("MMDIT_AVX512") && enabled("MMDIT_VNNI") && detect_avx512() && detect_vnni(),
        avx512_bf16: enabled("MMDIT_AVX512")
            && enabled("MMDIT_AVX512_BF16")
            && detect_avx512()
            && detect_avx512_bf16(),
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
    std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512_bf16() -> bool {
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
        if std::env::var("MMDIT_AMX").is_ok_and(|v| v == "0") {
            assert!(!f.amx);
        }
        if std::env::var("MMDIT_VNNI").is_ok_and(|v| v == "0") {
            assert!(!f.vnni);
        }
        if std::env::var("MMDIT_AVX512_BF16").is_ok_and(|v| v == "0") {
            assert!(!f.avx512_bf16);
        }
        assert!(!f.vnni || f.avx512);
        assert!(!f.avx512_bf16 || f.avx512);
    }
}
