//! cuDNN's fused attention on CUDA: `softmax(q kᵀ · scale) v` for bf16 and f16 in one kernel
//! (cuDNN 9's flash attention), without the score matrix that the composed attention writes and
//! reads for every layer. The graph is built by `sdpa.cpp` on the cuDNN frontend's graph API
//! (compiled by `build.rs`), once per shape; a shape cuDNN cannot run gets `None`, and the caller's
//! attention runs instead. `MMDIT_CUDNN_ATTENTION=0` turns it off.

use super::key::Args;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::ffi::{c_char, c_int, c_void};

extern "C" {
    fn mmdit_cudnn_sdpa_prepare(
        device: c_int,
        dtype: c_int,
        shape: *const i64,
        strides: *const i64,
        scale: f32,
        workspace: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    #[allow(clippy::too_many_arguments)]
    fn mmdit_cudnn_sdpa_run(
        device: c_int,
        dtype: c_int,
        shape: *const i64,
        strides: *const i64,
        scale: f32,
        stream: *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        workspace: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// `softmax(q kᵀ · scale) v` on cuDNN, or `None` where it does not apply (not bf16/f16, turned
/// off, or a shape cuDNN cannot run).
///
/// # Shapes
/// q: (b, h, n, d), k and v: (b, h, m, d), each with its last dimension contiguous -> (b, h, n, d),
/// a view of a token-major (b, n, h, d) tensor, so that merging the heads is no copy.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Option<Tensor>> {
    if std::env::var_os("MMDIT_CUDNN_ATTENTION").is_some_and(|s| s == "0")
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
    {
        return Ok(None);
    }
    let Some(dtype) = dtype_code(q.dtype()) else {
        return Ok(None);
    };
    let dev = q.device().as_cuda_device()?;
    let ordinal = dev.cuda_stream().context().ordinal();
    let Some(args) = Args::new(ordinal, dtype, [q.layout(), k.layout(), v.layout()], scale) else {
        return Ok(None);
    };
    dev.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(candle_core::Error::wrap)?;
    if args.prepare()?.is_none() {
        return Ok(None);
    }
    let o = q.apply_op3_no_bwd(k, v, &CudnnSdpa { scale })?; // (b, n, h, d)
    Ok(Some(o.transpose(1, 2)?))
}

/// 1 for bf16, 2 for f16 (as `sdpa.cpp` takes them).
fn dtype_code(dtype: DType) -> Option<c_int> {
    match dtype {
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

impl Args {
    /// The plan's workspace in bytes, built on first use; None where cuDNN cannot run the shape.
    /// The device's context must be current on this thread.
    fn prepare(&self) -> Result<Option<usize>> {
        let mut workspace = 0i64;
        let mut err = [0 as c_char; 512];
        // SAFETY: shape and strides point at 5 and 12 i64s, workspace at an i64 and err at
        // err.len() bytes, all alive for the call; sdpa.cpp reads and writes no further and keeps
        // no pointer.
        let code = unsafe {
            mmdit_cudnn_sdpa_prepare(
                self.device,
                self.dtype,
                self.shape.as_ptr(),
                self.strides.as_ptr(),
                self.scale,
                &mut workspace,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        match code {
            0 => Ok(Some(usize::try_from(workspace).unwrap_or(0))),
            1 => Ok(None),
            _ => Err(ffi_error(&err)),
        }
    }
}

/// The message `sdpa.cpp` wrote (NUL-terminated within the buffer).
fn ffi_error(err: &[c_char]) -> candle_core::Error {
    let bytes: Vec<u8> = err
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    candle_core::Error::Msg(String::from_utf8_lossy(&bytes).into_owned())
}

/// The op whose CUDA forward runs the prepared plan.
struct CudnnSdpa {
    scale: f32,
}

impl CudnnSdpa {
    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        (q, q_l): (&CudaStorage, &Layout),
        (k, k_l): (&CudaStorage, &Layout),
        (v, v_l): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device();
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        let dtype = dtype_code(q.dtype()).ok_or_else(|| unsupported(q.dtype()))?;
        let args = Args::new(ordinal, dtype, [q_l, k_l, v_l], self.scale)
            .ok_or_else(|| candle_core::Error::Msg("cuDNN attention: layouts changed".into()))?;
        stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        let Some(workspace_bytes) = args.prepare()? else {
            candle_core::bail!("cuDNN attention: no plan for {:?}", q_l.shape());
        };
        let (b, h, n, d) = q_l.shape().dims4()?;
        let q = q.as_cuda_slice::<T>()?.slice(q_l.start_offset()..);
        let k = k.as_cuda_slice::<T>()?.slice(k_l.start_offset()..);
        let v = v.as_cuda_slice::<T>()?.slice(v_l.start_offset()..);
        // SAFETY: cuDNN writes every element of o (b·n·h·d values) before anything reads it.
        let mut o = unsafe { dev.alloc::<T>(b * n * h * d)? };
        // SAFETY: as above; cuDNN uses the workspace as scratch.
        let mut workspace = unsafe { dev.alloc::<u8>(workspace_bytes.max(1))? };
        let mut err = [0 as c_char; 512];
        let code = {
            let (q_ptr, _q_guard) = q.device_ptr(&stream);
            let (k_ptr, _k_guard) = k.device_ptr(&stream);
            let (v_ptr, _v_guard) = v.device_ptr(&stream);
            let (o_ptr, _o_guard) = o.device_ptr_mut(&stream);
            let (w_ptr, _w_guard) = workspace.device_ptr_mut(&stream);
            let w_ptr = if workspace_bytes == 0 {
                std::ptr::null_mut()
            } else {
                w_ptr as *mut c_void
            };
            // SAFETY: q, k and v hold b·h·n·d, b·h·m·d and b·h·m·d values at the strides in
            // `args` from their start offsets (the layouts they were checked against), o holds
            // b·n·h·d, the workspace at least the plan's bytes, all on this device and used on
            // `stream`, alive (with their guards) until the work queued on the stream is ordered
            // after; the shape and stride arrays and err are alive for the call.
            unsafe {
                mmdit_cudnn_sdpa_run(
                    args.device,
                    args.dtype,
                    args.shape.as_ptr(),
                    args.strides.as_ptr(),
                    args.scale,
                    stream.cu_stream() as *mut c_void,
                    q_ptr as *const c_void,
                    k_ptr as *const c_void,
                    v_ptr as *const c_void,
                    o_ptr as *mut c_void,
                    w_ptr,
                    err.as_mut_ptr(),
                    err.len(),
                )
            }
        };
        if code != 0 {
            return Err(ffi_error(&err));
        }
        let o = CudaStorage::wrap_cuda_slice(o, dev.clone());
        Ok((o, Shape::from((b, n, h, d))))
    }
}

fn unsupported(dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuDNN attention takes bf16 or f16, not {dtype:?}"))
}

impl CustomOp3 for CudnnSdpa {
    fn name(&self) -> &'static str {
        "cudnn-sdpa"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cuDNN attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let inputs = ((q, q_l), (k, k_l), (v, v_l));
        match q.dtype() {
            DType::BF16 => self.run::<half::bf16>(inputs.0, inputs.1, inputs.2),
            DType::F16 => self.run::<half::f16>(inputs.0, inputs.1, inputs.2),
            dtype => Err(unsupported(dtype)),
        }
    }
}
