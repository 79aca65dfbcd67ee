//! Tensor maps for Hopper's TMA (bulk tensor copies): the driver encodes how a kernel's
//! `cp.async.bulk.tensor` reads a global tensor (shape, strides, box, swizzle), and the kernel
//! takes the 128-byte map by value as a `__grid_constant__` parameter.

use cudarc::driver::{sys, DeviceRepr};

use crate::backend::BackendError;

/// An encoded `CUtensorMap`, passed to a kernel by value.
#[repr(transparent)]
pub(super) struct TensorMap(sys::CUtensorMap);

// SAFETY: a plain 128-byte C struct the kernel declares as its parameter (`FaTmap`); the
// launcher copies it into the parameter buffer.
unsafe impl DeviceRepr for TensorMap {}

/// A map of the row-major bf16 matrix at `ptr` (`rows` x `cols`, rows `cols` elements apart)
/// read in boxes of `box_rows` x `box_cols` with the 128-byte swizzle (the layout wgmma's
/// descriptors expect; `box_cols` x 2 bytes must be at most 128). Rows past `rows` read as 0.
pub(super) fn bf16_2d(
    op: &'static str,
    ptr: u64,
    rows: usize,
    cols: usize,
    box_rows: u32,
    box_cols: u32,
) -> Result<TensorMap, BackendError> {
    let shape = |message: String| BackendError::Shape { op, message };
    if !ptr.is_multiple_of(16) || !(cols * 2).is_multiple_of(16) || box_cols * 2 > 128 || rows == 0
    {
        return Err(shape(format!(
            "tensor map: {rows} x {cols} bf16 at {ptr:#x} with {box_rows} x {box_cols} boxes \
             (needs 16-byte aligned rows and boxes of at most 128 bytes)"
        )));
    }
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * 2) as u64];
    let boxes = [box_cols, box_rows];
    let elem = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call and have the lengths rank 2 needs (rank - 1
    // strides); the driver only writes `map`.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(|e| BackendError::Device {
        op,
        message: format!("cuTensorMapEncodeTiled ({rows} x {cols}): {e:?}"),
    })?;
    // SAFETY: the driver filled the map (the call succeeded); zeroed is a valid map anyway.
    Ok(TensorMap(unsafe { map.assume_init() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps TMA cannot take are refused before the driver is asked: a row stride that is not
    /// a multiple of 16 bytes, a box wider than the 128-byte swizzle, a misaligned base, no rows.
    #[test]
    fn unusable_maps_are_errors() {
        for (ptr, rows, cols, box_cols) in [
            (0x1000u64, 10usize, 36usize, 64u32),
            (0x1000, 10, 64, 128),
            (0x1008, 10, 64, 64),
            (0x1000, 0, 64, 64),
        ] {
            let e = bf16_2d("test", ptr, rows, cols, 64, box_cols).err();
            assert!(
                matches!(&e, Some(BackendError::Shape { op: "test", message }) if message.contains("tensor map")),
                "{ptr:#x} {rows}x{cols} box {box_cols}: {e:?}"
            );
        }
    }
}
