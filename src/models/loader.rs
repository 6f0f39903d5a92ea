//! A walk over Hugging Face tensor names: `w.pp("model").pp("layers.0")`
//! addresses `model.layers.0.*`, and every tensor taken is recorded so that
//! leftovers can be reported.

use std::cell::RefCell;
use std::collections::BTreeSet;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use crate::nn::Linear;
use crate::weights::WeightFiles;

/// A view of a checkpoint under a name prefix, loading in one dtype on one device.
pub struct Weights<'a> {
    files: &'a WeightFiles,
    prefix: String,
    kind: Kind,
    device: Device,
    used: &'a RefCell<BTreeSet<String>>,
}

impl<'a> Weights<'a> {
    /// The root of a checkpoint; `used` collects the names loaded.
    pub fn new(
        files: &'a WeightFiles,
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
        }
    }

    /// The view under `self.prefix + name + "."`.
    pub fn pp(&self, name: &str) -> Weights<'a> {
        Weights {
            files: self.files,
            prefix: self.path(name) + ".",
            kind: self.kind,
            device: self.device,
            used: self.used,
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
        let t = self.files.load(&full, shape, self.kind, self.device)?;
        self.used.borrow_mut().insert(full);
        Ok(t)
    }

    /// Loads the linear layer `prefix + name` (`.weight`, and `.bias` when `bias`).
    pub fn linear(&self, name: &str, in_dim: i64, out_dim: i64, bias: bool) -> Result<Linear> {
        let w = self.pp(name);
        let weight = w.get("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }
}
