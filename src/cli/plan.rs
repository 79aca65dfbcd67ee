//! `packtrain plan`: the packing report.
