//! The frozen base sharded over the ranks (`--fsdp`), as PyTorch's FSDP
//! keeps it: each rank holds 1/N of every frozen tensor between uses, and a
//! whole decoder layer (one *unit*) is all-gathered just before it runs and
//! dropped after, in the forward pass and again in the backward pass.
//!
//! Every frozen tensor a unit holds, dense or the packed bytes and
//! quantization state of a 4-bit weight, is cut into N equal runs of its
//! flat elements (the last padded); a unit's runs travel as one byte buffer,
//! so that one all-gather brings a whole layer, quantized or not (FSDP-QLoRA's
//! `bnb_4bit_quant_storage` idea). The gathered bytes are rebuilt into the
//! weights the model computes with ([`FrozenWeight::Sharded`] reads them), and
//! a 4-bit weight is dequantized only after the gather.
//!
//! The model code calls [`Fsdp::gather_layer`] around each layer and never
//! sees a shard. Every rank must run the same gathers in the same order:
//! a rank with no rows in a step or an evaluation batch runs
//! [`Fsdp::idle_pass`] instead of a forward pass.

use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{PendingGather, ProcessGroup};
use crate::quant::FrozenWeight;

/// Elements per rank of a tensor of `numel` elements cut into rows of
/// `row` elements over `world` ranks: whole rows, as even as possible (a
/// matrix's rank holds a block of its rows, which is what the embeddings
/// and the output head are used as, sharded by vocabulary).
pub fn run_len(numel: i64, world: usize, row: i64) -> i64 {
    let rows = (numel + row - 1) / row;
    (rows + world as i64 - 1) / world as i64 * row
}

/// The elements of a `numel`-element tensor that `rank` of `world` holds
/// (a run of [`run_len`], cut at the end; empty past it).
pub fn run_of(numel: i64, rank: usize, world: usize, row: i64) -> Range<i64> {
    let len = run_len(numel, world, row);
    let start = (rank as i64 * len).min(numel);
    start..(start + len).min(numel)
}

/// The row length a tensor is sharded by: a matrix's rows, else elements.
pub fn row_of(shape: &[i64]) -> i64 {
    match shape {
        [_, cols] => (*cols).max(1),
        _ => 1,
    }
}

/// One stored tensor of a sharded weight: its whole shape and dtype, and
/// the elements of each rank's (padded) run.
#[derive(Debug, Clone)]
struct Part {
    shape: Vec<i64>,
    kind: Kind,
    run: i64,
}

impl Part {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
    /// Bytes of this rank's (padded) run.
    fn run_bytes(&self) -> i64 {
        self.run * self.kind.elt_size_in_bytes() as i64
    }
}

/// A frozen weight of which this rank holds one run of each stored tensor.
pub struct ShardedWeight {
    /// The weight as it is when whole, with empty tensors for its parts
    /// (kept for what is not a tensor: quantization type, shape, dtypes).
    template: FrozenWeight,
    parts: Vec<Part>,
    /// This rank's runs until [`Fsdp::new`] moves them into the unit's buffer.
    runs: Mutex<Option<Vec<Tensor>>>,
    /// The whole weight while its unit is gathered.
    whole: Mutex<Option<FrozenWeight>>,
}

impl ShardedWeight {
    /// Keeps `rank`'s run of each part of `whole` (which is then dropped).
    pub fn from_whole(whole: &FrozenWeight, rank: usize, world: usize) -> Arc<Self> {
        let runs = whole
            .parts()
            .into_iter()
            .map(|t| {
                let flat = t.reshape([-1]);
                let row = row_of(&t.size());
                let r = run_of(flat.numel() as i64, rank, world, row);
                let len = run_len(flat.numel() as i64, world, row);
                // A copy: the run must not keep the whole tensor's storage.
                pad_run(&flat.narrow(0, r.start, r.end - r.start).copy(), len)
            })
            .collect();
        Self::from_runs(whole, runs)
    }

