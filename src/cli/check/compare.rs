//! The comparison of a backend's runs with the reference's, output by output, and the report.

use std::collections::BTreeMap;

use super::harness::CaseRun;
use super::tolerance;

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub case: String,
    pub output: String,
    /// Relative error (absolute when the reference is 0); None when not compared.
    pub rel: Option<f64>,
    pub tol: f64,
    /// None: pass; Some(why): fail.
    pub failure: Option<String>,
}

/// `‖a − b‖ / ‖b‖` in f64 (`‖a − b‖` when `‖b‖ = 0`).
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm > 0.0 {
        (diff / norm).sqrt()
    } else {
        diff.sqrt()
    }
}

/// Compare the runs of the backend under test with the reference's, output by output.
pub fn compare(test: &[CaseRun], reference: &[CaseRun]) -> Vec<Row> {
    let by_name: BTreeMap<&str, &CaseRun> =
        reference.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut rows = Vec::new();
    for run in test {
        let tol = tolerance(run.family);
        let row = |output: &str, rel, failure| Row {
            case: run.name.clone(),
            output: output.to_string(),
            rel,
            tol,
            failure,
        };
        let Some(reference) = by_name.get(run.name.as_str()) else {
            rows.push(row("-", None, Some("no reference run".into())));
            continue;
        };
        let outputs = match (&run.result, &reference.result) {
            (Err(e), _) => {
                rows.push(row("-", None, Some(e.clone())));
                continue;
            }
            (Ok(_), Err(e)) => {
                rows.push(row("-", None, Some(format!("the reference failed: {e}"))));
                continue;
            }
            (Ok(out), Ok(refs)) => (out, refs),
        };
        let (out, refs) = outputs;
        if out.len() != refs.len() {
            rows.push(row(
                "-",
                None,
                Some(format!(
                    "{} outputs, the reference has {}",
                    out.len(),
                    refs.len()
                )),
            ));
            continue;
        }
        for ((name, o), (_, r)) in out.iter().zip(refs) {
            if o.len() != r.len() {
                rows.push(row(
                    name,
                    None,
                    Some(format!("{} values, the reference has {}", o.len(), r.len())),
                ));
                continue;
            }
            if let Some(i) = o.iter().position(|x| !x.is_finite()) {
                let bad = o.iter().filter(|x| !x.is_finite()).count();
                rows.push(row(
                    name,
                    None,
                    Some(format!("{bad} non-finite (first at {i}: not written?)")),
                ));
                continue;
            }
            if let Some(i) = r.iter().position(|x| !x.is_finite()) {
                rows.push(row(
                    name,
                    None,
                    Some(format!("the reference is non-finite at {i}")),
                ));
                continue;
            }
            let rel = rel_error(o, r);
            let failure = (rel > tol).then(|| "above tolerance".to_string());
            rows.push(row(name, Some(rel), failure));
        }
    }
    rows
}

/// The report table; the last line is "N passed, M failed".
pub fn render(rows: &[Row]) -> String {
    let w_case = rows.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    let w_out = rows
        .iter()
        .map(|r| r.output.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut s = format!(
        "{:<w_case$}  {:<w_out$}  {:>10}  {:>7}  result\n",
        "op", "output", "rel err", "tol"
    );
    for r in rows {
        let rel = r.rel.map_or("-".to_string(), |e| format!("{e:.3e}"));
        let result = match &r.failure {
            None => "PASS".to_string(),
            Some(why) => format!("FAIL {why}"),
        };
        s += &format!(
            "{:<w_case$}  {:<w_out$}  {:>10}  {:>7.0e}  {}\n",
            r.case, r.output, rel, r.tol, result
        );
    }
    let failed = rows.iter().filter(|r| r.failure.is_some()).count();
    s += &format!("{} passed, {} failed\n", rows.len() - failed, failed);
    s
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_bad_values_fail() {
        let ok = |v: Vec<f32>| CaseRun {
            name: "x".into(),
            family: "add",
            result: Ok(vec![("out".into(), v)]),
        };
        let reference = [ok(vec![1.0, 2.0])];
        let unsupported = CaseRun {
            name: "x".into(),
            family: "add",
            result: Err("unsupported".into()),
        };
        for (run, why) in [
            (ok(vec![1.0, f32::NAN]), "non-finite"),
            (ok(vec![1.0, 2.1]), "above tolerance"),
            (unsupported, "unsupported"),
        ] {
            let rows = compare(&[run], &reference);
            assert!(
                rows[0].failure.as_deref().unwrap().contains(why),
                "{rows:?}"
            );
        }
        let rows = compare(&[ok(vec![1.0, 2.0 + 1e-7])], &reference);
        assert!(rows[0].failure.is_none());
        assert!(render(&rows).ends_with("1 passed, 0 failed\n"));
    }
}
