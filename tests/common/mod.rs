//! Shared helpers for the integration tests: the Python reference
//! environment, the cached reference fixtures and the tensors and JSON they
//! hold, loading models and making adapters, and running the binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models::{self, Checkpointing, KeptProducts, LlamaForCausalLM};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use tch::{Device, Kind, Tensor};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python with torch, transformers and peft that `scripts/setup.sh` installs.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PEFT_RS_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    PathBuf::from(home).join(".cache/peft-rs/torch-2.11.0/bin/python")
}

/// A file of the project's shared folder, which sits beside the repository
/// (`../shared`, as on developer machines and in CI), or under `$PEFT_RS_SHARED`.
pub fn shared(rel: &str) -> PathBuf {
    let root = std::env::var_os("PEFT_RS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared"));
    let p = root.join(rel);
    assert!(
        p.exists(),
        "{} is missing: the shared folder belongs beside the repository (or set PEFT_RS_SHARED)",
        p.display()
    );
    p
}

/// The first `n` records of the shared Alpaca data, written into `dir`.
pub fn alpaca(dir: &Path, n: usize) -> PathBuf {
    let src = shared("data/alpaca_5000.json");
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    // One file per size, renamed into place: tests run in parallel and
    // share the scratch folder, and a run must never read a half-written
    // or another test's data.
    let p = dir.join(format!("alpaca_{n}.json"));
    let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
    std::fs::write(tmp.path(), serde_json::to_string(&all[..n]).unwrap()).unwrap();
    tmp.persist(&p).unwrap();
    p
}

/// The default model converted by `scripts/setup.sh`.
pub fn default_model() -> PathBuf {
    let d = repo().join("models/SmolLM2-135M-Instruct");
    assert!(
        d.join("config.json").exists(),
        "{} is missing: run ./scripts/setup.sh first (./scripts/test.sh does)",
        d.display()
    );
    d
}

fn hash_file(p: &Path) -> u64 {
    // FNV-1a: enough to notice that a fixture script changed.
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Runs `script LEADING... OUT ARGS...` once per content hash of the fixture scripts and returns OUT
/// (cached under `target/test-fixtures`, written to a temporary folder and renamed; looked up once
/// per test binary).
pub fn fixture(script: &str, leading: &[&str], args: &[&Path]) -> &'static Path {
    type Once = &'static OnceLock<PathBuf>;
    static SEEN: Mutex<Vec<(String, Once)>> = Mutex::new(Vec::new());
    let call = format!("{script}\0{leading:?}\0{args:?}");
    let once: Once = {
        let mut seen = SEEN.lock().unwrap();
        match seen.iter().find(|(c, _)| *c == call) {
            Some((_, once)) => once,
            None => {
                let once: Once = Box::leak(Box::default());
                seen.push((call, once));
                once
            }
        }
    };
    once.get_or_init(|| run_fixture(script, leading, args))
}

fn run_fixture(script: &str, leading: &[&str], args: &[&Path]) -> PathBuf {
    let script = repo().join("tests/fixtures").join(script);
    // The arguments are part of the key: the leading ones choose what the
    // script makes, the others name other fixtures, themselves keyed by content.
    let arg_text: String = leading
        .iter()
        .map(|a| a.to_string())
        .chain(args.iter().map(|a| a.display().to_string()))
        .collect::<Vec<_>>()
        .join("\0");
    // Scripts import each other and refkit.py: every script of the folder is in the key.
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
        .collect();
    scripts.sort();
    let folder_hash = scripts.iter().fold(hash_file(&script), |h, p| {
        (h ^ hash_file(p)).wrapping_mul(0x100000001b3)
    });
    let arg_hash = arg_text.bytes().fold(folder_hash, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let key = format!(
        "{}-{arg_hash:016x}",
        script.file_stem().unwrap().to_string_lossy()
    );
    let root = repo().join("target/test-fixtures");
    let out = root.join(&key);
    if out.join("COMPLETE").exists() {
        return out;
    }
    std::fs::create_dir_all(&root).unwrap();
    let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(python())
        .arg(&script)
        .args(leading)
        .arg(&tmp)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(status.success(), "{} failed", script.display());
    if std::fs::rename(&tmp, &out).is_err() {
        // Another test binary finished first; use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(out.join("COMPLETE").exists());
    out
}

/// The transformers reference for the tiny models and the default model.
pub fn reference() -> &'static Path {
    fixture("reference.py", &[], &[&default_model()])
}

/// `tests/fixtures/grad_reference.py`: PEFT adapters on the tiny Llama and
/// one training step's gradients.
pub fn grad_reference() -> &'static Path {
    fixture("grad_reference.py", &[], &[&tiny()])
}

