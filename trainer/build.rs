//! Records the libtorch version this binary is built against (from `$LIBTORCH/build-version`).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let version = std::env::var("LIBTORCH")
        .ok()
        .and_then(|dir| {
            let p = std::path::Path::new(&dir).join("build-version");
            println!("cargo:rerun-if-changed={}", p.display());
            std::fs::read_to_string(p).ok()
        })
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ZK0_LIBTORCH_VERSION={version}");
}
