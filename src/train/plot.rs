//! `loss.png`: loss and tokens/s over the steps of a run.

use std::path::Path;

use plotters::prelude::*;

use super::metrics::StepMetrics;

/// Draw loss (top) and tokens/s (bottom) against the step.
pub fn plot_run(path: &Path, steps: &[StepMetrics], title: &str) -> Result<(), String> {
    if steps.is_empty() {
        return Err("no steps to plot".into());
    }
    crate::cli::plot_font::register();
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(380);
    let x_max = steps.last().map_or(1, |m| m.step).max(2) as f64;
    let x_min = steps.first().map_or(0, |m| m.step) as f64;

    let loss_max = steps.iter().map(|m| m.loss).fold(0.0f64, f64::max) * 1.05;
    let loss_min = steps
        .iter()
        .map(|m| m.loss)
        .fold(f64::INFINITY, f64::min)
        .min(loss_max)
        * 0.95;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{title}: loss per target token"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, loss_min..loss_max.max(loss_min + 1e-6))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            steps.iter().map(|m| (m.step as f64, m.loss)),
            &BLUE,
        ))
        .map_err(|e| e.to_string())?;

    let tps_max = steps.iter().map(|m| m.tokens_per_s).fold(0.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("tokens/s", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0.0..tps_max.max(1.0))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("tokens/s")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            steps.iter().map(|m| (m.step as f64, m.tokens_per_s)),
            &RED,
        ))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
