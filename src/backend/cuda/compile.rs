//! NVRTC: compile each `kernels/*.cu` for the device's architecture, cached on disk.
//!
//! The cache key is a hash of the source, the architecture and the options, so an edited
//! kernel or another GPU compiles afresh and nothing stale is ever loaded. Compiling needs only
//! the NVRTC library and the CUDA headers (no GPU), which is how CI checks every kernel.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::CudaError;

/// One kernel file: its name (for errors), its source.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
}

/// One entry of [`SOURCES`]: the file name and its text, embedded at build time.
macro_rules! kernel {
    ($file:literal) => {
        KernelSource {
            file: $file,
            source: include_str!(concat!("kernels/", $file)),
        }
    };
}

/// Every kernel file, embedded at build time.
pub const SOURCES: &[KernelSource] = &[
    kernel!("common.cuh"),
    kernel!("embedding.cu"),
    kernel!("rmsnorm.cu"),
    kernel!("rope.cu"),
    kernel!("swiglu.cu"),
    kernel!("elementwise.cu"),
    kernel!("adamw.cu"),
    kernel!("attention.cu"),
    kernel!("flash_attention.cu"),
    kernel!("classifier.cu"),
];

/// The CUDA include directory: `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let candidates = ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain(std::iter::once(PathBuf::from("/usr/local/cuda")));
    candidates
        .map(|p| p.join("include"))
        .find(|p| p.join("cuda_bf16.h").is_file())
}

/// Where compiled kernels are cached: `$PACKTRAIN_KERNEL_CACHE`, else `$XDG_CACHE_HOME/packtrain/kernels`,
/// else `~/.cache/packtrain/kernels`, else a temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PACKTRAIN_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("packtrain/kernels");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/packtrain/kernels");
    }
    std::env::temp_dir().join("packtrain-kernels")
}

/// NVRTC's name for a compute capability (`sm_90` for Hopper).
pub fn arch_name(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => {
            return Err(CudaError::Unsupported(format!(
                "compute capability {major}.{minor} (packtrain's kernels target sm_80 and newer)"
            )))
        }
    })
}

/// The source NVRTC sees: the shared header pasted in front of the file, so each module
/// compiles on its own without a file-system include of our own headers.
fn full_source(file: &KernelSource) -> String {
    let common = SOURCES
        .iter()
        .find(|s| s.file == "common.cuh")
        .map_or("", |s| s.source);
    if file.file == "common.cuh" {
        return String::new();
    }
    format!("{common}\n#line 1 \"{}\"\n{}", file.file, file.source)
}

/// Compile one kernel file to PTX for `arch`, through the disk cache.
pub fn compile(file: &KernelSource, arch: &'static str) -> Result<Ptx, CudaError> {
    let include = cuda_include_dir().ok_or_else(|| CudaError::Missing {
        what: "the CUDA headers (cuda_bf16.h)".into(),
        hint: "set CUDA_HOME to the CUDA toolkit (its include/ is needed by NVRTC)".into(),
    })?;
    let src = full_source(file);
    let options = ["--std=c++17", "--use_fast_math=false"];
    let key = xxhash_rust::xxh3::xxh3_128(format!("{arch}\0{options:?}\0{src}").as_bytes());
    let cached = cache_dir().join(format!(
        "{}-{arch}-{key:032x}.ptx",
        file.file.trim_end_matches(".cu")
    ));
    if let Ok(text) = std::fs::read_to_string(&cached) {
        return Ok(Ptx::from_src(text));
    }
    // SAFETY: probing for the shared library only dlopens it.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaError::Missing {
            what: "the NVRTC library (libnvrtc.so)".into(),
            hint: "install the CUDA toolkit or put its lib directory on LD_LIBRARY_PATH".into(),
        });
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![include.display().to_string()],
        options: vec!["--std=c++17".into()],
        name: Some(file.file.into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&src, opts).map_err(|e| CudaError::Compile {
        file: file.file,
        log: format!("{e:?}"),
    })?;
    store(&cached, &ptx.to_src());
    Ok(ptx)
}

/// Write the cache entry atomically; a failure only costs a recompile next time.
fn store(path: &Path, ptx: &str) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, ptx).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles for sm_90 through NVRTC. Needs libnvrtc and the CUDA headers
    /// (CI installs them with ../shared/tools/cuda-toolchain.sh); skipped, loudly, without.
    #[test]
    fn every_kernel_compiles_for_sm90_with_nvrtc() {
        // SAFETY: probing for the shared library only dlopens it.
        let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        if !nvrtc || cuda_include_dir().is_none() {
            eprintln!("SKIPPED every_kernel_compiles_for_sm90_with_nvrtc: no NVRTC/CUDA headers here (CI installs them)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("PACKTRAIN_KERNEL_CACHE", dir.path());
        for file in SOURCES.iter().filter(|f| f.file.ends_with(".cu")) {
            let ptx = compile(file, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            assert!(
                ptx.to_src().contains(".entry"),
                "{} has no kernels",
                file.file
            );
        }
    }

    #[test]
    fn unknown_architecture_is_an_error() {
        assert!(arch_name(7, 5).is_err());
        assert_eq!(arch_name(9, 0).unwrap(), "sm_90");
    }
}
