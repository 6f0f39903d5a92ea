//! `peft-rs export gguf` against llama.cpp: the files llama.cpp's own
//! converters write for the same PEFT adapter and model (metadata, tensor
//! names, shapes, types and bytes), and what llama.cpp (llama-cpp-python,
//! built by scripts/setup.sh) computes from ours: its tokenization, its
//! logits and its greedy answers, against peft-rs's with the adapter loaded.

mod common;

use std::path::{Path, PathBuf};

use common::{arch_reference, python, repo, s};
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::models::LlamaForCausalLM;
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::tokenizer::Tokenizer;
use serde_json::Value;
use tch::{Kind, Tensor};

/// Plain and chat-formatted prompts: digits, punctuation, newlines,
/// non-ASCII text and special tokens, so that tokenization is exercised.
const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "List three colors:\n1.",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "def fibonacci(n):\n    if n < 2:",
    "Über café naïve — résumé, 東京 and emoji 🙂 are",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Q: Why is the sky blue?\nA:",
];
const NEW_TOKENS: usize = 12;

fn converters() -> PathBuf {
    let dir = std::env::var_os("PEFT_RS_LLAMA_CPP_CONVERTERS")
        .map(PathBuf::from)
        .expect("PEFT_RS_LLAMA_CPP_CONVERTERS is unset: run the tests through scripts/test.sh after scripts/setup.sh");
    assert!(
        dir.join("convert_lora_to_gguf.py").exists(),
        "{}: llama.cpp's converters are missing; run scripts/setup.sh",
        dir.display()
    );
    dir
}

fn fixture(args: &[&str]) {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/fixtures/gguf_reference.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf_reference.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn export(args: &[&str]) {
    let mut all = vec!["export", "gguf"];
    all.extend_from_slice(args);
    common::assert_ok(&common::peft_rs(&all));
}

fn dump(file: &Path) -> Value {
    let out = file.with_extension("json");
    fixture(&["dump", s(file), s(&out)]);
    common::read_json(&out)
}

/// A random adapter on `base`, saved: all linear layers, B drawn so that
/// answers change but stay sensible.
fn random_adapter(base: &Path, config: &LoraConfig, out: &Path) -> LlamaForCausalLM {
    let mut model = common::load(base);
    tch::manual_seed(5);
    peft_model::inject(&mut model, DEFAULT_ADAPTER, config).unwrap();
    tch::no_grad(|| {
        for (k, t) in peft_model::trainable_parameters(&model) {
            if k.ends_with("lora_B.weight") {
                let _ = t.shallow_clone().normal_(0.0, 0.02);
            }
        }
    });
    peft_model::save_adapter(&model, DEFAULT_ADAPTER, config, out).unwrap();
    model
}

/// peft-rs's tokenization, logits at every prompt position and greedy
/// tokens, for each prompt.
struct Answers {
    tokens: Vec<Vec<i64>>,
    logits: Vec<Tensor>,
    generated: Vec<Vec<i64>>,
}

fn ours(model: &LlamaForCausalLM, tokenizer: &Tokenizer) -> Answers {
    let mut a = Answers {
        tokens: vec![],
        logits: vec![],
        generated: vec![],
    };
    for p in PROMPTS {
        let ids: Vec<i64> = tokenizer
            .encode(p, true)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let mut seq = ids.clone();
        let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0)));
        a.logits.push(logits.squeeze_dim(0).to_kind(Kind::Float));
        let mut generated = vec![];
        for _ in 0..NEW_TOKENS {
            let l = tch::no_grad(|| model.forward(&Tensor::from_slice(&seq).unsqueeze(0)));
            let next = l.get(0).get(-1).argmax(0, false).int64_value(&[]);
            generated.push(next);
            seq.push(next);
        }
        a.tokens.push(ids);
        a.generated.push(generated);
    }
    a
}

