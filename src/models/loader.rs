//! A walk over Hugging Face tensor names: `w.pp("model").pp("layers.0")`
//! addresses `model.layers.0.*`, and every tensor taken is recorded so that
//! leftovers can be reported.

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::nn::{FrozenWeight, Linear};
use crate::quant::QuantPlan;
use crate::weights::WeightFiles;

/// Where a model's tensors come from: a checkpoint, or random values for
/// benchmarks of shapes no checkpoint is at hand for.
pub trait TensorSource {
    /// The tensor `name` of `shape`, in `kind` on `device`.
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor>;

    /// The checkpoint files, when the tensors come from some (pre-quantized
    /// layers are read from them directly).
    fn weight_files(&self) -> Option<&WeightFiles> {
        None
    }
}

impl TensorSource for WeightFiles {
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.load(name, shape, kind, device)
    }

    fn weight_files(&self) -> Option<&WeightFiles> {
        Some(self)
    }
}

/// Random weights with a model's shapes: norms at 1, everything else
/// N(0, `std`), drawn on the device (a 7B model in seconds, nothing read).
pub struct RandomWeights {
    /// Standard deviation of the non-norm weights.
    pub std: f64,
}

impl TensorSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::f_ones(shape, (kind, device))?
        } else {
            Tensor::f_empty(shape, (kind, device))?.f_normal_(0.0, self.std)?
        };
        Ok(t)
    }
}

/// A view of a checkpoint under a name prefix, loading in one dtype on one device.
pub struct Weights<'a> {
    files: &'a dyn TensorSource,
    prefix: String,
    kind: Kind,
    device: Device,
    used: &'a RefCell<BTreeSet<String>>,
    quant: Option<&'a QuantPlan>,
}

impl<'a> Weights<'a> {
    /// The root of a checkpoint; `used` collects the names loaded.
    pub fn new(
        files: &'a dyn TensorSource,
        kind: Kind,
        device: Device,
        used: &'a RefCell<BTreeSet<String>>,
    ) -> Self {
        Self {
            files,
            prefix: String::new(),
            kind,
            device,
            used,
            quant: None,
        }
    }

    /// The same root, loading linear layers as `plan` says (quantized at
    /// load, or read pre-quantized).
    pub fn with_quantization(mut self, plan: Option<&'a QuantPlan>) -> Self {
        self.quant = plan;
        self
    }

    /// The view under `self.prefix + name + "."`.
    pub fn pp(&self, name: &str) -> Weights<'a> {
        Weights {
            files: self.files,
            prefix: self.path(name) + ".",
            kind: self.kind,
            device: self.device,
            used: self.used,
            quant: self.quant,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The dtype tensors are loaded in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device tensors are loaded on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Loads `prefix + name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.files.tensor(&full, shape, self.kind, self.device)?;
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// Loads the linear layer `prefix + name` (`.weight`, and `.bias` when `bias`).
    pub fn linear(&self, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Result<Linear> {
        let w = self.pp(name);
        let path = self.path(name);
        let weight = match self.quant {
            Some(plan) if plan.quantizes(&path)? => {
                let (weight, used) = plan.weight(
                    &path,
                    &[out_dim, in_dim],
                    self.files.weight_files(),
                    || w.get("weight", &[out_dim, in_dim]),
                    self.kind,
                    self.device,
                )?;
                self.used.borrow_mut().extend(used);
                weight
            }
            _ => FrozenWeight::Dense(w.get("weight", &[out_dim, in_dim])?),
        };
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::with_weight(weight, bias))
    }
}