/// `tests/fixtures/arch_reference.py`: the tiny models of the newer
/// architectures and their transformers + PEFT references.
pub fn arch_reference() -> &'static Path {
    fixture("arch_reference.py", &[], &[&default_model(), reference()])
}

/// `tests/fixtures/qlora_merge_reference.py`: the tiny Llama quantized and
/// saved by transformers + bitsandbytes, an adapter, and PEFT's merges.
pub fn qlora_merge_reference() -> &'static Path {
    fixture("qlora_merge_reference.py", &[], &[&tiny()])
}

/// The model directory of a reference model (`llama`, `mistral`, `qwen2`, `smollm2`).
pub fn model_dir(name: &str) -> PathBuf {
    if name == "smollm2" {
        default_model()
    } else {
        reference().join("models").join(name)
    }
}

/// Runs the `peft-rs` binary.
pub fn peft_rs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft-rs"))
        .args(args)
        .output()
        .expect("run peft-rs")
}

/// Asserts that a run failed as a user error should: non-zero exit, no panic,
/// one line on stderr starting with `error:` and containing every `needle`.
pub fn assert_user_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line, got: {stderr}");
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}

/// Gradient checkpointing with every choice of kept frozen products:
/// nothing, the MLP's, the attention's, both. Each must give the gradients
/// of a step without checkpointing, bit for bit.
#[allow(dead_code)]
pub fn every_checkpointing() -> [Checkpointing; 4] {
    [(false, false), (false, true), (true, false), (true, true)]
        .map(|(attention, mlp)| Checkpointing::On(KeptProducts { attention, mlp }))
}

/// One training step's adapter gradients, the harness of the gradient parity
/// tests: `model` (adapters attached) in training mode, one forward/backward
/// on the right-padded fixture batch in `batch_file` (`input_ids`,
/// `attention_mask`, `labels`), the loss normalised by the batch's label
/// tokens as transformers' Trainer does. Returns every trainable tensor's
/// gradient by PEFT key, and the loss.
pub fn one_step_grads(
    model: &mut LlamaForCausalLM,
    batch_file: &Path,
    opts: peft_rs::train::StepOptions,
    regs: &mut peft_rs::regularizers::RegularizerStack,
) -> (HashMap<String, Tensor>, f64) {
    peft_model::set_training(model, true);
    let (params, trainable) = trainable(model);
    let b = tensors(batch_file);
    let labels = b["labels"].shallow_clone();
    let batch = peft_rs::data::Batch {
        input_ids: b["input_ids"].shallow_clone(),
        attention_mask: b["attention_mask"].shallow_clone(),
        num_tokens: b["attention_mask"].sum(Kind::Int64).int64_value(&[]),
        // Tokens that are predicted: a label at position i+1 for i in 0..T-1.
        num_label_tokens: labels
            .narrow(1, 1, labels.size()[1] - 1)
            .ne(-100)
            .sum(Kind::Int64)
            .int64_value(&[]),
        labels,
        position_ids: None,
        segment_ids: None,
    };
    let mb = peft_rs::train::MicroBatch::single(0, batch.num_label_tokens as f64, 1.0);
    let loss =
        peft_rs::train::forward_backward(model, regs, &trainable, &batch, &mb, opts).unwrap();
    let grads = params
        .iter()
        .map(|(k, t)| (k.clone(), t.grad().copy()))
        .collect();
    (grads, loss)
}

