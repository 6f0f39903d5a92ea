//! LoRA on a parameter rather than on a linear module: PEFT's
//! `ParamWrapper` (`LoraConfig.target_parameters`), which adapts the
//! experts of a mixture of experts (3D `[experts, out, in]` tensors, as
//! transformers 5 stores `mlp.experts.gate_up_proj` and `down_proj`) and
//! the router's 2D weight (`mlp.gate.weight`).
//!
//! PEFT reads a 3D parameter `[E, d1, d2]` as (experts, in, out) and, since
//! transformers' experts are not `is_transposed`, swaps the two: `lora_A` is
//! `[r·E, d2]` and `lora_B` `[d1, r·E]`. Expert `e`'s factors are rows
//! `e·r .. e·r + r` of A and, of B seen as `[d1, r, E]`, the slice `[:, :, e]`;
//! ΔW = scaling · `einsum("o r e, e r i -> e o i")`. Experts stored
//! `[E, in, out]` (gpt-oss's, `is_transposed` in transformers) are read
//! as they are, and their ΔW is `[E, in, out]` too. A 2D parameter is
//! plain LoRA. PEFT refuses dropout, DoRA and a LoRA bias on these.

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// LoRA factors of one adapted parameter.
pub struct ParamLora {
    /// `lora_A.weight`, `[r·experts, in]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out, r·experts]`.
    pub b: Tensor,
    /// alpha / r (or alpha / √r with rsLoRA).
    pub scaling: f64,
    /// Experts stacked in the parameter (1 for a 2D parameter).
    pub experts: i64,
    /// Whether the parameter is stored `[experts, in, out]` (gpt-oss).
    pub transposed: bool,
    /// Whether ΔW is folded into the parameter (the forward then skips it).
    pub merged: bool,
    /// The adapter's name (`default`).
    pub name: String,
    /// Whether the adapter is among the active ones.
    pub active: bool,
}

/// A parameter an adapter may target: its path, its stored shape, and
/// whether a 3D one is stored `[experts, in, out]` (gpt-oss's experts).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamShape {
    /// The parameter's path (`model.layers.0.mlp.experts.gate_up_proj`).
    pub path: String,
    /// Its shape as stored.
    pub shape: Vec<i64>,
    /// `[experts, in, out]` rather than `[experts, out, in]`.
    pub transposed: bool,
}

impl ParamShape {
    /// `(experts, in, out)` as PEFT's `ParamWrapper` reads the parameter
    /// (see the module documentation).
    pub fn dims(&self) -> Result<(i64, i64, i64)> {
        match (self.shape.as_slice(), self.transposed) {
            (&[out, inp], false) => Ok((1, inp, out)),
            (&[e, out, inp], false) => Ok((e, inp, out)),
            (&[e, inp, out], true) => Ok((e, inp, out)),
            (shape, _) => bail!("only 2D and 3D parameters take LoRA (found {shape:?})"),
        }
    }

    /// The shapes of `lora_A` and `lora_B` at rank `r`.
    pub fn factor_shapes(&self, r: i64) -> Result<([i64; 2], [i64; 2])> {
        let (e, inp, out) = self.dims()?;
        Ok(([r * e, inp], [out, r * e]))
    }
}

