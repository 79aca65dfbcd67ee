//! The f32 reference backend.
