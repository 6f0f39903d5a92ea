//! Training paths that silently went wrong before: fp16 without loss
//! scaling, non-finite gradients applied and saved, loss-point regularizers
//! counted once per micro-batch, resume accepting changed settings, and
//! epochs counted differently from transformers. All on the tiny model.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{assert_user_error, losses, metrics, tensors, tiny, train_tiny_small, Cmd};
use peft_rs::adapters::lora::{InitLoraWeights, LoraConfig};
use peft_rs::data::Batch;
use peft_rs::device::DeviceArg;
use peft_rs::models::{self, Checkpointing};
use peft_rs::peft_model::{self, DEFAULT_ADAPTER};
use peft_rs::regularizers::rng::with_torch_seed;
use peft_rs::regularizers::{HookContext, HookPoint, Registry, Regularizer, RegularizerStack};
use peft_rs::train::{forward_backward, MicroBatch, StepOptions, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn config(dir: &Path, records: usize, out: &str) -> TrainConfig {
    TrainConfig {
        model: Some(tiny()),
        data: Some(common::alpaca(dir, records)),
        output: dir.join(out),
        device: DeviceArg::Cpu,
        // The reference runs are fp32 (auto is bf16 on CPUs with native bf16).
        dtype: peft_rs::device::DtypeArg::Fp32,
        per_device_train_batch_size: 4,
        max_seq_length: 96,
        lora: LoraConfig {
            r: 4,
            ..LoraConfig::training()
        },
        learning_rate: 1e-3,
        seed: 7,
        ..TrainConfig::default()
    }
}

/// A trainer whose settings name one regularizer of the test's own,
/// registered under `name` next to the built-in ones.
fn trainer_with(
    cfg: TrainConfig,
    name: &str,
    make: impl Fn() -> Box<dyn Regularizer> + Send + Sync + 'static,
) -> Trainer {
    let mut registry = Registry::builtin();
    registry.register(name, "a test's own", &[], move |_| Ok(make()));
    let cfg = TrainConfig {
        regularizers: vec![name.parse().unwrap()],
        ..cfg
    };
    Trainer::new(cfg, &registry).unwrap()
}

fn read_adapter(dir: &Path) -> HashMap<String, Tensor> {
    tensors(&dir.join("adapter_model.safetensors"))
}

fn all_finite(t: &HashMap<String, Tensor>) -> bool {
    t.values()
        .all(|x| bool::try_from(x.isfinite().all()).unwrap())
}

/// Multiplies decoder layer 0's output by a huge factor at one step: fp16
/// activations overflow there.
struct OverflowAt(u64);

impl Regularizer for OverflowAt {
    fn name(&self) -> String {
        "overflow".into()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::DecoderLayerOutput(0)]
    }
    fn apply(&mut self, _: HookPoint, x: Tensor, ctx: &HookContext) -> Tensor {
        if ctx.step == self.0 {
            x * 1e6
        } else {
            x
        }
    }
}

/// At one step, adds `sqrt(0·p)` to the loss: 0 in value, NaN in gradient.
struct NanGradientAt(u64);

impl Regularizer for NanGradientAt {
    fn name(&self) -> String {
        "nan-gradient".into()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::Loss]
    }
    fn apply(&mut self, _: HookPoint, loss: Tensor, ctx: &HookContext) -> Tensor {
        if ctx.step != self.0 {
            return loss;
        }
        let p = &ctx.trainable[0].1;
        loss + (p * 0.0).sqrt().sum(Kind::Float)
    }
}

/// λ·Σ‖w‖² over the adapter weights, a loss-point penalty.
struct L2(f64);

impl Regularizer for L2 {
    fn name(&self) -> String {
        "l2".into()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::Loss]
    }
    fn apply(&mut self, _: HookPoint, loss: Tensor, ctx: &HookContext) -> Tensor {
        let penalty = ctx
            .trainable
            .iter()
            .map(|(_, w)| w.pow_tensor_scalar(2).sum(Kind::Float))
            .fold(Tensor::from(0.0f32), |a, b| a + b);
        loss + penalty * self.0
    }
}

