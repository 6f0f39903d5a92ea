//! A 4-bit layer keeps only its packed weight for the backward pass, as
//! bitsandbytes' `MatMul4Bit` does: the input's gradient equals plain
//! autograd's through the dequantized weight, and a chain of layers run
//! forward with the graph alive raises the peak by about one dense weight,
//! not one per layer.

mod common;

use peft_rs::quant::{quantize_4bit, FrozenWeight, QuantType};
use tch::{Device, Kind, Tensor};

const LAYERS: usize = 8;
const DIM: i64 = 2048;

fn layers(double_quant: bool, compute: Kind) -> Vec<FrozenWeight> {
    tch::manual_seed(5);
    (0..LAYERS)
        .map(|_| {
            let w = Tensor::randn([DIM, DIM], (Kind::Float, Device::Cpu)) * 0.03;
            FrozenWeight::FourBit {
                q: quantize_4bit(&w, QuantType::Nf4, double_quant).unwrap(),
                compute,
            }
        })
        .collect()
}

#[test]
fn the_input_gradient_equals_plain_autograd_through_the_dequantized_weight() {
    for (double_quant, compute) in [
        (false, Kind::Float),
        (true, Kind::Float),
        (false, Kind::BFloat16),
    ] {
        let layers = layers(double_quant, compute);
        let x0 = Tensor::randn([2, 16, DIM], (Kind::Float, Device::Cpu)).to_kind(compute);
        let bias = Tensor::randn([DIM], (compute, Device::Cpu));
        let run = |one_op: bool| {
            let x = x0.detach().set_requires_grad(true);
            let mut y = x.shallow_clone();
            for (i, l) in layers.iter().enumerate() {
                let b = (i == 0).then_some(&bias);
                y = if one_op {
                    l.linear(&y, b)
                } else {
                    y.linear(&l.dense(), b)
                };
                y = y.tanh();
            }
            y.to_kind(Kind::Float).square().sum(Kind::Float).backward();
            (y.detach(), x.grad())
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        let diff = |a: &Tensor, b: &Tensor| {
            (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[])
        };
        let scale = g2.to_kind(Kind::Float).abs().max().double_value(&[]);
        // Up to the last bit of the bias add (one fused op in plain autograd).
        let tol = if compute == Kind::Float { 1e-5 } else { 2e-2 };
        assert!(
            diff(&y1, &y2) <= tol,
            "{compute:?}: outputs differ by {}",
            diff(&y1, &y2)
        );
        assert!(
            diff(&g1, &g2) <= tol * scale.max(1.0),
            "{compute:?} dq={double_quant}: input gradients differ by {} (scale {scale})",
            diff(&g1, &g2)
        );
        assert!(
            g1.to_kind(Kind::Float)
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
    }
}

/// Runs in a child process (started by the test below, which reads what it
/// prints): a chain of 4-bit layers forward with the graph alive, through
/// the one operation or through plain autograd, and the rise of the
/// process's peak resident memory.
#[test]
#[ignore = "child process of a_chain_of_4bit_layers_keeps_no_dense_weight_for_backward"]
fn chain_peak_child() {
    let one_op = std::env::var("PEFT_RS_CHAIN_ONE_OP").unwrap() == "1";
    let layers = layers(false, Kind::Float);
    let x = Tensor::randn([64, DIM], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    // Quantizing made its own peak: start the count again from here.
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
    let before = common::peak_rss_bytes();
    let mut y = x.shallow_clone();
    for l in &layers {
        y = if one_op {
            l.linear(&y, None)
        } else {
            y.linear::<Tensor>(&l.dense(), None)
        };
    }
    let rise = common::peak_rss_bytes() - before;
    y.sum(Kind::Float).backward();
    assert!(x.grad().defined());
    println!("PEAK_RISE {rise}");
}

#[test]
fn a_chain_of_4bit_layers_keeps_no_dense_weight_for_backward() {
    if !peft_rs::quant::matmul_4bit::AVAILABLE {
        panic!("this build lacks the 4-bit autograd operation (libtorch's headers were not found at build time)");
    }
    let rise = |one_op: &str| {
        common::child_peak_rise_mib("chain_peak_child", ("PEFT_RS_CHAIN_ONE_OP", one_op))
    };
    let dense = (DIM * DIM * 4) as f64 / (1 << 20) as f64;
    let (plain, one_op) = (rise("0"), rise("1"));
    eprintln!(
        "{LAYERS} layers of {DIM}x{DIM} (dense fp32 {dense:.0} MiB each): peak rise {plain:.0} MiB \
         through plain autograd, {one_op:.0} MiB through the one operation"
    );
    // Plain autograd keeps every layer's dense weight until backward.
    assert!(
        plain > (LAYERS as f64 - 1.0) * dense,
        "the plain path kept less than expected: {plain:.0} MiB"
    );
    assert!(
        one_op < 2.5 * dense,
        "the one operation kept {one_op:.0} MiB"
    );
}
