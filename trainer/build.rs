//! Build script shared by every package that links libtorch (the trainer crate and the `ferrotune`
//! binary): bakes libtorch's directory into the binary's run path so that users never set
//! `LD_LIBRARY_PATH`. It does not locate libtorch itself; `torch-sys` does that (from the Python
//! environment when `LIBTORCH_USE_PYTORCH=1`) and hands the directory over through `links` metadata.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let lib = lib.to_string_lossy();
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // The torch wheel keeps NCCL and the CUDA runtime in sibling `nvidia/*/lib` folders; libtorch
        // finds those through its own run path, so nothing more is needed here.
        // Keep libtorch_cuda even though no symbol of it is referenced, so CUDA devices are visible.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-env=FERROTUNE_LIBTORCH_LIB={lib}");
    }
}
