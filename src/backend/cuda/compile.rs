//! NVRTC: compile each `kernels/*.cu` for the device's architecture, cached on disk.
//!
//! What NVRTC compiles for a file is `common.cuh`, then the file's own headers (see [`kernel!`]:
//! `flash_common.cuh` for the `flash_*.cu` pair), then the file. The cache key is a hash of that
//! whole pasted text, the architecture and the options, so an edited kernel or header or another
//! GPU compiles afresh and nothing stale is ever loaded. Compiling needs only
//! the NVRTC library and the CUDA headers (no GPU), which is how CI checks every kernel.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::CudaError;

/// One kernel file: its name (for errors), its source, and the headers pasted in front of it.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    /// Other `.cuh` entries of [`SOURCES`] pasted, in order, after `common.cuh` and before this
    /// file (which sees them as if it had included them).
    pub headers: &'static [&'static str],
}

/// One entry of [`SOURCES`]: the file name and its text, embedded at build time, and after
/// `=>` the headers (entries of [`SOURCES`] too) it needs besides `common.cuh`.
macro_rules! kernel {
    ($file:literal) => {
        kernel!($file => [])
    };
    ($file:literal => [$($header:literal),* $(,)?]) => {
        KernelSource {
            file: $file,
            source: include_str!(concat!("kernels/", $file)),
            headers: &[$($header),*],
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
    kernel!("flash_common.cuh"),
    kernel!("flash_forward.cu" => ["flash_common.cuh"]),
    kernel!("flash_backward.cu" => ["flash_common.cuh"]),
    kernel!("flash_wgmma.cuh"),
    kernel!("flash_forward_wgmma.cu" => ["flash_common.cuh", "flash_wgmma.cuh"]),
    kernel!("flash_backward_wgmma.cu" => ["flash_common.cuh", "flash_wgmma.cuh"]),
    kernel!("flash_ws.cuh"),
    kernel!("flash_forward_ws.cu" => ["flash_common.cuh", "flash_wgmma.cuh", "flash_ws.cuh"]),
    kernel!("flash_backward_ws.cu" => ["flash_common.cuh", "flash_wgmma.cuh", "flash_ws.cuh"]),
    kernel!("flash_backward_dq_ws.cu" => ["flash_common.cuh", "flash_wgmma.cuh", "flash_ws.cuh"]),
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

/// NVRTC's name for a compute capability. Hopper is `sm_90a`: the architecture-specific target
/// whose PTX may use `wgmma` (flash_forward_wgmma.cu); such PTX loads only on compute
/// capability 9.0, which is the only device it is built for.
pub fn arch_name(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90a",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => {
            return Err(CudaError::Unsupported(format!(
                "compute capability {major}.{minor} (packtrain's kernels target sm_80 and newer)"
            )))
        }
    })
}

/// The source NVRTC sees: `common.cuh`, then the file's own headers, then the file, so each
/// module compiles on its own without a file-system include of our own headers. Each pasted
/// header and the file restart the line count under their own name, so NVRTC's errors point
/// into the right file.
fn full_source(file: &KernelSource) -> Result<String, CudaError> {
    let find = |name: &str| SOURCES.iter().find(|s| s.file == name);
    let common = find("common.cuh").map_or("", |s| s.source);
    if file.file == "common.cuh" {
        return Ok(String::new());
    }
    let mut src = format!("{common}\n");
    for &name in file.headers {
        let header = find(name).ok_or_else(|| CudaError::Compile {
            file: file.file,
            log: format!("header {name} is not in compile::SOURCES"),
        })?;
        src.push_str(&format!("#line 1 \"{name}\"\n{}\n", header.source));
    }
    src.push_str(&format!("#line 1 \"{}\"\n{}", file.file, file.source));
    Ok(src)
}

/// Compile one kernel file to PTX for `arch`, through the disk cache.
pub fn compile(file: &KernelSource, arch: &'static str) -> Result<Ptx, CudaError> {
    let include = cuda_include_dir().ok_or_else(|| CudaError::Missing {
        what: "the CUDA headers (cuda_bf16.h)".into(),
        hint: "set CUDA_HOME to the CUDA toolkit (its include/ is needed by NVRTC)".into(),
    })?;
    let src = full_source(file)?;
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

    /// Every kernel compiles through NVRTC for sm_90a (Hopper, with the wgmma kernels) and for
    /// sm_80 (where those compile to a trap and the mma.sync kernels run). Needs libnvrtc and
    /// the CUDA headers (CI installs them with ../shared/tools/cuda-toolchain.sh); skipped,
    /// loudly, without.
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
        for arch in ["sm_90a", "sm_80"] {
            for file in SOURCES.iter().filter(|f| f.file.ends_with(".cu")) {
                let ptx = compile(file, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
                assert!(
                    ptx.to_src().contains(".entry"),
                    "{} has no kernels",
                    file.file
                );
                if file.file == "flash_forward_ws.cu" {
                    assert_eq!(
                        ptx.to_src().contains("cp.async.bulk.tensor"),
                        arch == "sm_90a",
                        "{arch}: TMA only on sm_90a"
                    );
                }
                if file.file == "flash_forward_wgmma.cu" {
                    assert_eq!(
                        ptx.to_src().contains("wgmma.mma_async"),
                        arch == "sm_90a",
                        "{arch}: wgmma only on sm_90a"
                    );
                }
            }
        }
    }

    /// Every named header exists, and is pasted after common.cuh and before the file.
    #[test]
    fn headers_are_pasted_in_order() {
        for file in SOURCES.iter().filter(|f| f.file.ends_with(".cu")) {
            let src = full_source(file).unwrap_or_else(|e| panic!("{e}"));
            let mut at = src.find("#pragma once").expect("common.cuh first");
            for name in file.headers.iter().chain([&file.file]) {
                let pos = src[at..]
                    .find(&format!("#line 1 \"{name}\""))
                    .unwrap_or_else(|| panic!("{name} not pasted (in order) for {}", file.file));
                at += pos;
            }
        }
        let flash = SOURCES
            .iter()
            .find(|f| f.file == "flash_forward.cu")
            .unwrap();
        assert!(full_source(flash).unwrap().contains("struct FaPipe"));
    }

    #[test]
    fn a_missing_header_is_an_error() {
        let file = KernelSource {
            file: "x.cu",
            source: "",
            headers: &["nope.cuh"],
        };
        assert!(full_source(&file)
            .unwrap_err()
            .to_string()
            .contains("nope.cuh"));
    }

    #[test]
    fn unknown_architecture_is_an_error() {
        assert!(arch_name(7, 5).is_err());
        assert_eq!(arch_name(9, 0).unwrap(), "sm_90a");
    }
}