/// llama.cpp's answers for `model` (+ `lora`), and the largest logit
/// difference from `ours` relative to the largest |logit|.
fn llama_cpp(model: &Path, lora: Option<&Path>, ours: &Answers, dir: &Path) -> f64 {
    let prompts = dir.join("prompts.json");
    std::fs::write(&prompts, serde_json::to_string(&PROMPTS).unwrap()).unwrap();
    let out = dir.join(model.file_stem().unwrap());
    let mut args = vec!["run", s(model), s(&prompts), s(&out)];
    let n = NEW_TOKENS.to_string();
    args.extend(["--tokens", &n]);
    if let Some(l) = lora {
        args.extend(["--lora", s(l)]);
    }
    fixture(&args);
    let theirs: Value = common::read_json(&out.join("llama_cpp.json"));
    let logits = common::tensors(&out.join("logits.safetensors"));
    let mut worst: f64 = 0.0;
    for (i, p) in PROMPTS.iter().enumerate() {
        let tokens: Vec<i64> = serde_json::from_value(theirs["tokens"][i].clone()).unwrap();
        assert_eq!(
            tokens,
            ours.tokens[i],
            "{}: llama.cpp tokenizes {p:?} differently",
            model.display()
        );
        let generated: Vec<i64> = serde_json::from_value(theirs["generated"][i].clone()).unwrap();
        assert_eq!(
            generated,
            ours.generated[i],
            "{}: llama.cpp's greedy answer to {p:?} differs",
            model.display()
        );
        let l = &logits[&format!("logits_{i}")];
        let scale = ours.logits[i].abs().max().double_value(&[]);
        let diff = (l - &ours.logits[i]).abs().max().double_value(&[]) / scale;
        worst = worst.max(diff);
    }
    eprintln!(
        "{}: llama.cpp logits within {worst:.2e} of peft-rs's (relative to max |logit|)",
        model.display()
    );
    worst
}

/// llama.cpp's kernels sum in other orders (ggml's own blocking of f32
/// matmuls), so logits agree to float rounding accumulated over the layers,
/// not bit for bit: about 1e-6 of the largest logit with the f32 KV cache
/// the fixture asks for. 1e-4 leaves room for other CPUs' kernels and is
/// still far below a difference a wrong tensor, a missed permutation or a
/// misapplied scaling makes (those move logits by 1e-2 and more).
const LOGIT_TOLERANCE: f64 = 1e-4;

/// For GELU models (Gemma 3): llama.cpp's CPU GELU rounds its input to fp16
/// and reads the result from a table (ggml's `GGML_GELU_FP16`), which moves
/// each activation by up to ~1e-3 of its size; measured on the tiny Gemma 3:
/// 8e-4 of the largest logit. Still an order of magnitude below what a
/// missed norm shift or a wrong RoPE base does.
const GELU_LOGIT_TOLERANCE: f64 = 2e-3;

/// The logit tolerance for the model in `base`.
fn logit_tolerance(base: &Path) -> f64 {
    let config = common::read_json::<Value>(&base.join("config.json"));
    let text = config.get("text_config").unwrap_or(&config);
    match text["hidden_activation"]
        .as_str()
        .or(text["hidden_act"].as_str())
    {
        Some(act) if act.starts_with("gelu") => GELU_LOGIT_TOLERANCE,
        _ => LOGIT_TOLERANCE,
    }
}

#[test]
fn smollm2_adapter_and_merged_gguf_answer_as_peft_rs_in_llama_cpp() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::default_model();
    let adapter = tmp.path().join("adapter");
    // rsLoRA: llama.cpp scales by alpha / r, so the export folds √r into lora_b.
    let config = LoraConfig {
        r: 8,
        lora_alpha: 16.0,
        use_rslora: true,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    let model = random_adapter(&base, &config, &adapter);
    let tokenizer = Tokenizer::from_model_dir(&base).unwrap();
    let answers = ours(&model, &tokenizer);
    drop(model);
    serve_in_llama_cpp(&base, &adapter, &answers, tmp.path());
}

/// Exports `base` and `adapter` (adapter GGUF and merged GGUF) and checks
/// llama.cpp's answers for base + adapter and for the merged model.
fn serve_in_llama_cpp(base: &Path, adapter: &Path, answers: &Answers, tmp: &Path) {
    let (base_gguf, lora_gguf, merged_gguf) = (
        tmp.join("base.gguf"),
        tmp.join("lora.gguf"),
        tmp.join("merged.gguf"),
    );
    let f32 = ["--outtype", "f32"];
    export(&[&["--model", s(base), "--output", s(&base_gguf)][..], &f32].concat());
    export(
        &[
            &[
                "--model",
                s(base),
                "--adapter",
                s(adapter),
                "--adapter-only",
                "--output",
                s(&lora_gguf),
            ][..],
            &f32,
        ]
        .concat(),
    );
    export(
        &[
            &[
                "--model",
                s(base),
                "--adapter",
                s(adapter),
                "--output",
                s(&merged_gguf),
            ][..],
            &f32,
        ]
        .concat(),
    );
    let with_lora = llama_cpp(&base_gguf, Some(&lora_gguf), answers, tmp);
    let merged = llama_cpp(&merged_gguf, None, answers, tmp);
    let tolerance = logit_tolerance(base);
    assert!(with_lora < tolerance, "base + lora: {with_lora:.2e}");
    assert!(merged < tolerance, "merged: {merged:.2e}");
}

