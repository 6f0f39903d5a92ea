//! Property tests over the three readers of untrusted input: the safetensors
//! header parser (model weights), the adapter config reader and the training
//! data reader. Random and mutated inputs must give a value or an error —
//! never a panic, never a hang, and never an allocation out of proportion to
//! the input (measured by a counting allocator).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use peft_rs::adapters::lora::LoraConfig;
use peft_rs::data::{load_dataset, DataOptions};
use peft_rs::tokenizer::Tokenizer;
use peft_rs::weights::WeightFiles;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// The system allocator, counting the live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// When the current case started (ms since the watchdog began; 0: none running).
static CASE_START: AtomicU64 = AtomicU64::new(0);
const CASE_LIMIT: Duration = Duration::from_secs(20);

fn watchdog_epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let epoch = Instant::now();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let start = CASE_START.load(Ordering::Relaxed);
            // `start` is stored one millisecond ahead (0 means none), so it
            // may be later than now: saturate, or this thread panics, and its
            // backtrace's symbol tables count as the case's allocation.
            if start > 0
                && (epoch.elapsed().as_millis() as u64).saturating_sub(start)
                    > CASE_LIMIT.as_millis() as u64
            {
                eprintln!("a fuzz case ran past {CASE_LIMIT:?}: the reader hangs");
                std::process::abort();
            }
        });
        epoch
    })
}

/// Runs one case, checking time and peak allocation against the input size.
fn case<T>(input_len: usize, f: impl FnOnce() -> T) -> T {
    let epoch = watchdog_epoch();
    CASE_START.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    CASE_START.store(0, Ordering::Relaxed);
    let allowed = 64 * input_len + (32 << 20);
    assert!(
        grown <= allowed,
        "a {input_len}-byte input made the reader allocate {grown} bytes"
    );
    out
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!(u64::MAX)),
        ".{0,24}".prop_map(Value::from),
    ]
}

/// JSON values whose object keys come from `keys` or are random.
fn json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> + Clone {
    let key = prop_oneof![
        proptest::sample::select(keys).prop_map(str::to_owned),
        "[a-z_]{1,12}",
    ];
    json_leaf().prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every adapter_config.json key peft-rs reads.
const ADAPTER_KEYS: &[&str] = peft_rs::adapters::lora::config::KNOWN_FIELDS;

const RECORD_KEYS: &[&str] = &[
    "instruction",
    "input",
    "output",
    "messages",
    "role",
    "content",
    "prompt",
    "completion",
    "text",
];

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn valid_adapter_config() -> Value {
    serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "rank_pattern": {"q_proj": 4}, "alpha_pattern": {}, "use_dora": false
    })
}

fn adapter_config_reader_never_panics() {
    let mut r = runner(400);
    r.run(&json(ADAPTER_KEYS), |v| {
        let len = v.to_string().len();
        let _ = case(len, || LoraConfig::from_json(&v));
        Ok(())
    })
    .unwrap();
    // Valid configs with one field replaced by anything.
    let mutation = (proptest::sample::select(ADAPTER_KEYS), json(ADAPTER_KEYS));
    r.run(&mutation, |(k, v)| {
        let mut c = valid_adapter_config();
        c[k] = v;
        let len = c.to_string().len();
        let _ = case(len, || LoraConfig::from_json(&c));
        Ok(())
    })
    .unwrap();
}

