//! `peft-rs plot` draws a PNG of the requested size from runs' metrics, and
//! names the file when a run has nothing to plot.

mod common;

use common::{assert_user_error, s, Cmd};

#[test]
fn plots_two_runs_and_reports_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, slope) in [("with-neftune", 0.02), ("without", 0.03)] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut lines = vec![serde_json::json!({"step": 0, "eval_loss": 2.5}).to_string()];
        for s in 1..=40 {
            let mut l = serde_json::json!({"step": s, "loss": 2.4 - slope * s as f64, "lr": 1e-4});
            if s % 10 == 0 {
                l["eval_loss"] = serde_json::json!(2.45 - slope * s as f64);
            }
            lines.push(l.to_string());
        }
        std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
    }
    let png = tmp.path().join("loss.png");
    let a = tmp.path().join("with-neftune");
    let b = tmp.path().join("without");
    Cmd::new("plot")
        .arg(s(&a))
        .arg(s(&b))
        .path("--output", &png)
        .args("--width 900 --height 500")
        .run_ok();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 500));

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    let plot = |run: &std::path::Path| Cmd::new("plot").arg(s(run)).path("--output", &png).run();
    assert_user_error(&plot(&empty), &["metrics.jsonl", "no loss"]);
    let missing = tmp.path().join("nope");
    assert_user_error(&plot(&missing), &["nope", "metrics.jsonl"]);
}
