//! Build script shared by every package that links libtorch (the trainer crate and the `ferrotune`
//! package): bakes libtorch's directory into the run path of what links it, so that users never set
//! `LD_LIBRARY_PATH`. It does not locate libtorch itself; `torch-sys` does that (from the Python
//! environment when `LIBTORCH_USE_PYTORCH=1`) and hands the directory over through `links` metadata.
//! In the `ferrotune` package only the `ferrotune-worker` binary and the benches link libtorch; the front
//! binary does not, so that it can report a missing libtorch itself.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo::rustc-check-cfg=cfg(ferrotune_cuda_stats)");
    println!("cargo::rustc-check-cfg=cfg(ferrotune_profiler)");
    println!("cargo::rustc-check-cfg=cfg(ferrotune_fused_adamw)");
    println!("cargo::rustc-check-cfg=cfg(ferrotune_kernels)");
    println!("cargo::rustc-check-cfg=cfg(ferrotune_sdp)");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else { return };
    let lib = lib.to_string_lossy();
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("ferrotune-trainer") {
        cuda_memory_shim(std::path::Path::new(lib.as_ref()));
        profiler_shim(std::path::Path::new(lib.as_ref()));
        fused_adamw_shim(std::path::Path::new(lib.as_ref()));
        kernels_shim(std::path::Path::new(lib.as_ref()));
        sdp_shim(std::path::Path::new(lib.as_ref()));
    }
    // Keep libtorch (and through it libtorch_cuda) even though no symbol of it is referenced directly,
    // so that CUDA devices are visible.
    let mut args = vec![format!("-Wl,-rpath,{lib}"), "-Wl,--no-as-needed".into(), "-ltorch".into()];
    // NCCL: the wheel ships nvidia/nccl/lib/libnccl.so.2, which cudarc (looking for libnccl.so) does not
    // find. A `libnccl.so` link to it in a private directory on the run path fixes that; dlopen then
    // maps the same file libtorch_cuda loaded.
    let nccl = std::path::Path::new(lib.as_ref()).join("../../nvidia/nccl/lib/libnccl.so.2");
    if let (Ok(target), Some(out)) = (nccl.canonicalize(), std::env::var_os("OUT_DIR")) {
        let dir = std::path::Path::new(&out).join("nccl");
        let link = dir.join("libnccl.so");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::remove_file(&link);
        if std::os::unix::fs::symlink(&target, &link).is_ok() {
            args.push(format!("-Wl,-rpath,{}", dir.display()));
        }
    }
    let front_package = std::env::var("CARGO_PKG_NAME").as_deref() == Ok("ferrotune");
    for arg in args {
        if front_package {
            println!("cargo:rustc-link-arg-bin=ferrotune-worker={arg}");
            println!("cargo:rustc-link-arg-benches={arg}");
        } else {
            println!("cargo:rustc-link-arg={arg}");
        }
    }
    println!("cargo:rustc-env=FERROTUNE_LIBTORCH_LIB={lib}");
}

/// Compiles csrc/cuda_memory.cpp (the CUDA caching allocator's statistics) when libtorch was built with
/// CUDA and its c10 has the device-agnostic allocator interface (torch 2.9 and later), and sets
/// `cfg(ferrotune_cuda_stats)`. Without them memory on CUDA falls back to the driver's view.
fn cuda_memory_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/cuda_memory.cpp");
    let include = lib.join("../include");
    let header = std::fs::read_to_string(include.join("c10/core/CachingDeviceAllocator.h")).unwrap_or_default();
    if !lib.join("libtorch_cuda.so").exists() || !header.contains("getDeviceAllocator") {
        return;
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .flag("-std=c++17")
        .include(&include)
        .file("csrc/cuda_memory.cpp")
        .compile("ferrotune_cuda_memory");
    println!("cargo:rustc-cfg=ferrotune_cuda_stats");
}

/// Compiles csrc/profiler.cpp (libtorch's Kineto operator profiler, for `profile.rs`) when libtorch's
/// headers declare it, and sets `cfg(ferrotune_profiler)`; without it profiling reports that it is absent.
fn profiler_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/profiler.cpp");
    let include = lib.join("../include");
    let header = std::fs::read_to_string(include.join("torch/csrc/autograd/profiler_kineto.h")).unwrap_or_default();
    if !header.contains("disableProfiler") || !header.contains("struct TORCH_API KinetoEvent") {
        return;
    }
    compile_shim(&include, &["csrc/profiler.cpp"], "ferrotune_profiler", true);
    println!("cargo:rustc-cfg=ferrotune_profiler");
}

