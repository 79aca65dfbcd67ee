//! The one font every plot uses, bundled so plotting needs no system font (DejaVu Sans,
//! Bitstream Vera licence: assets/fonts/LICENSE-DejaVu.txt).

use std::sync::Once;

static REGISTER: Once = Once::new();

/// Register the bundled font as plotters' "sans-serif" (idempotent).
pub fn register() {
    REGISTER.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        // Only fails on a malformed font file, which the bundled one is not; plots would then
        // lack text rather than fail.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes);
    });
}
