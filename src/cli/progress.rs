//! The progress bar and a `tracing` writer that prints log lines above it instead of through it.

use std::io::Write;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Start the run's progress bar over `len` steps (hidden when stderr is not a terminal).
pub fn start(len: u64, done: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps  eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(done);
    if let Ok(mut slot) = BAR.lock() {
        *slot = Some(bar.clone());
    }
    bar
}

/// Drop the bar (the run is over).
pub fn finish() {
    if let Ok(mut slot) = BAR.lock() {
        if let Some(bar) = slot.take() {
            bar.finish_and_clear();
        }
    }
}

/// `tracing_subscriber` writer: stderr, with the bar suspended while a line is written.
#[derive(Clone, Copy, Default)]
pub struct SuspendingStderr;

pub struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.0);
        let write = || {
            let _ = std::io::stderr().write_all(&bytes);
        };
        match BAR.lock().ok().and_then(|s| s.clone()) {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SuspendingStderr {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::new())
    }
}
