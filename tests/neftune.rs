//! NEFTune: bounds, padding, modes, determinism and statistics of the noise,
//! and the `hf` mode against transformers' `neftune_post_forward_hook`.

mod common;

use std::process::Command;

use common::hook_context as ctx;

use peft_rs::regularizers::{
    HookContext, HookPoint, Neftune, NeftuneMode, NoiseDistribution, Regularizer,
};
use tch::{Device, Kind, Tensor};

const D: i64 = 64;

/// A right-padded batch: real lengths 12, 5 and 30 of a padded length 30.
fn batch() -> (Tensor, Tensor, Vec<i64>) {
    let lengths = vec![12i64, 5, 30];
    let t = 30;
    let mask: Vec<i64> = lengths
        .iter()
        .flat_map(|&l| (0..t).map(move |i| (i < l) as i64))
        .collect();
    let mask = Tensor::from_slice(&mask).view([3, t]);
    tch::manual_seed(3);
    let emb = Tensor::randn([3, t, D], (Kind::Float, Device::Cpu));
    (emb, mask, lengths)
}

fn noise_of(n: &mut Neftune, emb: &Tensor, mask: &Tensor, training: bool, seed: u64) -> Tensor {
    n.apply(
        HookPoint::EmbeddingOutput,
        emb.shallow_clone(),
        &ctx(mask, training, seed),
    ) - emb
}

#[test]
fn paper_mode_uses_each_examples_length_and_spares_padding() {
    let (emb, mask, lengths) = batch();
    let mut n = Neftune::new(5.0);
    let noise = noise_of(&mut n, &emb, &mask, true, 1);
    for (i, &l) in lengths.iter().enumerate() {
        let bound = 5.0 / ((l * D) as f64).sqrt();
        let real = noise.get(i as i64).narrow(0, 0, l);
        let max = real.abs().max().double_value(&[]);
        assert!(max <= bound * (1.0 + 1e-6), "example {i}: {max} > {bound}");
        // Uniform noise reaches close to its bound with hundreds of draws.
        assert!(
            max > 0.95 * bound,
            "example {i}: max {max} far below the bound {bound}"
        );
        if l < 30 {
            let pad = noise.get(i as i64).narrow(0, l, 30 - l);
            assert_eq!(
                pad.abs().max().double_value(&[]),
                0.0,
                "example {i}: noise on padding"
            );
        }
    }
}

#[test]
fn hf_mode_uses_the_padded_length_everywhere() {
    let (emb, mask, _) = batch();
    let mut n = Neftune {
        alpha: 5.0,
        mode: NeftuneMode::Hf,
        noise: NoiseDistribution::Uniform,
    };
    let noise = noise_of(&mut n, &emb, &mask, true, 1);
    let bound = 5.0 / ((30 * D) as f64).sqrt();
    let max = noise.abs().max().double_value(&[]);
    assert!(max <= bound * (1.0 + 1e-6) && max > 0.99 * bound);
    // Padding positions are noised too (example 1 has 25 of them).
    let pad = noise.get(1).narrow(0, 5, 25);
    assert!(pad.abs().max().double_value(&[]) > 0.9 * bound);
}

#[test]
fn uniform_noise_has_the_predicted_mean_and_variance() {
    // One long example: 4096 x 64 draws.
    let emb = Tensor::zeros([1, 4096, D], (Kind::Float, Device::Cpu));
    let mask = Tensor::ones([1, 4096], (Kind::Int64, Device::Cpu));
    let mut n = Neftune::new(10.0);
    let noise = noise_of(&mut n, &emb, &mask, true, 9);
    let scale = 10.0 / ((4096 * D) as f64).sqrt();
    let eps = noise / scale; // should be U(-1, 1)
    let count = (4096 * D) as f64;
    let mean = eps.mean(Kind::Float).double_value(&[]);
    let var = eps.var(true).double_value(&[]);
    // U(-1,1): mean 0 (sd of the sample mean √(1/3/n)), variance 1/3 (sd of the sample variance √(4/45/n)).
    assert!(mean.abs() < 5.0 * (1.0 / 3.0 / count).sqrt(), "mean {mean}");
    assert!(
        (var - 1.0 / 3.0).abs() < 5.0 * (4.0 / 45.0 / count).sqrt(),
        "variance {var}"
    );
    let mut g = Neftune {
        alpha: 10.0,
        mode: NeftuneMode::Paper,
        noise: NoiseDistribution::Gaussian,
    };
    let gauss = noise_of(&mut g, &emb, &mask, true, 9) / scale;
    let gvar = gauss.var(true).double_value(&[]);
    assert!(
        (gvar - 1.0).abs() < 5.0 * (2.0 / count).sqrt(),
        "gaussian variance {gvar}"
    );
}

