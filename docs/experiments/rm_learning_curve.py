"""How well can a linear Bradley–Terry head on frozen SmolLM2 features agree with the VADER judge, as the number
of labelled pairs grows? (docs/rlhf.md, "How far can the embedded model's reward model agree with VADER?")

    python docs/experiments/rm_learning_curve.py OUT_DIR --pairs 3000      # ~22 min on the 2-core box

Generates `--pairs` pairs from the embedded model on the review openings (40 new tokens, T = 1, plain prompts,
as recipes/rlhf_loop.yaml), labels them with the `vader` judge (`--judge-margin`, default 0), then reads each
answer's hidden states once (layers 15, 22, 30: at the last token, which the reward model's head reads, and
the mean over the answer's tokens) and fits L2-regularised logistic regression on chosen − rejected feature differences, and
on token-count differences (a bag of words and punctuation, the feature family of VADER's lexicon rules).
5-fold cross-validation split by opening; per fold the training pairs are cut to 300, 1000 and all. Prints the
held-out agreement per feature, training size and regularisation. Re-running reuses OUT_DIR's pairs, labels and
features, so it must use the same --judge-margin.
"""

import argparse
import random
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from rlhflab.data.diversity import tokenize
from rlhflab.models.loading import load_causal_lm, pick_device
from rlhflab.pipelines.pairs import generate_pairs
from rlhflab.preferences.judge import judge_pending
from rlhflab.preferences.store import PreferenceStore
from rlhflab.rewards.reward_model import bradley_terry_loss, last_real_index, rm_text, rm_tokenizer
from rlhflab.rewards.specs import build_reward

ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2-135m-instruct"
LAYERS = (15, 22, 30)
DECIDED = """SELECT p.prompt_id, pr.text, ra.text, rb.text, c.choice FROM comparisons c
    JOIN pairs p ON p.id = c.pair_id JOIN prompts pr ON pr.id = p.prompt_id
    JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b
    WHERE c.choice IN ('a', 'b') ORDER BY p.id"""


def features(texts: list[tuple[str, str]], batch_size: int = 32) -> dict[str, np.ndarray]:
    """(N, len(LAYERS), H) hidden states of the reward model's input (`rm_text`): at the last real token, which
    its head reads, and averaged over the answer's tokens."""
    tokenizer = rm_tokenizer(MODEL)
    lm = load_causal_lm(MODEL, pick_device("cpu"), torch.float32).eval()
    last, mean = [], []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = tokenizer([rm_text(tokenizer, p, a, "plain") for p, a in chunk], return_tensors="pt", padding=True,
                            truncation=True, max_length=128, add_special_tokens=False)
            ends = last_real_index(enc["attention_mask"])  # (B,)
            starts = torch.tensor([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p, _ in chunk])
            positions = torch.arange(enc["input_ids"].shape[1])
            answer = ((positions >= starts.clamp(max=ends)[:, None]) & (positions <= ends[:, None])).float()  # (B, L)
            hidden = lm(**enc, output_hidden_states=True).hidden_states
            last.append(torch.stack([hidden[l][torch.arange(len(chunk)), ends] for l in LAYERS], 1).numpy())
            mean.append(torch.stack([(hidden[l] * answer[..., None]).sum(1) / answer.sum(1, keepdim=True)
                                     for l in LAYERS], 1).numpy())
    return {"last": np.concatenate(last), "mean": np.concatenate(mean)}


def fit(diffs: np.ndarray, lam: float) -> np.ndarray:
    """Bradley–Terry weights w minimising mean −log σ(d·w) + lam·|w|² (no bias: the loss sees differences)."""
    w = torch.zeros(diffs.shape[1], dtype=torch.float64, requires_grad=True)
    x = torch.tensor(diffs)  # (N, F) chosen − rejected, so the rejected side scores 0
    opt = torch.optim.LBFGS([w], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bradley_terry_loss(x @ w, torch.zeros(len(x), dtype=x.dtype))[0] + lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--judge-margin", type=float, default=0.0, help="VADER scores this close are a tie")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    db, feature_file, margin_file = args.out / "prefs.db", args.out / "features.npz", args.out / "judge_margin"
    # labels and features are kept, so a re-run with another margin would silently reuse the old verdicts
    if margin_file.exists() and float(recorded := margin_file.read_text().strip()) != args.judge_margin:
        parser.error(f"{args.out} was labelled with --judge-margin {recorded}; "
                     f"use a new OUT_DIR for {args.judge_margin}")
    margin_file.write_text(str(args.judge_margin))
    start = time.time()
    with PreferenceStore(db) as store:
        missing = args.pairs - store.count_pairs()
        if missing > 0:
            counts = generate_pairs(MODEL, ROOT / "recipes/data/review_openings.txt", store, missing,
                                    max_new_tokens=40, batch_size=64, prompt_format="plain", seed=0)
            print(f"generate: {counts} ({time.time() - start:.0f} s)")
        print("judge:", judge_pending(store, build_reward("vader"), "judge:vader", margin=args.judge_margin))
    rows = sqlite3.connect(db).execute(DECIDED).fetchall()
    print(f"decided pairs: {len(rows)}")
    if not feature_file.exists():
        start = time.time()
        np.savez(feature_file, **features([(prompt, answer) for _, prompt, a, b, _ in rows for answer in (a, b)]))
        print(f"features: {time.time() - start:.0f} s")
    stored = np.load(feature_file)
    sign = np.array([1.0 if choice == "a" else -1.0 for *_, choice in rows])
    prompt_of = np.array([r[0] for r in rows])
    prompts = sorted(set(prompt_of.tolist()))
    random.Random(0).shuffle(prompts)
    answers = [answer for _, _, a, b, _ in rows for answer in (a, b)]
    vocab = {w: i for i, w in enumerate(sorted({w for answer in answers for w in tokenize(answer)}))}
    counts = np.zeros((len(answers), len(vocab)))
    for j, answer in enumerate(answers):
        for w in tokenize(answer):
            counts[j, vocab[w]] += 1
    candidates = [(f"{pooling} layer {layer}", stored[pooling][:, k]) for pooling in ("last", "mean")
                  for k, layer in enumerate(LAYERS)]
    for name, h in candidates + [("bag of words", counts)]:  # word counts: the feature family VADER itself uses
        h = h.astype(np.float64)
        h = (h - h.mean(0)) / (h.std(0) + 1e-6)
        diffs = (h[0::2] - h[1::2]) * sign[:, None]  # chosen − rejected
        for n in (300, 1000, None):
            cells = []
            for lam in (1e-3, 1e-2, 1e-1):
                accs = []
                for fold in range(5):
                    test = np.isin(prompt_of, prompts[fold::5])
                    train = np.flatnonzero(~test)[:n]
                    accs.append(((diffs[test] @ fit(diffs[train], lam)) > 0).mean())
                cells.append(f"λ {lam}: {np.mean(accs):.3f}")
            print(f"{name}, {len(train)} training pairs per fold: held-out {', '.join(cells)}")


if __name__ == "__main__":
    main()
