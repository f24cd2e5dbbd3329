//! ferrotune's own CPU kernels (trainer/csrc, compiled by trainer/build.rs), bound for the model, each a
//! libtorch autograd function that computes in one pass forward and one backward what a composite of
//! libtorch operations computes in several, rounding where the composite rounds: RMSNorm
//! (`csrc/rms_norm.cpp`), the MLP's silu(gate) * up (`csrc/swiglu.cpp`) and the rotary embedding
//! (`csrc/rope.cpp`). Not the model's choice of when to use them (`model.rs` calls these and keeps the
//! composite for whatever they decline), and nothing for CUDA.
//!
//! `FERROTUNE_COMPOSITE` names kernels to leave out (comma-separated `rms_norm`, `swiglu`, `rope`,
//! `attention`, `stack`, `trim`, or `all`), for comparing the two or as an escape hatch. `attention`,
//! `stack` and `trim` are not csrc kernels but the same kind of choice: short documents' bf16 attention
//! as grouped matrix products (`attention.rs`) instead of libtorch's flash kernel on fp32 copies, frozen
//! q, k, v and gate, up projections as one product each (`model::Stacked`) instead of one per linear,
//! and a step that computes only the positions that can reach the loss (`batch::trimmed`) instead of
//! every position of its rows.

use tch::{Device, Kind, Tensor};

/// One of the fused kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    RmsNorm,
    Swiglu,
    Rope,
    /// `attention::grouped`: libtorch operations, in every build.
    Attention,
    /// `model::Stacked`: libtorch operations, in every build.
    Stack,
    /// `batch::trimmed`: host-side selection of positions, in every build and on every device.
    Trim,
}

impl Kernel {
    pub const ALL: [Kernel; 6] =
        [Kernel::RmsNorm, Kernel::Swiglu, Kernel::Rope, Kernel::Attention, Kernel::Stack, Kernel::Trim];

    /// The name `FERROTUNE_COMPOSITE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::RmsNorm => "rms_norm",
            Kernel::Swiglu => "swiglu",
            Kernel::Rope => "rope",
            Kernel::Attention => "attention",
            Kernel::Stack => "stack",
            Kernel::Trim => "trim",
        }
    }
}

/// The kernels a `FERROTUNE_COMPOSITE` value leaves out, or what is wrong with it.
pub fn parse_composite(value: &str) -> Result<Vec<Kernel>, String> {
    let mut out = vec![];
    for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "all" => out.extend(Kernel::ALL),
            _ => out.push(Kernel::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| {
                format!(
                    "FERROTUNE_COMPOSITE={value}: no kernel `{name}`; name some of rms_norm, swiglu, rope, \
                     attention, stack, trim (comma-separated), or all"
                )
            })?),
        }
    }
    Ok(out)
}

/// The kernels the environment leaves out (read once); an error names a bad `FERROTUNE_COMPOSITE`. The
/// worker checks it at start, so that a typo stops the run instead of quietly timing the fused kernels.
pub fn composite_from_env() -> Result<&'static [Kernel], &'static str> {
    static LEFT_OUT: std::sync::OnceLock<Result<Vec<Kernel>, String>> = std::sync::OnceLock::new();
    let left_out =
        LEFT_OUT.get_or_init(|| std::env::var("FERROTUNE_COMPOSITE").map_or(Ok(vec![]), |v| parse_composite(&v)));
    left_out.as_deref().map_err(String::as_str)
}

/// Whether `kernel` is in use: in this build (libtorch's headers declared custom autograd functions; the
/// grouped attention needs none), and not left out by `FERROTUNE_COMPOSITE`. Called for every norm,
/// MLP, rotation and attention: allocates nothing.
pub fn enabled(kernel: Kernel) -> bool {
    (cfg!(ferrotune_kernels) || matches!(kernel, Kernel::Attention | Kernel::Stack | Kernel::Trim))
        && !composite_from_env().unwrap_or_else(|e| panic!("{e}")).contains(&kernel)
}

/// Whether a model computing in `kind` on `device` runs `kernel` for its own tensors (what the functions
/// below do, and what the memory plan counts): on CPU, in fp32 and bf16, except SwiGLU in bf16. There
/// the composite's own kernels move half the bytes and the fused loop's bf16 conversions cost more than
/// they save: fwd + bwd of (1024, 1536) 3.9 ms fused against 3.4 ms composite on the AVX2 EPYC (fp32:
/// 4.0 against 6.1; not measured on AVX-512). The grouped attention: bf16 only, and only on a CPU with
/// bf16 matrix units (`attention.rs` says why).
pub fn applies(kernel: Kernel, device: Device, kind: Kind) -> bool {
    let kinds: &[Kind] = match kernel {
        Kernel::Swiglu => &[Kind::Float],
        Kernel::RmsNorm | Kernel::Rope => &[Kind::Float, Kind::BFloat16],
        Kernel::Attention if !crate::hardware::cpu_has_bf16_units() => &[],
        Kernel::Attention => &[Kind::BFloat16],
        Kernel::Stack | Kernel::Trim => return enabled(kernel),
    };
    enabled(kernel) && device == Device::Cpu && kinds.contains(&kind)
}

/// RMSNorm of `x` (..., C) times `w` (C,) with the fused kernel, when it applies: both on CPU, both fp32
/// or both bf16, and the kernel enabled. None otherwise (the caller computes the composite).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
    let kind = x.kind();
    if !applies(Kernel::RmsNorm, x.device(), kind)
        || w.device() != Device::Cpu
        || w.kind() != kind
        || w.dim() != 1
        || x.dim() == 0
        || x.size().last() != Some(&w.size()[0])
        || w.size()[0] == 0
    {
        return None;
    }
    ffi::rms_norm(&x.contiguous(), &w.contiguous(), eps)
}

