//! The IA³ layer: `y = l ⊙ (W x + b)`, or `y = W (l ⊙ x) + b` on a
//! feed-forward module, with merge and unmerge as PEFT's `IA3Layer`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

use crate::{BaseLinear, LayerInput, LinearAdapter};

/// The IA³ vectors attached to one linear layer (one per adapter name).
pub struct Ia3Layer {
    /// `ia3_l`: `[1, in_features]` on a feed-forward module, else
    /// `[out_features, 1]`; fp32.
    vectors: BTreeMap<String, Tensor>,
    active: Vec<String>,
    merged: Vec<String>,
    is_feedforward: bool,
}

impl Ia3Layer {
    /// A layer carrying one active vector `l` (fp32, shaped as in the file).
    pub fn new(name: &str, l: Tensor, is_feedforward: bool) -> Self {
        Self {
            vectors: [(name.to_owned(), l)].into(),
            active: vec![name.to_owned()],
            merged: vec![],
            is_feedforward,
        }
    }

    /// The product of the active, unmerged vectors, flattened (PEFT's
    /// `ia3_scaling`), or `None` when there is none.
    fn scaling(&self) -> Option<Tensor> {
        self.active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .filter_map(|n| self.vectors.get(n))
            .map(|t| t.flatten(0, -1))
            .reduce(|a, b| a * b)
    }

    /// The product of the active vectors not yet merged, shaped for the weight.
    fn unmerged_active(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter(|n| !self.merged.contains(n))
            .filter_map(|n| self.vectors.get(n).map(|t| (n.clone(), t.shallow_clone())))
            .collect()
    }
}

impl LinearAdapter for Ia3Layer {
    fn base_input(&self, x: &Tensor) -> Option<Tensor> {
        if !self.is_feedforward {
            return None;
        }
        // As PEFT: the input in the vector's dtype times the scaling, cast back.
        let l = self.scaling()?;
        Some((x.to_kind(l.kind()) * l).to_kind(x.kind()))
    }

    fn forward(&self, _x: &LayerInput, base_output: Tensor, _base: &BaseLinear) -> Tensor {
        if self.is_feedforward {
            return base_output;
        }
        match self.scaling() {
            None => base_output,
            Some(l) => {
                let kind = base_output.kind();
                (base_output * l).to_kind(kind)
            }
        }
    }

    fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.active
            .iter()
            .filter_map(|n| self.vectors.get(n))
            .map(|t| ("ia3_l".to_owned(), t.shallow_clone()))
            .collect()
    }

    fn set_training(&mut self, _training: bool) {}

    fn merge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (name, l) in self.unmerged_active() {
            // `[1, in]` scales columns, `[out, 1]` rows: PEFT's torch.mul(W, l).
            let new = weight.to_kind(Kind::Float) * &l;
            if !bool::try_from(new.isfinite().all())? {
                bail!(
                    "merging IA³ adapter `{name}` gives NaN or inf weights; the adapter is broken"
                );
            }
            *weight = new.to_kind(weight.kind());
            self.merged.push(name);
        }
        Ok(())
    }

    fn merge_bias(&self, bias: &mut Tensor) -> Result<()> {
        if self.is_feedforward {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        if let Some(l) = self.scaling() {
            *bias = (bias.to_kind(Kind::Float) * l).to_kind(bias.kind());
        }
        Ok(())
    }

    fn unmerge(&mut self, weight: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        while let Some(name) = self.merged.pop() {
            // PEFT divides by l + 1e-8 (IA³ cannot be undone where l is 0).
            let l = &self.vectors[&name] + 1e-8;
            *weight = (weight.to_kind(Kind::Float) / l).to_kind(weight.kind());
        }
        Ok(())
    }

    fn unmerge_bias(&self, bias: &mut Tensor) -> Result<()> {
        if self.is_feedforward {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        for name in self.merged.iter().rev() {
            let l = self.vectors[name].flatten(0, -1) + 1e-8;
            *bias = (bias.to_kind(Kind::Float) / l).to_kind(bias.kind());
        }
        Ok(())
    }

    fn state_dict(&self, name: &str) -> Vec<(String, Tensor)> {
        self.vectors
            .get(name)
            .map(|t| vec![("ia3_l".to_owned(), t.shallow_clone())])
            .unwrap_or_default()
    }

    fn set_active(&mut self, names: &[String]) {
        self.active = crate::held_names(names, |n| self.vectors.contains_key(n));
    }
}
