//! 4-bit (NF4, FP4, with and without double quantization) and 8-bit weight
//! quantization against bitsandbytes on the CPU, bit for bit
//! (`tests/fixtures/quant_reference.py`): every linear layer of SmolLM2-135M,
//! hand-made edge cases, tiny Llamas quantized and saved by transformers, and
//! the errors for checkpoints and configs peft-rs cannot read.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_rs::quant::codebook::host_tables_made;
use peft_rs::quant::{
    dequantize_blockwise, dynamic_map, load_4bit, load_int8, quantize_4bit, quantize_blockwise,
    quantize_int8, read_quantization, BnbMode, BnbQuantization, QuantType, Quantized4bit,
};
use peft_rs::weights::{tensor_bytes, WeightFiles};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

const SETTINGS: [(&str, QuantType, bool); 4] = [
    ("nf4", QuantType::Nf4, false),
    ("fp4", QuantType::Fp4, false),
    ("nf4_dq", QuantType::Nf4, true),
    ("fp4_dq", QuantType::Fp4, true),
];

fn reference() -> &'static Path {
    common::fixture("quant_reference.py", &[], &[&common::default_model()])
}

fn read(file: &str) -> HashMap<String, Tensor> {
    common::tensors(&reference().join(file))
}

fn info() -> Value {
    common::read_json(&reference().join("info.json"))
}

/// The weight of the linear layer `prefix` in `files`, of `shape`, in `kind`.
fn weight(files: &WeightFiles, prefix: &str, shape: &[i64], kind: Kind) -> Tensor {
    files
        .load(&format!("{prefix}.weight"), shape, kind, Device::Cpu)
        .unwrap()
}

