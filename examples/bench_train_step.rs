//! Rust side of the training-step benchmark (see `bench/run.sh`): the same
//! LoRA r=16 all-linear step as `bench/train_step.py`, through the trainer's
//! own `forward_backward`, clipping and AdamW.
//!
//! cargo run --release --example bench_train_step -- MODEL_DIR BATCH SEQ STEPS [--gradient-checkpointing] [--random-weights]
//!     [--packed] [--lora-compute-dtype bf16] [--tf32] [--dtype fp32|bf16|auto] [--quantize nf4|fp4|int8]
//!
//! --packed packs two examples per row (block-diagonal causal mask), which
//! sends attention through the masked path (keys and values expanded for
//! grouped heads); --lora-compute-dtype bf16 runs the adapters' matmuls in bf16.
//!
//! The base's dtype is `--dtype` (default auto, as `peft-rs train`: bf16 on
//! CUDA and on CPUs with native bf16, fp32 elsewhere).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::data::Batch;
use peft_rs::models::{self, Checkpointing, KeptProducts};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::rng::with_torch_seed;
use peft_rs::regularizers::{Neftune, NeftuneMode, NoiseDistribution, RegularizerStack};
use peft_rs::train::config::LOSS_CHUNK_SIZE;
use peft_rs::train::optim::{clip_grad_norm, AdamW};
use peft_rs::train::{forward_backward, MicroBatch, StepOptions};
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_dir = PathBuf::from(&args[0]);
    let (batch, seq, steps): (i64, i64, usize) =
        (args[1].parse()?, args[2].parse()?, args[3].parse()?);
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let packed = args.iter().any(|a| a == "--packed");
    if args.iter().any(|a| a == "--tf32") {
        peft_rs::device::allow_tf32();
    }
    let lora_kind = match args.iter().position(|a| a == "--lora-compute-dtype") {
        Some(i) => peft_rs::device::parse_dtype(&args[i + 1], Device::Cpu)?,
        None => Kind::Float,
    };
    let device = {
        // libtorch's CUDA library is loaded at run time (peft_rs::cuda_library).
        peft_rs::cuda_library::ensure_loaded();
        Device::cuda_if_available()
    };
    let kind = match args.iter().position(|a| a == "--dtype") {
        Some(i) => peft_rs::device::parse_dtype(&args[i + 1], device)?,
        None => peft_rs::device::DtypeArg::Auto.resolve(device),
    };
    // --random-weights: only config.json is read (a 7B-shaped model on a GPU
    // machine that has no checkpoint).
    // --quantize nf4|fp4|int8: the frozen linear layers quantized at load
    // (QLoRA), with the base dtype as compute dtype, as `peft-rs train`.
    let quantize = match args.iter().position(|a| a == "--quantize") {
        Some(i) => Some(
            <peft_rs::quant::load::Quantize as clap::ValueEnum>::from_str(&args[i + 1], true)
                .map_err(anyhow::Error::msg)?
                .config(false, kind),
        ),
        None => None,
    };
    let mut model = if args.iter().any(|a| a == "--random-weights") {
        let config = models::read_config(&model_dir)?;
        match &quantize {
            Some(q) => with_torch_seed(5, || models::random_quantized(config, kind, device, q))?,
            None => with_torch_seed(5, || models::random(config, kind, device))?,
        }
    } else {
        models::load(&model_dir, kind, device)?
    };
    if device != Device::Cpu {
        tch::Cuda::synchronize(0);
    }
    let lora = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.05,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    };
    with_torch_seed(0, || peft_model::inject(&mut model, DEFAULT_ADAPTER, &lora))?;
    peft_model::set_training(&mut model, true);
    peft_model::set_compute_kind(&mut model, lora_kind);
    let params = peft_model::trainable_parameters(&model);
    let trainable: Vec<(String, Tensor)> = params
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let mut optim = AdamW::new(&params, (0.9, 0.999), 1e-8, 0.0);
    let mut regs = RegularizerStack::new();
    regs.push(Box::new(Neftune {
        alpha: 5.0,
        mode: NeftuneMode::Hf,
        noise: NoiseDistribution::Uniform,
    }));
    // Ids below 40000 (the same on both sides), and below the vocabulary
    // (Llama 2's is 32000).
    let high = (model.config.vocab_size as i64).min(40000);
    let ids = with_torch_seed(1, || {
        Tensor::randint_low(3, high, [batch, seq], (Kind::Int64, Device::Cpu))
    });
    // Two examples per row: positions restart and segments do not see each other.
    let half = seq / 2;
    let t = Tensor::arange(seq, (Kind::Int64, Device::Cpu));
    let segments = t
        .ge(half)
        .to_kind(Kind::Int64)
        .f_add_scalar(1)?
        .expand([batch, seq], true);
    let positions = t.remainder(half).expand([batch, seq], true);
    let b = Batch {
        input_ids: ids.shallow_clone(),
        labels: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        position_ids: packed.then(|| positions.contiguous()),
        segment_ids: packed.then(|| segments.contiguous()),
        num_tokens: batch * seq,
        num_label_tokens: batch * (seq - 1),
    };
    let opts = StepOptions {
        checkpointing: Checkpointing::new(checkpointing, KeptProducts::default()),
        loss_chunk_size: LOSS_CHUNK_SIZE,
        router_aux_loss_coef: None,
    };
    let mut step = |i: u64| -> Result<f64> {
        let mb = MicroBatch {
            seed: i,
            ..MicroBatch::single(i, b.num_label_tokens as f64, 1.0)
        };
        let t = Instant::now();
        let loss = forward_backward(&model, &mut regs, &trainable, &b, &mb, opts)?;
        let t1 = t.elapsed().as_secs_f64();
        clip_grad_norm(&params, 1.0);
        optim.step(&params, 2e-4);
        peft_rs::train::optim::clear_grads(params.values());
        if std::env::var_os("PEFT_RS_BENCH_VERBOSE").is_some() {
            eprintln!(
                "fwd+bwd {t1:.3} s, optimizer {:.3} s",
                t.elapsed().as_secs_f64() - t1
            );
        }
        Ok(loss)
    };
    step(0)?; // warm-up
    if device != Device::Cpu {
        tch::Cuda::synchronize(0);
    }
    let t0 = Instant::now();
    let mut loss = 0.0;
    for i in 1..=steps as u64 {
        loss = step(i)?;
    }
    if device != Device::Cpu {
        // The last optimizer step is still queued on the device.
        tch::Cuda::synchronize(0);
    }
    let dt = t0.elapsed().as_secs_f64();
    let flops = step_flops(&model.config, batch, seq, 16);
    let kind = model.kind();
    println!(
        "{}",
        serde_json::json!({"stack": "peft-rs", "tokens_per_second": (batch * seq) as f64 * steps as f64 / dt,
            "seconds_per_step": dt / steps as f64, "loss": loss, "threads": tch::get_num_threads(),
            "gradient_checkpointing": checkpointing, "device": format!("{device:?}"),
            "packed": packed, "quantize": quantize.is_some(), "lora_compute_dtype": peft_rs::device::dtype_name(lora_kind),
            "flops_per_step": flops, "matmul_peak_flops": matmul_peak(&model.config, batch * seq, kind, device)})
    );
    Ok(())
}

