//! Several regularizers applied in order, and the decoder hooks that run them.

use tch::Tensor;

use crate::hooks::ForwardHooks;
use crate::{mix, HookContext, HookPoint, Regularizer};

/// Several regularizers applied in the order given.
#[derive(Default)]
pub struct RegularizerStack {
    regs: Vec<Box<dyn Regularizer>>,
}

impl RegularizerStack {
    /// An empty stack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a regularizer after those already present.
    pub fn push(&mut self, r: Box<dyn Regularizer>) {
        self.regs.push(r);
    }

    /// True when no regularizer is present.
    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    /// Names, in order.
    pub fn names(&self) -> Vec<String> {
        self.regs.iter().map(|r| r.name()).collect()
    }

    /// Whether any regularizer acts at `point` in this mode.
    pub fn wants(&self, point: HookPoint, training: bool) -> bool {
        self.regs
            .iter()
            .any(|r| (training || r.active_in_eval()) && r.hook_points().contains(&point))
    }

    /// Runs every regularizer that acts at `point`, in order. Each sees a seed
    /// derived from `ctx.seed`, the point and its position in the stack.
    pub fn apply(&mut self, point: HookPoint, mut value: Tensor, ctx: &HookContext) -> Tensor {
        for (i, r) in self.regs.iter_mut().enumerate() {
            if !(ctx.training || r.active_in_eval()) || !r.hook_points().contains(&point) {
                continue;
            }
            let own_seed = |s: u64| mix(mix(s, point.salt()), i as u64);
            let rows: Option<Vec<u64>> = ctx
                .row_seeds
                .map(|r| r.iter().map(|&s| own_seed(s)).collect());
            let own = HookContext {
                seed: own_seed(ctx.seed),
                row_seeds: rows.as_deref(),
                ..*ctx
            };
            let (kind, device) = (value.kind(), value.device());
            value = r.apply(point, value, &own);
            // A regularizer computing in fp32 (noise on a bf16 base, say)
            // must not change what the next layer receives.
            if point != HookPoint::Loss && (value.kind() != kind || value.device() != device) {
                value = value.to_device(device).to_kind(kind);
            }
        }
        value
    }
}

/// A stack as the decoder's hooks: called at the embedding and layer outputs
/// with one micro-batch's context, and giving each layer the seed of its
/// random draws (adapter dropout) in training.
pub struct StackHooks<'a> {
    /// The regularizers.
    pub regs: &'a mut RegularizerStack,
    /// The micro-batch's context.
    pub ctx: HookContext<'a>,
}

impl ForwardHooks for StackHooks<'_> {
    fn embedding_output(&mut self, x: Tensor) -> Tensor {
        self.apply(HookPoint::EmbeddingOutput, x)
    }

    fn layer_output(&mut self, i: usize, x: Tensor) -> Tensor {
        self.apply(HookPoint::DecoderLayerOutput(i), x)
    }

    fn reads_layer_output(&self, i: usize) -> bool {
        self.regs
            .wants(HookPoint::DecoderLayerOutput(i), self.ctx.training)
    }

    fn layer_seed(&self, i: usize) -> Option<u64> {
        self.ctx
            .training
            .then(|| mix(self.ctx.seed, 10_000 + i as u64))
    }
}

impl StackHooks<'_> {
    fn apply(&mut self, point: HookPoint, x: Tensor) -> Tensor {
        if self.regs.wants(point, self.ctx.training) {
            self.regs.apply(point, x, &self.ctx)
        } else {
            x
        }
    }
}
