"""Caption metrics exactly as the SAM authors' scorer (`evaluate_score.py` in McCartney01/SAM).

For each sample, prediction and reference are normalised (`normalize_text`: newlines/tabs to
spaces, the VQA-style punctuation stripping, quotes stripped, lower-cased), then:

- ROUGE_L: the F score of ``rouge-l`` of the `rouge` package (summary level), per sample, averaged
  over samples (an empty prediction scores 0). `rouge_l` computes it as that package does, to the
  last bit, without its recursive LCS walk (a RecursionError for texts of a few thousand words);
- CIDEr: CIDEr-D from pycocoevalcap over the corpus, one reference per sample;
- Bleu_4: corpus BLEU-4 from pycocoevalcap;

no PTB tokenizer (so no Java), each x100 (docs/model.md#data-format-and-metrics). The scorer
rounds to 2 decimals when it reports; we return full precision (`round_metrics` rounds like it).
"""

from __future__ import annotations

import re

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: as in the scorer
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The scorer calls periodStrip.sub("", out, re.UNICODE): re.UNICODE (32) lands in `count`.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def normalize_text(text: str) -> str:
    """The scorer's `process`: the same string it scores."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return text.strip("'").strip('"').strip().lower()


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the `rouge` package's longest common subsequence of x and y (a set, as it keeps
    them), with its tie-break (up in x only when strictly longer), walked without recursion."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        row, prev, word = table[i], table[i - 1], x[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if word == y[j - 1] else max(prev[j], row[j - 1])
    out, i, j = set(), len(x), len(y)
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F (summary level) of one prediction against one reference, equal to
    ``rouge.Rouge().get_scores(pred, ref)[0]["rouge-l"]["f"]``; 0.0 where that package refuses the
    pair (a text with no sentence left after splitting on periods)."""
    hyp = [" ".join(t.split()) for t in pred.split(".") if len(t) > 0]
    refs = [" ".join(t.split()) for t in ref.split(".") if len(t) > 0]
    if not hyp or not refs:
        return 0.0
    m = len({w for t in refs for w in t.split(" ")})
    n = len({w for t in hyp for w in t.split(" ")})
    union: set[str] = set()
    llcs = 0
    for r in refs:
        before = len(union)
        for h in hyp:
            union |= _lcs_words(r.split(" "), h.split(" "))
        llcs += len(union) - before
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def caption_metrics(preds, refs, per_sample: bool = False) -> dict:
    """ROUGE_L, CIDEr, Bleu_4 (x100) of predictions against one reference each.

    Args:
        preds, refs: equal-length sequences of strings (sample i: preds[i] vs refs[i]).
        per_sample: also return ``"per_sample"``: [{"rouge", "cider", "bleu4"}] in sample order.

    Raises:
        ValueError: lengths differ, no samples, or a reference is empty after normalisation
            (the scorer asserts on that too).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no samples to score")
    rouge_f, res, gts = [], {}, {}
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        gt, pred = normalize_text(r), normalize_text(p)
        if gt == "":
            raise ValueError(f"sample {i}: the reference {r!r} is empty after normalisation")
        rouge_f.append(rouge_l(pred, gt) if pred else 0.0)
        res[i], gts[i] = [pred], [gt]
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    out = {
        "ROUGE_L": 100.0 * sum(rouge_f) / len(rouge_f),
        "CIDEr": 100.0 * float(cider),
        "Bleu_4": 100.0 * float(bleu[-1]),
    }
    if per_sample:
        out["per_sample"] = [{"rouge": float(r), "cider": float(c), "bleu4": float(b)}
                             for r, c, b in zip(rouge_f, cider_each, bleu_each[-1], strict=True)]
    return out


def round_metrics(metrics: dict, digits: int = 2) -> dict:
    """Round the three figures as the scorer prints them."""
    return {k: round(v, digits) for k, v in metrics.items() if k in ("ROUGE_L", "CIDEr", "Bleu_4")}