/// silu(a) * b for the MLP's gate `a` and up projection `b` (same shape) with the fused kernel, where
/// the model uses it (`applies`: fp32 on CPU). None otherwise.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    if !applies(Kernel::Swiglu, a.device(), a.kind()) {
        return None;
    }
    swiglu_kernel(a, b)
}

/// The fused SwiGLU in either dtype it computes (fp32 and bf16, both tensors on CPU, of one shape and
/// dtype), whether or not the model uses it there: the tests pin both. None otherwise.
pub fn swiglu_kernel(a: &Tensor, b: &Tensor) -> Option<Tensor> {
    let kind = a.kind();
    if !enabled(Kernel::Swiglu)
        || !matches!(kind, Kind::Float | Kind::BFloat16)
        || [a, b].iter().any(|t| t.device() != Device::Cpu)
        || b.kind() != kind
        || a.size() != b.size()
    {
        return None;
    }
    ffi::swiglu(&a.contiguous(), &b.contiguous())
}

/// x * cos + rotate_half(x) * sin for x (B, H, T, D) and tables (B or 1, T, D) with the fused kernel,
/// when it applies: all on CPU, all fp32 or all bf16, and the kernel enabled. None otherwise. The result
/// keeps x's layout (the projections' (B, T, H, D) seen transposed stays so).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
    let kind = x.kind();
    let (xs, cs) = (x.size(), cos.size());
    if !applies(Kernel::Rope, x.device(), kind)
        || [cos, sin].iter().any(|t| t.device() != Device::Cpu || t.kind() != kind)
        || xs.len() != 4
        || xs[3] % 2 != 0
        || cs.len() != 3
        || sin.size() != cs
        || cs[1] != xs[2]
        || cs[2] != xs[3]
        || (cs[0] != 1 && cs[0] != xs[0])
    {
        return None;
    }
    ffi::rope(x, &cos.contiguous(), &sin.contiguous())
}

#[cfg(ferrotune_kernels)]
mod ffi {
    use tch::Tensor;

    unsafe extern "C" {
        fn ferrotune_rms_norm(
            x: *mut torch_sys::C_tensor,
            w: *mut torch_sys::C_tensor,
            eps: f64,
        ) -> *mut torch_sys::C_tensor;
        fn ferrotune_swiglu(a: *mut torch_sys::C_tensor, b: *mut torch_sys::C_tensor) -> *mut torch_sys::C_tensor;
        fn ferrotune_rope(
            x: *mut torch_sys::C_tensor,
            cos: *mut torch_sys::C_tensor,
            sin: *mut torch_sys::C_tensor,
        ) -> *mut torch_sys::C_tensor;
        fn ferrotune_kernel_error() -> *const std::ffi::c_char;
    }

    fn handle(t: &Tensor) -> *mut torch_sys::C_tensor {
        t.as_ptr() as *mut _
    }

    /// The kernel's result as a tensor we own. Every condition a kernel checks was checked by its caller
    /// in `kernels`: a null result is a bug, not bad input, and panics naming the inputs.
    fn own(y: *mut torch_sys::C_tensor, what: &str, inputs: &[&Tensor]) -> Option<Tensor> {
        if y.is_null() {
            // SAFETY: the kernels leave a NUL-terminated message, alive until this thread's next call.
            let why = unsafe { std::ffi::CStr::from_ptr(ferrotune_kernel_error()) };
            let shapes: Vec<String> = inputs.iter().map(|t| format!("{:?} {:?}", t.size(), t.kind())).collect();
            panic!("fused {what} of {}: {}", shapes.join(", "), why.to_string_lossy());
        }
        // SAFETY: a non-null result is a new `at::Tensor*` that nothing else owns.
        Some(unsafe { Tensor::from_ptr(y) })
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Option<Tensor> {
        // SAFETY: both handles are live `at::Tensor*` for the call.
        own(unsafe { ferrotune_rms_norm(handle(x), handle(w), eps) }, "rms_norm", &[x, w])
    }

    pub fn swiglu(a: &Tensor, b: &Tensor) -> Option<Tensor> {
        // SAFETY: as above.
        own(unsafe { ferrotune_swiglu(handle(a), handle(b)) }, "swiglu", &[a, b])
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
        // SAFETY: as above.
        own(unsafe { ferrotune_rope(handle(x), handle(cos), handle(sin)) }, "rope", &[x, cos, sin])
    }
}

#[cfg(not(ferrotune_kernels))]
mod ffi {
    use tch::Tensor;

    pub fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> Option<Tensor> {
        None
    }
    pub fn swiglu(_: &Tensor, _: &Tensor) -> Option<Tensor> {
        None
    }
    pub fn rope(_: &Tensor, _: &Tensor, _: &Tensor) -> Option<Tensor> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_names_parse_and_a_typo_is_named() {
        assert_eq!(parse_composite("").unwrap(), vec![]);
        assert_eq!(parse_composite("rope, swiglu").unwrap(), vec![Kernel::Rope, Kernel::Swiglu]);
        assert_eq!(parse_composite("all").unwrap(), Kernel::ALL.to_vec());
        let e = parse_composite("rms_norm,silu").unwrap_err();
        assert!(e.contains("`silu`") && e.contains("rms_norm, swiglu, rope"), "{e}");
    }
}
