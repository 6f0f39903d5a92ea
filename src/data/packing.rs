//! Packing: several examples in one row of `max_len` tokens (best fit,
//! longest first), each keeping its own positions and attending only to itself.

use super::{Example, IGNORE};

/// Packs examples into rows of at most `max_len` tokens, best fit
/// decreasing (as TRL's `bfd` packing): longest first, each into the fullest
/// row it still fits. Each row keeps its examples' lengths, so that the
/// model restarts positions and confines attention to each example; the
/// first label of every packed example is masked, so that no example learns
/// to predict the next one's first token. The rows are in a fixed order; the
/// epochs shuffle them.
pub fn pack(examples: Vec<Example>, max_len: usize) -> Vec<Example> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].input_ids.len()));
    // Row lengths kept sorted, so the best fit is a binary search.
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut by_room: std::collections::BTreeMap<(usize, usize), ()> = Default::default();
    for i in order {
        let len = examples[i].input_ids.len();
        // The row with the least room that still fits `len`.
        let fit = by_room.range((len, 0)..).next().map(|(&k, _)| k);
        let row = match fit {
            Some((room, r)) => {
                by_room.remove(&(room, r));
                by_room.insert((room - len, r), ());
                r
            }
            None => {
                rows.push(Vec::new());
                by_room.insert((max_len.saturating_sub(len), rows.len() - 1), ());
                rows.len() - 1
            }
        };
        rows[row].push(i);
    }
    let mut examples: Vec<Option<Example>> = examples.into_iter().map(Some).collect();
    rows.into_iter()
        .map(|members| {
            let mut row = Example::default();
            for i in members {
                let e = examples[i].take().expect("each example is packed once");
                row.segments.push(e.input_ids.len());
                row.input_ids.extend(&e.input_ids);
                let mut labels = e.labels;
                labels[0] = IGNORE;
                row.labels.extend(labels);
            }
            row
        })
        .collect()
}