/// A copy of the tiny model `src` in `dst` that llama.cpp computes as
/// transformers does. llama.cpp's llama, qwen2, qwen3 and qwen3moe attend
/// over the whole context (the export warns about a sliding window), and
/// the fixtures' Mistral, Mixtral and Qwen3s have a window of 5 tokens, so
/// the copy has none; gpt-oss keeps its sliding layers (llama.cpp's have
/// them). What llama.cpp fixes and the fixtures vary (the export refuses
/// it by name) is set to llama.cpp's: Qwen3-MoE's dense layer 1 becomes a
/// sparse one (layer 0's router and experts, negated) with `norm_topk_prob`;
/// gpt-oss gets `swiglu_limit` 7 and YaRN's default `truncate`, Gemma 3
/// a `query_pre_attn_scalar` of `head_dim` (llama.cpp scales by 1/√head_dim;
/// its sliding layers are llama.cpp's too, their pattern written). Phi-3's
/// tokenizer_config.json names GPT2Tokenizer, as Phi-4-mini's does (the
/// converter reads a BPE vocabulary only then, SentencePiece otherwise).
fn servable_copy(src: &Path, dst: &Path) -> PathBuf {
    let base = common::copy_dir(src, dst);
    let config = base.join("config.json");
    let model_type = common::read_json::<Value>(&config)["model_type"]
        .as_str()
        .unwrap()
        .to_owned();
    common::edit_json(&config, |c| match model_type.as_str() {
        "gemma3_text" | "gemma3" => {
            let is_multimodal = c.get("text_config").is_some();
            let text = text_config(c);
            text["query_pre_attn_scalar"] = text["head_dim"].clone();
            if is_multimodal {
                // transformers' Gemma3ForConditionalGeneration caps no
                // logits (export gguf writes none); the converter would
                // write text_config's cap.
                text["final_logit_softcapping"] = Value::Null;
            }
        }
        "gpt_oss" => {
            c["swiglu_limit"] = 7.0.into();
            c["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("truncate");
        }
        _ => {
            c["use_sliding_window"] = false.into();
            c["sliding_window"] = Value::Null;
            if let Some(types) = c["layer_types"].as_array_mut() {
                types.iter_mut().for_each(|t| *t = "full_attention".into());
            }
            if model_type == "qwen3_moe" {
                c["mlp_only_layers"] = serde_json::json!([]);
                c["norm_topk_prob"] = true.into();
            }
        }
    });
    if model_type == "phi3" {
        common::edit_json(&base.join("tokenizer_config.json"), |c| {
            c["tokenizer_class"] = "GPT2Tokenizer".into();
        });
    }
    if model_type == "qwen3_moe" {
        let file = base.join("model.safetensors");
        let tensors = Tensor::read_safetensors(&file).unwrap();
        let mut out: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("model.layers.1.mlp."))
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        for (k, t) in &tensors {
            if k.starts_with("model.layers.0.mlp.") {
                out.push((k.replace("layers.0.", "layers.1."), -t));
            }
        }
        Tensor::write_safetensors(&out, &file).unwrap();
    }
    base
}

/// A tiny model, with `adapter` or a random one made here, on the
/// [`servable_copy`] of `src`.
fn tiny_in_llama_cpp(src: &Path, adapter: Option<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let base = servable_copy(src, &tmp.path().join("model"));
    let model = match adapter {
        Some(a) => {
            let mut model = common::load(&base);
            peft_model::load_adapter(&mut model, &a, DEFAULT_ADAPTER).unwrap();
            std::fs::create_dir_all(tmp.path().join("adapter")).unwrap();
            common::copy_dir(&a, &tmp.path().join("adapter"));
            model
        }
        None => random_adapter(&base, &common::lora(8, 16.0), &tmp.path().join("adapter")),
    };
    let answers = ours(&model, &Tokenizer::from_model_dir(&base).unwrap());
    drop(model);
    serve_in_llama_cpp(&base, &tmp.path().join("adapter"), &answers, tmp.path());
}

/// A config's text model: its `text_config` (a multimodal checkpoint's), or itself.
fn text_config(c: &mut Value) -> &mut Value {
    if c.get("text_config").is_some() {
        &mut c["text_config"]
    } else {
        c
    }
}