fn sha(t: &Tensor) -> String {
    Sha256::digest(tensor_bytes(t).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `None` when `ours` has the same dtype, shape and bytes as `want`; else
/// what differs (with the first differing element), for the failure report.
fn differs(ours: &Tensor, want: &Tensor) -> Option<String> {
    if ours.kind() != want.kind() || ours.size() != want.size() {
        return Some(format!(
            "{:?} {:?} vs bitsandbytes {:?} {:?}",
            ours.kind(),
            ours.size(),
            want.kind(),
            want.size()
        ));
    }
    let (a, b) = (tensor_bytes(ours).unwrap(), tensor_bytes(want).unwrap());
    if a == b {
        return None;
    }
    let width = ours.kind().elt_size_in_bytes();
    let diff = a
        .chunks(width)
        .zip(b.chunks(width))
        .filter(|(x, y)| x != y)
        .count();
    let first = a
        .chunks(width)
        .zip(b.chunks(width))
        .position(|(x, y)| x != y)
        .unwrap();
    let (fo, fw) = (
        ours.view([-1]).get(first as i64),
        want.view([-1]).get(first as i64),
    );
    Some(format!(
        "{diff} of {} elements differ; first at flat index {first}: {} vs bitsandbytes {}",
        ours.numel(),
        fo.double_value(&[]),
        fw.double_value(&[])
    ))
}

/// Compares a quantization (and its dequantization to the input's dtype)
/// with bitsandbytes' outputs stored under `prefix/`; pushes what differs.
fn compare_4bit(
    q: &Quantized4bit,
    t: &HashMap<String, Tensor>,
    prefix: &str,
    hashes: Option<&Value>,
    failures: &mut Vec<String>,
) {
    let mut check = |field: &str, ours: &Tensor| {
        let key = format!("{prefix}/{field}");
        if let Some(want) = t.get(&key) {
            if let Some(d) = differs(ours, want) {
                failures.push(format!("{key}: {d}"));
            }
        } else {
            let want = hashes.and_then(|h| h[field].as_str()).unwrap_or_else(|| {
                panic!("{key}: neither stored nor hashed by the fixture");
            });
            if sha(ours) != want {
                failures.push(format!("{key}: bytes differ (SHA-256)"));
            }
        }
    };
    check("data", &q.data);
    check("absmax", &q.absmax);
    check("dequant", &q.dequantize(q.dtype, Device::Cpu));
    // The path of a weight on a GPU, run here: the same bits, and no table
    // made from host data (on a GPU, a blocking copy per layer and forward).
    let made = host_tables_made();
    check(
        "dequant",
        &q.dequantize_with_tensor_ops(q.dtype, Device::Cpu),
    );
    assert_eq!(
        host_tables_made(),
        made,
        "{prefix}: dequantization copied a table from the host"
    );
    // Rounded into bf16 as the products are written: what rounding the f32
    // result gives.
    if q.dtype == Kind::Float
        && !q
            .dequantize_with_tensor_ops(Kind::BFloat16, Device::Cpu)
            .equal(
                &q.dequantize(Kind::Float, Device::Cpu)
                    .to_kind(Kind::BFloat16),
            )
    {
        failures.push(format!(
            "{prefix}: bf16 dequantization differs from the rounded f32 one"
        ));
    }
    let nested_key = format!("{prefix}/nested_absmax");
    match (&q.nested, t.get(&nested_key)) {
        (Some(nested), Some(want)) => {
            if let Some(d) = differs(&nested.absmax, want) {
                failures.push(format!("{nested_key}: {d}"));
            }
            let want_offset = t[&format!("{prefix}/offset")].double_value(&[0]) as f32;
            if nested.offset.to_bits() != want_offset.to_bits() {
                failures.push(format!(
                    "{prefix}/offset: {} vs bitsandbytes {want_offset}",
                    nested.offset
                ));
            }
        }
        (None, None) => {}
        (ours, _) => failures.push(format!(
            "{prefix}: double quantization {} here, {} in bitsandbytes",
            ours.is_some(),
            !ours.is_some()
        )),
    }
}

fn report(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} mismatches with bitsandbytes; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn code_books_are_bitsandbytes_code_books() {
    let t = read("codebooks.safetensors");
    let mut failures = vec![];
    for (name, qt) in [("nf4", QuantType::Nf4), ("fp4", QuantType::Fp4)] {
        if let Some(d) = differs(&qt.code_tensor(Device::Cpu), &t[name]) {
            failures.push(format!("{name}: {d}"));
        }
    }
    if let Some(d) = differs(&dynamic_map(Device::Cpu), &t["dynamic"]) {
        failures.push(format!("dynamic map: {d}"));
    }
    report(&failures);
}

#[test]
fn every_smollm2_linear_layer_matches_bitsandbytes() {
    let info = info();
    assert_eq!(
        info["native_cpu_library"], true,
        "bitsandbytes' native CPU library did not load, so the reference is its PyTorch fallback"
    );
    let t = read("smollm2.safetensors");
    let files = WeightFiles::from_model_dir(&common::default_model()).unwrap();
    let layers = info["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 30 * 7, "every linear layer of SmolLM2-135M");
    let mut failures = vec![];
    let (mut quant_s, mut dequant_s, mut params) = (0f64, 0f64, 0i64);
    let (mut frozen, mut frozen_bnb) = (0usize, 0u64);
    for (prefix, entry) in layers {
        let shape: Vec<i64> = entry["nf4"]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let w = weight(&files, prefix, &shape, Kind::Float);
        for (setting, qt, dq) in SETTINGS {
            let start = Instant::now();
            let q = quantize_4bit(&w, qt, dq).unwrap();
            if setting == "nf4_dq" {
                quant_s += start.elapsed().as_secs_f64();
                let start = Instant::now();
                let _ = q.dequantize(Kind::Float, Device::Cpu);
                dequant_s += start.elapsed().as_secs_f64();
                params += w.numel() as i64;
                frozen += q.frozen_bytes();
                frozen_bnb += entry[setting]["frozen_bytes"].as_u64().unwrap();
            }
            compare_4bit(
                &q,
                &t,
                &format!("{setting}/{prefix}"),
                Some(&entry[setting]),
                &mut failures,
            );
        }
        let i8w = quantize_int8(&w).unwrap();
        let key = format!("int8/{prefix}");
        match t.get(&format!("{key}/CB")) {
            Some(want) => {
                if let Some(d) = differs(&i8w.cb, want) {
                    failures.push(format!("{key}/CB: {d}"));
                }
            }
            None => failures.push(format!("{key}/CB: not in the fixture")),
        }
        if let Some(d) = differs(&i8w.scb, &t[&format!("{key}/SCB")]) {
            failures.push(format!("{key}/SCB: {d}"));
        }
        if sha(&i8w.dequantize(Kind::Float, Device::Cpu)) != entry["int8"]["dequant"] {
            failures.push(format!("{key}/dequant: bytes differ (SHA-256)"));
        }
        if let Some(want) = t.get(&format!("{key}/dequant")) {
            if let Some(d) = differs(&i8w.dequantize(Kind::Float, Device::Cpu), want) {
                failures.push(format!("{key}/dequant: {d}"));
            }
        }
    }
    eprintln!(
        "SmolLM2-135M, {params} linear parameters, NF4 + double quantization: quantize {quant_s:.2} s, \
         dequantize to f32 {dequant_s:.2} s; {frozen} bytes held = {:.4} B/param (bitsandbytes holds {frozen_bnb})",
        frozen as f64 / params as f64
    );
    assert_eq!(frozen as u64, frozen_bnb, "bytes held per layer, summed");
    report(&failures);
}

#[test]
fn edge_cases_match_bitsandbytes() {
    let t = read("edge.safetensors");
    let mut names: Vec<&str> = t
        .keys()
        .filter_map(|k| k.strip_prefix("edge/")?.strip_suffix("/input"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 21, "edge cases: {names:?}");
    let mut failures = vec![];
    for name in &names {
        let input = &t[&format!("edge/{name}/input")];
        for (setting, qt, dq) in SETTINGS {
            let q = quantize_4bit(input, qt, dq).unwrap();
            assert_eq!(q.dtype, input.kind());
            compare_4bit(
                &q,
                &t,
                &format!("edge/{name}/{setting}"),
                None,
                &mut failures,
            );
        }
    }
    // The 8-bit quantizer of the nested absmax, on its own.
    let code = dynamic_map(Device::Cpu);
    for key in t
        .keys()
        .filter(|k| k.starts_with("blockwise8/") && k.ends_with("/input"))
    {
        let base = key.strip_suffix("/input").unwrap();
        let (q, absmax) = quantize_blockwise(&t[key], &code, 256).unwrap();
        for (field, ours) in [
            ("q", &q),
            ("absmax", &absmax),
            ("dequant", &dequantize_blockwise(&q, &absmax, &code, 256)),
        ] {
            if let Some(d) = differs(ours, &t[&format!("{base}/{field}")]) {
                failures.push(format!("{base}/{field}: {d}"));
            }
        }
    }
    for case in ["int8_edge", "int8_scaling_rule", "int8_bf16"] {
        let w = quantize_int8(&t[&format!("{case}/input")]).unwrap();
        for (field, ours) in [
            ("CB", &w.cb),
            ("SCB", &w.scb),
            ("dequant", &w.dequantize(Kind::Float, Device::Cpu)),
        ] {
            if let Some(d) = differs(ours, &t[&format!("{case}/{field}")]) {
                failures.push(format!("{case}/{field}: {d}"));
            }
        }
    }
    report(&failures);

    // The cases exercise what they are meant to (so that the comparisons
    // above could fail): FP4's two zero codes both occur (both decode to
    // +0.0, the code book's value; bitsandbytes' scalar CPU and CUDA kernels
    // give code 8 the sign bit, its PyTorch definition does not).
    let codes: Vec<u8> = Vec::try_from(&t["edge/midpoints_fp4/fp4/data"].view([-1])).unwrap();
    let nibbles: Vec<u8> = codes.iter().flat_map(|b| [b >> 4, b & 15]).collect();
    assert!(
        nibbles.contains(&0) && nibbles.contains(&8),
        "FP4 codes 0 and 8"
    );
    // The zero tail's absmax is the clamp value, the zero block's a true 0.
    let tail: Vec<f32> = Vec::try_from(&t["edge/size_300_zero_tail/nf4/absmax"]).unwrap();
    assert_eq!(*tail.last().unwrap(), 1e-38f32);
    let zero_block: Vec<f32> = Vec::try_from(&t["edge/zero_block/nf4/absmax"]).unwrap();
    assert!(zero_block.contains(&0.0));
}

fn model(name: &str) -> PathBuf {
    reference().join("models").join(name)
}

/// The weights of the quantized checkpoint in `dir`, those of the base it
/// was quantized from, and bitsandbytes' dequantization of each layer.
fn saved(dir: &Path) -> (WeightFiles, WeightFiles, HashMap<String, Tensor>) {
    (
        WeightFiles::from_model_dir(dir).unwrap(),
        WeightFiles::from_model_dir(&model("base")).unwrap(),
        common::tensors(&dir.join("dequant.safetensors")),
    )
}

#[test]
fn transformers_4bit_checkpoints_load_as_bitsandbytes_reads_them() {
    for (name, qt, dq, dtype) in [
        ("nf4_dq", QuantType::Nf4, true, Kind::Float),
        ("fp4_bf16", QuantType::Fp4, false, Kind::BFloat16),
    ] {
        let dir = model(name);
        let config = read_quantization(&dir)
            .unwrap()
            .expect("a quantization_config");
        assert_eq!(
            config.mode,
            BnbMode::FourBit {
                quant_type: qt,
                double_quant: dq,
                compute_dtype: dtype
            },
            "{name}"
        );
        let (files, base, want) = saved(&dir);
        assert_eq!(want.len(), 14);
        for (prefix, want) in &want {
            let shape = want.size();
            let q = load_4bit(&files, prefix, &shape).unwrap();
            assert_eq!((q.quant_type, q.nested.is_some(), q.dtype), (qt, dq, dtype));
            if let Some(d) = differs(&q.dequantize(q.dtype, Device::Cpu), want) {
                panic!("{name} {prefix}: dequantized weight: {d}");
            }
            // transformers quantized the base weight (in the model's dtype)
            // with bitsandbytes: quantizing it here gives the stored bytes.
            let w = weight(&base, prefix, &shape, dtype);
            let ours = quantize_4bit(&w, qt, dq).unwrap();
            for (field, a, b) in [
                ("weight", &ours.data, &q.data),
                ("weight.absmax", &ours.absmax, &q.absmax),
            ] {
                if let Some(d) = differs(a, b) {
                    panic!("{name} {prefix}.{field}: {d}");
                }
            }
            if let (Some(a), Some(b)) = (&ours.nested, &q.nested) {
                assert!(
                    differs(&a.absmax, &b.absmax).is_none(),
                    "{prefix} nested_absmax"
                );
                assert!(
                    differs(&a.code, &b.code).is_none(),
                    "{prefix} nested_quant_map"
                );
                assert_eq!(
                    a.offset.to_bits(),
                    b.offset.to_bits(),
                    "{prefix} nested_offset"
                );
            }
        }
    }
}

#[test]
fn transformers_int8_checkpoint_loads_as_bitsandbytes_reads_it() {
    let dir = model("int8");
    let config = read_quantization(&dir).unwrap().unwrap();
    assert_eq!(config.mode, BnbMode::EightBit { threshold: 6.0 });
    let (files, base, want) = saved(&dir);
    assert_eq!(want.len(), 14);
    for (prefix, want) in &want {
        let shape = want.size();
        let w = load_int8(&files, prefix, &shape).unwrap();
        if let Some(d) = differs(&w.dequantize(Kind::Float, Device::Cpu), want) {
            panic!("{prefix}: dequantized weight: {d}");
        }
        let fp32 = weight(&base, prefix, &shape, Kind::Float);
        let ours = quantize_int8(&fp32).unwrap();
        assert!(differs(&ours.cb, &w.cb).is_none(), "{prefix}.weight");
        assert!(differs(&ours.scb, &w.scb).is_none(), "{prefix}.SCB");
    }
}

/// The error of a failed load, checked to be one line holding every needle.
fn one_line_error<T>(r: anyhow::Result<T>, needles: &[&str]) -> String {
    let Err(e) = r else {
        panic!("expected an error containing {needles:?}");
    };
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "error lacks {n:?}: {msg}");
    }
    msg
}

const Q: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn broken_4bit_checkpoints_give_one_clear_error() {
    let bad =
        |name: &str| WeightFiles::from_model_dir(&reference().join("bad").join(name)).unwrap();
    one_line_error(
        load_4bit(&bad("no_quant_state"), Q, &[64, 64]),
        &[
            "model.safetensors",
            "tensor model.layers.0.self_attn.q_proj.weight",
            "quant_state.bitsandbytes__nf4",
        ],
    );
    one_line_error(
        load_4bit(&bad("short_absmax"), Q, &[64, 64]),
        &[
            "tensor model.layers.0.self_attn.q_proj.weight.absmax",
            "shape [63]",
            "[64]",
        ],
    );
    one_line_error(
        load_4bit(&bad("no_nested_absmax"), Q, &[64, 64]),
        &[
            "tensor model.layers.0.self_attn.q_proj.weight.nested_absmax",
            "missing",
        ],
    );
    one_line_error(
        load_4bit(&bad("wrong_state_shape"), Q, &[64, 64]),
        &[
            "quant_state.bitsandbytes__nf4",
            "field `shape`",
            "[64, 128]",
            "[64, 64]",
        ],
    );
    // A model config that implies another shape than the checkpoint holds.
    let good = WeightFiles::from_model_dir(&model("nf4_dq")).unwrap();
    one_line_error(
        load_4bit(&good, Q, &[64, 32]),
        &["field `shape`", "[64, 64]", "model config implies [64, 32]"],
    );
    // An unquantized layer (the output head stays in full precision).
    one_line_error(
        load_4bit(&good, "lm_head", &[128, 64]),
        &["tensor lm_head.weight", "quant_state"],
    );
    // An int8 layer read from a 4-bit checkpoint.
    one_line_error(
        load_int8(&good, Q, &[64, 64]),
        &[
            "tensor model.layers.0.self_attn.q_proj.weight",
            "dtype U8",
            "expected I8",
        ],
    );
    // The good layer loads (so the failures above are the breakage's).
    load_4bit(&good, Q, &[64, 64]).unwrap();
}

fn parse(q: Value) -> anyhow::Result<BnbQuantization> {
    BnbQuantization::from_json(&q, Path::new("/m/config.json"))
}

#[test]
fn quantization_configs_other_than_bitsandbytes_are_refused_by_name() {
    for (method, name) in [("gptq", "GPTQ"), ("awq", "AWQ"), ("hqq", "HQQ")] {
        one_line_error(
            parse(json!({"quant_method": method, "bits": 4, "group_size": 128})),
            &[
                "/m/config.json",
                "quantization_config.quant_method",
                method,
                name,
            ],
        );
    }
    one_line_error(
        parse(json!({"load_in_4bit": true})),
        &["quantization_config.quant_method", "missing"],
    );
    one_line_error(
        parse(
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_storage": "bfloat16"}),
        ),
        &["bnb_4bit_quant_storage", "bfloat16", "uint8"],
    );
    one_line_error(
        parse(
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "int4"}),
        ),
        &["bnb_4bit_quant_type", "int4"],
    );
    one_line_error(
        parse(json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": true})),
        &["both true"],
    );
    one_line_error(
        parse(json!({"quant_method": "bitsandbytes"})),
        &["neither", "load_in_4bit"],
    );
    one_line_error(
        parse(
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "_load_in_4bit": false}),
        ),
        &["disagree"],
    );
    one_line_error(
        parse(
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_compute_dtype": "int8"}),
        ),
        &["bnb_4bit_compute_dtype", "int8"],
    );
}