/// The model FLOPs of one LoRA step on `b` x `t` tokens with every token
/// labelled: base matmuls forward and input-gradient backward (no weight
/// gradients: the base is frozen), the LoRA branches forward and backward,
/// causal attention (half the scores) forward and backward, and lm_head at
/// the label positions forward and input-gradient backward. Recomputation
/// (checkpointing) is not model work and is not counted.
fn step_flops(c: &models::LlamaConfig, b: i64, t: i64, r: i64) -> f64 {
    let tokens = (b * t) as f64;
    let r = r as f64;
    let mut base = 0.0;
    let mut lora = 0.0;
    for (path, i, o) in c.linear_modules() {
        if path == "lm_head" {
            continue;
        }
        base += 2.0 * (i * o) as f64;
        lora += 2.0 * r * (i + o) as f64;
    }
    let layers = c.num_hidden_layers as f64;
    let (h, d) = (c.num_attention_heads as f64, c.head_dim as f64);
    // Q·Kᵀ and P·V, 2·t·d each per query, half of them causal.
    let attention = layers * b as f64 * h * (t * t) as f64 * d * 2.0;
    let lm_head = 2.0 * (c.vocab_size * c.hidden_size) as f64 * (b * (t - 1)) as f64;
    // Backward: the input gradient only for frozen weights (1x forward);
    // LoRA gets input and weight gradients (2x); attention 2x.
    tokens * (2.0 * base + 3.0 * lora) + 3.0 * attention + 2.0 * lm_head
}

/// This machine's matmul throughput on the step's own shapes (tokens x
/// hidden x intermediate, both ways), as FLOP/s: the roofline.
fn matmul_peak(c: &models::LlamaConfig, tokens: i64, kind: Kind, device: Device) -> f64 {
    let (h, f) = (c.hidden_size as i64, c.intermediate_size as i64);
    let x = Tensor::randn([tokens, h], (kind, device));
    let w1 = Tensor::randn([f, h], (kind, device));
    let w2 = Tensor::randn([h, f], (kind, device));
    let run = || {
        let y = x.linear::<Tensor>(&w1, None);
        let _ = y.linear::<Tensor>(&w2, None);
        if device != Device::Cpu {
            tch::Cuda::synchronize(0);
        }
    };
    run();
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        run();
    }
    let secs = t.elapsed().as_secs_f64();
    (reps as f64 * 4.0 * (tokens * h * f) as f64) / secs
}