#[test]
fn fp16_loss_scaling_keeps_small_gradients() {
    // One batch of real Alpaca records, its loss divided as if the step had
    // 4096 times as many label tokens (a long accumulation over large
    // batches): per-token gradients then fall below fp16's normal range, as
    // they do in real runs with small initial weights.
    let tmp = tempfile::tempdir().unwrap();
    let base = models::Pretrained::load(&tiny(), Kind::Float, Device::Cpu).unwrap();
    let ds = peft_rs::data::load_dataset(
        &common::alpaca(tmp.path(), 16),
        &base.tokenizer,
        base.completion_eos().unwrap(),
        &peft_rs::data::DataOptions {
            format: None,
            max_seq_len: 256,
            train_on_prompt: false,
        },
    )
    .unwrap();
    let ex: Vec<&peft_rs::data::Example> = ds.examples.iter().collect();
    let batch: Batch = peft_rs::data::collate(&ex, 2);
    let grads = |kind: Kind, loss_scale: f64| -> HashMap<String, Tensor> {
        let mut model = models::load(&tiny(), kind, Device::Cpu).unwrap();
        let lora = LoraConfig {
            init_lora_weights: InitLoraWeights::Random,
            ..common::lora(4, LoraConfig::default().lora_alpha)
        };
        with_torch_seed(3, || peft_model::inject(&mut model, DEFAULT_ADAPTER, &lora)).unwrap();
        let (params, trainable) = common::trainable(&model);
        let mb = MicroBatch::single(0, batch.num_label_tokens as f64 * 4096.0, loss_scale);
        let opts = StepOptions {
            checkpointing: Checkpointing::Off,
            loss_chunk_size: 1024,
            router_aux_loss_coef: None,
        };
        forward_backward(
            &model,
            &mut RegularizerStack::new(),
            &trainable,
            &batch,
            &mb,
            opts,
        )
        .unwrap();
        params
            .iter()
            .map(|(k, t)| (k.clone(), t.grad() / loss_scale))
            .collect()
    };
    let exact = grads(Kind::Float, 1.0);
    let norm = |g: &HashMap<String, Tensor>| -> f64 {
        g.values()
            .map(|t| t.pow_tensor_scalar(2).sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt()
    };
    let error = |g: &HashMap<String, Tensor>| -> f64 {
        let diff: HashMap<String, Tensor> =
            g.iter().map(|(k, t)| (k.clone(), t - &exact[k])).collect();
        norm(&diff) / norm(&exact)
    };
    let unscaled = error(&grads(Kind::Half, 1.0));
    let scaled = error(&grads(Kind::Half, 65536.0));
    eprintln!(
        "fp16 gradient error against fp32 (loss over {} x 4096 label tokens): unscaled {unscaled:.3e}, scaled by 2^16 {scaled:.3e}",
        batch.num_label_tokens
    );
    assert!(
        scaled < 0.5 * unscaled,
        "loss scaling must recover the gradients fp16 flushes to zero"
    );
}

#[test]
fn fp16_training_skips_overflowing_steps_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        dtype: peft_rs::device::DtypeArg::Fp16,
        max_steps: 10,
        eval_holdout: 8,
        learning_rate: 3e-3,
        ..config(tmp.path(), 64, "fp16")
    };
    let out = cfg.output.clone();
    let mut t = trainer_with(cfg, "overflow_at", || Box::new(OverflowAt(3)));
    let s = t.run().unwrap();
    let m = metrics(&out);
    let steps: Vec<&serde_json::Value> = m.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 10);
    let skipped: Vec<u64> = steps
        .iter()
        .filter(|l| l["skipped"] == true)
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        skipped,
        vec![4],
        "the overflowing step (the 4th) is skipped"
    );
    assert_eq!(s.skipped_steps, 1);
    assert_eq!(steps[2]["loss_scale"], 65536.0);
    assert_eq!(
        steps[3]["loss_scale"], 32768.0,
        "the scale halves after an overflow"
    );
    assert!(
        all_finite(&read_adapter(&out)),
        "no NaN reaches the adapter"
    );
    let (before, after) = (s.eval_loss_before.unwrap(), s.eval_loss_after.unwrap());
    eprintln!(
        "fp16: eval loss {before:.4} -> {after:.4}, {} step skipped",
        s.skipped_steps
    );
    assert!(after < before, "fp16 training learns: {before} -> {after}");
}