#[test]
fn no_noise_in_evaluation_or_at_alpha_zero() {
    let (emb, mask, _) = batch();
    let max_abs = |t: Tensor| t.abs().max().double_value(&[]);
    let mut n = Neftune::new(5.0);
    assert_eq!(max_abs(noise_of(&mut n, &emb, &mask, false, 1)), 0.0);
    let mut zero = Neftune::new(0.0);
    assert_eq!(max_abs(noise_of(&mut zero, &emb, &mask, true, 1)), 0.0);
}

#[test]
fn same_seed_same_noise_new_seed_new_noise() {
    let (emb, mask, _) = batch();
    let mut n = Neftune::new(5.0);
    let a = noise_of(&mut n, &emb, &mask, true, 100);
    let b = noise_of(&mut n, &emb, &mask, true, 100);
    let c = noise_of(&mut n, &emb, &mask, true, 101);
    assert!(a.equal(&b));
    assert!(!a.equal(&c));
}

/// With row seeds, an example's noise is the same whether it is batched with
/// others or alone, padded or not (so 2 processes × batch 2 draw what one
/// process × batch 4 draws), and rows with different seeds differ.
#[test]
fn row_seeds_make_an_examples_noise_independent_of_its_batch() {
    let (emb, mask, lengths) = batch();
    let seeds = [11u64, 12, 13];
    let with_rows = |emb: &Tensor, mask: &Tensor, seeds: &[u64]| {
        let mut c = ctx(mask, true, 99);
        c.row_seeds = Some(seeds);
        Neftune::new(5.0).noise(emb, &c)
    };
    let together = with_rows(&emb, &mask, &seeds);
    for (i, &l) in lengths.iter().enumerate() {
        // The example alone, without padding, in a batch of one.
        let own = emb.get(i as i64).narrow(0, 0, l).unsqueeze(0);
        let alone = with_rows(
            &own,
            &Tensor::ones([1, l], (Kind::Int64, Device::Cpu)),
            &seeds[i..=i],
        );
        let diff = (together.get(i as i64).narrow(0, 0, l) - alone.get(0))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0, "example {i} drew other noise alone");
        let bound = 5.0 / ((l * D) as f64).sqrt();
        let max = alone.abs().max().double_value(&[]);
        assert!(
            max <= bound * (1.0 + 1e-6) && max > 0.5 * bound,
            "example {i}: {max} vs {bound}"
        );
    }
    let pad = together
        .get(0)
        .narrow(0, 12, 18)
        .abs()
        .max()
        .double_value(&[]);
    assert_eq!(pad, 0.0, "padding was noised");
    // Same example, same length: different seeds give different noise.
    let a = with_rows(&emb.narrow(0, 2, 1), &mask.narrow(0, 2, 1), &[1]);
    let b = with_rows(&emb.narrow(0, 2, 1), &mask.narrow(0, 2, 1), &[2]);
    assert!((a - b).abs().max().double_value(&[]) > 0.0);
}

#[test]
fn packed_segments_use_their_own_lengths() {
    // One row packing examples of lengths 3 and 7, then 2 pads.
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([1, 12]);
    let seg = Tensor::from_slice(&[1i64, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0, 0]).view([1, 12]);
    let emb = Tensor::zeros([1, 12, D], (Kind::Float, Device::Cpu));
    let mut n = Neftune::new(5.0);
    let c = HookContext {
        segment_ids: Some(&seg),
        ..ctx(&mask, true, 4)
    };
    let noise = n.apply(HookPoint::EmbeddingOutput, emb.shallow_clone(), &c);
    let first = noise.get(0).narrow(0, 0, 3).abs().max().double_value(&[]);
    let second = noise.get(0).narrow(0, 3, 7).abs().max().double_value(&[]);
    assert!(
        first > 5.0 / ((7 * D) as f64).sqrt(),
        "segment 1 must use L = 3, not 7 or 10"
    );
    assert!(first <= 5.0 / ((3 * D) as f64).sqrt() * (1.0 + 1e-6));
    assert!(second <= 5.0 / ((7 * D) as f64).sqrt() * (1.0 + 1e-6));
    assert_eq!(
        noise.get(0).narrow(0, 10, 2).abs().max().double_value(&[]),
        0.0
    );
}

