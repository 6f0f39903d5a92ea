//! A mixture of experts' experts as llama.cpp stores them: per sparse layer
//! `ffn_gate_exps`, `ffn_up_exps` and `ffn_down_exps`, each `[experts, out,
//! in]` (gpt-oss adds their biases, `[experts, out]`), and LoRA on them as
//! llama.cpp applies it (`build_lora_mm_id`): `lora_a` `[experts, r, in]`,
//! `lora_b` `[experts, out, r]`.
//!
//! A checkpoint holds them one of three ways: one tensor per expert and
//! projection (the Hub's Qwen3-MoE and Mixtral), transformers 5's fused
//! `gate_up_proj` `[experts, 2·inter, hidden]` (gate, then up), or gpt-oss's
//! `[experts, in, out]` with gate and up interleaved. Each GGUF tensor is
//! built from the stored tensors it needs, with the adapter's ΔW added in
//! the stored layout, so that one layer's projection is the most held at once.

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::models::config::{ExpertStyle, MoeConfig};
use crate::models::LlamaConfig;
use crate::weights::WeightFiles;
use peft_adapters::lora::param::ParamLora;

/// One of an expert's three projections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    fn gguf(self) -> &'static str {
        match self {
            Proj::Gate => "ffn_gate_exps",
            Proj::Up => "ffn_up_exps",
            Proj::Down => "ffn_down_exps",
        }
    }

    /// The transformers 5 parameter holding this projection.
    fn fused(self) -> &'static str {
        match self {
            Proj::Gate | Proj::Up => "gate_up_proj",
            Proj::Down => "down_proj",
        }
    }
}

/// One expert GGUF tensor of a layer: its projection, and whether it is the bias.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    layer: usize,
    proj: Proj,
    bias: bool,
}

fn moe(c: &LlamaConfig) -> &MoeConfig {
    c.moe.as_ref().expect("a mixture of experts")
}

/// Whether the stored tensor `name` belongs to some layer's experts (written
/// through [`tensors`], not one to one).
pub(super) fn is_expert_tensor(c: &LlamaConfig, name: &str) -> bool {
    if c.parameter_part(name).is_some_and(|(p, _, _)| {
        p.ends_with(".experts.gate_up_proj") || p.ends_with(".experts.down_proj")
    }) {
        return true;
    }
    // gpt-oss's expert biases are not adaptable parameters.
    c.moe.is_some()
        && (name.ends_with(".mlp.experts.gate_up_proj_bias")
            || name.ends_with(".mlp.experts.down_proj_bias"))
}

/// The expert tensors of every sparse layer, as (GGUF name, shape, what it is).
pub(super) fn tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>, Part)> {
    let Some(m) = &c.moe else {
        return Vec::new();
    };
    let (e, h, i) = (m.num_experts, c.hidden_size, m.moe_intermediate_size);
    let biases = m.style != ExpertStyle::SwiGlu;
    let mut out = Vec::new();
    for layer in (0..c.num_hidden_layers).filter(|&l| c.is_sparse(l)) {
        for proj in Proj::ALL {
            let (rows, cols) = if proj == Proj::Down { (h, i) } else { (i, h) };
            let name = |s: &str| format!("blk.{layer}.{}.{s}", proj.gguf());
            let part = |bias| Part { layer, proj, bias };
            out.push((name("weight"), vec![e, rows, cols], part(false)));
            if biases {
                out.push((name("bias"), vec![e, rows], part(true)));
            }
        }
    }
    out
}

/// The adaptable parameter `part` is (part of): its path.
pub(super) fn parameter(c: &LlamaConfig, part: Part) -> Option<String> {
    (!part.bias).then(|| {
        format!(
            "{}.layers.{}.mlp.experts.{}",
            c.decoder_path,
            part.layer,
            part.proj.fused()
        )
    })
}

/// The rows of `t`'s dimension 1 that are `proj`'s in a fused gate/up tensor
/// (`[experts, 2·inter, ...]`): the halves, or gpt-oss's interleaved rows.
fn gate_or_up(t: &Tensor, proj: Proj, style: ExpertStyle) -> Tensor {
    let rows = t.size()[1];
    let start = i64::from(proj == Proj::Up);
    match style {
        ExpertStyle::SwiGlu => t.narrow(1, start * rows / 2, rows / 2),
        ExpertStyle::GptOss { .. } => t.slice(1, start, rows, 2),
    }
}

