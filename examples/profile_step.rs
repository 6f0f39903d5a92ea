//! Where the time of one LoRA training step goes, on the shapes of the
//! benchmark (`bench/run.sh`): each part of the step is timed on its own,
//! forward and backward, and what the parts do not explain is the framework
//! (autograd bookkeeping, allocation, small-op overhead).
//!
//! cargo run --release --example profile_step -- MODEL_DIR BATCH SEQ [REPEATS]
//!     [--dtype bf16] [--lora-compute-dtype bf16]
//!
//! Also times the whole step with gradient checkpointing, so the cost of
//! the recompute is a row of its own, and with the checkpointing that keeps
//! the MLP's frozen products (`--gradient-checkpointing-keep-mlp`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

#[global_allocator]
static GLOBAL: peft_rs::Jemalloc = peft_rs::Jemalloc;
use peft_rs::adapters::lora::{LoraConfig, TargetModules};
use peft_rs::data::Batch;
use peft_rs::flash_attention;
use peft_rs::models::{self, LlamaForCausalLM};
use peft_rs::models::{Checkpointing, DecoderInput, KeptProducts};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::rng::with_torch_seed;
use peft_rs::regularizers::ForwardHooks;
use peft_rs::regularizers::{Neftune, RegularizerStack};
use peft_rs::train::config::LOSS_CHUNK_SIZE;
use peft_rs::train::optim::{clip_grad_norm, AdamW};
use peft_rs::train::{chunked_cross_entropy, forward_backward, MicroBatch, StepOptions};
use tch::{Device, Kind, Tensor};