#[test]
fn a_nan_gradient_is_never_applied_or_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        max_steps: 8,
        save_steps: 1,
        save_total_limit: 1,
        ..config(tmp.path(), 48, "nan")
    };
    let out = cfg.output.clone();
    let mut t = trainer_with(cfg, "nan_gradient_at", || Box::new(NanGradientAt(3)));
    let err = format!("{:#}", t.run().unwrap_err());
    assert!(
        err.contains("gradient norm became NaN at step 4"),
        "error: {err}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(
        !out.join("checkpoint-4").exists(),
        "no checkpoint after the bad step"
    );
    let last = out.join("checkpoint-3");
    assert!(
        last.join("COMPLETE").exists(),
        "the last good checkpoint survives pruning"
    );
    assert!(all_finite(&read_adapter(&last)));
}

#[test]
fn a_loss_penalty_counts_once_per_step_whatever_the_accumulation() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &str, batch: usize, accum: usize| {
        let base = config(tmp.path(), 64, out);
        let cfg = TrainConfig {
            per_device_train_batch_size: batch,
            gradient_accumulation_steps: accum,
            group_by_length: false,
            lora: LoraConfig {
                lora_dropout: 0.0,
                ..base.lora.clone()
            },
            max_steps: 3,
            ..base
        };
        let out = cfg.output.clone();
        trainer_with(cfg, "l2", || Box::new(L2(0.05)))
            .run()
            .unwrap();
        (losses(&out), read_adapter(&out))
    };
    let (l1, a1) = run("b8", 8, 1);
    let (l4, a4) = run("b2x4", 2, 4);
    for (a, b) in l1.iter().zip(&l4) {
        assert!((a - b).abs() < 1e-5 * a.abs(), "losses {l1:?} vs {l4:?}");
    }
    let mut worst: f64 = 0.0;
    for (k, t) in &a1 {
        worst = worst.max((t - &a4[k]).abs().max().double_value(&[]));
    }
    eprintln!("1 x B8 vs 4 x B2 with an L2 penalty: losses {l1:?} vs {l4:?}, adapter max diff {worst:.2e}");
    assert!(worst < 1e-5, "adapters differ by {worst}");
}

/// Four steps, with a checkpoint every two.
fn train_cmd(data: &Path, out: &Path) -> Cmd {
    train_tiny_small(data, out).args("--max-steps 4 --save-steps 2")
}

#[test]
fn resume_refuses_every_setting_that_changes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 32);
    let out = tmp.path().join("run");
    train_cmd(&data, &out).run_ok();
    for (change, field) in [
        (&["--max-seq-len", "64"][..], "max_seq_length"),
        (&["--eval-holdout", "4"], "eval_holdout"),
        (&["--format", "alpaca"], "format"),
        (&["--train-on-prompt"], "train_on_prompt"),
        (&["--group-by-length", "false"], "group_by_length"),
        (&["--lora-alpha", "16"], "lora_alpha"),
        (&["--use-rslora"], "use_rslora"),
        (&["--use-dora"], "use_dora"),
        (&["--lr", "5e-4"], "learning_rate"),
        (&["--lr-scheduler", "cosine"], "lr_scheduler_type"),
        (&["--warmup-steps", "2"], "warmup_steps"),
        (&["--epochs", "2"], "num_train_epochs"),
        (&["--max-steps", "6"], "max_steps"),
        (&["--neftune-alpha", "5"], "neftune_noise_alpha"),
        (&["--dtype", "bf16"], "dtype"),
    ] {
        let mut cmd = train_cmd(&data, &out);
        let pos = cmd.0.iter().position(|a| *a == change[0]);
        match pos {
            Some(p) => cmd.0[p + 1] = change[1].into(),
            None => cmd = cmd.all(change),
        }
        assert_user_error(&cmd.arg("--resume").run(), &["--resume", field]);
    }
    // What only changes logging or saving is accepted.
    train_cmd(&data, &out)
        .args("--logging-steps 2 --resume")
        .run_ok();
}

