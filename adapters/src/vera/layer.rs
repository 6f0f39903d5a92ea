//! The VeRA weights: `y = W x + b + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))`,
//! with dropout on x in training, as PEFT's `VeraLayer`; the layer itself
//! (merge, unmerge, several adapters) is the shared [`LycorisLayer`].

use tch::Tensor;

use crate::lycoris::{Dropout, LycorisLayer, LycorisWeights};

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
}

/// The VeRA adapters attached to one linear layer.
pub type VeraLayer = LycorisLayer<VeraWeights>;

impl LycorisWeights for VeraWeights {
    const METHOD: &'static str = "VeRA";

    /// ΔW = (λ_b ⊙ B) (λ_d ⊙ A), `[out, in]`, as PEFT's `get_delta_weight`.
    fn delta(&self) -> Tensor {
        let (a, b) = self.sliced();
        (self.lambda_b.unsqueeze(-1) * b).matmul(&(self.lambda_d.unsqueeze(-1) * a))
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        vec![
            ("vera_lambda_b".to_owned(), self.lambda_b.shallow_clone()),
            ("vera_lambda_d".to_owned(), self.lambda_d.shallow_clone()),
        ]
    }

    /// None of LyCORIS' dropouts: VeRA drops input features instead.
    fn dropout(&self) -> Dropout {
        Dropout {
            rank: 0.0,
            module: 0.0,
            rescale_rank: false,
        }
    }

    /// PEFT's order: λ_b ⊙ linear(λ_d ⊙ linear(dropout(x), A), B).
    fn output(&self, x: &Tensor, training: bool) -> Option<Tensor> {
        let (a, b) = self.sliced();
        let x = if training && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let h = x.linear::<Tensor>(&a, None) * &self.lambda_d;
        Some(h.linear::<Tensor>(&b, None) * &self.lambda_b)
    }

    fn shared(&self) -> Vec<(String, Tensor)> {
        if !self.save_projection {
            return Vec::new();
        }
        vec![
            ("vera_A".to_owned(), self.a.shallow_clone()),
            ("vera_B".to_owned(), self.b.shallow_clone()),
        ]
    }
}