#[test]
fn hf_mode_matches_transformers_hook() {
    let (emb, mask, _) = batch();
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("emb.safetensors");
    let output = tmp.path().join("noise.safetensors");
    Tensor::write_safetensors(&[("embeddings", &emb)], &input).unwrap();
    let status = Command::new(common::python())
        .arg(common::repo().join("tests/fixtures/neftune_reference.py"))
        .arg(&input)
        .arg("5")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());
    let theirs = common::tensors(&output);
    let mut n = Neftune {
        alpha: 5.0,
        mode: NeftuneMode::Hf,
        noise: NoiseDistribution::Uniform,
    };
    let ours = noise_of(&mut n, &emb, &mask, true, 1);
    let stats = |t: &Tensor| {
        (
            t.abs().max().double_value(&[]),
            t.mean(Kind::Float).double_value(&[]),
            t.var(true).double_value(&[]),
        )
    };
    let (om, omean, ovar) = stats(&ours);
    let (tm, tmean, tvar) = stats(&theirs["noise"]);
    let bound = 5.0 / ((30 * D) as f64).sqrt();
    eprintln!("ours max {om:.5} var {ovar:.3e}; transformers max {tm:.5} var {tvar:.3e}; bound {bound:.5}");
    for m in [om, tm] {
        assert!(m <= bound * (1.0 + 1e-6) && m > 0.99 * bound);
    }
    let count = ours.numel() as f64;
    let var_sd = bound * bound * (4.0 / 45.0 / count).sqrt();
    assert!(
        (ovar - tvar).abs() < 7.0 * var_sd,
        "variances {ovar} vs {tvar}"
    );
    assert!((omean - tmean).abs() < 7.0 * bound * (1.0 / 3.0 / count).sqrt());
    // Both noise every position, padding included, and nothing in eval mode.
    assert_eq!(theirs["eval_noise"].abs().max().double_value(&[]), 0.0);
    assert!(
        theirs["noise"]
            .get(1)
            .narrow(0, 5, 25)
            .abs()
            .max()
            .double_value(&[])
            > 0.9 * bound
    );
}

/// The packed batch of the memory test: 2 rows of T = 8192 tokens, each
/// holding 64 examples of 128 tokens, embedded by the tiny Llama.
const PEAK_T: i64 = 8192;

/// Runs in a child process (started by the test below, which reads what it
/// prints): embeds the packed batch, optionally applies NEFTune in paper
/// mode, and prints how far the process's peak resident memory rose.
#[test]
#[ignore = "child process of paper_mode_on_a_packed_8k_batch_needs_no_pairwise_matrix"]
fn packed_noise_peak_child() {
    let with_noise = std::env::var("PEFT_RS_PEAK_WITH_NOISE").unwrap() == "1";
    let model = common::load_tiny();
    let (b, t) = (2, PEAK_T);
    let ids = Tensor::randint(100, [b, t], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
    let seg = (Tensor::arange(t, (Kind::Int64, Device::Cpu)).floor_divide_scalar(128) + 1)
        .unsqueeze(0)
        .expand([b, t], false)
        .contiguous();
    let before = common::peak_rss_bytes();
    let x = tch::no_grad(|| model.embed(&ids));
    let out = if with_noise {
        let ctx = HookContext {
            segment_ids: Some(&seg),
            ..ctx(&mask, true, 1)
        };
        Neftune::new(5.0).apply(HookPoint::EmbeddingOutput, x, &ctx)
    } else {
        x
    };
    assert_eq!(out.size(), [b, t, D]);
    println!("PEAK_RISE {}", common::peak_rss_bytes() - before);
}

#[test]
fn paper_mode_on_a_packed_8k_batch_needs_no_pairwise_matrix() {
    let rise = |noise: &str| {
        common::child_peak_rise_mib(
            "packed_noise_peak_child",
            ("PEFT_RS_PEAK_WITH_NOISE", noise),
        )
    };
    let (plain, noisy) = (rise("0"), rise("1"));
    eprintln!("packed 2 x {PEAK_T}: peak rise {plain:.1} MiB without NEFTune, {noisy:.1} MiB with");
    // Comparing every pair of positions would need 2 x 8192^2 floats (512 MiB).
    assert!(
        noisy - plain < 64.0,
        "NEFTune adds {:.1} MiB to the peak",
        noisy - plain
    );
}