#[test]
fn bitsandbytes_configs_parse_with_transformers_defaults() {
    let c = parse(json!({"quant_method": "bitsandbytes", "load_in_4bit": true})).unwrap();
    assert_eq!(
        c.mode,
        BnbMode::FourBit {
            quant_type: QuantType::Fp4,
            double_quant: false,
            compute_dtype: Kind::Float
        }
    );
    let c = parse(json!({
        "quant_method": "bitsandbytes", "_load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head", "layers.1", "mlp.gate"]
    }))
    .unwrap();
    assert_eq!(
        c.mode,
        BnbMode::FourBit {
            quant_type: QuantType::Nf4,
            double_quant: true,
            compute_dtype: Kind::BFloat16
        }
    );
    // transformers' should_convert_module: a prefix up to a module boundary,
    // a regular expression, or a suffix.
    for (path, skipped) in [
        ("lm_head", true),
        ("model.layers.1.mlp.down_proj", false),
        ("layers.1.mlp.up_proj", true),
        ("layers.11.mlp.up_proj", false),
        ("model.layers.3.mlp.gate", true),
        ("model.layers.3.mlp.gate_proj", false),
    ] {
        assert_eq!(c.skips(path).unwrap(), skipped, "{path}");
    }
    let c = parse(
        json!({"quant_method": "bitsandbytes", "load_in_8bit": true, "llm_int8_threshold": 4.5}),
    )
    .unwrap();
    assert_eq!(c.mode, BnbMode::EightBit { threshold: 4.5 });
    assert!(read_quantization(&common::default_model())
        .unwrap()
        .is_none());
}

#[test]
fn bad_weights_are_refused() {
    one_line_error(
        quantize_4bit(
            &Tensor::from_slice(&[1.0f32, f32::NAN]),
            QuantType::Nf4,
            false,
        ),
        &["NaN or infinite"],
    );
    one_line_error(
        quantize_4bit(&Tensor::from_slice(&[1i64, 2]), QuantType::Nf4, false),
        &["f32, f16 or bf16", "Int64"],
    );
    one_line_error(
        quantize_int8(&Tensor::from_slice(&[1e5f32, 1.0]).view([1, 2])),
        &["f16"],
    );
}