impl ParamLora {
    /// A fresh adapter for the parameter `param` held in `base_kind`, as
    /// PEFT's `ParamWrapper.update_layer` makes it: A kaiming-uniform (a = √5)
    /// over `[r·experts, in]`, i.e. U(−1/√in, 1/√in), B zero (`init_lora_weights`
    /// true), drawn on the CPU in fp32, rounded through the base's dtype (PEFT
    /// moves adapters to it) and placed on `device` in fp32.
    pub fn init(
        param: &ParamShape,
        base_kind: Kind,
        r: i64,
        scaling: f64,
        name: &str,
        device: tch::Device,
    ) -> Result<Self> {
        let (experts, inp, out) = param.dims()?;
        let opts = (Kind::Float, tch::Device::Cpu);
        let kaiming = |rows: i64, fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::empty([rows, fan_in], opts).uniform_(-bound, bound)
        };
        // The draws of the two nn.Linear constructors PEFT runs first, so
        // that one seed gives PEFT's adapter.
        let _ = (kaiming(r * experts, inp), kaiming(out, r * experts));
        let a = kaiming(r * experts, inp);
        let b = Tensor::zeros([out, r * experts], opts);
        let place = |t: Tensor| {
            t.to_kind(base_kind)
                .to_kind(Kind::Float)
                .to_device(device)
                .set_requires_grad(true)
        };
        Ok(Self {
            a: place(a),
            b: place(b),
            scaling,
            experts,
            transposed: param.transposed,
            merged: false,
            name: name.to_owned(),
            active: true,
        })
    }

    /// Whether the forward pass adds this adapter (active, not merged).
    pub fn applies(&self) -> bool {
        self.active && !self.merged
    }

    /// The rank per expert.
    pub fn rank(&self) -> i64 {
        self.a.size()[0] / self.experts
    }

    /// Expert `e`'s `(A_e [r, in], B_e [out, r])`.
    pub fn factors(&self, e: i64) -> (Tensor, Tensor) {
        let r = self.rank();
        let out = self.b.size()[0];
        let a = self.a.narrow(0, e * r, r);
        let b = self.b.reshape([out, r, self.experts]).select(2, e);
        (a, b)
    }

    /// `scaling · x A_eᵀ B_eᵀ` for rows `x` `[n, in]` of expert `e` (0 for a
    /// 2D parameter), in `x`'s dtype: what the adapter adds to `x Wᵀ`.
    pub fn forward(&self, e: i64, x: &Tensor) -> Tensor {
        let (a, b) = self.factors(e);
        let kind = x.kind();
        x.linear::<Tensor>(&a.to_kind(kind), None)
            .linear::<Tensor>(&b.to_kind(kind), None)
            * self.scaling
    }

    /// The factors of every expert as grouped-matmul operands in `kind`:
    /// `A` as `[experts, in, r]` and `B` as `[experts, r, out]`, so that
    /// `x A_e` then `· B_e` is expert e's thin product (views of the
    /// parameters: autograd flows back into A and B in one step).
    pub fn grouped_factors(&self, kind: Kind) -> (Tensor, Tensor) {
        let (r, out, inp) = (self.rank(), self.b.size()[0], self.a.size()[1]);
        let a = self
            .a
            .to_kind(kind)
            .view([self.experts, r, inp])
            .transpose(1, 2);
        let b = self
            .b
            .to_kind(kind)
            .view([out, r, self.experts])
            .permute([2, 1, 0])
            .contiguous();
        (a, b)
    }

    /// Expert `e`'s ΔW `[out, in]` in fp32 (rows `rows` = (start, count)
    /// of it when given: a per-expert checkpoint stores the gate and up
    /// halves of `gate_up_proj` as two tensors).
    pub fn expert_delta(&self, e: i64, rows: Option<(i64, i64)>) -> Tensor {
        let (a, b) = self.factors(e);
        let d = b.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * self.scaling;
        match rows {
            Some((start, n)) => d.narrow(0, start, n),
            None => d,
        }
    }

    /// ΔW in fp32, shaped as the parameter: `[out, in]`, `[E, out, in]`, or
    /// `[E, in, out]` when the parameter is stored transposed.
    pub fn delta(&self) -> Tensor {
        let (a, b) = (self.a.to_kind(Kind::Float), self.b.to_kind(Kind::Float));
        if self.experts == 1 {
            return b.matmul(&a) * self.scaling;
        }
        let (r, out, inp) = (self.rank(), b.size()[0], a.size()[1]);
        let a = a.reshape([self.experts, r, inp]);
        let b = b.reshape([out, r, self.experts]).permute([2, 0, 1]);
        let delta = b.matmul(&a) * self.scaling;
        if self.transposed {
            delta.transpose(1, 2)
        } else {
            delta
        }
    }
}

/// The adapter-file key stem (the module path PEFT's nested wrappers give)
/// of each parameter in `chosen`, in order: several adapted parameters of one
/// module nest in the order the module registers them, the first innermost,
/// so the first of n is `module.base_layer` n − 1 times, the last `module`.
/// `chosen` lists parameter paths (`…mlp.experts.gate_up_proj`) in the
/// model's registration order.
pub fn key_stems(chosen: &[&str]) -> Vec<String> {
    let module = |p: &str| {
        p.rsplit_once('.')
            .map_or(String::new(), |(m, _)| m.to_owned())
    };
    chosen
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let m = module(p);
            let after = chosen[i + 1..].iter().filter(|q| module(q) == m).count();
            format!("{m}{}", ".base_layer".repeat(after))
        })
        .collect()
}

/// Whether the parameter `path` is one of `targets` (PEFT's match: the whole
/// path, or a suffix after a dot).
pub fn targeted(targets: &[String], path: &str) -> bool {
    targets
        .iter()
        .any(|t| path == t || path.ends_with(&format!(".{t}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn nested_wrappers_name_the_first_parameter_innermost() {
        let chosen = [
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.0.mlp.experts.down_proj",
            "model.layers.1.mlp.experts.down_proj",
        ];
        assert_eq!(
            key_stems(&chosen),
            [
                "model.layers.0.mlp.gate",
                "model.layers.0.mlp.experts.base_layer",
                "model.layers.0.mlp.experts",
                "model.layers.1.mlp.experts",
            ]
        );
    }

    /// ΔW of each expert is B_e A_e, and the thin forward applies it.
    #[test]
    fn delta_and_forward_agree_per_expert() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let (e, r, inp, out) = (3, 2, 5, 4);
        let l = ParamLora {
            a: Tensor::randn([r * e, inp], opts),
            b: Tensor::randn([out, r * e], opts),
            scaling: 0.5,
            experts: e,
            transposed: false,
            merged: false,
            name: "default".into(),
            active: true,
        };
        let delta = l.delta();
        assert_eq!(delta.size(), vec![e, out, inp]);
        let x = Tensor::randn([7, inp], opts);
        for k in 0..e {
            let (a, b) = l.factors(k);
            let want = b.matmul(&a) * 0.5;
            assert!((delta.get(k) - &want).abs().max().double_value(&[]) < 1e-6);
            let thin = l.forward(k, &x);
            assert!((thin - x.matmul(&want.tr())).abs().max().double_value(&[]) < 1e-5);
        }
        // Stored [E, in, out] (gpt-oss): the same factors, ΔW laid out as the parameter.
        let t = ParamLora {
            a: l.a.shallow_clone(),
            b: l.b.shallow_clone(),
            transposed: true,
            name: "t".into(),
            ..l
        };
        assert_eq!(t.delta().size(), vec![e, inp, out]);
        assert_eq!(
            (t.delta() - delta.transpose(1, 2))
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
        assert!(targeted(
            &["gate_up_proj".into()],
            "m.l.0.mlp.experts.gate_up_proj"
        ));
        assert!(!targeted(
            &["up_proj".into()],
            "m.l.0.mlp.experts.gate_up_proj"
        ));
    }
}
