"""Where `steps` teacher positions fall in natural-language chains of thought, under a real tokenizer.

    python scripts/steps_positions.py --tokenizer PATH/qwen3-tokenizer --data-path PATH/data [--K 6]

For GSM8k and MATH train it tokenizes each worked reference solution as think content (calculator
annotations `<<48/2=24>>` removed; these are stand-ins for Qwen3 rollouts, which need Qwen3's weights) and
counts the `steps` candidates per chain (values after `=`, line ends): the distribution says what K the
scheme suggests. Then it shows, for a few hand-written Qwen3-style think blocks (GSM8k, MATH, Tooluse), the
tokens K=6 `steps` positions select, next to `linspace`. Prints markdown (ARCHITECTURE.md quotes it).
"""

import argparse
import json
import re
import statistics
from pathlib import Path

from transformers import AutoTokenizer

from qthink.teachers.positions import (
    linspace_positions,
    natural_step_offsets,
    offsets_to_tokens,
    step_positions,
    token_char_ends,
)

EXAMPLES = {
    "GSM8k": "Okay, let's see. Natalia sold 48 clips in April. In May she sold half as many, so 48 / 2 = 24 "
             "clips in May.\nAltogether that is 48 + 24 = 72 clips.\nSo the answer is 72.",
    "MATH": "We need f continuous at x = 2, so a(2) + 3 = 2 - 5, which gives 2a = -6, so a = -3.\n"
            "At x = -2: -2 - 5 = 2(-2) - b, so b = 3.\nThen a + b = -3 + 3 = 0.",
    "Tooluse": "The user wants a random picture of an axolotl. The getRandomAxolotlImage tool returns one and "
               "takes no parameters.\nSo I call it with an empty input.",
}


def candidates(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(content ids, candidate token indices) of a think text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _, ends = token_char_ends(tokenizer, ids)
    return ids, offsets_to_tokens(natural_step_offsets(text), ends)


def mark(tokenizer, ids: list[int], positions: list[int]) -> str:
    """The text with each selected token wrapped in ⟦ ⟧ (a repeated position is marked once)."""
    pieces = [tokenizer.decode([i]) for i in ids]
    return "".join(f"⟦{p}⟧" if j in set(positions) else p for j, p in enumerate(pieces)).replace("\n", "⏎ ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. Qwen3's)")
    p.add_argument("--data-path", required=True, help="data root with gsm8k/train.jsonl and math/train_hendrycks7500.jsonl")
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--limit", type=int, default=2000, help="chains per dataset")
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    root = Path(args.data_path)
    sources = {"GSM8k train": (root / "gsm8k" / "train.jsonl", "answer"),
               "MATH train": (root / "math" / "train_hendrycks7500.jsonl", "solution")}
    print("| chains (reference solutions as think content) | n | tokens (median) | step candidates: median | p10–p90 | share with ≥ K |")
    print("|---|---|---|---|---|---|")
    for name, (path, field) in sources.items():
        lines = path.read_text().splitlines()[: args.limit]
        texts = [re.sub(r"<<[^>]*>>", "", json.loads(line)[field]).split("####")[0].strip() for line in lines]
        counts, lengths = [], []
        for text in texts:
            ids, cands = candidates(tok, text)
            counts.append(len(cands))
            lengths.append(len(ids))
        deciles = statistics.quantiles(counts, n=10)
        print(f"| {name} | {len(texts)} | {statistics.median(lengths):.0f} | {statistics.median(counts):.0f} | "
              f"{deciles[0]:.0f}–{deciles[-1]:.0f} | {sum(c >= args.K for c in counts) / len(counts):.0%} |")
    print()
    for name, text in EXAMPLES.items():
        ids, cands = candidates(tok, text)
        steps = step_positions(tok, ids, args.K)
        print(f"**{name}** ({len(ids)} tokens, {len(cands)} candidates)\n")
        print(f"- steps K={args.K} {steps}: {mark(tok, ids, steps)}")
        lin = linspace_positions(len(ids), args.K)
        print(f"- linspace K={args.K} {lin}: {mark(tok, ids, lin)}\n")


if __name__ == "__main__":
    main()
