"""Generate the demo dataset: dates written many ways, to be rewritten as ISO 8601.

Usage: python3 scripts/make_dates_dataset.py data/dates

Writes train.jsonl (1,500 chats) and test.jsonl (100 chats) in the `messages`
format. The task is small and exact: SmolLM2-135M-Instruct answers it with
prose or wrong digits before training, and a few minutes of LoRA teach it the
format. Deterministic (seeded); no external data. Written for peft-rs and
released under CC0 1.0 (see data/dates/LICENSE).
"""
import json
import pathlib
import random
import sys

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
QUESTIONS = [
    "Convert this date to ISO 8601 (YYYY-MM-DD): {d}",
    "Write {d} as an ISO date.",
    "What is {d} in YYYY-MM-DD format?",
    "Normalize the date \"{d}\" to ISO 8601.",
]


def ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def surface(rng, y, m, d):
    month, short = MONTHS[m - 1], MONTHS[m - 1][:3]
    forms = [
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"{short} {d} {y}",
        f"{ordinal(d)} of {month}, {y}",
        f"{month} {ordinal(d)}, {y}",
        f"{d}.{m}.{y}",
        f"{short}. {d}, {y}",
    ]
    return rng.choice(forms)


def example(rng):
    y = rng.randint(1950, 2049)
    m = rng.randint(1, 12)
    d = rng.randint(1, DAYS_IN[m - 1])
    q = rng.choice(QUESTIONS).format(d=surface(rng, y, m, d))
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]}


def main():
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20231005)
    seen, rows = set(), []
    while len(rows) < 1600:
        e = example(rng)
        key = e["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(e)
    for name, part in (("train.jsonl", rows[:1500]), ("test.jsonl", rows[1500:])):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    print(f"wrote {out}/train.jsonl (1500) and {out}/test.jsonl (100)")


if __name__ == "__main__":
    main()