/// Compiles csrc/fused_adamw.cpp (libtorch's fused AdamW kernel, for `optim.rs`) when libtorch's
/// headers declare `aten::_fused_adamw_`, and sets `cfg(ferrotune_fused_adamw)`; without it the
/// optimizer runs its elementwise operations one by one.
fn fused_adamw_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/fused_adamw.cpp");
    let include = lib.join("../include");
    let header = std::fs::read_to_string(include.join("ATen/ops/_fused_adamw.h")).unwrap_or_default();
    if !header.contains("inline void _fused_adamw_(at::TensorList self") {
        return;
    }
    compile_shim(&include, &["csrc/fused_adamw.cpp"], "ferrotune_fused_adamw", false);
    println!("cargo:rustc-cfg=ferrotune_fused_adamw");
}

/// Compiles csrc/sdp.cpp (the flags choosing SDPA's fused CUDA kernels, for `sdp.rs`) when libtorch's
/// ATen/Context.h declares them, and sets `cfg(ferrotune_sdp)`; without it SDPA keeps libtorch's order.
fn sdp_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/sdp.cpp");
    let include = lib.join("../include");
    let header = std::fs::read_to_string(include.join("ATen/Context.h")).unwrap_or_default();
    if !header.contains("setSDPUseCuDNN") || !header.contains("userEnabledCuDNNSDP") {
        return;
    }
    compile_shim(&include, &["csrc/sdp.cpp"], "ferrotune_sdp", false);
    println!("cargo:rustc-cfg=ferrotune_sdp");
}

/// Compiles ferrotune's own CPU kernels (csrc/rms_norm.cpp, swiglu.cpp, rope.cpp and what they share,
/// libtorch autograd functions for `kernels.rs`) when libtorch's headers declare custom autograd
/// functions, and sets `cfg(ferrotune_kernels)`; without it the model runs the composites of libtorch
/// operations.
fn kernels_shim(lib: &std::path::Path) {
    let files = ["csrc/common.cpp", "csrc/rms_norm.cpp", "csrc/swiglu.cpp", "csrc/rope.cpp"];
    for file in files.iter().chain(&["csrc/common.h"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let include = lib.join("../include");
    let header = std::fs::read_to_string(include.join("torch/csrc/autograd/custom_function.h")).unwrap_or_default();
    if !header.contains("needs_input_grad") {
        return;
    }
    let openmp = openmp(lib);
    let mut build = shim_build(&include, true);
    if openmp {
        build.flag("-fopenmp");
    }
    build.files(files).compile("ferrotune_kernels");
    println!("cargo:rustc-cfg=ferrotune_kernels");
}

/// Whether libtorch runs `at::parallel_for` on OpenMP (its headers' ATen/Config.h), and if so, links
/// the OpenMP runtime libtorch itself loads. `at::parallel_for` is inline: compiled in a shim without
/// `-fopenmp`, its `#pragma omp parallel` is dropped and every kernel runs on one thread. With it, the
/// shim calls into libgomp, and must call into the same one as libtorch (the wheel's own
/// `torch/lib/libgomp.so.1`, found on the run path baked in above), never a second runtime with a pool
/// of its own.
fn openmp(lib: &std::path::Path) -> bool {
    let config = std::fs::read_to_string(lib.join("../include/ATen/Config.h")).unwrap_or_default();
    if !config.contains("#define AT_PARALLEL_OPENMP 1") {
        return false;
    }
    // Found on the search path torch-sys already gives the link (libtorch's own directory).
    let bundled = std::fs::read_dir(lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libgomp") && n.contains(".so"));
    match bundled {
        Some(name) => println!("cargo:rustc-link-lib=dylib:+verbatim={name}"),
        None => println!("cargo:rustc-link-lib=dylib=gomp"),
    }
    true
}

/// Compiles C++ shims of csrc/ into one library against libtorch's headers under `include` (with the C++
/// API headers when `api`), optimised, without contracting a product and a sum into one FMA (the
/// kernels round as libtorch's elementwise kernels do): the PyPI wheels since torch 2.7 use the C++11
/// ABI, as tch's own build assumes by default (LIBTORCH_CXX11_ABI=0 for an older libtorch).
fn compile_shim(include: &std::path::Path, files: &[&str], name: &str, api: bool) {
    shim_build(include, api).files(files).compile(name);
}

/// The compiler settings of every shim (see [`compile_shim`]).
fn shim_build(include: &std::path::Path, api: bool) -> cc::Build {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).warnings(false).opt_level(3).flag("-std=c++17");
    // Vectorized loops with selects need -fno-trapping-math (exceptions are never trapped; values do not
    // change); -ffp-contract=off keeps a product and a sum rounded twice.
    build.flag("-ffp-contract=off").flag("-fno-trapping-math");
    build.define("_GLIBCXX_USE_CXX11_ABI", abi.as_str()).include(include);
    if api {
        build.include(include.join("torch/csrc/api/include"));
    }
    build
}
