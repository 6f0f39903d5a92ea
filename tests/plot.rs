//! `peft-rs plot` draws a PNG of the requested size from runs' metrics, and
//! names the file when a run has nothing to plot.

mod common;

use common::{assert_user_error, peft_rs};

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
    let out = peft_rs(&[
        "plot",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--width",
        "900",
        "--height",
        "500",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 500));

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    assert_user_error(
        &peft_rs(&[
            "plot",
            empty.to_str().unwrap(),
            "--output",
            png.to_str().unwrap(),
        ]),
        &["metrics.jsonl", "no loss"],
    );
    let missing = tmp.path().join("nope");
    assert_user_error(
        &peft_rs(&[
            "plot",
            missing.to_str().unwrap(),
            "--output",
            png.to_str().unwrap(),
        ]),
        &["nope", "metrics.jsonl"],
    );
}