    /// A sharded weight shaped as `whole` (whose parts may be placeholders
    /// of the right shape and dtype), holding `runs`, this rank's padded
    /// runs of each part (read straight from the checkpoint).
    pub fn from_runs(whole: &FrozenWeight, runs: Vec<Tensor>) -> Arc<Self> {
        let parts: Vec<Part> = whole
            .parts()
            .iter()
            .zip(&runs)
            .map(|(t, r)| Part {
                shape: t.size(),
                kind: t.kind(),
                run: r.numel() as i64,
            })
            .collect();
        let empty = parts
            .iter()
            .map(|p| Tensor::empty([0], (p.kind, tch::Device::Cpu)))
            .collect();
        Arc::new(Self {
            template: whole.with_parts(empty),
            parts,
            runs: Mutex::new(Some(runs)),
            whole: Mutex::new(None),
        })
    }

    /// `[out_features, in_features]`.
    pub fn size(&self) -> Vec<i64> {
        match &self.template {
            FrozenWeight::FourBit { q, .. } => q.shape.clone(),
            _ => self.parts[0].shape.clone(),
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        self.template.is_quantized()
    }

    /// The dtype the layer computes in.
    pub fn compute_kind(&self) -> Kind {
        match &self.template {
            FrozenWeight::Dense(_) => self.parts[0].kind,
            t => t.compute_kind(),
        }
    }

    /// A tensor of the whole weight's shape and compute dtype that holds
    /// one value (zero, broadcast): for code that reads only those.
    pub fn stand_in(&self, device: tch::Device) -> Tensor {
        Tensor::zeros([1, 1], (self.compute_kind(), device)).expand(self.size(), false)
    }

    /// Bytes this rank holds of the weight between gathers.
    pub fn held_bytes(&self) -> usize {
        self.parts.iter().map(Part::run_bytes).sum::<i64>() as usize
    }

    /// Bytes of the whole weight.
    pub fn whole_bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.numel() as usize * p.kind.elt_size_in_bytes())
            .sum()
    }

    /// `f` on the whole weight; its unit must be gathered (a bug otherwise:
    /// the model ran a layer outside [`Fsdp::gather_layer`]).
    pub fn with_whole<T>(&self, f: impl FnOnce(&FrozenWeight) -> T) -> T {
        let whole = lock(&self.whole);
        let w = whole.as_ref().expect(
            "a sharded weight was used outside its gathered unit (FSDP gathers each layer before it runs)",
        );
        f(w)
    }

    /// Makes the weight whole from its gathered parts (each the bytes of
    /// `[world · run]`, the runs in rank order, so the whole tensor is their
    /// start): views, no copy.
    fn rebuild(&self, gathered: impl Iterator<Item = Tensor>) {
        let whole = self
            .parts
            .iter()
            .zip(gathered)
            .map(|(p, g)| {
                g.view_dtype(p.kind)
                    .narrow(0, 0, p.numel())
                    .view(p.shape.as_slice())
            })
            .collect();
        *lock(&self.whole) = Some(self.template.with_parts(whole));
    }

    /// Zeros in place of the whole weight: what a unit holds after a failed
    /// gather, so that the pass ends and the error is reported (see
    /// [`Fsdp::take_error`]).
    fn fill_zeros(&self, device: tch::Device) {
        let zeros = self
            .parts
            .iter()
            .map(|p| Tensor::zeros(p.shape.as_slice(), (p.kind, device)))
            .collect();
        *lock(&self.whole) = Some(self.template.with_parts(zeros));
    }

    fn release(&self) {
        *lock(&self.whole) = None;
    }
}

