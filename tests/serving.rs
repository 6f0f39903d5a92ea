//! From a trained adapter to where people use it: models and adapters named by
//! Hub id from a Hugging Face cache layout, and TensorBoard logs read back by
//! TensorBoard's own reader.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{assert_user_error, s, tiny, train_tiny_small, Cmd};

const MAIN: &str = "1111111111111111111111111111111111111111";
const V1: &str = "2222222222222222222222222222222222222222";

/// Lays `files` out as `huggingface_hub` does: each a blob named by a hash,
/// linked from `snapshots/COMMIT/NAME`, with `refs/REF` holding the commit.
fn cache_snapshot(cache: &Path, repo: &str, reference: &str, commit: &str, files: &[PathBuf]) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs").join(reference), commit).unwrap();
    for (i, f) in files.iter().enumerate() {
        let blob = format!("{commit}{i:024}");
        std::fs::copy(f, folder.join("blobs").join(&blob)).unwrap();
        let link = snapshot.join(f.file_name().unwrap());
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), link).unwrap();
    }
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// `peft-rs ARGS` run in `cwd` with the cache at `cache`, offline unless an
/// endpoint is given.
fn run_in(cwd: &Path, cache: &Path, endpoint: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft-rs"));
    c.args(args).current_dir(cwd).env("HF_HUB_CACHE", cache);
    match endpoint {
        Some(e) => c.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", e),
        None => c.env("HF_HUB_OFFLINE", "1"),
    };
    c.output().unwrap()
}

fn answer(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

const GENERATE: &[&str] = &[
    "generate",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--prompt",
    "The capital of France is",
    "--max-new-tokens",
    "12",
];

#[test]
fn hub_ids_resolve_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let model = tiny();
    let model_files = files_of(&model);
    // `main` lacks the weights; the tag `v1` has them all.
    let without_weights: Vec<PathBuf> = model_files
        .iter()
        .filter(|p| p.extension().is_none_or(|e| e != "safetensors"))
        .cloned()
        .collect();
    assert!(without_weights.len() < model_files.len());
    cache_snapshot(
        &cache,
        "test-org/tiny-llama",
        "main",
        MAIN,
        &without_weights,
    );
    cache_snapshot(&cache, "test-org/tiny-llama", "v1", V1, &model_files);
    let cwd = tmp.path().join("work");
    std::fs::create_dir_all(&cwd).unwrap();

    let local = answer(&run_in(
        &cwd,
        &cache,
        None,
        &[GENERATE, &["--model", s(&model)]].concat(),
    ));
    for id in [
        "test-org/tiny-llama@v1",
        &format!("test-org/tiny-llama@{V1}"),
    ] {
        let by_id = answer(&run_in(
            &cwd,
            &cache,
            None,
            &[GENERATE, &["--model", id]].concat(),
        ));
        assert_eq!(by_id, local, "{id} must load the model of its snapshot");
    }

    // A snapshot without its weights is named with what it lacks.
    let out = run_in(
        &cwd,
        &cache,
        None,
        &[GENERATE, &["--model", "test-org/tiny-llama"]].concat(),
    );
    assert_user_error(
        &out,
        &[
            "test-org/tiny-llama",
            "model.safetensors",
            "HF_HUB_OFFLINE",
            s(&cache),
        ],
    );

    // An id absent from the cache, offline: one line with the id and where it looked.
    let out = run_in(
        &cwd,
        &cache,
        None,
        &[GENERATE, &["--model", "nobody/nothing"]].concat(),
    );
    assert_user_error(
        &out,
        &["nobody/nothing", s(&cache.join("models--nobody--nothing"))],
    );

    // Online with an unreachable endpoint: one line naming the id and the failure.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let out = run_in(
        &cwd,
        &cache,
        Some(&endpoint),
        &[GENERATE, &["--model", "nobody/nothing"]].concat(),
    );
    assert_user_error(&out, &["nobody/nothing", "downloading it failed"]);

    // A local folder of the same name wins over the cache: here another model.
    let other = common::model_dir("mistral");
    let shadow = cwd.join("test-org/tiny-llama@v1");
    common::copy_dir(&other, &shadow);
    let from_local = answer(&run_in(
        &cwd,
        &cache,
        None,
        &[GENERATE, &["--model", "test-org/tiny-llama@v1"]].concat(),
    ));
    let other_answer = answer(&run_in(
        &cwd,
        &cache,
        None,
        &[GENERATE, &["--model", s(&other)]].concat(),
    ));
    assert_eq!(from_local, other_answer);
    assert_ne!(from_local, local, "the two models must answer differently");
}

#[test]
fn adapters_by_hub_id_and_the_base_id_recorded_in_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    cache_snapshot(
        &cache,
        "test-org/tiny-llama",
        "main",
        MAIN,
        &files_of(&tiny()),
    );
    let data = common::alpaca(tmp.path(), 16);
    let out = tmp.path().join("run");
    let train = Cmd::new("train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 96")
        .args("--lora-rank 4 --lr 5e-2 --seed 7 --max-steps 2 --model test-org/tiny-llama")
        .path("--data", &data)
        .path("--output", &out);
    answer(&run_in(tmp.path(), &cache, None, &train.strs()));
    let config: serde_json::Value = common::read_json(&out.join("adapter_config.json"));
    assert_eq!(
        config["base_model_name_or_path"], "test-org/tiny-llama",
        "PEFT records a base loaded by id by its id"
    );

    let adapter_files: Vec<PathBuf> = ["adapter_config.json", "adapter_model.safetensors"]
        .iter()
        .map(|f| out.join(f))
        .collect();
    cache_snapshot(&cache, "test-org/tiny-lora", "main", MAIN, &adapter_files);
    let with = |adapter: &str| {
        answer(&run_in(
            tmp.path(),
            &cache,
            None,
            &[
                GENERATE,
                &["--model", "test-org/tiny-llama", "--adapter", adapter],
            ]
            .concat(),
        ))
    };
    let plain = answer(&run_in(
        tmp.path(),
        &cache,
        None,
        &[GENERATE, &["--model", "test-org/tiny-llama"]].concat(),
    ));
    let by_id = with("test-org/tiny-lora");
    assert_eq!(by_id, with(s(&out)));
    assert_ne!(by_id, plain, "the adapter must change the answer");
    let out = run_in(
        tmp.path(),
        &cache,
        None,
        &[GENERATE, &["--adapter", "test-org/absent-lora"]].concat(),
    );
    assert_user_error(
        &out,
        &[
            "test-org/absent-lora",
            "adapter",
            "not in the Hugging Face cache",
        ],
    );
}

#[test]
fn tensorboard_events_read_back_equal_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 48);
    let out = tmp.path().join("run");
    let run = train_tiny_small(&data, &out)
        .args("--max-steps 6 --eval-holdout 8 --eval-steps 3 --report-to tensorboard")
        .run_ok();
    assert!(String::from_utf8_lossy(&run.stdout).contains("tensorboard --logdir"));
    common::assert_tensorboard_matches_metrics(&out);
    assert!(!common::series(&out, "eval_loss").is_empty());

    // A settings file says it with transformers' key; a fresh run in the same
    // folder replaces the old events as it replaces metrics.jsonl.
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let settings = tmp.path().join("settings.toml");
    std::fs::write(&settings, "report_to = \"tensorboard\"\nmax_steps = 3\n").unwrap();
    train_tiny_small(&data, &out)
        .path("--config", &settings)
        .run_ok();
    assert_eq!(common::series(&out, "loss").len(), 3);
    common::assert_tensorboard_matches_metrics(&out);
}