/// Runs the ignored test `child` of this test binary in a child process
/// with `env` set, and returns the `PEAK_RISE <bytes>` it prints, in MiB:
/// a peak measured in a process of its own.
pub fn child_peak_rise_mib(child: &str, env: (&str, &str)) -> f64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--nocapture"])
        .env(env.0, env.1)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PEAK_RISE "))
        .unwrap_or_else(|| panic!("no PEAK_RISE line in {stdout}"));
    line.trim().parse::<f64>().unwrap() / (1 << 20) as f64
}

/// This process's peak resident memory so far (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib * 1024
}

/// A copy of the files of `src` (one level) in `dst`.
pub fn copy_dir(src: &Path, dst: &Path) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst.to_path_buf()
}

/// Runs `peft-rs` with `args`, failing the test if it takes longer than `limit`.
pub fn run_within(limit: std::time::Duration, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft-rs"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("peft-rs {args:?} ran past {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Rewrites the JSON file `path` with `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The training losses `metrics.jsonl` in `out` records, step by step.
pub fn losses(out: &Path) -> Vec<f64> {
    series(out, "loss")
}

/// The numbers `metrics.jsonl` in `out` records under `key`, in order.
pub fn series(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64())
        .collect()
}

/// A scratch folder that lives as long as the test binary.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// The tiny random Llama of the reference fixtures.
pub fn tiny() -> PathBuf {
    model_dir("llama")
}

/// A path as a `&str` (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// A `peft-rs` command line, built from words and paths:
/// `Cmd::new("train --device cpu --lora-rank 4").path("--data", &data)`.
#[derive(Clone, Debug)]
pub struct Cmd(pub Vec<String>);

impl Cmd {
    /// The whitespace-separated words of `line`.
    pub fn new(line: &str) -> Self {
        Self(line.split_whitespace().map(str::to_owned).collect())
    }

    /// `flag` followed by `path`.
    pub fn path(mut self, flag: &str, path: &Path) -> Self {
        self.0.push(flag.to_owned());
        self.0.push(s(path).to_owned());
        self
    }

    /// More words.
    pub fn args(mut self, line: &str) -> Self {
        self.0.extend(line.split_whitespace().map(str::to_owned));
        self
    }

    /// More arguments, each taken whole.
    pub fn all(mut self, args: &[&str]) -> Self {
        self.0.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    /// One more argument, taken whole (it may hold spaces).
    pub fn arg(mut self, a: &str) -> Self {
        self.0.push(a.to_owned());
        self
    }

    /// The arguments as `&str`s.
    pub fn strs(&self) -> Vec<&str> {
        self.0.iter().map(String::as_str).collect()
    }

    /// Runs `peft-rs` and waits for it.
    pub fn run(&self) -> Output {
        peft_rs(&self.strs())
    }

    /// Runs `peft-rs`, failing the test if it takes longer than `limit`.
    pub fn run_within(&self, limit: std::time::Duration) -> Output {
        run_within(limit, &self.strs())
    }

    /// Starts `peft-rs` with stdout discarded and stderr piped.
    pub fn spawn(&self, envs: &[(&str, String)]) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_peft-rs"))
            .args(&self.0)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// The pids of `pid`'s child processes.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|s| {
                    s.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `RANK` a process was started with.
pub fn rank_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix("RANK=").map(str::to_owned))
}

/// Waits until `ok` holds, failing the test after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How many training steps `metrics.jsonl` in `out` records so far.
pub fn steps_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().filter(|l| l.contains("\"loss\"")).count())
        .unwrap_or(0)
}

/// Every line of `metrics.jsonl` in `out`.
pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The largest difference between the adapters written in two run folders.
pub fn max_adapter_diff(a: &Path, b: &Path) -> f64 {
    let read = |p: &Path| {
        let mut v = tch::Tensor::read_safetensors(p.join("adapter_model.safetensors")).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    read(a)
        .iter()
        .zip(read(b))
        .map(|((n, x), (m, y))| {
            assert_eq!(n, &m);
            (x - y).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

/// The largest difference between two equally long series.
pub fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The largest element-wise difference of two tensors, and the largest
/// magnitude of the second.
pub fn tensor_diff(a: &tch::Tensor, b: &tch::Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size());
    (
        (a - b).abs().max().double_value(&[]),
        b.abs().max().double_value(&[]),
    )
}

/// The stderr of a run, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a run succeeded, with its stderr as the message.
pub fn assert_ok(out: &Output) {
    assert!(out.status.success(), "{}", stderr(out));
}

impl Cmd {
    /// `peft-rs merge` of `adapter` into `model`, written to `out`.
    pub fn merge(model: &Path, adapter: &Path, out: &Path) -> Self {
        Self::new("merge")
            .path("--model", model)
            .path("--adapter", adapter)
            .path("--output", out)
    }

    /// `peft-rs generate --model MODEL` and the words of `line`.
    pub fn generate(model: &Path, line: &str) -> Self {
        Self::new("generate").path("--model", model).args(line)
    }

    /// The words of `line` (a `train` command), then the tiny Llama, `data` and `out`.
    pub fn train_tiny(line: &str, data: &Path, out: &Path) -> Self {
        Self::new(line)
            .path("--model", &tiny())
            .path("--data", data)
            .path("--output", out)
    }

    /// Runs `peft-rs`, asserting that it succeeds (its stderr is the message).
    pub fn run_ok(&self) -> Output {
        let out = self.run();
        assert_ok(&out);
        out
    }
}

/// Greedy answers of `peft-rs generate --json` to the prompts file, in
/// batches of `batch_size`, one JSON value per prompt.
pub fn generate_json(model: &Path, prompts: &Path, batch_size: &str) -> Vec<serde_json::Value> {
    let out = Cmd::generate(model, "--device cpu --dtype fp32")
        .path("--prompts", prompts)
        .args("--max-new-tokens 32 --batch-size")
        .arg(batch_size)
        .arg("--json")
        .run_ok();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSON file, parsed.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `loss` a reference script wrote to `dir/loss.json`.
pub fn ref_loss(dir: &Path) -> f64 {
    read_json::<serde_json::Value>(&dir.join("loss.json"))["loss"]
        .as_f64()
        .unwrap()
}

/// The tensors of a safetensors file, by name.
pub fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The `logits` tensor of a safetensors file.
pub fn logits(path: &Path) -> Tensor {
    tensors(path)
        .remove("logits")
        .unwrap_or_else(|| panic!("{}: no logits", path.display()))
}

/// The `input_ids` and `attention_mask` of a safetensors file.
pub fn ids_and_mask(path: &Path) -> (Tensor, Tensor) {
    let mut t = tensors(path);
    let mut take = |k: &str| {
        t.remove(k)
            .unwrap_or_else(|| panic!("{}: no {k}", path.display()))
    };
    (take("input_ids"), take("attention_mask"))
}

/// Max |a - b| over real (non-pad) positions.
pub fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let keep = mask.to_kind(Kind::Bool).unsqueeze(-1);
    (a - b)
        .abs()
        .masked_fill(&keep.logical_not(), 0.0)
        .max()
        .double_value(&[])
}

/// A model directory loaded in fp32 on the CPU.
pub fn load(dir: &Path) -> LlamaForCausalLM {
    models::load(dir, Kind::Float, Device::Cpu).unwrap()
}

/// The tiny Llama, loaded in fp32 on the CPU.
pub fn load_tiny() -> LlamaForCausalLM {
    load(&tiny())
}

/// A LoRA config of rank `r` and `lora_alpha` on every linear layer, PEFT's
/// defaults otherwise.
pub fn lora(r: usize, lora_alpha: f64) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    }
}

/// Logits that `tests/fixtures/peft_reference.py logits` computes with
/// transformers (and PEFT, given an adapter) for `base` on the `inputs` file;
/// with `quant` ("nf4", "fp4"), on the base quantized by bitsandbytes.
pub fn peft_logits(
    base: &Path,
    inputs: &Path,
    adapter: Option<&Path>,
    quant: Option<&str>,
) -> Tensor {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let mut cmd = Command::new(python());
    cmd.arg(repo().join("tests/fixtures/peft_reference.py"))
        .arg("logits")
        .arg(base)
        .arg(inputs)
        .arg(&out);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    if let Some(q) = quant {
        cmd.args(["--load-in-4bit", q]);
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "peft_reference.py logits failed");
    logits(&out)
}

/// [`peft_logits`] (no quantization) with each of `adapters` in turn, in one
/// Python process.
pub fn peft_logits_each(base: &Path, inputs: &Path, adapters: &[&Path]) -> Vec<Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let status = Command::new(python())
        .arg(repo().join("tests/fixtures/peft_reference.py"))
        .arg("logits-each")
        .arg(base)
        .arg(inputs)
        .arg(tmp.path())
        .args(adapters)
        .status()
        .unwrap();
    assert!(status.success(), "peft_reference.py logits-each failed");
    (0..adapters.len())
        .map(|i| logits(&tmp.path().join(format!("{i}.safetensors"))))
        .collect()
}

/// Adapters made by peft-rs and read back by PEFT: each of `configs`
/// injected into a fresh `load()` (base `base`) with seed 7, its B drawn
/// from N(0, 0.05²) and a DoRA magnitude jittered by 5%, saved, and loaded
/// by PEFT (strictly: every key, every value; one Python process for all).
/// Per config, our logits on `ids` and PEFT's on the `inputs` file.
pub fn our_adapters_in_peft(
    load: impl Fn() -> LlamaForCausalLM,
    configs: &[LoraConfig],
    base: &Path,
    inputs: &Path,
    ids: &Tensor,
) -> Vec<(Tensor, Tensor)> {
    let tmp = tempfile::tempdir().unwrap();
    let mut ours = Vec::new();
    let mut dirs = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let mut model = load();
        tch::manual_seed(7);
        peft_model::inject(&mut model, DEFAULT_ADAPTER, config).unwrap();
        tch::no_grad(|| {
            for (k, t) in peft_model::trainable_parameters(&model) {
                let mut t = t.shallow_clone();
                if k.ends_with("lora_B.weight") {
                    let _ = t.normal_(0.0, 0.05);
                } else if k.ends_with("lora_magnitude_vector") {
                    let noise = t.randn_like() * 0.05 + 1.0;
                    t *= noise;
                }
            }
        });
        ours.push(tch::no_grad(|| model.forward(ids)));
        let dir = tmp.path().join(i.to_string());
        peft_model::save_adapter(&model, DEFAULT_ADAPTER, config, &dir).unwrap();
        dirs.push(dir);
    }
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    ours.into_iter()
        .zip(peft_logits_each(base, inputs, &dirs))
        .collect()
}

/// `model`'s trainable tensors by PEFT key, and the same as the list of
/// pairs that `forward_backward` takes.
pub fn trainable(
    model: &LlamaForCausalLM,
) -> (
    std::collections::BTreeMap<String, Tensor>,
    Vec<(String, Tensor)>,
) {
    let params = peft_model::trainable_parameters(model);
    let list = params
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    (params, list)
}

/// The context a regularizer sees at step 0 of a one-micro-batch step, with
/// no segments, row seeds or trainable tensors.
pub fn hook_context(
    attention_mask: &Tensor,
    training: bool,
    seed: u64,
) -> peft_rs::regularizers::HookContext<'_> {
    peft_rs::regularizers::HookContext {
        training,
        step: 0,
        attention_mask,
        segment_ids: None,
        seed,
        row_seeds: None,
        micro_batch: 0,
        micro_batches: 1,
        trainable: &[],
    }
}

/// `train` of the tiny Llama on `data` into `out` with the settings of the
/// one-process training tests (batch 4, length 96, rank 4, lr 1e-3, seed 7).
pub fn train_tiny_small(data: &Path, out: &Path) -> Cmd {
    let line =
        "train --device cpu --dtype fp32 --batch-size 4 --max-seq-len 96 --lora-rank 4 --lr 1e-3 --seed 7";
    Cmd::train_tiny(line, data, out)
}

/// The names of the entries of `dir` that `keep` accepts, in directory order.
pub fn entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| keep(n))
        .collect()
}

/// The scalars of the event files under `dir`, as TensorBoard's own reader
/// loads them (orphaned steps of a resumed run purged): `{tag: [[step, value]]}`.
fn tensorboard_scalars(dir: &Path) -> serde_json::Value {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new(python())
        .args(["-c", script, s(dir)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts that the TensorBoard scalars of run `out` are `metrics.jsonl`'s.
pub fn assert_tensorboard_matches_metrics(out: &Path) {
    let tb = tensorboard_scalars(&out.join("runs"));
    let tags = [
        ("loss", "train/loss"),
        ("lr", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("epoch", "train/epoch"),
        ("tokens_per_second", "train/tokens_per_second"),
        ("eval_loss", "eval/loss"),
    ];
    for (key, tag) in tags {
        let want: Vec<(u64, f64)> = metrics(out)
            .iter()
            .filter_map(|l| Some((l["step"].as_u64()?, l[key].as_f64()?)))
            .collect();
        if want.is_empty() {
            assert!(key != "loss", "metrics.jsonl has no loss");
            assert!(
                tb.get(tag).is_none(),
                "{tag} in TensorBoard, not in metrics.jsonl"
            );
            continue;
        }
        let got: Vec<(u64, f64)> = tb[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {tb}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        assert_eq!(
            got.iter().map(|p| p.0).collect::<Vec<_>>(),
            want.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{tag}: steps"
        );
        for ((step, g), (_, w)) in got.iter().zip(&want) {
            // TensorBoard stores scalars as float32.
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1e-30),
                "{tag} at step {step}: {g} in TensorBoard, {w} in metrics.jsonl"
            );
        }
    }
}

/// Each row of `ids` continued alone by greedy decoding for exactly `n`
/// tokens, no EOS stopping it (the fixtures' `refkit.greedy`).
pub fn greedy_rows(model: &LlamaForCausalLM, ids: &Tensor, n: usize) -> Vec<Vec<i64>> {
    let cfg = peft_rs::generate::GenerationConfig {
        max_new_tokens: n,
        eos_token_ids: Vec::new(),
        ..peft_rs::generate::GenerationConfig::default()
    };
    (0..ids.size()[0])
        .map(|i| {
            let row: Vec<i64> = Vec::try_from(ids.get(i)).unwrap();
            let row: Vec<u32> = row.into_iter().map(|t| t as u32).collect();
            peft_rs::generate::generate(model, &row, &cfg).unwrap()
        })
        .collect()
}

/// Starts `run` (a 2-process `train` saving a checkpoint every 2 steps into
/// `out`), kills rank 1 with SIGKILL once the first checkpoint exists, as
/// the OOM killer would, and checks that the launcher fails within 30 s
/// naming rank 1, without a panic; that the last checkpoint is whole; and
/// that `run --resume` continues from it to the final adapter.
pub fn kill_rank_1_then_resume(run: &Cmd, out: &Path) {
    use std::time::{Duration, Instant};
    let mut launcher = run.spawn(&[]);
    let start = Instant::now();
    while !out.join("checkpoint-2").exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank1 = children(launcher.id())
        .into_iter()
        .find(|&p| rank_of(p).as_deref() == Some("1"))
        .expect("rank 1 worker");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &rank1.to_string()])
        .status()
        .unwrap();
    let status = launcher.wait().unwrap();
    let waited = killed.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(launcher.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!("launcher ended {waited:?} after rank 1 was killed");
    assert!(!status.success());
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
    assert!(err.contains("rank 1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    assert!(out
        .join(format!("checkpoint-{last}"))
        .join("COMPLETE")
        .exists());
    let r = run.clone().arg("--resume").run();
    assert!(
        r.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.join("adapter_model.safetensors").exists());
}