/// A small valid safetensors file.
fn valid_safetensors() -> Vec<u8> {
    let t = [
        (
            "a.weight".to_owned(),
            tch::Tensor::arange(12, (tch::Kind::Float, tch::Device::Cpu)).view([3, 4]),
        ),
        (
            "b.bias".to_owned(),
            tch::Tensor::ones([5], (tch::Kind::BFloat16, tch::Device::Cpu)),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    tch::Tensor::write_safetensors(&t, &p).unwrap();
    std::fs::read(p).unwrap()
}

/// A safetensors file of `header` (padded as the format does) over `data`.
fn with_header(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut head = header.to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut b = (head.len() as u64).to_le_bytes().to_vec();
    b.extend(head);
    b.extend(data);
    b
}

fn open_and_load(path: &Path) {
    if let Ok(files) = WeightFiles::from_files(&[path.to_path_buf()]) {
        let names: Vec<String> = files.names().map(str::to_owned).collect();
        for n in names {
            let (shape, _) = files.info(&n).unwrap();
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let _ = files.load(&n, &shape, tch::Kind::Float, tch::Device::Cpu);
        }
    }
}

fn safetensors_reader_never_panics() {
    let valid = valid_safetensors();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mutation = prop_oneof![
        // Overwrite bytes of the header.
        proptest::collection::vec((0..8 + header_len, any::<u8>()), 1..8).prop_map({
            let valid = valid.clone();
            move |edits| {
                let mut b = valid.clone();
                for (i, x) in edits {
                    b[i] = x;
                }
                b
            }
        }),
        // Truncate anywhere.
        (0..valid.len()).prop_map({
            let valid = valid.clone();
            move |n| valid[..n].to_vec()
        }),
        // Lie about the header length.
        any::<u64>().prop_map({
            let valid = valid.clone();
            move |n| {
                let mut b = valid.clone();
                b[..8].copy_from_slice(&n.to_le_bytes());
                b
            }
        }),
        // Any JSON as the header, over the valid data.
        json(&[
            "dtype",
            "shape",
            "data_offsets",
            "a.weight",
            "b.bias",
            "__metadata__"
        ])
        .prop_map({
            let valid = valid.clone();
            move |h| with_header(&h, &valid[8 + header_len..])
        }),
        proptest::collection::vec(any::<u8>(), 0..256),
        // A well-formed header with one field of one tensor replaced.
        (
            proptest::sample::select(&["a.weight", "b.bias"][..]),
            proptest::sample::select(&["dtype", "shape", "data_offsets"][..]),
            prop_oneof![
                proptest::collection::vec(any::<u32>().prop_map(u64::from), 0..4)
                    .prop_map(|v| serde_json::json!(v)),
                proptest::collection::vec(0u64..64, 0..4).prop_map(|v| serde_json::json!(v)),
                Just(serde_json::json!([0, u64::MAX])),
                Just(serde_json::json!([u64::MAX / 2, u64::MAX / 2])),
                proptest::sample::select(
                    &["F32", "BF16", "F16", "I64", "U8", "BOOL", "F8_E4M3", "X"][..]
                )
                .prop_map(|d| serde_json::json!(d)),
            ],
        )
            .prop_map({
                let valid = valid.clone();
                move |(tensor, field, value)| {
                    let mut header: Value =
                        serde_json::from_slice(&valid[8..8 + header_len]).unwrap();
                    header[tensor][field] = value;
                    with_header(&header, &valid[8 + header_len..])
                }
            }),
        Just(valid.clone()),
    ];
    runner(400)
        .run(&mutation, |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            case(bytes.len(), || open_and_load(&path));
            Ok(())
        })
        .unwrap();
}

fn data_reader_never_panics() {
    let tok = Tokenizer::from_model_dir(&common::model_dir("llama")).unwrap();
    let eos = tok.eos_token_id().unwrap() as i64;
    let dir = tempfile::tempdir().unwrap();
    let opts = DataOptions {
        format: None,
        max_seq_len: 64,
        train_on_prompt: false,
    };
    let record = json(RECORD_KEYS);
    let file = prop_oneof![
        proptest::collection::vec(record.clone(), 1..5).prop_map(|rs| {
            rs.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        }),
        proptest::collection::vec(record, 1..5).prop_map(|rs| Value::Array(rs).to_string()),
        // Chats with random turns.
        proptest::collection::vec(
            (
                prop_oneof![
                    Just("user".to_owned()),
                    Just("assistant".to_owned()),
                    Just("system".to_owned()),
                    ".{0,8}"
                ],
                ".{0,40}"
            ),
            0..12
        )
        .prop_map(|turns| {
            let m: Vec<Value> = turns
                .into_iter()
                .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                .collect();
            serde_json::json!({"messages": m}).to_string()
        }),
        ".{0,200}",
        // Well-formed records with random text, so that tokenizing and
        // masking run on all of them.
        proptest::collection::vec(
            prop_oneof![
                (".{0,60}", ".{0,20}", ".{0,80}").prop_map(
                    |(i, n, o)| serde_json::json!({"instruction": i, "input": n, "output": o})
                ),
                (".{0,60}", ".{0,80}")
                    .prop_map(|(p, c)| serde_json::json!({"prompt": p, "completion": c})),
                ".{1,120}".prop_map(|t| serde_json::json!({"text": t})),
            ],
            1..4,
        )
        .prop_map(|rs| rs
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")),
    ];
    let path = dir.path().join("data.jsonl");
    runner(300)
        .run(&file, |text| {
            std::fs::write(&path, &text).unwrap();
            let _ = case(text.len(), || load_dataset(&path, &tok, eos, &opts));
            Ok(())
        })
        .unwrap();
}

#[test]
fn untrusted_readers_never_panic_hang_or_overallocate() {
    // One test, run in order: the allocation count is per process.
    adapter_config_reader_never_panics();
    safetensors_reader_never_panics();
    data_reader_never_panics();
}