#[test]
fn epochs_are_counted_as_transformers_counts_them() {
    // 40 examples in batches of 4: 10 micro-batches per epoch; 4 per step
    // gives steps of 4, 4 and 2 micro-batches, so 3 epochs are 9 steps.
    let tmp = tempfile::tempdir().unwrap();
    let data = common::alpaca(tmp.path(), 40);
    let out = tmp.path().join("run");
    train_tiny_small(&data, &out)
        .args("--grad-accum 4 --epochs 3")
        .run_ok();
    let epochs = common::series(&out, "epoch");
    assert_eq!(epochs, [0.4, 0.8, 1.0, 1.4, 1.8, 2.0, 2.4, 2.8, 3.0]);
}

// ---- LoRA initialisation is device-independent (issue 15) ----

fn init_on(weight: &Tensor) -> peft_rs::adapters::lora::LoraWeights {
    peft_rs::adapters::rng::with_torch_seed(7, || {
        peft_rs::adapters::lora::LoraWeights::init(
            weight,
            8,
            2.0,
            0.0,
            peft_rs::adapters::lora::InitLoraWeights::Default,
            false,
            Device::Cpu,
        )
    })
}

#[test]
fn init_is_drawn_on_the_cpu_and_rounded_through_a_16_bit_base_dtype() {
    let weight = Tensor::ones([48, 64], (Kind::Float, Device::Cpu));
    let fp32 = init_on(&weight);
    // The same draws as libtorch's CPU generator gives for that seed, so
    // any device that receives them gets the same adapter: PEFT's two
    // nn.Linear constructors (A [8, 64], B [48, 8]), then A again.
    let by_hand = peft_rs::adapters::rng::with_torch_seed(7, || {
        let cpu = (Kind::Float, Device::Cpu);
        let _ = Tensor::empty([8, 64], cpu).uniform_(-0.125, 0.125);
        let _ = Tensor::empty([48, 8], cpu).uniform_(-(8f64.sqrt().recip()), 8f64.sqrt().recip());
        Tensor::empty([8, 64], cpu).uniform_(-0.125, 0.125)
    });
    assert!(fp32.a.equal(&by_hand));
    assert_eq!(fp32.a.kind(), Kind::Float);
    for kind in [Kind::BFloat16, Kind::Half] {
        let w16 = init_on(&weight.to_kind(kind));
        assert_eq!(w16.a.kind(), Kind::Float, "adapters stay fp32");
        let rounded = fp32.a.to_kind(kind).to_kind(Kind::Float);
        assert!(w16.a.equal(&rounded), "{kind:?}: not the fp32 draw rounded");
        assert!(!w16.a.equal(&fp32.a), "{kind:?}: the rounding did nothing");
        assert!(w16.b.equal(&fp32.b));
    }
}
// ---- dropout keep masks ----

#[test]
fn keep_mask_drops_at_the_asked_rate_and_repeats() {
    let n = 1 << 20;
    let m = peft_rs::adapters::rng::keep_mask(n, 0.05, 7);
    let rate = m.iter().filter(|&&keep| !keep).count() as f64 / n as f64;
    // Standard error sqrt(p(1-p)/n) = 2.1e-4.
    assert!((rate - 0.05).abs() < 1e-3, "rate {rate}");
    assert_eq!(m, peft_rs::adapters::rng::keep_mask(n, 0.05, 7));
    assert_ne!(m, peft_rs::adapters::rng::keep_mask(n, 0.05, 8));
}
/// Noise computed in fp32 on a bf16 base, as a careless custom regularizer
/// would return it.
struct Fp32Noise;

impl Regularizer for Fp32Noise {
    fn name(&self) -> String {
        "fp32-noise".into()
    }
    fn hook_points(&self) -> Vec<HookPoint> {
        vec![HookPoint::EmbeddingOutput, HookPoint::DecoderLayerOutput(0)]
    }
    fn apply(&mut self, _point: HookPoint, value: Tensor, _ctx: &HookContext) -> Tensor {
        value.to_kind(Kind::Float) + 0.5
    }
}