// The template's tensors are empty and never written; the rest is behind mutexes.
unsafe impl Sync for ShardedWeight {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `run` (1-D) padded with zeros to `len` elements.
pub fn pad_run(run: &Tensor, len: i64) -> Tensor {
    let have = run.numel() as i64;
    if have == len {
        return run.contiguous();
    }
    let pad = Tensor::zeros([len - have], (run.kind(), run.device()));
    Tensor::cat(&[run.reshape([-1]), pad], 0)
}

/// Weights gathered and dropped together: a decoder layer, the embeddings.
struct Unit {
    weights: Vec<Arc<ShardedWeight>>,
    /// This rank's run of every part of every weight, in order, as bytes
    /// (c10d's coalesced gather on Gloo takes one dtype).
    local: Vec<Tensor>,
    device: tch::Device,
}

impl Unit {
    fn new(weights: Vec<Arc<ShardedWeight>>, device: tch::Device) -> Self {
        let local = weights
            .iter()
            .flat_map(|w| lock(&w.runs).take().unwrap_or_default())
            .map(|r| r.to_device(device).contiguous().view_dtype(Kind::Uint8))
            .collect();
        Self {
            weights,
            local,
            device,
        }
    }

    /// Bytes of this rank's runs.
    fn local_bytes(&self) -> usize {
        self.local
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// Makes every weight whole from the gathered parts, in order.
    fn rebuild(&self, gathered: Vec<Tensor>) {
        let mut parts = gathered.into_iter();
        for w in &self.weights {
            w.rebuild(parts.by_ref().take(w.parts.len()));
        }
    }
}

/// Which unit: a decoder layer, or the embeddings (with the tied head), or
/// an untied output head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitId {
    /// `model.embed_tokens` (and `lm_head` when tied).
    Embedding,
    /// `model.layers.N`.
    Layer(usize),
    /// An untied `lm_head`.
    Head,
}

/// How the loss of a pass uses the output head (see [`Fsdp::idle_pass`]).
#[derive(Debug, Clone, Copy)]
pub enum IdleHead {
    /// Gathered whole (a head with an adapter or soft-capping).
    Gathered,
    /// Sharded by vocabulary ([`Fsdp::cross_entropy`]), `chunk` rows at a
    /// time, with the gradient when `training`.
    VocabParallel {
        /// Rows per chunk.
        chunk: i64,
        /// Whether the gradient is computed (a training pass).
        training: bool,
    },
}

/// What the gathers of a run cost, for `train_summary.json`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct GatherStats {
    /// All-gathers run.
    pub gathers: u64,
    /// Bytes received (the whole units, less this rank's own runs).
    pub bytes: f64,
    /// Seconds the compute waited for a gather (what prefetch did not hide).
    pub wait_seconds: f64,
}

/// The sharded frozen base of one rank, and the process group it gathers over.
pub struct Fsdp {
    group: Arc<ProcessGroup>,
    layers: Vec<Unit>,
    embedding: Unit,
    head: Option<Unit>,
    /// Start the next unit's gather while this one computes.
    prefetch: bool,
    pending: RefCell<Option<(UnitId, PendingGather)>>,
    stats: Cell<GatherStats>,
    error: RefCell<Option<anyhow::Error>>,
    /// What runs after each layer of the checkpointed backward pass.
    after_layer_backward: Option<Rc<dyn LayerBackward>>,
}

/// Work on a decoder layer once the checkpointed backward pass has left it
/// (its gradients are complete), run by every rank in the same order as the
/// gathers, idle ranks included: ZeRO-2's per-layer gradient sum.
pub trait LayerBackward {
    /// Layer `layer`'s backward pass is done on this rank.
    fn layer_done(&self, group: &ProcessGroup, layer: usize) -> Result<()>;
}

/// The sharded weights of a model, by unit, as [`Fsdp::new`] takes them.
pub struct ShardedUnits {
    /// Per decoder layer.
    pub layers: Vec<Vec<Arc<ShardedWeight>>>,
    /// The embeddings (the tied head is the same weight).
    pub embedding: Arc<ShardedWeight>,
    /// An untied head.
    pub head: Option<Arc<ShardedWeight>>,
}