/// Median seconds of each of `fs` over `repeats` rounds of one run each
/// (after a warm-up round): interleaved, so that the machine's drift over
/// time falls on every variant alike.
fn time_interleaved(repeats: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    for f in fs.iter_mut() {
        f();
    }
    let mut runs = vec![Vec::new(); fs.len()];
    for _ in 0..repeats {
        for (f, v) in fs.iter_mut().zip(&mut runs) {
            let t = Instant::now();
            f();
            v.push(t.elapsed().as_secs_f64());
        }
    }
    runs.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

/// Median seconds of `repeats` runs of `f` (after one warm-up run).
fn time(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn lora(dropout: f64) -> LoraConfig {
    LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: dropout,
        target_modules: TargetModules::AllLinear,
        ..LoraConfig::default()
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(&args[0]);
    let (b, t): (i64, i64) = (args[1].parse()?, args[2].parse()?);
    let repeats: usize = match args.get(3) {
        Some(r) if !r.starts_with("--") => r.parse()?,
        _ => 3,
    };
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| match v.as_str() {
                "bf16" => Kind::BFloat16,
                _ => Kind::Float,
            })
    };
    let kind = flag("--dtype").unwrap_or(Kind::Float);
    let lora_kind = flag("--lora-compute-dtype").unwrap_or(Kind::Float);
    let load = || models::load(&dir, kind, Device::Cpu);
    let ids = with_torch_seed(1, || {
        Tensor::randint_low(3, 40000, [b, t], (Kind::Int64, Device::Cpu))
    });
    let batch = Batch {
        input_ids: ids.shallow_clone(),
        labels: ids.shallow_clone(),
        attention_mask: ids.ones_like(),
        num_tokens: b * t,
        num_label_tokens: b * (t - 1),
        position_ids: None,
        segment_ids: None,
    };
    let opts = StepOptions {
        checkpointing: Checkpointing::Off,
        loss_chunk_size: LOSS_CHUNK_SIZE,
        router_aux_loss_coef: None,
    };
    let mb = MicroBatch::single(0, batch.num_label_tokens as f64, 1.0);

    // The whole step, as the benchmark runs it, and variants without parts.
    let stepper = |model: &mut LlamaForCausalLM, neftune: bool| {
        peft_model::set_training(model, true);
        let params = peft_model::trainable_parameters(model);
        let trainable: Vec<(String, Tensor)> = params
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let mut regs = RegularizerStack::new();
        if neftune {
            regs.push(Box::new(Neftune::new(5.0)));
        }
        (params, trainable, regs)
    };
    let mut model = load()?;
    with_torch_seed(0, || {
        peft_model::inject(&mut model, DEFAULT_ADAPTER, &lora(0.05))
    })?;
    let mut plain = load()?;
    with_torch_seed(0, || {
        peft_model::inject(&mut plain, DEFAULT_ADAPTER, &lora(0.0))
    })?;
    peft_model::set_compute_kind(&mut model, lora_kind);
    peft_model::set_compute_kind(&mut plain, lora_kind);
    let base = load()?;
    let (params, trainable, mut noisy) = stepper(&mut model, true);
    let (_, _, mut quiet) = stepper(&mut model, false);
    let (_, _, mut noisy_again) = stepper(&mut model, true);
    let (_, _, mut noisy_kept) = stepper(&mut model, true);
    let (plain_params, plain_trainable, mut plain_regs) = stepper(&mut plain, false);
    let checkpointed = StepOptions {
        checkpointing: Checkpointing::FULL,
        ..opts
    };
    let keeping = StepOptions {
        checkpointing: Checkpointing::On(KeptProducts {
            attention: false,
            mlp: true,
        }),
        ..checkpointed
    };
    let run_with = |opts: StepOptions,
                    model: &LlamaForCausalLM,
                    regs: &mut RegularizerStack,
                    trainable: &[(String, Tensor)],
                    params: &std::collections::BTreeMap<String, Tensor>| {
        forward_backward(model, regs, trainable, &batch, &mb, opts).unwrap();
        for p in params.values() {
            p.shallow_clone().zero_grad();
        }
    };
    // The frozen base alone: gradients flow to the embeddings' output only.
    struct GradAtEmbeddings;
    impl ForwardHooks for GradAtEmbeddings {
        fn embedding_output(&mut self, x: Tensor) -> Tensor {
            x.detach().set_requires_grad(true)
        }
    }
    let times = time_interleaved(
        repeats,
        &mut [
            &mut || run_with(opts, &model, &mut noisy, &trainable, &params),
            &mut || run_with(opts, &model, &mut quiet, &trainable, &params),
            &mut || {
                run_with(
                    opts,
                    &plain,
                    &mut plain_regs,
                    &plain_trainable,
                    &plain_params,
                )
            },
            &mut || run_with(checkpointed, &model, &mut noisy_again, &trainable, &params),
            &mut || run_with(keeping, &model, &mut noisy_kept, &trainable, &params),
            &mut || {
                let normed =
                    base.forward_hidden(&DecoderInput::causal(&ids), None, &mut GradAtEmbeddings);
                chunked_cross_entropy(&base, &normed, &batch.labels, LOSS_CHUNK_SIZE, Some(1.0))
                    .unwrap();
            },
        ],
    );
    let (full, no_noise, no_dropout, recomputed, kept, base_step) =
        (times[0], times[1], times[2], times[3], times[4], times[5]);
    let mut optim = AdamW::new(&params, (0.9, 0.999), 1e-8, 0.0);
    let optimizer = time(repeats, || {
        clip_grad_norm(&params, 1.0);
        optim.step(&params, 1e-4);
    });
    let c = &base.config;
    let (h, inter) = (c.hidden_size as i64, c.intermediate_size as i64);
    let (nh, nkv, hd) = (
        c.num_attention_heads as i64,
        c.num_key_value_heads as i64,
        c.head_dim as i64,
    );
    let layers = c.num_hidden_layers as f64;
    let opt = (kind, Device::Cpu);
    // The base matmuls of one layer, forward and input-gradient backward.
    let x = Tensor::randn([b, t, h], opt).set_requires_grad(true);
    let weights: Vec<Tensor> = [
        (nh * hd, h),
        (nkv * hd, h),
        (nkv * hd, h),
        (h, nh * hd),
        (inter, h),
        (inter, h),
    ]
    .iter()
    .map(|&(o, i)| Tensor::randn([o, i], opt) * 0.02)
    .collect();
    let down = Tensor::randn([h, inter], opt) * 0.02;
    let matmuls = time(repeats, || {
        let mut outs: Vec<Tensor> = weights
            .iter()
            .map(|w| x.linear::<Tensor>(w, None))
            .collect();
        let a = outs.pop().unwrap() * outs.pop().unwrap();
        let y = a.linear::<Tensor>(&down, None);
        let s = outs
            .into_iter()
            .fold(y, |acc, o| acc.sum(Kind::Float) + o.sum(Kind::Float));
        s.backward();
    }) * layers;
    // Attention (SDPA, causal, grouped-query) of one layer.
    let q = Tensor::randn([b, nh, t, hd], opt).set_requires_grad(true);
    let k = Tensor::randn([b, nkv, t, hd], opt).set_requires_grad(true);
    let v = Tensor::randn([b, nkv, t, hd], opt).set_requires_grad(true);
    let scale = 1.0 / (hd as f64).sqrt();
    // As the model runs it: where it pays, the backward pass in fp32.
    let attention = time(repeats, || {
        let y = flash_attention::unmasked(&q, &k, &v, true, scale);
        y.sum(Kind::Float).backward();
    }) * layers;
    let sdpa_attention = time(repeats, || {
        let y = flash_attention::sdpa(&q, &k, &v, true, scale);
        y.sum(Kind::Float).backward();
    }) * layers;
    // The two RMS norms of one layer.
    let norm = &base.model.layers[0].input_layernorm;
    let norms = time(repeats, || {
        let y = norm.forward(&x) + norm.forward(&x);
        y.sum(Kind::Float).backward();
    }) * layers;
    // The loss: lm_head and cross-entropy at the label positions.
    let hidden = Tensor::randn([b, t, h], opt).set_requires_grad(true);
    let loss = time(repeats, || {
        chunked_cross_entropy(&base, &hidden, &batch.labels, LOSS_CHUNK_SIZE, Some(1.0)).unwrap();
    });

    let rows = [
        ("base matmuls (fwd + input grad)", matmuls),
        ("attention (flash fwd + bwd)", attention),
        ("RMS norms", norms),
        ("lm_head + cross-entropy", loss),
        (
            "frozen-base rest (RoPE, SiLU, residuals, framework)",
            base_step - matmuls - attention - norms - loss,
        ),
        (
            "LoRA branch (r=16, every linear layer)",
            no_dropout - base_step,
        ),
        ("LoRA dropout 0.05", no_noise - no_dropout),
        ("NEFTune noise", full - no_noise),
        ("optimizer (clip + AdamW)", optimizer),
        (
            "(not in the step) gradient checkpointing's recompute",
            recomputed - full,
        ),
        (
            "(not in the step) the recompute, MLP products kept",
            kept - full,
        ),
        (
            "(not in the step) attention, SDPA's own backward",
            sdpa_attention,
        ),
    ];
    let total = full + optimizer;
    println!(
        "one training step, batch {b} x {t}, {} base {}, LoRA r=16 all-linear computing in {}; {total:.2} s in all",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        peft_rs::device::dtype_name(kind),
        peft_rs::device::dtype_name(lora_kind),
    );
    println!("{:<52}{:>9}{:>8}", "part", "seconds", "share");
    for (name, s) in rows {
        println!("{name:<52}{s:>9.3}{:>7.1}%", 100.0 * s / total);
    }
    Ok(())
}