#[test]
fn the_regularizer_stack_returns_what_the_next_bf16_layer_expects() {
    let mut stack = RegularizerStack::new();
    stack.push(Box::new(Fp32Noise));
    let mask = Tensor::ones([2, 3], (Kind::Int64, Device::Cpu));
    let ctx = common::hook_context(&mask, true, 1);
    let x = Tensor::ones([2, 3, 4], (Kind::BFloat16, Device::Cpu));
    for point in [HookPoint::EmbeddingOutput, HookPoint::DecoderLayerOutput(0)] {
        let y = stack.apply(point, x.shallow_clone(), &ctx);
        assert_eq!(y.kind(), Kind::BFloat16, "{point:?}");
        // The next layer (a bf16 linear) accepts it; an fp32 input would fail.
        let w = Tensor::ones([5, 4], (Kind::BFloat16, Device::Cpu));
        assert_eq!(y.linear::<Tensor>(&w, None).double_value(&[0, 0, 0]), 6.0);
    }
    let w = Tensor::ones([5, 4], (Kind::BFloat16, Device::Cpu));
    let raw = Fp32Noise.apply(HookPoint::EmbeddingOutput, x, &ctx);
    assert!(
        raw.f_linear::<Tensor>(&w, None).is_err(),
        "the uncast value should not fit"
    );
}

/// A LoRA layer on `weight` with PEFT's random (non-zero B) initialisation
/// from seed 3, no dropout, and its A and B.
fn random_lora(
    weight: &Tensor,
    r: usize,
    scaling: f64,
) -> (peft_rs::adapters::lora::LoraLayer, Tensor, Tensor) {
    use peft_rs::adapters::lora::{LoraLayer, LoraWeights};
    let w = with_torch_seed(3, || {
        LoraWeights::init(
            weight,
            r,
            scaling,
            0.0,
            InitLoraWeights::Random,
            false,
            Device::Cpu,
        )
    });
    let (a, b) = (w.a.shallow_clone(), w.b.shallow_clone());
    (LoraLayer::new("default", w), a, b)
}

/// `layer`'s output on `x` over the bias-free linear layer `weight`.
fn lora_on(layer: &peft_rs::adapters::lora::LoraLayer, x: &Tensor, weight: &Tensor) -> Tensor {
    use peft_rs::adapters::{BaseLinear, LayerInput, LinearAdapter};
    layer.forward(
        &LayerInput::new(x),
        x.linear::<Tensor>(weight, None),
        &BaseLinear {
            weight: &|| weight.shallow_clone(),
            bias: None,
        },
    )
}

