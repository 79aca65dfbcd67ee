//! The command line: one module per subcommand, `main.rs` dispatches.

pub mod attention_dump;
pub mod bench;
pub mod check;
pub mod eval;
pub mod plan;
pub mod plot_font;
pub mod progress;
