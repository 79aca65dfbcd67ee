//! The command line: one module per subcommand, `main.rs` dispatches.

pub mod plan;
