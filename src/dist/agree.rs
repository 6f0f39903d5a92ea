//! What the ranks of a run agree on: whether to stop, whether every rank
//! could do its part, the settings and data they train with, and the state
//! rank 0 resumes from. Each agreement is a collective (every rank calls it
//! at the same point), so that no rank leaves while others wait for it.

use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::Tensor;

use super::ProcessGroup;

/// The signals a stop request can carry, in the order that breaks a tie.
const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Slots a stop request takes in an all-reduced vector: one count per signal.
pub const STOP_SLOTS: usize = STOP_SIGNALS.len();

/// This rank's stop request (the first signal it received, if any) as
/// [`STOP_SLOTS`] counts, to be summed over the ranks.
pub fn stop_vote(pending: Option<i32>) -> [f64; STOP_SLOTS] {
    STOP_SIGNALS.map(|s| f64::from(u8::from(pending == Some(s))))
}

/// The signal all ranks stop on, from the summed votes: the one most ranks
/// received (ties: SIGTERM, SIGINT, SIGHUP); `None` when no rank got one.
pub fn agreed_stop(summed: &[f64]) -> Option<i32> {
    let mut best: Option<(f64, i32)> = None;
    for (&count, &sig) in summed.iter().zip(&STOP_SIGNALS) {
        if count > 0.5 && best.is_none_or(|(c, _)| count > c) {
            best = Some((count, sig));
        }
    }
    best.map(|(_, s)| s)
}

/// What the ranks concluded at a checkpoint of agreement.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The ranks whose part failed, in rank order.
    pub failed: Vec<usize>,
    /// The signal every rank stops on, if any rank received one.
    pub stop: Option<i32>,
}

/// Every rank reports whether its part succeeded and whether it received a
/// signal; all learn the same [`Verdict`]. Without a group (one process)
/// the verdict is this process's own.
pub fn agree(group: Option<&ProcessGroup>, ok: bool, pending: Option<i32>) -> Result<Verdict> {
    let Some(g) = group else {
        return Ok(Verdict {
            failed: if ok { vec![] } else { vec![0] },
            stop: pending,
        });
    };
    let world = g.world_size();
    let mut v = vec![0f64; world + STOP_SLOTS];
    v[g.rank()] = f64::from(u8::from(!ok));
    v[world..].copy_from_slice(&stop_vote(pending));
    let mut t = Tensor::from_slice(&v);
    g.all_reduce_sum(&mut t)?;
    let summed = Vec::<f64>::try_from(&t)?;
    Ok(Verdict {
        failed: (0..world).filter(|&r| summed[r] > 0.5).collect(),
        stop: agreed_stop(&summed[world..]),
    })
}

/// Runs a part that may fail on some ranks only (reading a checkpoint on
/// rank 0, checking settings against rank 0's), and makes every rank fail
/// if one does: the failing rank with its own error, the others naming it.
pub fn fail_together<T>(group: Option<&ProcessGroup>, what: &str, local: Result<T>) -> Result<T> {
    let Some(g) = group else { return local };
    let verdict = agree(Some(g), local.is_ok(), None)?;
    match (local, verdict.failed.first()) {
        (Err(e), _) => Err(e),
        (Ok(v), None) => Ok(v),
        (Ok(_), Some(&r)) => bail!(
            "rank {}: stopping because rank {r} failed {what} (its error is above)",
            g.rank()
        ),
    }
}

/// Sends `bytes` from rank 0 to every rank through the rendezvous store
/// under `key` (for what is not a tensor: a trainer state, say).
pub fn share_from_rank0(group: &ProcessGroup, key: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    let key = format!("peft-rs/share/{key}");
    if group.rank() == 0 {
        group.store_set(&key, bytes)?;
        Ok(bytes.to_vec())
    } else {
        group.store_get(&key, group.timeout())
    }
}

/// [`share_from_rank0`] as the last exchange before the processes exit:
/// rank 0 hosts the rendezvous store, so it waits (at most `linger`) until
/// every other rank says it has read the value before it may exit and
/// close the store under them.
pub fn share_from_rank0_before_exit(
    group: &ProcessGroup,
    key: &str,
    bytes: &[u8],
    linger: std::time::Duration,
) -> Result<Vec<u8>> {
    let got = share_from_rank0(group, key, bytes)?;
    let ack = |r: usize| format!("peft-rs/share/{key}/read-by/{r}");
    if group.rank() == 0 {
        for r in 1..group.world_size() {
            // A rank that died reads nothing: exit anyway after `linger`.
            if group.store_get(&ack(r), linger).is_err() {
                break;
            }
        }
    } else {
        group.store_set(&ack(group.rank()), b"1")?;
    }
    Ok(got)
}