/// The tensor `part` in fp32, `[experts, out, in]` (`[experts, out]` for a
/// bias), with `params`' ΔW on its parameter added.
pub(super) fn load(
    files: &WeightFiles,
    c: &LlamaConfig,
    part: Part,
    params: &super::ParamDeltas,
) -> Result<Tensor> {
    let m = moe(c);
    let fused = parameter(
        c,
        Part {
            bias: false,
            ..part
        },
    )
    .expect("a weight");
    let delta = params.get(&fused);
    let stored = |module: &str| c.stored_name(module);
    let get = |name: &str| -> Result<Tensor> {
        let (shape, _) = files
            .info(name)
            .with_context(|| format!("tensor {name}: not in the checkpoint"))?;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let t = files.load(name, &dims, Kind::Float, Device::Cpu)?;
        files.release(name);
        Ok(t)
    };
    let oriented = |t: Tensor| match m.style {
        ExpertStyle::SwiGlu => t,
        ExpertStyle::GptOss { .. } => t.transpose(1, 2),
    };
    if part.bias {
        let t = get(&stored(&format!("{fused}_bias")))?;
        return Ok(match part.proj {
            Proj::Down => t,
            p => gate_or_up(&t, p, m.style).contiguous(),
        });
    }
    if !files.contains(&stored(&fused)) {
        return per_expert(c, part.layer, part.proj, delta, &get);
    }
    let mut t = get(&stored(&fused))?;
    if let Some(d) = delta {
        t += d.delta();
    }
    let t = oriented(t);
    Ok(match part.proj {
        Proj::Down => t.contiguous(),
        p => gate_or_up(&t, p, m.style).contiguous(),
    })
}

/// `proj` of every expert from the Hub's per-expert tensors, stacked
/// `[experts, out, in]`.
fn per_expert(
    c: &LlamaConfig,
    layer: usize,
    proj: Proj,
    delta: Option<&ParamLora>,
    get: &dyn Fn(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    let m = moe(c);
    let (block, gate, up, down) = m.per_expert_names;
    let (e, h, i) = (
        m.num_experts as i64,
        c.hidden_size as i64,
        m.moe_intermediate_size as i64,
    );
    // Gate and up are the two halves of the adapter's gate_up ΔW.
    let (name, rows, shape) = match proj {
        Proj::Gate => (gate, Some((0, i)), [e, i, h]),
        Proj::Up => (up, Some((i, i)), [e, i, h]),
        Proj::Down => (down, None, [e, h, i]),
    };
    let out = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    for x in 0..e {
        let module = format!(
            "{}.layers.{layer}.{block}.experts.{x}.{name}",
            c.decoder_path
        );
        let mut t = get(&c.stored_name(&format!("{module}.weight")))?;
        if let Some(d) = delta {
            t += d.expert_delta(x, rows);
        }
        out.get(x).copy_(&t);
    }
    Ok(out)
}

/// The LoRA GGUF tensors of an adapter on a layer's experts (`path` is
/// `…mlp.experts.gate_up_proj` or `…down_proj`): per projection
/// `.lora_a` `[experts, r, in]` and `.lora_b` `[experts, out, r]`, with
/// `fold` multiplying B (llama.cpp scales every module by alpha / r).
pub(super) fn lora_tensors(
    c: &LlamaConfig,
    path: &str,
    l: &ParamLora,
    fold: f64,
) -> Result<Vec<(String, Tensor)>> {
    let m = moe(c);
    let layer = path
        .strip_prefix(&format!("{}.layers.", c.decoder_path))
        .and_then(|r| r.split_once('.'))
        .with_context(|| format!("parameter {path}: not in a decoder layer"))?
        .0;
    let (r, out, inp) = (l.rank(), l.b.size()[0], l.a.size()[1]);
    let a = l.a.reshape([l.experts, r, inp]);
    // B as [experts, out, r], out in [out, in] orientation for both layouts.
    let b = l.b.reshape([out, r, l.experts]).permute([2, 0, 1]) * fold;
    let projs: &[Proj] = if path.ends_with(".down_proj") {
        &[Proj::Down]
    } else {
        &[Proj::Gate, Proj::Up]
    };
    Ok(projs
        .iter()
        .flat_map(|&p| {
            let name = format!("blk.{layer}.{}.weight", p.gguf());
            let b = match p {
                Proj::Down => b.shallow_clone(),
                p => gate_or_up(&b, p, m.style),
            };
            [
                (format!("{name}.lora_a"), a.contiguous()),
                (format!("{name}.lora_b"), b.contiguous()),
            ]
        })
        .collect())
}