/// [`tiny_in_llama_cpp`] on the arch fixture's model `name`, with its
/// PEFT-made adapter of `kind` (`lora`, `experts`) or a random one.
fn fixture_in_llama_cpp(name: &str, kind: Option<&str>) {
    let fx = arch_reference();
    let adapter = kind.map(|k| fx.join(name).join(k).join("adapter"));
    tiny_in_llama_cpp(&fx.join("models").join(name), adapter);
}

#[test]
fn tiny_llama32_ggufs_answer_as_peft_rs_in_llama_cpp() {
    // Llama 3.2 style: Llama 3 RoPE scaling (rope_freqs), tied head; a PEFT-made adapter.
    fixture_in_llama_cpp("llama32", Some("lora"));
}

#[test]
fn tiny_qwen3_ggufs_answer_as_peft_rs_in_llama_cpp() {
    // q/k norms, head_dim apart from hidden / heads; a PEFT-made adapter.
    fixture_in_llama_cpp("qwen3", Some("lora"));
}

#[test]
fn tiny_gemma3_ggufs_answer_as_peft_rs_in_llama_cpp() {
    // Shifted norms (1 + weight), four norms per layer, q/k norms, scaled
    // embeddings, local and global RoPE (linear scaling on the global
    // layers only), sliding and full layers in a pattern not llama.cpp's
    // default, final logit soft-capping, tied head; a PEFT-made adapter.
    fixture_in_llama_cpp("gemma3", Some("lora"));
}

#[test]
fn sentencepiece_vocabularies_equal_the_converters_and_tokenize_as_peft_rs_in_llama_cpp() {
    // Tiny Llama 2 style and Gemma 3 models with SentencePiece vocabularies
    // (600 BPE pieces with byte fallback, trained by the fixture on Alpaca
    // text; tokenizer.json as transformers converts it): the model GGUF
    // (tokens, scores, types) equals the converter's, and llama.cpp's
    // tokenization of the prompts (non-ASCII text through byte pieces)
    // and its answers equal peft-rs's.
    let tmp = tempfile::tempdir().unwrap();
    let conv = converters();
    let alpaca = common::shared("data/alpaca_5000.json");
    for kind in ["llama", "gemma3"] {
        let dir = tmp.path().join(kind);
        fixture(&["spm-model", s(&dir), kind, s(&alpaca)]);
        let ours = tmp.path().join(format!("ours-{kind}.gguf"));
        let theirs = tmp.path().join(format!("ref-{kind}.gguf"));
        fixture(&["convert-model", s(&conv), s(&dir), s(&theirs), "f32"]);
        export(&["--model", s(&dir), "--output", s(&ours), "--outtype", "f32"]);
        let dumped = dump(&ours);
        assert_eq!(dumped["kv"]["tokenizer.ggml.model"], "llama", "{kind}");
        assert_same_gguf(&ours, &dumped, &dump(&theirs));
        tiny_in_llama_cpp(&dir, None);
    }
}

#[test]
fn tiny_phi3_ggufs_answer_as_peft_rs_in_llama_cpp() {
    // Fused qkv_proj and gate_up_proj, partial rotary dimensions; a
    // PEFT-made adapter. (LongRoPE is checked against the converter only:
    // llama.cpp picks its factors by context size, transformers by length.)
    fixture_in_llama_cpp("phi3", Some("lora"));
}

#[test]
fn tiny_moe_ggufs_with_expert_adapters_answer_as_peft_rs_in_llama_cpp() {
    // Experts, routers and attention adapted: PEFT-made adapters
    // (`target_parameters`) for Mixtral and gpt-oss (sinks, sliding layers,
    // YaRN, biases, transposed interleaved experts), and peft-rs's
    // all-linear (experts and router included, as PEFT's) for Qwen3-MoE.
    fixture_in_llama_cpp("mixtral", Some("experts"));
    fixture_in_llama_cpp("gpt_oss", Some("experts"));
    fixture_in_llama_cpp("qwen3_moe", None);
}

#[test]
fn tiny_qwen2_and_mistral_ggufs_answer_as_peft_rs_in_llama_cpp() {
    // Qwen2: q/k/v biases, an fp16 checkpoint, untied head. Mistral: a bf16
    // checkpoint in shards, tied head. Adapters made by peft-rs.
    tiny_in_llama_cpp(&common::model_dir("qwen2"), None);
    tiny_in_llama_cpp(&common::model_dir("mistral"), None);
}

