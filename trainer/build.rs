//! Build script shared by every package that links libtorch (the trainer crate and the `ferrotune`
//! package): bakes libtorch's directory into the run path of what links it, so that users never set
//! `LD_LIBRARY_PATH`. It does not locate libtorch itself; `torch-sys` does that (from the Python
//! environment when `LIBTORCH_USE_PYTORCH=1`) and hands the directory over through `links` metadata.
//! In the `ferrotune` package only the `ferrotune-worker` binary and the benches link libtorch; the front
//! binary does not, so that it can report a missing libtorch itself.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else { return };
    let lib = lib.to_string_lossy();
    // Keep libtorch (and through it libtorch_cuda) even though no symbol of it is referenced directly,
    // so that CUDA devices are visible.
    let args = [format!("-Wl,-rpath,{lib}"), "-Wl,--no-as-needed".into(), "-ltorch".into()];
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
