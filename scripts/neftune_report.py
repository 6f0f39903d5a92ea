"""Writes the NEFTune study's report (report.md and report.json) from its runs.

Called by scripts/neftune_study.sh with: study dir, run names, seeds, the runs
table ("name|label|flags" lines) and a one-line description of the settings.
Every number comes from files the runs wrote: metrics.jsonl (losses, written by
`peft-rs train`) and heldout.json / train_probe.json (answer statistics, written
by `peft-rs eval --exact-match --json`).
"""

import json
import pathlib
import statistics
import sys

study = pathlib.Path(sys.argv[1])
names = sys.argv[2].split()
seeds = sys.argv[3].split()
labels = {line.split("|")[0]: line.split("|")[1] for line in sys.argv[4].splitlines() if line}
settings = sys.argv[5]


def read_metrics(run):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [l for l in lines if "loss" in l]
    evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
    last_epoch = max(int(l["epoch"] - 1e-9) for l in steps) if steps else 0
    final = [l["loss"] for l in steps if int(l["epoch"] - 1e-9) == last_epoch]
    return {
        "train_loss_last_epoch": statistics.fmean(final),
        "eval_loss_start": evals[0],
        "eval_loss_best": min(evals),
        "eval_loss_final": evals[-1],
    }


def read_answers(run):
    held = json.loads((run / "heldout.json").read_text())
    probe = json.loads((run / "train_probe.json").read_text())
    return {
        "answer_tokens": held["mean_tokens"],
        "answer_chars": held["mean_chars"],
        "distinct_2": held["distinct_2"],
        "repetition_2": held["repetition_2"],
        "at_token_limit": held["truncated"],
        "rouge_l_train": probe["rouge_l"],
    }


rows, row_seeds = {}, {}
for name in names:
    per_seed = []
    for seed in seeds:
        run = study / f"{name}-seed{seed}"
        if not (run / "train_probe.json").exists():
            continue  # an unfinished run (the study can be resumed)
        per_seed.append({**read_metrics(run), **read_answers(run)})
        row_seeds.setdefault(name, []).append(seed)
    if per_seed:
        rows[name] = per_seed
names = [n for n in names if n in rows]
base = read_answers(study / "base")

columns = [
    ("train_loss_last_epoch", "train loss (last epoch, noise on)", "{:.3f}"),
    ("eval_loss_final", "held-out loss (noise off)", "{:.3f}"),
    ("eval_loss_best", "best held-out loss", "{:.3f}"),
    ("answer_tokens", "answer tokens", "{:.1f}"),
    ("answer_chars", "answer characters", "{:.0f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("repetition_2", "repetition-2", "{:.3f}"),
    ("at_token_limit", "at token limit", "{:.0%}"),
    ("rouge_l_train", "ROUGE-L vs training answers", "{:.3f}"),
]


def mean(name, key):
    return statistics.fmean(r[key] for r in rows[name])


def spread(name, key):
    values = [r[key] for r in rows[name]]
    return (max(values) - min(values)) / 2


def cell(name, key, fmt):
    text = fmt.format(mean(name, key))
    if len(rows[name]) > 1:
        text += " ± " + fmt.format(spread(name, key))
    return text


out = [
    "# NEFTune study",
    "",
    f"SmolLM2-135M-Instruct (or $MODEL), {settings}; seeds {', '.join(seeds)}. "
    "Cells are the mean over the seeds a row names ± half the spread between them. Answers are greedy, "
    "to the 32 held-out instructions of data/instructions/heldout.jsonl (written for this study); "
    "ROUGE-L is of answers to training instructions against their training answers (the paper's overfitting measure).",
    "",
    "| run | " + " | ".join(c[1] for c in columns) + " |",
    "|---|" + "---|" * len(columns),
]
base_cells = ["–", "–", "–"] + [c[2].format(base[c[0]]) for c in columns[3:]]
out.append("| base model, no training | " + " | ".join(base_cells) + " |")
for name in names:
    seeds_note = f" (seed{'s' if len(row_seeds[name]) > 1 else ''} {', '.join(row_seeds[name])})"
    out.append(f"| {labels.get(name, name)}{seeds_note} | " + " | ".join(cell(name, k, f) for k, _, f in columns) + " |")


def verdict(diff, noise, expect_positive):
    if abs(diff) <= noise:
        return "within the seed spread"
    return "holds" if (diff > 0) == expect_positive else "reversed"


claims = []
if "alpha0" in rows:
    for name in [n for n in names if n != "alpha0"]:
        checks = [
            ("longer answers", "answer_tokens", True),
            ("higher training loss", "train_loss_last_epoch", True),
            ("less overfitting (lower ROUGE-L vs training answers)", "rouge_l_train", False),
            ("no added repetition (repetition-2 not higher)", "repetition_2", False),
        ]
        for claim, key, positive in checks:
            diff = mean(name, key) - mean("alpha0", key)
            noise = spread(name, key) + spread("alpha0", key)
            if key == "repetition_2":
                v = "holds" if diff <= noise else "reversed"
            else:
                v = verdict(diff, noise, positive)
            claims.append((labels.get(name, name), claim, mean("alpha0", key), mean(name, key), noise, v))
        diff = mean(name, "eval_loss_final") - mean("alpha0", "eval_loss_final")
        claims.append(
            (labels.get(name, name), "similar held-out loss (within 2%)", mean("alpha0", "eval_loss_final"),
             mean(name, "eval_loss_final"), spread(name, "eval_loss_final") + spread("alpha0", "eval_loss_final"),
             "holds" if abs(diff) <= 0.02 * mean("alpha0", "eval_loss_final") else "does not hold")
        )
    out += [
        "",
        "## The paper's claims at this scale, against the run without noise",
        "",
        "| run | claim | no noise | with noise | seed spread | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for run, claim, a, b, noise, v in claims:
        out.append(f"| {run} | {claim} | {a:.4g} | {b:.4g} | {noise:.2g} | {v} |")

out += ["", "Plot: curves.png (every run's training loss and held-out loss against step)."]
(study / "report.md").write_text("\n".join(out) + "\n")
(study / "report.json").write_text(json.dumps({"settings": settings, "seeds": seeds, "base": base, "runs": rows,
                                               "claims": [dict(zip(["run", "claim", "no_noise", "with_noise", "seed_spread", "verdict"], c)) for c in claims]}, indent=1))
print("\n".join(out))