impl Fsdp {
    /// Builds each unit's byte buffer from the runs its weights hold.
    pub fn new(group: Arc<ProcessGroup>, units: ShardedUnits, device: tch::Device) -> Self {
        Self {
            layers: units
                .layers
                .into_iter()
                .map(|w| Unit::new(w, device))
                .collect(),
            embedding: Unit::new(vec![units.embedding], device),
            head: units.head.map(|h| Unit::new(vec![h], device)),
            group,
            prefetch: true,
            pending: RefCell::new(None),
            stats: Cell::new(GatherStats::default()),
            error: RefCell::new(None),
            after_layer_backward: None,
        }
    }

    /// Sets what runs after each layer of the checkpointed backward pass.
    pub fn set_after_layer_backward(&mut self, work: Rc<dyn LayerBackward>) {
        self.after_layer_backward = Some(work);
    }

    /// The checkpointed backward pass left layer `layer`: runs what was set
    /// for it (a failure is recorded, as a failed gather is).
    pub fn layer_backward_done(&self, layer: usize) {
        // After a failed collective this rank starts no other: its partner
        // may be waiting in a different one, which this one would then meet.
        if self.check().is_err() {
            return;
        }
        if let Some(work) = &self.after_layer_backward {
            if let Err(e) = work.layer_done(&self.group, layer) {
                self.fail(e);
            }
        }
    }

