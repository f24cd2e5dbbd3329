//! Which of libtorch's fused attention kernels `scaled_dot_product_attention` may pick on CUDA. On
//! Hopper and Blackwell GPUs libtorch (2.11 and later, with cuDNN newer than 9.15) tries cuDNN's
//! attention first, and cuDNN builds an execution plan for every new shape. ferrotune attends one
//! document at a time, so every document length not seen before builds a plan, forward and backward:
//! profiled on an H200 (Llama-3.1-8B shape, LoRA, rows of 4,096 tokens, `train.profile_step`), the GPU
//! sat idle for three stretches of 44-72 ms inside cuDNN attention calls of one 759 ms step, and a run's
//! steps sped up as lengths repeated (2,983 to 9,043 tok/s over four steps). Flash attention (FA2:
//! bf16, grouped-query heads, causal, head dim up to 256) has no per-shape plan, so on CUDA ferrotune
//! forbids cuDNN's backend (as `torch.backends.cuda.enable_cudnn_sdp(False)` does), unless
//! `FERROTUNE_CUDNN_ATTENTION=1`. Not verified on a GPU after the change (no device time was left):
//! `scripts/gpu-check --profile` lists the attention kernels used. It does not touch CPU attention,
//! which never uses cuDNN, and it is not a kernel.

use tch::Device;

#[cfg(ferrotune_sdp)]
unsafe extern "C" {
    fn ferrotune_sdp_set_cudnn(enabled: i32) -> i32;
    fn ferrotune_sdp_cudnn_enabled() -> i32;
}

/// Whether this build can read and set the flag (libtorch's ATen/Context.h declared it).
pub const AVAILABLE: bool = cfg!(ferrotune_sdp);

/// The environment variable that keeps cuDNN's attention allowed on CUDA.
pub const KEEP_CUDNN_ENV: &str = "FERROTUNE_CUDNN_ATTENTION";

/// Whether SDPA may use cuDNN's attention (None: this build cannot tell).
pub fn cudnn_allowed() -> Option<bool> {
    #[cfg(ferrotune_sdp)]
    {
        // SAFETY: plain call into the shim; failures come back as -1.
        let r = unsafe { ferrotune_sdp_cudnn_enabled() };
        (r >= 0).then_some(r == 1)
    }
    #[cfg(not(ferrotune_sdp))]
    None
}

/// Allows or forbids cuDNN's attention; returns the flag as read back (None: this build cannot set it).
pub fn allow_cudnn(allowed: bool) -> Option<bool> {
    #[cfg(ferrotune_sdp)]
    {
        // SAFETY: plain call into the shim; failures come back as -1.
        let r = unsafe { ferrotune_sdp_set_cudnn(i32::from(allowed)) };
        (r >= 0).then_some(r == 1)
    }
    #[cfg(not(ferrotune_sdp))]
    {
        let _ = allowed;
        None
    }
}

/// Whether `FERROTUNE_CUDNN_ATTENTION`'s value (if set) keeps cuDNN's attention: `1` or `true`.
pub fn keeps_cudnn(env: Option<&str>) -> bool {
    matches!(env.map(str::trim), Some("1" | "true"))
}

/// For work on `device`: on CUDA, forbids cuDNN's attention unless `FERROTUNE_CUDNN_ATTENTION=1`.
/// Returns whether cuDNN's attention is allowed afterwards (None on CPU, or where this build cannot set it).
pub fn configure(device: Device) -> Option<bool> {
    if !device.is_cuda() {
        return None;
    }
    let keep = keeps_cudnn(std::env::var(KEEP_CUDNN_ENV).ok().as_deref());
    let allowed = allow_cudnn(keep);
    tracing::debug!("SDPA on CUDA: cuDNN attention allowed: {allowed:?} ({KEEP_CUDNN_ENV}=1 keeps it)");
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flag libtorch's dispatcher reads is set and read back through the shim (the same global
    /// context a CUDA dispatch reads; CPU builds have it too). On CPU `configure` leaves it alone.
    #[test]
    fn the_cudnn_attention_flag_is_set_and_read_back() {
        // None here means the shim did not build, though libtorch 2.13's ATen/Context.h declares the flag.
        assert_eq!(allow_cudnn(false), Some(false));
        assert_eq!(cudnn_allowed(), Some(false));
        assert_eq!(configure(Device::Cpu), None);
        assert_eq!(cudnn_allowed(), Some(false), "CPU work leaves the flag alone");
        assert_eq!(allow_cudnn(true), Some(true));
        assert_eq!(cudnn_allowed(), Some(true));
        assert!(keeps_cudnn(Some("1")) && keeps_cudnn(Some("true")));
        assert!(!keeps_cudnn(None) && !keeps_cudnn(Some("0")) && !keeps_cudnn(Some("")));
    }
}
