//! ferrotune's own CPU kernels (trainer/csrc, compiled by trainer/build.rs), bound for the model: RMSNorm
//! forward and backward in one pass each (`csrc/rms_norm.cpp`), a libtorch autograd function that rounds
//! where transformers' composite rounds. Not the model's choice of when to use them (`model.rs` calls
//! [`rms_norm`] and keeps the composite for whatever it declines), and nothing for CUDA.

use tch::{Device, Kind, Tensor};

/// Whether the fused RMSNorm is in use: in this build (libtorch's headers declared custom autograd
/// functions), and not switched off with `FERROTUNE_RMS_NORM=composite` (for comparing the two, or as
/// an escape hatch).
pub fn fused_rms_norm_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(ferrotune_rms_norm) && std::env::var("FERROTUNE_RMS_NORM").map_or(true, |v| v != "composite")
    })
}

/// Whether a model computing in `kind` on `device` runs its norms through the fused kernel (what
/// [`rms_norm`] does for a model's own tensors, and what the memory plan counts).
pub fn fused_rms_norm_applies(device: Device, kind: Kind) -> bool {
    fused_rms_norm_enabled() && device == Device::Cpu && matches!(kind, Kind::Float | Kind::BFloat16)
}

/// RMSNorm of `x` (..., C) times `w` (C,) with the fused kernel, when it applies: both on CPU, both
/// fp32 or both bf16, and the kernel enabled. None otherwise (the caller computes the composite).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
    let kind = x.kind();
    if !fused_rms_norm_applies(x.device(), kind)
        || w.device() != Device::Cpu
        || w.kind() != kind
        || w.dim() != 1
        || x.dim() == 0
        || x.size().last() != Some(&w.size()[0])
        || w.size()[0] == 0
    {
        return None;
    }
    fused(&x.contiguous(), &w.contiguous(), eps)
}

#[cfg(ferrotune_rms_norm)]
unsafe extern "C" {
    fn ferrotune_rms_norm(
        x: *mut torch_sys::C_tensor,
        w: *mut torch_sys::C_tensor,
        eps: f64,
    ) -> *mut torch_sys::C_tensor;
    fn ferrotune_rms_norm_error() -> *const std::ffi::c_char;
}

#[cfg(ferrotune_rms_norm)]
fn fused(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
    // SAFETY: both handles are live `at::Tensor*` for the call; the result is a new handle we own.
    let y = unsafe { ferrotune_rms_norm(x.as_ptr() as *mut _, w.as_ptr() as *mut _, eps) };
    if y.is_null() {
        // Every condition the kernel checks was checked above: reaching this is a bug, not bad input.
        let why = unsafe { std::ffi::CStr::from_ptr(ferrotune_rms_norm_error()) };
        panic!("fused rms_norm of x {:?} {:?} with w {:?}: {}", x.size(), x.kind(), w.size(), why.to_string_lossy());
    }
    Some(unsafe { Tensor::from_ptr(y) })
}

#[cfg(not(ferrotune_rms_norm))]
fn fused(_: &Tensor, _: &Tensor, _: f64) -> Option<Tensor> {
    None
}
