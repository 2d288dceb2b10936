"""caption_metrics equals pycocoevalcap and `rouge` called directly (the SAM scorer's recipe)."""

import numpy as np
import pytest

from sam_fast.eval import caption_metrics, normalize_text, round_metrics

PREDS = [
    "A group of red circles.",
    "Two dogs play in the park, happily!",
    "the cat sits on a mat",
    "",
    "Three (3) yellow squares; on a blue background",
    "a story about a boy who finds a dog and they become friends",
]
REFS = [
    "a group of red circles",
    "Two dogs are playing in a park.",
    "A cat is sitting on the mat.",
    "some reference",
    "three yellow squares",
    "the boy found a lost dog. they became best friends.",
]


def test_normalisation_matches_the_scorer():
    assert normalize_text("  A group of Red circles.\n") == "a group of red circles"
    assert normalize_text('"Hello, world!"') == "hello world"
    assert normalize_text("1,000 dogs, 2.5 cats.") == "1000 dogs 2.5 cats"  # digit,digit: punctuation removed
    assert normalize_text("x-ray/scan") == "x ray scan"  # no space around: replaced by a space
    assert normalize_text("'quoted'") == "quoted"


def test_against_pycocoevalcap_and_rouge_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from rouge import Rouge

    got = caption_metrics(PREDS, REFS, per_sample=True)
    p = [normalize_text(x) for x in PREDS]
    r = [normalize_text(x) for x in REFS]
    rouge = [0.0 if not h else Rouge().get_scores(h, g)[0]["rouge-l"]["f"] for h, g in zip(p, r, strict=True)]
    gts = {f"s{i}": [g] for i, g in enumerate(r)}
    res = {f"s{i}": [h] for i, h in enumerate(p)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["ROUGE_L"] == pytest.approx(100 * np.mean(rouge), abs=1e-9)
    assert got["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)
    assert got["Bleu_4"] == pytest.approx(100 * bleu[3], abs=1e-9)
    assert got["per_sample"][3] == {"rouge": 0.0, "cider": 0.0, "bleu4": pytest.approx(0.0, abs=1e-6)}
    assert got["per_sample"][0]["rouge"] == pytest.approx(1.0)
    assert 0 < got["ROUGE_L"] < 100 and got["CIDEr"] > 0
    assert set(round_metrics(got)) == {"ROUGE_L", "CIDEr", "Bleu_4"}


def test_perfect_and_refusals():
    m = caption_metrics(["a red dog runs", "two blue cats sleep"], ["A red dog runs.", "Two blue cats sleep!"])
    assert m["ROUGE_L"] == pytest.approx(100) and m["Bleu_4"] == pytest.approx(100, abs=1e-3)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        caption_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty after normalisation"):
        caption_metrics(["a"], ["?!"])


def _rouge_package(pred, ref, recursion=None):
    """The `rouge` package's ROUGE-L F, as the scorer calls it; with `recursion`, in a thread with a
    stack and recursion limit deep enough for its recursive LCS walk (the oracle for long texts)."""
    import sys
    import threading

    from rouge import Rouge

    def score():
        try:
            return Rouge().get_scores(pred, ref)[0]["rouge-l"]["f"]
        except ValueError:  # no sentence left: the package refuses, caption_metrics scores 0
            return 0.0

    if recursion is None:
        return score()
    out, limit, size = [], sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(recursion)
    threading.stack_size(512 << 20)
    try:
        t = threading.Thread(target=lambda: out.append(score()))
        t.start()
        t.join()
    finally:
        threading.stack_size(size)
        sys.setrecursionlimit(limit)
    return out[0]


def test_rouge_l_equals_the_rouge_package_bit_for_bit():
    from sam_fast.eval.metrics import rouge_l

    rng = np.random.default_rng(0)
    vocab = ["a", "dog", "red", "cat", "the", "1.5", "runs", ".", "..", "  ", "x"]
    for _ in range(400):
        pred = " ".join(rng.choice(vocab, rng.integers(1, 25)))
        ref = " ".join(rng.choice(vocab, rng.integers(1, 25)))
        assert rouge_l(pred, ref) == _rouge_package(pred, ref), (pred, ref)


def test_long_overlapping_texts_are_scored_not_a_recursion_error():
    """255 predicted words against a 5000-word reference that holds them near its start: the `rouge`
    package's recursive LCS walk goes ~5000 calls deep (RecursionError at Python's default limit),
    which ended an eval after all generation was done."""
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(60)]
    pred = " ".join(rng.choice(words, 255))
    ref = pred + " " + " ".join(rng.choice(words + [f"v{i}" for i in range(500)], 4745))
    got = caption_metrics([pred], [ref], per_sample=True)
    expected = _rouge_package(normalize_text(pred), normalize_text(ref), recursion=20_000)
    assert got["per_sample"][0]["rouge"] == expected and 0 < expected < 1