/// Metadata that differs by design: what llama.cpp's converter derives
/// from the model card (README.md) and the folder's name (names, tags,
/// base-model links); `tokenizer.ggml.pre`, which it picks by hashing a
/// tokenization and we by the declared pre-tokenizer (the llama.cpp tests
/// above check that the splits agree); `add_bos_token` and `add_eos_token`,
/// which we always write and it sometimes leaves to llama.cpp's default
/// (their values are compared where both files have them).
fn informational(key: &str) -> bool {
    key.starts_with("general.base_model.")
        || [
            "general.name",
            "general.finetune",
            "general.basename",
            "general.size_label",
            "general.tags",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ]
        .contains(&key)
}

/// The dumps (see `gguf_reference.py dump`) of our file `ours` and the
/// converters' are the same GGUF: metadata (less the informational keys)
/// and every tensor's shape, type and bytes.
fn assert_same_gguf(ours: &Path, a: &Value, b: &Value) {
    let keys = |v: &Value| -> std::collections::BTreeSet<String> {
        v["kv"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !informational(k))
            .cloned()
            .collect()
    };
    assert_eq!(keys(a), keys(b), "metadata keys of {}", ours.display());
    for k in keys(a)
        .into_iter()
        .chain(["tokenizer.ggml.add_bos_token".to_owned()])
    {
        if b["kv"].get(&k).is_some() {
            assert_eq!(
                a["kv"][&k],
                b["kv"][&k],
                "metadata {k} of {}",
                ours.display()
            );
        }
    }
    let (ta, tb) = (
        a["tensors"].as_object().unwrap(),
        b["tensors"].as_object().unwrap(),
    );
    let names = |t: &serde_json::Map<String, Value>| {
        t.keys().cloned().collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(names(ta), names(tb), "tensor names of {}", ours.display());
    for (n, v) in ta {
        assert_eq!(
            v,
            &tb[n],
            "tensor {n} (shape, type, bytes) of {}",
            ours.display()
        );
    }
}

/// Writes `value` as JSON to `dir/name` and returns the path.
fn json_file(dir: &Path, name: &str, value: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

#[test]
fn ggufs_equal_what_llama_cpp_converters_write() {
    // Models and adapters. The models of Phi-3 (fused qkv_proj and
    // gate_up_proj, also with LongRoPE), Gemma 3 (text and multimodal
    // layouts) and the mixtures of experts are their servable copies (see
    // `servable_copy`: the Hub's per-expert layout for Qwen3-MoE and
    // Mixtral, gpt-oss's fused and transposed one), Gemma 3's with
    // llama.cpp's default layer pattern, which the converter assumes (the
    // fixture's other pattern is checked in llama.cpp above); their adapters
    // are the fixtures'.
    // llama.cpp's converters take no adapter on experts (`target_parameters`);
    // the llama.cpp test above checks ours.
    let models = [
        ("llama32", true),
        ("qwen3", true),
        ("phi3", true),
        ("phi3_longrope", true),
        ("gemma3", true),
        ("gemma3_mm", true),
        ("qwen3_moe", true),
        ("mixtral", true),
        ("gpt_oss", true),
    ];
    // (model, kind, outtype): an adapter GGUF ("lora") or the model's ("model").
    let mut cases: Vec<(&str, &str, &str)> = Vec::new();
    for (name, with_model) in models {
        let (kinds, outtypes): (&[&str], &[&str]) = if with_model {
            (&["lora", "model"], &["f32", "f16", "bf16", "q8_0"])
        } else {
            (&["lora"], &["f32", "q8_0"])
        };
        for &kind in kinds {
            cases.extend(outtypes.iter().map(|&t| (name, kind, t)));
        }
    }
    let conv = converters();
    let tmp = tempfile::tempdir().unwrap();
    for name in [
        "phi3",
        "phi3_longrope",
        "gemma3",
        "gemma3_mm",
        "qwen3_moe",
        "mixtral",
        "gpt_oss",
    ] {
        let copy = servable_copy(
            &arch_reference().join("models").join(name),
            &tmp.path().join("servable").join(name),
        );
        if name.starts_with("gemma3") {
            common::edit_json(&copy.join("config.json"), |c| {
                let text = text_config(c);
                let layers = text["num_hidden_layers"].as_u64().unwrap();
                text["layer_types"] = (0..layers)
                    .map(|l| {
                        if l % 6 < 5 {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
            });
        }
    }
    let model = |name: &str| match tmp.path().join("servable").join(name) {
        copy if copy.exists() => copy,
        _ => arch_reference().join("models").join(name),
    };
    let base = |name: &str| arch_reference().join("models").join(name);
    let adapter = |name: &str| arch_reference().join(name).join("lora/adapter");
    let path = |who: &str, (name, kind, t): (&str, &str, &str)| {
        tmp.path().join(format!("{who}-{name}-{kind}-{t}.gguf"))
    };
    // llama.cpp's converters run in one Python process (torch imported once),
    // beside our exports.
    let jobs: Vec<Value> = cases
        .iter()
        .map(|&c| {
            let (name, kind, t) = c;
            let theirs = path("ref", c);
            match kind {
                "lora" => serde_json::json!({
                    "script": "convert_lora_to_gguf.py",
                    "args": [s(&adapter(name)), "--base", s(&base(name)), "--outfile", s(&theirs), "--outtype", t],
                }),
                _ => serde_json::json!({
                    "script": "convert_hf_to_gguf.py",
                    "args": [s(&model(name)), "--outfile", s(&theirs), "--outtype", t],
                }),
            }
        })
        .collect();
    let jobs = json_file(tmp.path(), "convert.json", &Value::from(jobs));
    std::thread::scope(|scope| {
        let converting = scope.spawn(|| fixture(&["convert-batch", s(&conv), s(&jobs)]));
        for &c in &cases {
            let (name, kind, t) = c;
            let (a, ours) = (adapter(name), path("ours", c));
            let b = if kind == "lora" {
                base(name)
            } else {
                model(name)
            };
            let mut args = vec!["--model", s(&b)];
            if kind == "lora" {
                args.extend(["--adapter", s(&a), "--adapter-only"]);
            }
            args.extend(["--output", s(&ours), "--outtype", t]);
            export(&args);
        }
        converting.join().expect("the converters' thread panicked");
    });
    // Both sides' files, read by the gguf package in one Python process.
    let dumps: Vec<Value> = cases
        .iter()
        .flat_map(|&c| ["ours", "ref"].map(|who| path(who, c)))
        .map(|g| serde_json::json!([s(&g), s(&g.with_extension("json"))]))
        .collect();
    let dumps = json_file(tmp.path(), "dump.json", &Value::from(dumps));
    fixture(&["dump-batch", s(&dumps)]);
    let read = |g: PathBuf| -> Value { common::read_json(&g.with_extension("json")) };
    for &c in &cases {
        let ours = path("ours", c);
        assert_same_gguf(&ours, &read(ours.clone()), &read(path("ref", c)));
    }
    for (name, with_model) in models {
        let what = if with_model {
            "adapter and model GGUFs (f32, f16, bf16, q8_0)"
        } else {
            "adapter GGUFs (f32, q8_0)"
        };
        eprintln!("{name}: {what} equal llama.cpp's converters' output");
    }
}

#[test]
fn both_expert_layouts_write_the_same_gguf() {
    // The Hub's tensor per expert and transformers 5's fused gate_up_proj
    // (the fixtures' `_fused` models hold the same weights), each with
    // PEFT's Mixtral adapter on attention, router and experts merged (its
    // delta split per expert in one case, whole in the other): the same
    // tensors, byte for byte, and the same metadata.
    let tmp = tempfile::tempdir().unwrap();
    let fx = arch_reference();
    let mut pairs = Vec::new();
    for (name, adapter) in [("mixtral", Some("mixtral")), ("qwen3_moe", None)] {
        let mut files = Vec::new();
        for layout in [name.to_owned(), format!("{name}_fused")] {
            let model = servable_copy(&fx.join("models").join(&layout), &tmp.path().join(&layout));
            let out = tmp.path().join(format!("{layout}.gguf"));
            let mut args = vec![
                "--model",
                s(&model),
                "--output",
                s(&out),
                "--outtype",
                "f32",
            ];
            let adapter_dir = adapter.map(|a| fx.join(a).join("experts/adapter"));
            if let Some(a) = &adapter_dir {
                args.extend(["--adapter", s(a)]);
            }
            export(&args);
            files.push(out);
        }
        pairs.push(files);
    }
    let dumps: Vec<Value> = pairs
        .iter()
        .flatten()
        .map(|g| serde_json::json!([s(g), s(&g.with_extension("json"))]))
        .collect();
    let dumps = json_file(tmp.path(), "dump.json", &Value::from(dumps));
    fixture(&["dump-batch", s(&dumps)]);
    for pair in &pairs {
        let read = |g: &PathBuf| -> Value { common::read_json(&g.with_extension("json")) };
        assert_same_gguf(&pair[1], &read(&pair[1]), &read(&pair[0]));
    }
}

#[test]
fn export_refuses_what_llama_cpp_cannot_serve_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    let fx = arch_reference();
    let llama32 = fx.join("models/llama32");
    let run = |args: &[&str]| {
        let mut all = vec!["export", "gguf"];
        all.extend_from_slice(args);
        common::peft_rs(&all)
    };
    // DoRA has no llama.cpp form as an adapter; merged, it does.
    let dora = fx.join("llama32/dora/adapter");
    common::assert_user_error(
        &run(&[
            "--model",
            s(&llama32),
            "--adapter",
            s(&dora),
            "--adapter-only",
            "--output",
            s(&out),
        ]),
        &[
            "use_dora",
            "llama.cpp has no DoRA",
            "without --adapter-only",
        ],
    );
    export(&[
        "--model",
        s(&llama32),
        "--adapter",
        s(&dora),
        "--output",
        s(&out),
    ]);
    // An existing output is kept unless --overwrite, and --overwrite replaces only a GGUF file.
    common::assert_user_error(
        &run(&["--model", s(&llama32), "--output", s(&out)]),
        &["already exists", "--overwrite"],
    );
    let text = tmp.path().join("notes.gguf");
    std::fs::write(&text, "my notes").unwrap();
    common::assert_user_error(
        &run(&["--model", s(&llama32), "--output", s(&text), "--overwrite"]),
        &["not a GGUF file"],
    );
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "my notes");
    common::assert_user_error(
        &run(&[
            "--model",
            s(&llama32),
            "--output",
            s(&tmp.path().join("x.bin")),
        ]),
        &["FILE.gguf"],
    );
    // What llama.cpp's Gemma 3 cannot express (its attention scale) is named.
    common::assert_user_error(
        &run(&[
            "--model",
            s(&fx.join("models/gemma3")),
            "--output",
            s(&tmp.path().join("p.gguf")),
        ]),
        &["query_pre_attn_scalar", "1/√32"],
    );
    // Mixtures of experts that llama.cpp's graphs would compute otherwise:
    // a dense layer in Qwen3-MoE, top-k weights not renormalized, gpt-oss's
    // SwiGLU with other constants. Their adapters are written, with the
    // same lines as warnings.
    common::assert_user_error(
        &run(&[
            "--model",
            s(&fx.join("models/qwen3_moe")),
            "--output",
            s(&tmp.path().join("q.gguf")),
        ]),
        &["layers [1] are dense", "mlp_only_layers", "qwen3_moe"],
    );
    common::assert_user_error(
        &run(&[
            "--model",
            s(&fx.join("models/gpt_oss")),
            "--output",
            s(&tmp.path().join("g.gguf")),
        ]),
        &["swiglu_limit", "7.0"],
    );
    let warned = run(&[
        "--model",
        s(&fx.join("models/qwen3_moe")),
        "--adapter",
        s(&fx.join("qwen3_moe/experts/adapter")),
        "--adapter-only",
        "--output",
        s(&tmp.path().join("q-lora.gguf")),
    ]);
    common::assert_ok(&warned);
    for line in ["are dense", "`norm_topk_prob` is false"] {
        assert!(
            common::stderr(&warned).contains(line),
            "{}",
            common::stderr(&warned)
        );
    }
    // A sliding window llama.cpp does not apply is said, not hidden.
    let out2 = common::peft_rs(&[
        "export",
        "gguf",
        "--model",
        s(&common::model_dir("mistral")),
        "--output",
        s(&tmp.path().join("m.gguf")),
    ]);
    common::assert_ok(&out2);
    assert!(
        common::stderr(&out2).contains("sliding_window 5"),
        "{}",
        common::stderr(&out2)
    );
    // Nothing half-written is left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn ollama_modelfile_names_the_files_the_template_and_the_stop_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::default_model();
    let adapter = tmp.path().join("adapter");
    drop(random_adapter(&base, &common::lora(4, 8.0), &adapter));
    let lora = tmp.path().join("serve/my-lora.gguf");
    export(&[
        "--adapter",
        s(&adapter),
        "--model",
        s(&base),
        "--adapter-only",
        "--output",
        s(&lora),
        "--ollama",
    ]);
    let text = std::fs::read_to_string(tmp.path().join("serve/Modelfile")).unwrap();
    assert!(
        text.contains("FROM ./SmolLM2-135M-Instruct.gguf\n"),
        "{text}"
    );
    assert!(text.contains("ADAPTER ./my-lora.gguf\n"), "{text}");
    assert!(
        text.contains("TEMPLATE \"\"\"") && text.contains("<|im_start|>{{ .Role }}"),
        "{text}"
    );
    assert!(text.contains("PARAMETER stop \"<|im_end|>\""), "{text}");
    // The adapter alone names its base in the Modelfile; its file is a LoRA GGUF.
    let kv = dump(&lora)["kv"].clone();
    assert_eq!(kv["general.type"], "adapter");
    assert_eq!(kv["adapter.lora.alpha"], 8.0);
    // A second export keeps the Modelfile unless --overwrite.
    let again = common::peft_rs(&[
        "export",
        "gguf",
        "--adapter",
        s(&adapter),
        "--model",
        s(&base),
        "--adapter-only",
        "--output",
        s(&tmp.path().join("serve/b.gguf")),
        "--ollama",
    ]);
    common::assert_user_error(&again, &["Modelfile", "already exists"]);
}

/// The numbers of `merge --verify n`'s line: the largest logit difference,
/// the positions with the same next token, and all positions.
fn verify_line(out: &std::process::Output, n: usize) -> (f64, usize, usize) {
    common::assert_ok(out);
    let err = common::stderr(out);
    let line = err
        .lines()
        .find(|l| l.starts_with(&format!("verify: {n} prompts")))
        .unwrap_or_else(|| panic!("{err}"));
    let after = |key: &str| line.split(key).nth(1).unwrap_or_else(|| panic!("{line}"));
    let diff = after("largest logit difference ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (same, total) = after("same next token at ")
        .split(' ')
        .next()
        .unwrap()
        .split_once('/')
        .unwrap();
    (diff, same.parse().unwrap(), total.parse().unwrap())
}

#[test]
fn merge_verify_compares_the_merged_model_with_base_and_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base = arch_reference().join("models/llama32");
    let adapter = arch_reference().join("llama32/lora/adapter");
    let out = common::peft_rs(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--output",
        s(&tmp.path().join("m")),
        "--verify",
        "4",
    ]);
    let (diff, same, total) = verify_line(&out, 4);
    assert!(diff < 1e-4, "diff {diff}");
    assert_eq!(same, total);
    // In bf16 the merged weights are rounded: the difference is reported, larger.
    let out = common::peft_rs(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--output",
        s(&tmp.path().join("b")),
        "--dtype",
        "bf16",
        "--verify",
        "2",
    ]);
    let (bf16, _, _) = verify_line(&out, 2);
    assert!(bf16 > diff, "bf16 {bf16} against fp32 {diff}");
    common::assert_user_error(
        &common::peft_rs(&[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--output",
            s(&tmp.path().join("z")),
            "--verify",
            "0",
        ]),
        &["--verify 0"],
    );
}

/// Run by `export_streams_the_model_tensor_by_tensor` in a process of its
/// own: exports SmolLM2 with an adapter merged and prints the rise of the
/// peak RSS over the export.
#[test]
#[ignore]
fn export_peak_child() {
    let dir = PathBuf::from(std::env::var("GGUF_EXPORT_DIR").unwrap());
    let base = common::default_model();
    let before = common::peak_rss_bytes();
    peft_rs::gguf::export(&peft_rs::gguf::ExportOptions {
        model: base,
        adapters: vec![dir.join("adapter")],
        adapter_only: false,
        output: dir.join("merged.gguf"),
        outtype: peft_rs::gguf::TensorType::F32,
        overwrite: false,
        progress: false,
    })
    .unwrap();
    println!("PEAK_RISE {}", common::peak_rss_bytes() - before);
}

#[test]
fn export_streams_the_model_tensor_by_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::default_model();
    drop(random_adapter(
        &base,
        &common::lora(8, 16.0),
        &tmp.path().join("adapter"),
    ));
    let rise = common::child_peak_rise_mib("export_peak_child", ("GGUF_EXPORT_DIR", s(tmp.path())));
    let file_mib = std::fs::metadata(tmp.path().join("merged.gguf"))
        .unwrap()
        .len() as f64
        / (1 << 20) as f64;
    // The largest tensor (the 49152 × 576 embedding) is 108 MiB in f32: it is
    // held as its mapped pages and its copy, once, plus the tokenizer's
    // metadata and libtorch's first-use allocations (measured: 309 MiB, 0.6×
    // the file). A whole model in memory would be at least the file's size.
    eprintln!("export of a {file_mib:.0} MiB GGUF: peak RSS rise {rise:.0} MiB");
    assert!(
        rise < 0.75 * file_mib,
        "peak rise {rise:.0} MiB for a {file_mib:.0} MiB file"
    );
}
