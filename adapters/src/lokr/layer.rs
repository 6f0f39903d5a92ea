//! The LoKr weights: ΔW = scaling · W1 ⊗ W2 (Kronecker product), each
//! factor whole or a low-rank product, as PEFT's `LoKrLayer`; the layer
//! itself is the shared [`LycorisLayer`].

use tch::Tensor;

use super::config::{InitWeights, Layout};
use crate::lycoris::{kaiming, Dropout, LycorisLayer, LycorisWeights};

/// One Kronecker factor: a whole matrix, or the product of two through the rank.
pub enum Factor {
    /// `lokr_wN`.
    Whole(Tensor),
    /// `lokr_wN_a`, `lokr_wN_b`.
    Product(Tensor, Tensor),
}

impl Factor {
    fn matrix(&self) -> Tensor {
        match self {
            Self::Whole(w) => w.shallow_clone(),
            Self::Product(a, b) => a.matmul(b),
        }
    }

    fn named(&self, name: &str) -> Vec<(String, Tensor)> {
        match self {
            Self::Whole(w) => vec![(name.to_owned(), w.shallow_clone())],
            Self::Product(a, b) => vec![
                (format!("{name}_a"), a.shallow_clone()),
                (format!("{name}_b"), b.shallow_clone()),
            ],
        }
    }

    /// The factor from the front of `tensors` (in [`Layout::tensor_shapes`]' order).
    fn take(whole: bool, tensors: &mut std::vec::IntoIter<Tensor>) -> Self {
        let mut next = || tensors.next().expect("the layout's tensors");
        if whole {
            Self::Whole(next())
        } else {
            let a = next();
            Self::Product(a, next())
        }
    }
}

/// One LoKr adapter's weights on one layer, fp32.
pub struct LokrWeights {
    /// W1, `[a, c]`.
    pub w1: Factor,
    /// W2, `[b, d]`.
    pub w2: Factor,
    /// alpha / r.
    pub scaling: f64,
    /// Training only: rank dropout (rescaled with `rank_dropout_scale`) and
    /// module dropout.
    pub dropout: Dropout,
}

/// The LoKr adapters attached to one linear layer.
pub type LokrLayer = LycorisLayer<LokrWeights>;

impl LokrWeights {
    /// The weights from `tensors`, in `layout`'s order.
    pub fn new(layout: &Layout, tensors: Vec<Tensor>, scaling: f64, dropout: Dropout) -> Self {
        let mut it = tensors.into_iter();
        let w1 = Factor::take(layout.use_w1, &mut it);
        let w2 = Factor::take(layout.use_w2, &mut it);
        Self {
            w1,
            w2,
            scaling,
            dropout,
        }
    }

    /// Fresh tensors for `layout`, drawn from libtorch's CPU generator in
    /// PEFT's order: each factor kaiming-uniform, except the one `init`
    /// starts at zero (W1, or W1's left factor, by default; W2, or W2's
    /// right factor, for "lycoris"), so that ΔW = 0.
    pub fn fresh(layout: &Layout, init: InitWeights) -> Vec<Tensor> {
        let zero = |name: &str| match init {
            InitWeights::True => name == "lokr_w1" || name == "lokr_w1_a",
            InitWeights::False => false,
            InitWeights::Lycoris => name == "lokr_w2" || name == "lokr_w2_b",
        };
        layout
            .tensor_shapes()
            .into_iter()
            .map(|(name, s)| {
                if zero(&name) {
                    Tensor::zeros(s.as_slice(), (tch::Kind::Float, tch::Device::Cpu))
                } else {
                    kaiming(s[0], s[1])
                }
            })
            .collect()
    }
}

impl LycorisWeights for LokrWeights {
    const METHOD: &'static str = "LoKr";

    /// PEFT's `get_delta_weight` without rank dropout: `[a·b, c·d]` = `[out, in]`.
    fn delta(&self) -> Tensor {
        self.w1.matrix().kron(&self.w2.matrix()) * self.scaling
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        let mut v = self.w1.named("lokr_w1");
        v.extend(self.w2.named("lokr_w2"));
        v
    }

    fn dropout(&self) -> Dropout {
        self.dropout
    }
}
