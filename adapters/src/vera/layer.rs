//! The VeRA layer: `y = W x + b + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))`,
//! with dropout on x in training, merge and unmerge, as PEFT's `VeraLayer`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::{BaseLinear, LayerInput, LinearAdapter};

/// One VeRA adapter on one layer: its vectors and its view of the shared
/// projections, fp32.
pub struct VeraWeights {
    /// `vera_lambda_b`, `[out]`.
    pub lambda_b: Tensor,
    /// `vera_lambda_d`, `[r]`.
    pub lambda_d: Tensor,
    /// The shared `vera_A`, `[r, max in]` (frozen; one storage for all layers).
    pub a: Tensor,
    /// The shared `vera_B`, `[max out, r]`.
    pub b: Tensor,
    /// The layer's input features: the columns of A it uses.
    pub in_features: i64,
    /// Training only: dropout on the input.
    pub dropout: f64,
    /// Whether the projections go into the adapter file.
    pub save_projection: bool,
}

impl VeraWeights {
    fn sliced(&self) -> (Tensor, Tensor) {
        let out = self.lambda_b.size()[0];
        (
            self.a.narrow(1, 0, self.in_features),
            self.b.narrow(0, 0, out),
        )
    }

    /// ΔW = (λ_b ⊙ B) (λ_d ⊙ A), `[out, in]`, as PEFT's `get_delta_weight`.
    pub fn delta(&self) -> Tensor {
        let (a, b) = self.sliced();
        (self.lambda_b.unsqueeze(-1) * b).matmul(&(self.lambda_d.unsqueeze(-1) * a))
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        vec![
            ("vera_lambda_b".to_owned(), self.lambda_b.shallow_clone()),
            ("vera_lambda_d".to_owned(), self.lambda_d.shallow_clone()),
        ]
    }
}

/// The VeRA adapters attached to one linear layer.
pub struct VeraLayer {
    adapters: BTreeMap<String, VeraWeights>,
    active: Vec<String>,
    merged: Vec<String>,
    training: bool,
}

impl VeraLayer {
    /// A layer carrying one active adapter.
    pub fn new(name: &str, weights: VeraWeights) -> Self {
        Self {
            adapters: [(name.to_owned(), weights)].into(),
            active: vec![name.to_owned()],
            merged: vec![],
            training: false,
        }
    }

    fn active_unmerged(&self) -> impl Iterator<Item = (&String, &VeraWeights)> {
        self.active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .filter_map(|n| self.adapters.get_key_value(n))
    }
}

impl LinearAdapter for VeraLayer {
    fn forward(&self, input: &LayerInput, base_output: Tensor, _base: &BaseLinear) -> Tensor {
        let kind = base_output.kind();
        let mut out: Option<Tensor> = None;
        for (_, w) in self.active_unmerged() {
            let (a, b) = w.sliced();
            let x = input.derived(&format!("{:?}", Kind::Float), |x| x.to_kind(Kind::Float));
            let x = if self.training && w.dropout > 0.0 {
                x.dropout(w.dropout, true)
            } else {
                x
            };
            // PEFT's order: λ_b ⊙ linear(λ_d ⊙ linear(x, A), B).
            let h = x.linear::<Tensor>(&a, None) * &w.lambda_d;
            let delta = h.linear::<Tensor>(&b, None) * &w.lambda_b;
            let sum = out.unwrap_or_else(|| base_output.shallow_clone());
            out = Some(sum + delta);
        }
        match out {
            Some(y) => y.to_kind(kind),
            None => base_output,
        }
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter_map(|n| self.adapters.get(n))
            .flat_map(VeraWeights::named)
            .collect()
    }

    fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    fn merge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        let names: Vec<String> = self.active_unmerged().map(|(n, _)| n.clone()).collect();
        for name in names {
            let new = weight.to_kind(Kind::Float) + self.adapters[&name].delta();
            if !bool::try_from(new.isfinite().all())? {
                bail!(
                    "merging VeRA adapter `{name}` gives NaN or inf weights; the adapter is broken"
                );
            }
            *weight = new.to_kind(weight.kind());
            self.merged.push(name);
        }
        Ok(())
    }

    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        while let Some(name) = self.merged.pop() {
            let w = &self.adapters[&name];
            *weight = (weight.to_kind(Kind::Float) - w.delta()).to_kind(weight.kind());
        }
        Ok(())
    }

    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        self.adapters
            .get(name)
            .map(VeraWeights::named)
            .unwrap_or_default()
    }

    fn shared_state(&self, name: &str) -> Vec<(String, Tensor)> {
        match self.adapters.get(name) {
            Some(w) if w.save_projection => vec![
                ("vera_A".to_owned(), w.a.shallow_clone()),
                ("vera_B".to_owned(), w.b.shallow_clone()),
            ],
            _ => Vec::new(),
        }
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = crate::held_names(names, |n| self.adapters.contains_key(n));
    }
}
