//! Finding the onnxruntime shared library the agent's `infer` will load, and its version.

use serde::Serialize;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct OnnxRuntime {
    pub path: String,
    /// From the library itself (`OrtGetApiBase()->GetVersionString()`), when it loads.
    pub version: Option<String>,
    pub error: Option<String>,
}

const SEARCH_DIRS: &[&str] = &[
    "/usr/local/lib",
    "/usr/lib",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/opt/onnxruntime/lib",
];

/// `ORT_DYLIB_PATH` (as `ort`'s load-dynamic uses it), else the usual library dirs.
pub fn find_onnxruntime() -> Option<OnnxRuntime> {
    let path = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| SEARCH_DIRS.iter().find_map(|d| lib_in(Path::new(d))))?;
    let (version, error) = match version_of(&path) {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    Some(OnnxRuntime {
        path: path.display().to_string(),
        version,
        error,
    })
}

fn lib_in(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.into_iter().next()
}

#[repr(C)]
struct OrtApiBase {
    get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
    get_version_string: unsafe extern "C" fn() -> *const c_char,
}

/// Loads the library and asks it for its version: proof that it loads on this host.
#[allow(unsafe_code)]
fn version_of(path: &Path) -> Result<String, String> {
    // SAFETY: onnxruntime's C entry point `OrtGetApiBase` takes no arguments and returns a
    // pointer to a static struct of function pointers, stable across all ORT versions; the
    // version string it returns is static and NUL-terminated. The library stays loaded for
    // the life of `lib`, which outlives every use of the pointers.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
        let get_base: libloading::Symbol<'_, unsafe extern "C" fn() -> *const OrtApiBase> =
            lib.get(b"OrtGetApiBase\0").map_err(|e| e.to_string())?;
        let base = get_base();
        if base.is_null() {
            return Err("OrtGetApiBase returned null".into());
        }
        let v = ((*base).get_version_string)();
        if v.is_null() {
            return Err("GetVersionString returned null".into());
        }
        Ok(CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where `cargo xtask` set ORT_DYLIB_PATH (CI always does).
    #[test]
    fn reports_the_version_of_the_configured_library() {
        let Some(path) = std::env::var_os("ORT_DYLIB_PATH") else {
            eprintln!("skipped: ORT_DYLIB_PATH not set (run through `cargo xtask test`)");
            return;
        };
        let ort = find_onnxruntime().expect("ORT_DYLIB_PATH points at a file");
        assert_eq!(Path::new(&ort.path), Path::new(&path));
        let v = ort
            .version
            .unwrap_or_else(|| panic!("load failed: {:?}", ort.error));
        // The file name carries the version too (libonnxruntime.so.1.32.0).
        assert!(
            ort.path.ends_with(&v) || v.split('.').count() == 3,
            "odd version {v}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_library_reports_an_error() {
        let f = std::env::temp_dir().join(format!("libonnxruntime.so.fake-{}", std::process::id()));
        std::fs::write(&f, b"not an ELF").unwrap();
        assert!(version_of(&f).is_err());
        std::fs::remove_file(&f).unwrap();
    }
}
