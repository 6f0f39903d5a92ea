//! Every random number of a run, in one place.
//!
//! Two sources, both derived from the run seed so that a run repeats bit for
//! bit on the CPU and a resumed run continues exactly:
//!
//! * [`SplitMix64`] on the host, for decisions that must not depend on the
//!   libtorch version or platform (data order, hold-out split, sampling);
//! * libtorch's one global generator, for tensors drawn by libtorch
//!   (adapter init, dropout masks, NEFTune noise). It is process-wide state,
//!   shared by every thread, so it is only ever used through
//!   [`with_torch_seed`]: seed, draw and finish while holding one lock, so
//!   that two trainings in one process (parallel test threads, a library
//!   user's threads) cannot interleave their draws.
//!
//! Seeds of individual draws are [`mix`]ed from the run seed and what
//! identifies the draw (step, micro-batch, layer, hook point), never taken
//! from a stream, so that recomputing a layer (gradient checkpointing) or
//! resuming at step N draws the same numbers again.

use parking_lot::ReentrantMutex;

/// SplitMix64 (Steele, Lea and Flood 2014): small, fast, and the same on
/// every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose first state is `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates (the modulo bias is below 2^-40 for any real dataset).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// Mixes two numbers into a well-spread seed (SplitMix64's finaliser over a
/// combination of both): `mix(seed, step)`, `mix(mix(seed, step), micro)`.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(a << 6)
        .wrapping_add(a >> 2);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

static TORCH_GENERATOR: ReentrantMutex<()> = ReentrantMutex::new(());

/// Seeds libtorch's global generator with `seed` and runs `draw` while no
/// other thread can touch the generator. Reentrant: a regularizer called
/// inside a seeded layer may seed its own draws.
pub fn with_torch_seed<R>(seed: u64, draw: impl FnOnce() -> R) -> R {
    let _held = TORCH_GENERATOR.lock();
    tch::manual_seed((seed & i64::MAX as u64) as i64);
    draw()
}

/// The 16-bit draw below which [`keep_mask`] drops an element: four 16-bit
/// draws per 64-bit number, so p is resolved to 1/65536.
pub fn drop_threshold(p: f64) -> u64 {
    (p * 65536.0).round() as u64
}

/// A dropout keep-mask of `n` elements (`false`: dropped, with probability `p`),
/// drawn from `seed` on the host. Chunks are seeded apart, so the mask is
/// the same however many threads draw it. Far faster on a CPU than
/// libtorch's Bernoulli sampling, which runs on one thread.
pub fn keep_mask(n: usize, p: f64, seed: u64) -> Vec<bool> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let threshold = drop_threshold(p);
    let mut mask = vec![false; n];
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut g = SplitMix64::new(mix(seed, c as u64));
        for quad in out.chunks_mut(4) {
            let r = g.next_u64();
            for (k, m) in quad.iter_mut().enumerate() {
                *m = (r >> (16 * k)) & 0xFFFF >= threshold;
            }
        }
    });
    mask
}