    /// Turns prefetching of the next unit on or off (to measure what it hides).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    fn unit(&self, id: UnitId) -> &Unit {
        match id {
            UnitId::Embedding => &self.embedding,
            UnitId::Layer(i) => &self.layers[i],
            UnitId::Head => self.head.as_ref().unwrap_or(&self.embedding),
        }
    }

    /// The unit that holds the output head.
    pub fn head_unit(&self) -> UnitId {
        if self.head.is_some() {
            UnitId::Head
        } else {
            UnitId::Embedding
        }
    }

    /// Gathers unit `id` (waiting for its prefetch if one is under way),
    /// then starts the gather of `next`, if any. The unit is whole until
    /// the returned guard drops.
    pub fn gather(&self, id: UnitId, next: Option<UnitId>) -> Gathered<'_> {
        let started = Instant::now();
        let pending = self.pending.borrow_mut().take();
        let work = match pending {
            Some((p, work)) if p == id => Ok(work),
            other => {
                // A prefetch nobody used is finished first (collectives run in order).
                if let Some((_, w)) = other {
                    let _ = w.wait(&self.group);
                }
                self.start(id)
            }
        };
        let gathered = work.and_then(|w| w.wait(&self.group));
        let mut stats = self.stats.get();
        stats.wait_seconds += started.elapsed().as_secs_f64();
        self.stats.set(stats);
        let unit = self.unit(id);
        match gathered {
            Ok(parts) => unit.rebuild(parts),
            Err(e) => {
                self.fail(e);
                for w in &unit.weights {
                    w.fill_zeros(unit.device);
                }
            }
        }
        if let (true, Some(next)) = (self.prefetch, next) {
            match self.start(next) {
                Ok(work) => *self.pending.borrow_mut() = Some((next, work)),
                Err(e) => self.fail(e),
            }
        }
        Gathered { unit }
    }

    /// Starts gathering the first decoder layer, unless a gather is under
    /// way (prefetch on): called before the embeddings are looked up.
    pub(crate) fn prefetch_first_layer(&self) {
        if !self.layers.is_empty() {
            self.prefetch(UnitId::Layer(0));
        }
    }

    /// Starts gathering unit `id`, unless prefetching is off or a gather
    /// is under way; [`Fsdp::gather`] of `id` then waits for it.
    pub fn prefetch(&self, id: UnitId) {
        if !self.prefetch || self.pending.borrow().is_some() {
            return;
        }
        match self.start(id) {
            Ok(work) => *self.pending.borrow_mut() = Some((id, work)),
            Err(e) => self.fail(e),
        }
    }

    /// The process group the base is sharded over.
    pub(crate) fn group(&self) -> &ProcessGroup {
        &self.group
    }

    /// This rank's block of rows of unit `id`'s first weight (a matrix
    /// sharded by rows): the real rows `[rows, cols]` (the padding of the
    /// last block left out) and the index of the first.
    pub(crate) fn row_block(&self, id: UnitId) -> (Tensor, i64) {
        let unit = self.unit(id);
        let p = &unit.weights[0].parts[0];
        let cols = p.shape[1];
        let per = p.run / cols;
        let start = self.group.rank() as i64 * per;
        let real = (p.shape[0] - start).clamp(0, per);
        let block = unit.local[0]
            .view_dtype(p.kind)
            .view([per, cols])
            .narrow(0, 0, real);
        (block, start)
    }

    /// The recorded failure, if a collective of this pass failed.
    pub(crate) fn check(&self) -> Result<()> {
        match self.error.borrow().as_ref() {
            Some(e) => anyhow::bail!("{e:#}"),
            None => Ok(()),
        }
    }

    fn start(&self, id: UnitId) -> Result<PendingGather> {
        self.check()?;
        let unit = self.unit(id);
        let mut stats = self.stats.get();
        stats.gathers += 1;
        stats.bytes += (unit.local_bytes() * (self.group.world_size().saturating_sub(1))) as f64;
        self.stats.set(stats);
        self.group.all_gather_parts_start(&unit.local)
    }

    pub(crate) fn fail(&self, e: anyhow::Error) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// The first failed gather since the last call: the pass that saw it
    /// ran on zeros and must be thrown away.
    pub fn take_error(&self) -> Option<anyhow::Error> {
        self.error.borrow_mut().take()
    }

    /// The collectives of one forward pass, its loss (`head`) and, with
    /// `recompute`, its checkpointed backward pass, on no rows: what a rank
    /// without rows runs so that the others' collectives find a partner.
    pub fn idle_pass(&self, recompute: bool, head: IdleHead) {
        let n = self.layers.len();
        let (table, _) = self.row_block(UnitId::Embedding);
        drop(self.embed(&Tensor::zeros([0], (Kind::Int64, table.device()))));
        for i in 0..n {
            let next = match (i + 1 < n, head) {
                (true, _) => Some(UnitId::Layer(i + 1)),
                (false, IdleHead::Gathered) => Some(self.head_unit()),
                (false, IdleHead::VocabParallel { .. }) => None,
            };
            drop(self.gather(UnitId::Layer(i), next));
        }
        match head {
            IdleHead::Gathered => {
                let after_head = (recompute && n > 0).then(|| UnitId::Layer(n - 1));
                drop(self.gather(self.head_unit(), after_head));
            }
            IdleHead::VocabParallel { chunk, training } => {
                if recompute && n > 0 {
                    self.prefetch(UnitId::Layer(n - 1));
                }
                let (w, _) = self.row_block(self.head_unit());
                let x = Tensor::zeros([0, w.size()[1]], (w.kind(), w.device()));
                let t = Tensor::zeros([0], (Kind::Int64, w.device()));
                drop(self.cross_entropy(&x, &t, chunk, training.then_some(1.0)));
            }
        }
        if recompute {
            for i in (0..n).rev() {
                drop(self.gather(UnitId::Layer(i), i.checked_sub(1).map(UnitId::Layer)));
                self.layer_backward_done(i);
            }
        }
    }

    /// Bytes of frozen weights this rank holds between gathers, and of the
    /// whole sharded base.
    pub fn held_and_whole_bytes(&self) -> (usize, usize) {
        let units = self
            .layers
            .iter()
            .chain(std::iter::once(&self.embedding))
            .chain(self.head.iter());
        units
            .flat_map(|u| u.weights.iter())
            .fold((0, 0), |(h, w), s| {
                (h + s.held_bytes(), w + s.whole_bytes())
            })
    }

    /// The gathers so far.
    pub fn stats(&self) -> GatherStats {
        self.stats.get()
    }
}