#[test]
fn lora_compute_dtype_bf16_runs_the_adapter_as_autocast_does_with_fp32_gradients() {
    use peft_rs::adapters::LinearAdapter;
    let weight = Tensor::randn([32, 48], (Kind::BFloat16, Device::Cpu));
    let (mut layer, a, b) = random_lora(&weight, 8, 2.0);
    let x = Tensor::randn([2, 5, 48], (Kind::BFloat16, Device::Cpu));
    let base = x.linear::<Tensor>(&weight, None);
    let run = |layer: &peft_rs::adapters::lora::LoraLayer| {
        lora_on(layer, &x, &weight).to_kind(Kind::Float)
    };
    let y32 = run(&layer);
    layer.set_compute_kind(Kind::BFloat16);
    let y16 = run(&layer);
    assert_eq!(y16.size(), y32.size());
    // As PEFT under bf16 autocast: matmuls, scaling and the sum in bf16.
    let by_hand = (&base
        + x.linear::<Tensor>(&a.to_kind(Kind::BFloat16), None)
            .linear::<Tensor>(&b.to_kind(Kind::BFloat16), None)
            * 2.0)
        .to_kind(Kind::Float);
    assert!(y16.equal(&by_hand), "not autocast's bf16 LoRA");
    assert!(!y16.equal(&y32), "bf16 compute changed nothing");
    let rel = (&y16 - &y32).abs().max().double_value(&[]) / y32.abs().max().double_value(&[]);
    assert!(rel < 2e-2, "bf16 LoRA far from fp32: {rel}");
    y16.sum(Kind::Float).backward();
    assert_eq!(a.grad().kind(), Kind::Float);
    assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn bf16_lora_compute_gradients_are_autocasts_bit_for_bit_whatever_the_scaling() {
    use peft_rs::adapters::LinearAdapter;
    let bf16 = (Kind::BFloat16, Device::Cpu);
    let weight = with_torch_seed(5, || Tensor::randn([96, 40], bf16));
    let x0 = with_torch_seed(6, || Tensor::randn([3, 7, 40], bf16));
    let g = with_torch_seed(7, || Tensor::randn([3, 7, 96], bf16));
    // 2 = 32 / 16 (the CLI's default), 0.25 (a power of two below one) and
    // 0.75 (not one: scaled after the product, as autocast does).
    for scaling in [2.0, 0.25, 0.75] {
        let (mut layer, a, b) = random_lora(&weight, 16, scaling);
        layer.set_training(true);
        layer.set_compute_kind(Kind::BFloat16);
        let x = x0.detach().set_requires_grad(true);
        let y = lora_on(&layer, &x, &weight);
        (&y * &g).sum(Kind::Float).backward();
        let ours = [y.detach(), x.grad(), a.grad(), b.grad()];
        // Trainer's autocast, op by op: matmuls, scaling and sum in bf16.
        let (a2, b2) = (
            a.detach().set_requires_grad(true),
            b.detach().set_requires_grad(true),
        );
        let x2 = x0.detach().set_requires_grad(true);
        let base2 = x2.linear::<Tensor>(&weight, None);
        let y2 = &base2
            + x2.linear::<Tensor>(&a2.to_kind(Kind::BFloat16), None)
                .linear::<Tensor>(&b2.to_kind(Kind::BFloat16), None)
                * scaling;
        (&y2 * &g).sum(Kind::Float).backward();
        let theirs = [y2.detach(), x2.grad(), a2.grad(), b2.grad()];
        for (name, (o, t)) in ["output", "x.grad", "A.grad", "B.grad"]
            .iter()
            .zip(ours.iter().zip(&theirs))
        {
            assert!(o.equal(t), "scaling {scaling}: {name} is not autocast's");
        }
        assert!(a.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

/// Two LoRA layers with the same weights on one input, in training with
/// dropout 0.5, and their outputs minus the base output.
fn dropout_pair(shared: bool) -> (Tensor, Tensor, Tensor) {
    use peft_rs::adapters::lora::{LoraLayer, LoraWeights};
    use peft_rs::adapters::{BaseLinear, LayerInput, LinearAdapter};
    let weight = Tensor::zeros([24, 64], (Kind::Float, Device::Cpu));
    let layer = || {
        let w = with_torch_seed(3, || {
            LoraWeights::init(
                &weight,
                4,
                2.0,
                0.5,
                InitLoraWeights::Random,
                false,
                Device::Cpu,
            )
        });
        let mut l = LoraLayer::new("default", w);
        l.set_training(true);
        l.set_dropout_sharing(shared);
        l
    };
    let (first, second) = (layer(), layer());
    let x = with_torch_seed(4, || Tensor::randn([4096, 64], (Kind::Float, Device::Cpu)));
    let dense = || weight.shallow_clone();
    let base = BaseLinear {
        weight: &dense,
        bias: None,
    };
    let input = LayerInput::new(&x);
    let (y1, y2) = with_torch_seed(5, || {
        (
            first.forward(&input, x.linear::<Tensor>(&weight, None), &base),
            second.forward(&input, x.linear::<Tensor>(&weight, None), &base),
        )
    });
    let mut eval = layer();
    eval.set_training(false);
    let expected = eval.forward(
        &LayerInput::new(&x),
        x.linear::<Tensor>(&weight, None),
        &base,
    );
    (y1, y2, expected)
}

#[test]
fn layers_reading_one_input_share_one_dropout_draw_only_when_asked() {
    let (y1, y2, expected) = dropout_pair(true);
    assert!(
        y1.equal(&y2),
        "shared dropout: the two layers saw different masks"
    );
    let (z1, z2, _) = dropout_pair(false);
    assert!(
        !z1.equal(&z2),
        "unshared dropout: the two layers saw one mask"
    );
    // Either way each layer keeps inverted dropout's expectation: averaged
    // over 4096 rows, the output is the no-dropout output within a few
    // standard errors (the per-element spread is about the output itself).
    for y in [&y1, &z1, &z2] {
        let mean = y.mean_dim(0, false, Kind::Float);
        let want = expected.mean_dim(0, false, Kind::Float);
        let spread = expected.std_dim(0, true, false).max().double_value(&[]);
        let err = (&mean - &want).abs().max().double_value(&[]);
        assert!(
            err < 5.0 * spread / 4096f64.sqrt(),
            "mean off by {err} (spread {spread})"
        );
        assert!(!y.equal(&expected), "dropout changed nothing");
    }
}

/// The tiny model in `kind`, its plain head's weight, and random hidden
/// states `[rows, 9, hidden]` with random labels.
fn head_fixture(kind: Kind, rows: i64) -> (models::LlamaForCausalLM, Tensor, Tensor, Tensor) {
    let model = models::load(&tiny(), kind, Device::Cpu).unwrap();
    let (w, _) = model.plain_lm_head().expect("the test needs a plain head");
    let w = w.shallow_clone();
    let h = model.config.hidden_size as i64;
    let v = model.config.vocab_size as i64;
    let hidden = with_torch_seed(1, || Tensor::randn([rows, 9, h], (kind, Device::Cpu)));
    let labels = with_torch_seed(2, || {
        Tensor::randint(v, [rows, 9], (Kind::Int64, Device::Cpu))
    });
    (model, w, hidden, labels)
}

/// By autograd, every position at once: the summed cross-entropy of `x Wᵀ`
/// (fp32 logits) and the gradient of that sum divided by `scale`, in fp64.
fn autograd_cross_entropy(
    hidden: &Tensor,
    w: &Tensor,
    labels: &Tensor,
    scale: f64,
) -> (f64, Tensor) {
    let x = hidden.detach().set_requires_grad(true);
    let t = hidden.size()[1] - 1;
    let logits_kind = if w.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let logits = x
        .narrow(1, 0, t)
        .linear::<Tensor>(w, None)
        .to_kind(logits_kind);
    let ce = logits
        .reshape([-1, w.size()[0]])
        .cross_entropy_loss::<Tensor>(
            &labels.narrow(1, 1, t).reshape([-1]),
            None,
            tch::Reduction::Sum,
            -100,
            0.0,
        );
    (&ce / scale).backward();
    (ce.double_value(&[]), x.grad().to_kind(Kind::Double))
}

#[test]
fn the_loss_and_its_gradient_computed_together_equal_autograd() {
    use peft_rs::train::chunked_cross_entropy;
    let (model, w, hidden, labels) = head_fixture(Kind::Float, 3);
    // Some positions without a label, as prompts and padding are.
    let labels = labels.index_fill(1, &Tensor::from_slice(&[0i64, 4]), -100);
    let scale = 19.0;
    // By autograd, in fp32 and (the truth) in fp64.
    let (loss32, grad32) = autograd_cross_entropy(&hidden, &w, &labels, scale);
    let (loss64, grad64) = autograd_cross_entropy(
        &hidden.to_kind(Kind::Double),
        &w.to_kind(Kind::Double),
        &labels,
        scale,
    );
    // Together: in one chunk, and in chunks of 5 rows (matmuls that small
    // round less accurately in MKL, with or without autograd).
    let err = |g: &Tensor| {
        (g - &grad64).abs().max().double_value(&[]) / grad64.abs().max().double_value(&[])
    };
    let theirs = err(&grad32);
    for chunk in [1024, 5] {
        let x = hidden.detach().set_requires_grad(true);
        let loss = chunked_cross_entropy(&model, &x, &labels, chunk, Some(scale)).unwrap();
        let ours = err(&x.grad().to_kind(Kind::Double));
        println!(
            "chunk {chunk}: loss {loss} (autograd fp32 {loss32}, fp64 {loss64}); \
             gradient error vs fp64: ours {ours:.2e}, autograd fp32 {theirs:.2e}"
        );
        assert!(
            (loss - loss64).abs() / loss64 < 1e-6,
            "loss {loss} vs {loss64}"
        );
        let limit = if chunk == 1024 {
            2.0 * theirs + 1e-6
        } else {
            1e-4
        };
        assert!(
            ours < limit,
            "chunk {chunk}: gradient error {ours} vs autograd's {theirs}"
        );
    }
    assert!(grad64.abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

/// The gradient as the whole chunk's softmax gives it, every row at once:
/// `((softmax − onehot) / scale)` cast to the head's dtype, times `W`
/// (an fp32 head divides after the product), and the summed loss.
fn whole_chunk_gradient(sel: &Tensor, w: &Tensor, targets: &Tensor, scale: f64) -> (f64, Tensor) {
    let logp = sel
        .linear::<Tensor>(w, None)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float);
    let t = targets.unsqueeze(1);
    let loss = -logp.gather(1, &t, false).sum(Kind::Float);
    let minus_one = Tensor::full([t.size()[0], 1], -1.0, (Kind::Float, Device::Cpu));
    let d = logp.exp().scatter_add(1, &t, &minus_one);
    let g = if w.kind() == Kind::Float {
        d.mm(w) / scale
    } else {
        (d * (1.0 / scale)).to_kind(w.kind()).mm(w)
    };
    (loss.double_value(&[]), g)
}

#[test]
fn the_loss_gradient_worked_out_a_few_rows_at_a_time_is_the_whole_chunks_bit_for_bit() {
    use peft_rs::train::chunked_cross_entropy;
    for kind in [Kind::BFloat16, Kind::Float] {
        // 3 x 8 label rows of a 49,152-token vocabulary: blocks of 10 rows.
        let (model, w, hidden, labels) = head_fixture(kind, 3);
        let (rows, t, h) = hidden.size3().unwrap();
        let scale = 24.0;
        let sel = hidden.narrow(1, 0, t - 1).reshape([-1, h]);
        let targets = labels.narrow(1, 1, t - 1).reshape([-1]);
        let (want_loss, want) = whole_chunk_gradient(&sel, &w, &targets, scale);
        let x = hidden.detach().set_requires_grad(true);
        let loss = chunked_cross_entropy(&model, &x, &labels, 1024, Some(scale)).unwrap();
        let got = x.grad().narrow(1, 0, t - 1).reshape([-1, h]);
        assert_eq!(got.kind(), kind);
        assert!(got.equal(&want), "{kind:?}: not the whole chunk's gradient");
        assert_eq!(loss, want_loss, "{kind:?}: loss");
        let last = x.grad().narrow(1, t - 1, 1);
        assert_eq!(last.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(want.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert_eq!(rows * (t - 1), 24);
    }
}

#[test]
fn an_fp16_head_gets_the_loss_scaled_gradient_autograd_gets() {
    use peft_rs::train::chunked_cross_entropy;
    let (model, w, hidden, labels) = head_fixture(Kind::Half, 2);
    // As the fp16 trainer calls it: the sum divided by the token count and
    // multiplied by the loss scale 2^16, so that small probabilities' share
    // of the gradient survives fp16.
    let scale = 16.0 / 65536.0;
    let (_, want) = autograd_cross_entropy(&hidden, &w, &labels, scale);
    let x = hidden.detach().set_requires_grad(true);
    chunked_cross_entropy(&model, &x, &labels, 1024, Some(scale)).unwrap();
    let got = x.grad().to_kind(Kind::Float);
    assert_eq!(x.grad().kind(), Kind::Half);
    let err = (&got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    println!("fp16 head: gradient relative difference to autograd {err:.2e}");
    // The same arithmetic as autograd's (scaled in fp32, then cast): scaling
    // after the cast instead gives 1.7e-4 here.
    assert!(err < 1e-5, "fp16 head: gradient off by {err} relative");
    assert!(bool::try_from(got.isfinite().all()).unwrap());
}