/// Every rank's settings (a name and a printable value each) compared with
/// rank 0's; a rank whose differ fails, naming each setting with both
/// values, and every rank fails with it. Settings that may differ between
/// ranks (their own device, output paths) are left out by the caller.
pub fn agree_on_settings(group: &ProcessGroup, settings: &BTreeMap<String, String>) -> Result<()> {
    let text = serde_json::to_vec(settings)?;
    let theirs = share_from_rank0(group, "settings", &text)?;
    let local = (|| -> Result<()> {
        if group.rank() == 0 {
            return Ok(());
        }
        let rank0: BTreeMap<String, String> = serde_json::from_slice(&theirs)?;
        let diffs = differences(&rank0, settings);
        if diffs.is_empty() {
            return Ok(());
        }
        bail!(
            "rank {}: {} from rank 0's: {}; start every rank with the same settings and data",
            group.rank(),
            if diffs.len() == 1 {
                "this setting differs"
            } else {
                "these settings differ"
            },
            diffs.join(", ")
        )
    })();
    fail_together(Some(group), "the settings check", local)
}

/// `name (rank 0: A, this rank: B)` for each setting that differs.
pub fn differences(
    rank0: &BTreeMap<String, String>,
    mine: &BTreeMap<String, String>,
) -> Vec<String> {
    let missing = "(absent)".to_owned();
    let mut names: Vec<&String> = rank0.keys().chain(mine.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (
                rank0.get(k).unwrap_or(&missing),
                mine.get(k).unwrap_or(&missing),
            );
            (a != b).then(|| format!("{k} (rank 0: {a}, this rank: {b})"))
        })
        .collect()
}

/// Makes every tensor of `tensors` equal to rank 0's on every rank (in
/// buckets, see [`super::reduce::sum_in_buckets`]).
pub fn broadcast_tensors(group: &ProcessGroup, tensors: &[Tensor]) -> Result<()> {
    let _g = tch::no_grad_guard();
    let shapes: Vec<Vec<i64>> = tensors.iter().map(Tensor::size).collect();
    let device = tensors.first().map_or(tch::Device::Cpu, Tensor::device);
    let from_rank0 = |i: usize| (group.rank() == 0).then(|| tensors[i].shallow_clone());
    super::reduce::sum_in_buckets(group, device, &shapes, from_rank0, |i, sum| {
        tensors[i].shallow_clone().copy_(sum);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_is_agreed_from_the_votes_of_all_ranks() {
        let sum = |votes: &[Option<i32>]| {
            let mut s = [0.0; STOP_SLOTS];
            for v in votes {
                for (a, b) in s.iter_mut().zip(stop_vote(*v)) {
                    *a += b;
                }
            }
            s
        };
        assert_eq!(agreed_stop(&sum(&[None, None])), None);
        // SIGTERM reached rank 1 only: every rank stops on it.
        assert_eq!(
            agreed_stop(&sum(&[None, Some(libc::SIGTERM)])),
            Some(libc::SIGTERM)
        );
        // Ctrl-C reached two ranks, a scheduler's SIGTERM one.
        assert_eq!(
            agreed_stop(&sum(&[
                Some(libc::SIGINT),
                Some(libc::SIGINT),
                Some(libc::SIGTERM)
            ])),
            Some(libc::SIGINT)
        );
        assert_eq!(
            agreed_stop(&sum(&[Some(libc::SIGHUP), Some(libc::SIGTERM)])),
            Some(libc::SIGTERM)
        );
        let v = agree(None, false, Some(libc::SIGHUP)).unwrap();
        assert_eq!(
            v,
            Verdict {
                failed: vec![0],
                stop: Some(libc::SIGHUP)
            }
        );
    }

    #[test]
    fn differing_settings_are_named_with_both_values() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let d = differences(
            &m(&[("lora_rank", "8"), ("seed", "1"), ("data", "40 examples")]),
            &m(&[("lora_rank", "16"), ("seed", "1"), ("data", "16 examples")]),
        );
        assert_eq!(
            d,
            [
                "data (rank 0: 40 examples, this rank: 16 examples)",
                "lora_rank (rank 0: 8, this rank: 16)"
            ]
        );
        assert!(differences(&m(&[("a", "1")]), &m(&[("a", "1")])).is_empty());
        assert_eq!(
            differences(&m(&[("a", "1")]), &m(&[])),
            ["a (rank 0: 1, this rank: (absent))"]
        );
    }
}
