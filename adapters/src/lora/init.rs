//! Initialisations that read the frozen weight: PiSSA and OLoRA, as PEFT's
//! `pissa_init` and `olora_init` compute them, and LoftQ, as its
//! `loftq_init`. PiSSA and OLoRA put the adapter's starting product into A
//! and B and leave the rest, the residual W − scaling·BA, in the base
//! layer, so the model's output does not change (up to rounding) while
//! training starts from W's principal directions. LoftQ leaves W's 4-bit
//! quantization Q in the base and starts BA at the best rank-r fit of the
//! quantization error W − Q.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::InitLoraWeights;

/// A base-reading initialisation of one layer, all fp32.
pub struct FromBase {
    /// `lora_A.weight`, `[r, in_features]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out_features, r]`.
    pub b: Tensor,
    /// W − scaling·BA, `[out_features, in_features]`.
    pub residual: Tensor,
}

/// A and B of rank `r` for `weight` (`[out, in]`, any float dtype), and
/// the residual base, for a [`InitLoraWeights::mutates_base`]
/// initialisation. `pissa_niter_N` draws its random projection from
/// libtorch's CPU generator, after the draws of the two `nn.Linear`
/// constructors PEFT runs before it, so that one seed gives PEFT's adapter.
pub fn from_base(weight: &Tensor, r: i64, scaling: f64, init: InitLoraWeights) -> Result<FromBase> {
    let w = fp32_copy(weight);
    let (out_f, in_f) = (w.size()[0], w.size()[1]);
    if r > out_f.min(in_f) {
        bail!(
            "rank {r} is above the layer's smaller side ({out_f}×{in_f}); {init} needs r ≤ {}",
            out_f.min(in_f)
        );
    }
    let (a, b) = tch::no_grad(|| match init {
        InitLoraWeights::Pissa { niter } => {
            let (vr, sr, uhr) = match niter {
                None => {
                    // torch.svd(some) is linalg.svd(full_matrices=False) with V = Vhᴴ.
                    let (v, s, vh_t) = w.svd(true, true);
                    (
                        v.narrow(1, 0, r),
                        s.narrow(0, 0, r),
                        vh_t.tr().narrow(0, 0, r),
                    )
                }
                Some(n) => {
                    let opts = (Kind::Float, Device::Cpu);
                    let _ = Tensor::empty([r, in_f], opts).uniform_(-1.0, 1.0);
                    let _ = Tensor::empty([out_f, r], opts).uniform_(-1.0, 1.0);
                    let (u, s, v) = svd_lowrank(&w, r, n);
                    (u, s, v.tr())
                }
            };
            let sq = (sr / scaling).sqrt().diag(0);
            (sq.matmul(&uhr), vr.matmul(&sq))
        }
        InitLoraWeights::Olora => {
            let (q, rr) = Tensor::linalg_qr(&w, "reduced");
            (
                rr.narrow(0, 0, r).contiguous(),
                q.narrow(1, 0, r).contiguous(),
            )
        }
        other => unreachable!("{other} is not PiSSA or OLoRA"),
    });
    // As PEFT: (scaling·B) A, subtracted from the fp32 weight.
    let residual = tch::no_grad(|| &w - (&b * scaling).matmul(&a));
    Ok(FromBase { a, b, residual })
}

/// LoftQ's start for `weight` (`[out, in]`, any float dtype) at rank `r`,
/// as PEFT's `loftq_init`: `iters` times, quantize what the adapter does
/// not hold (`roundtrip`: quantize and dequantize, fp32) and fit the error
/// W − Q with the rank-r SVD factors L = U√S, R = √S Vᴴ; then A = R, B = L
/// (no scaling, as in PEFT) and the base becomes the last Q.
pub fn loftq(
    weight: &Tensor,
    r: i64,
    iters: u32,
    roundtrip: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<FromBase> {
    let w = fp32_copy(weight);
    let (out_f, in_f) = (w.size()[0], w.size()[1]);
    if r > out_f.min(in_f) {
        bail!(
            "rank {r} is above the layer's smaller side ({out_f}×{in_f}); loftq needs r ≤ {}",
            out_f.min(in_f)
        );
    }
    tch::no_grad(|| {
        let mut res = w.copy();
        for i in 1..=iters {
            let q = roundtrip(&res)?;
            let (l, rr) = low_rank_decomposition(&(&w - &q), r);
            if i == iters {
                return Ok(FromBase {
                    a: rr,
                    b: l,
                    residual: q,
                });
            }
            res = &w - l.mm(&rr);
        }
        bail!("loftq needs at least one iteration")
    })
}

/// PEFT's `_low_rank_decomposition`: with W = U diag(S) Vᴴ (thin SVD),
/// L = U · √diag(S)[:, :r] and R = √diag(S)[:r, :] · Vᴴ, as matrix products.
fn low_rank_decomposition(w: &Tensor, r: i64) -> (Tensor, Tensor) {
    // torch.svd(some) is linalg.svd(full_matrices=False) with V = Vhᴴ (a view).
    let (u, s, v) = w.svd(true, true);
    let vh = v.tr();
    let d = s.diag(0);
    let l = u.matmul(&d.narrow(1, 0, r).sqrt());
    let rr = d.narrow(0, 0, r).sqrt().matmul(&vh);
    (l, rr)
}

/// `weight` in fp32, in memory of its own, as PEFT's weight always is:
/// MKL's QR and GEMM round differently when the data does not start on a
/// 16-byte boundary, which a weight read in place from a memory-mapped file
/// need not.
fn fp32_copy(weight: &Tensor) -> Tensor {
    if weight.kind() == Kind::Float {
        weight.copy()
    } else {
        weight.to_kind(Kind::Float)
    }
}

/// `torch.svd_lowrank(a, q, niter)`: Halko et al.'s randomized SVD, with the
/// same draws and the same sequence of QR factorisations, returning
/// (U `[m, q]`, S `[q]`, V `[n, q]`) with a ≈ U diag(S) Vᵀ.
pub fn svd_lowrank(a: &Tensor, q: i64, niter: u32) -> (Tensor, Tensor, Tensor) {
    let (m, n) = (a.size()[0], a.size()[1]);
    let a = if m < n { a.tr() } else { a.shallow_clone() };
    let basis = approximate_basis(&a, q, niter);
    let (u, s, v) = basis.tr().matmul(&a).svd(true, true);
    let u = basis.matmul(&u);
    if m < n {
        (v, s, u)
    } else {
        (u, s, v)
    }
}

/// `torch._lowrank.get_approximate_basis`: an orthonormal Q with Q Qᵀ A ≈ A.
fn approximate_basis(a: &Tensor, q: i64, niter: u32) -> Tensor {
    let r = Tensor::randn([a.size()[1], q], (Kind::Float, a.device()));
    let orth = |x: Tensor| Tensor::linalg_qr(&x, "reduced").0;
    let mut basis = orth(a.matmul(&r));
    for _ in 0..niter {
        basis = orth(a.tr().matmul(&basis));
        basis = orth(a.matmul(&basis));
    }
    basis
}
