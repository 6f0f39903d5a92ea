//! The run path of this crate's test binaries: `cargo test -p` runs them
//! without `LD_LIBRARY_PATH`, as the root crate's build.rs arranges for its own.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