/// A gathered unit; dropping it frees the whole weights (autograd keeps
/// what a graph still needs).
pub struct Gathered<'a> {
    unit: &'a Unit,
}

impl Drop for Gathered<'_> {
    fn drop(&mut self) {
        for w in &self.unit.weights {
            w.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_each_tensor_once_in_whole_words() {
        for (numel, row) in [
            (0i64, 1i64),
            (1, 1),
            (7, 1),
            (9, 1),
            (1001, 1),
            (12, 3),
            (35, 7),
        ] {
            for world in 1..5 {
                let all: Vec<i64> = (0..world)
                    .flat_map(|r| run_of(numel, r, world, row))
                    .collect();
                assert_eq!(all, (0..numel).collect::<Vec<_>>(), "{numel} over {world}");
                assert_eq!(run_len(numel, world, row) % row, 0, "whole rows");
                assert!(run_len(numel, world, row) * world as i64 >= numel);
            }
        }
    }

    /// A one-rank Gloo group on 127.0.0.1 (`None` in a build without c10d).
    fn one_rank_group() -> Option<Arc<ProcessGroup>> {
        if !crate::dist::capabilities().0 {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = crate::dist::DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: Some(1),
            master_addr: "127.0.0.1".into(),
            master_port: port,
        };
        let timeout = std::time::Duration::from_secs(30);
        Some(Arc::new(
            ProcessGroup::join(&env, crate::dist::Backend::Gloo, timeout, None).unwrap(),
        ))
    }

    struct CountLayers(Cell<usize>);

    impl LayerBackward for CountLayers {
        fn layer_done(&self, _: &ProcessGroup, _: usize) -> Result<()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    /// After a failed collective a rank starts no other one, the per-layer
    /// gradient sum of the backward pass included: the other ranks may be
    /// waiting in a different collective, which this one would meet.
    #[test]
    fn after_a_failed_collective_the_backward_pass_starts_no_gradient_sum() {
        let Some(group) = one_rank_group() else {
            return;
        };
        let w = FrozenWeight::Dense(Tensor::randn([4, 3], (Kind::Float, tch::Device::Cpu)));
        let units = ShardedUnits {
            layers: vec![vec![ShardedWeight::from_whole(&w, 0, 1)]],
            embedding: ShardedWeight::from_whole(&w, 0, 1),
            head: None,
        };
        let mut fsdp = Fsdp::new(group, units, tch::Device::Cpu);
        let sums = Rc::new(CountLayers(Cell::new(0)));
        fsdp.set_after_layer_backward(sums.clone());
        fsdp.layer_backward_done(0);
        assert_eq!(
            sums.0.get(),
            1,
            "a healthy pass sums each layer's gradients"
        );
        fsdp.fail(anyhow::anyhow!("rank 1 does not answer"));
        fsdp.layer_backward_done(0);
        assert_eq!(sums.0.get(), 1, "a gradient sum started after the failure");
        assert!(fsdp.take_error().is_some());
    }

    #[test]
    fn a_weight_rebuilds_from_the_runs_of_every_rank() {
        let w = Tensor::randn([5, 7], (Kind::Float, tch::Device::Cpu));
        let whole = FrozenWeight::Dense(w.shallow_clone());
        let world = 3;
        let shards: Vec<_> = (0..world)
            .map(|r| ShardedWeight::from_whole(&whole, r, world))
            .collect();
        // What the all-gather delivers: every rank's run, in rank order.
        let runs: Vec<Tensor> = shards
            .iter()
            .map(|s| Unit::new(vec![s.clone()], tch::Device::Cpu).local.remove(0))
            .collect();
        let len = runs[0].numel();
        assert!(runs.iter().all(|r| r.numel() == len));
        assert_eq!(shards[1].held_bytes(), len);
        shards[1].rebuild(std::iter::once(Tensor::cat(&runs, 0)));
        let back = shards[1].with_whole(FrozenWeight::dense);
        assert!(back.equal(&w));
        assert_eq!(shards[1].size(), vec![5, 7]);
    }
}
