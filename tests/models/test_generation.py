"""Generation: the released code's decoder ("lavis" mode) against transformers 4.33's own answers,
answers independent of batch-mates in both modes, user length settings, untruncated prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam
from sam_fast.data import tiny_tokenizers
from sam_fast.data.tokenization import PromptBuilder
from sam_fast.models.generation import lavis_generate
from sam_fast.models.hf_compat import cache_kwarg

GOLDEN = Path(__file__).resolve().parents[1] / "golden"  # tests/golden: the recorded answers and their script
sys.path.insert(0, str(GOLDEN))
import lavis_generate_oracle as oracle  # noqa: E402

RECORDED = json.loads((GOLDEN / "lavis_generate_433.json").read_text())


def test_oracle_was_recorded_with_the_released_stack():
    assert RECORDED["transformers"] == "4.33.2"
    assert set(RECORDED["cases"]) == {c[0] for c in oracle.CASES}


@pytest.mark.parametrize("case", oracle.CASES, ids=[c[0] for c in oracle.CASES])
def test_lavis_mode_reproduces_transformers_433(case):
    """Same tiny LLaMA, same left-padded prompt embeddings: token for token what LAVIS' call
    into transformers 4.33 returned (BOS-seeded length, 255 new tokens for max_length 256, the
    BOS in the penalty and in beam length normalisation, 0 -> 2)."""
    name, seed, boost, lengths, beams, max_length, penalty, lp = case
    model = oracle.tiny_llama(seed, boost)
    embeds, mask = oracle.prompts(seed, lengths)
    got = lavis_generate(model, embeds, mask, num_beams=beams, max_length=max_length,
                         repetition_penalty=penalty, length_penalty=lp)
    assert got.tolist() == RECORDED["cases"][name]


def test_lavis_mode_runs_to_max_length_minus_one():
    for name in ("beams5-max", "greedy-max"):  # max_length 256 counts the seeded BOS
        assert {len(row) for row in RECORDED["cases"][name]} == {255}
    model = oracle.tiny_llama(4, -3.0)
    embeds, mask = oracle.prompts(4, [3])
    assert lavis_generate(model, embeds, mask, num_beams=2, max_length=9).shape == (1, 8)


def _prompts(model, counts, text_lens, seed=0):
    """Left-padded LLM prompts: Q placeholders per image, then random text."""
    g = torch.Generator().manual_seed(seed)
    Q, tok = model.config.num_query_tokens, model.config.image_token_index
    rows = [torch.cat([torch.full((n * Q,), tok), torch.randint(4, 100, (t,), generator=g)])
            for n, t in zip(counts, text_lens, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


def _strip(row: list[int], eos: int = 2, pad: int = 0) -> list[int]:
    return row[: row.index(eos)] if eos in row else [t for t in row if t != pad]


@pytest.mark.parametrize("mode", ["hf", "lavis"])
@pytest.mark.parametrize("beams", [1, 3])
def test_answer_does_not_depend_on_batch_mates(mode, beams):
    """Sample 0 (one image, short prompt) alone and then left-padded next to samples with more
    images and longer prompts: the same answer. transformers 5.x's own repetition penalty
    skipped the first k generated tokens of a row left-padded by k."""
    model = randomize_guidance(tiny_sam())
    counts, text_lens = [1, 3, 2], [3, 9, 6]
    feats, qids, qmask = ragged_batch(model, counts)
    ids, mask = _prompts(model, counts, text_lens)
    kw = dict(num_beams=beams, repetition_penalty=1.5)
    kw.update(max_new_tokens=24) if mode == "hf" else kw.update(max_length=25)
    with torch.no_grad():
        together = model.generate(image_features=feats, image_counts=counts, qformer_input_ids=qids,
                                  qformer_attention_mask=qmask, input_ids=ids, attention_mask=mask,
                                  generation_mode=mode, **kw)
        alone_ids, alone_mask = _prompts(model, counts, text_lens)
        n0 = int(mask[0].sum())
        alone = model.generate(image_features=feats[:1], image_counts=[1], qformer_input_ids=qids[:1],
                               qformer_attention_mask=qmask[:1], input_ids=alone_ids[:1, -n0:],
                               attention_mask=alone_mask[:1, -n0:], generation_mode=mode, **kw)
    a, b = _strip(alone[0].tolist()), _strip(together[0].tolist())
    assert len(a) >= 8, f"too short to test the penalty: {a}"
    assert a == b


def test_penalty_applies_to_every_generated_token():
    """With a huge penalty no token may repeat within an answer, whatever the left padding."""
    model = tiny_sam()
    counts = [1, 3]
    feats, qids, qmask = ragged_batch(model, counts)
    ids, mask = _prompts(model, counts, [2, 9])
    with torch.no_grad():
        out = model.generate(image_features=feats, image_counts=counts, qformer_input_ids=qids,
                             qformer_attention_mask=qmask, input_ids=ids, attention_mask=mask,
                             num_beams=1, max_new_tokens=30, repetition_penalty=1e6)
    for row in out.tolist():
        row = _strip(row)
        assert len(row) == len(set(row)), row


def test_user_max_length_and_generation_mode_are_honoured():
    model = tiny_sam()
    feats, qids, qmask = ragged_batch(model, [2])
    ids, mask = _prompts(model, [2], [4])
    common = dict(image_features=feats, image_counts=[2], qformer_input_ids=qids, input_ids=ids,
                  attention_mask=mask, num_beams=1)
    with torch.no_grad():
        # HF counts the prompt in max_length; the default max_new_tokens=256 must not override it
        assert model.generate(**common, max_length=ids.shape[1] + 5).shape[1] <= 5
        assert model.generate(**common, max_new_tokens=3).shape[1] <= 3
        assert model.generate(**common, generation_mode="lavis", max_length=6).shape[1] <= 5
    with pytest.raises(ValueError, match="generation_mode='beam' is not one of"):
        model.generate(**common, generation_mode="beam")
    with pytest.raises(ValueError, match=r"takes only .*\['do_sample'\]"):
        model.generate(**common, generation_mode="lavis", do_sample=True)


def test_generation_prompt_is_not_truncated():
    """Training cuts </s> + instruction to max_txt_len on the left; at generation the released
    code passes the whole prompt (only the Q-former text is cut)."""
    qtok, ltok = tiny_tokenizers()
    pb = PromptBuilder(qtok, ltok, num_query_tokens=2, image_token_index=3, max_txt_len=8)
    story = " ".join(["the red circle and the blue square"] * 6)
    text = ltok(story, add_special_tokens=False)["input_ids"]
    assert len(text) > 20
    gen = pb.encode(story, 2)
    assert gen.prompt == [3] * 4 + [pb.eos_id] + text
    train = pb.encode(story, 2, "a b")
    assert train.prompt == [3] * 4 + [pb.eos_id] + text[-7:]
    assert len(gen.qformer_ids) == 8  # the Q-former text is cut in both


@pytest.mark.parametrize("mode", ["hf", "lavis"])
def test_prompt_runs_once_per_sample_not_per_beam(mode):
    """Beam search prefills each prompt once and copies the cache to the beams; the ids are those
    of HF's own beam search, which runs the prompt once per beam."""
    from sam_fast.models.generation import generated_tokens_penalty

    model = randomize_guidance(tiny_sam())
    counts, K = [1, 3, 2], 4
    feats, qids, qmask = ragged_batch(model, counts)
    ids, mask = _prompts(model, counts, [3, 9, 6])
    lm = model.language_model
    seen = []
    real = lm.model.forward

    def spy(*args, **kwargs):
        x = kwargs.get("inputs_embeds")
        seen.append(tuple(x.shape[:2]) if x is not None else tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    kw = dict(num_beams=K, repetition_penalty=1.5)
    kw.update(max_new_tokens=12) if mode == "hf" else kw.update(max_length=13)
    with torch.no_grad():
        _, embeds, _ = model._llm_inputs(None, feats, counts, qids, qmask, ids, mask)
        lm.model.forward = spy
        try:
            got = model.generate(image_features=feats, image_counts=counts, qformer_input_ids=qids,
                                 qformer_attention_mask=qmask, input_ids=ids, attention_mask=mask,
                                 generation_mode=mode, **kw)
        finally:
            del lm.model.forward
        S = ids.shape[1]
        assert max(rows for rows, length in seen if length > 1) == len(counts)  # no [B * K, S] prefill
        assert sum(length for _, length in seen) <= S + 13 + 1
        if mode == "hf":
            want = lm.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=K, max_new_tokens=12,
                               do_sample=False, repetition_penalty=1.0,
                               logits_processor=generated_tokens_penalty(1.5))
            assert torch.equal(got, want)


def test_generation_config_defaults_override_and_round_trip(tmp_path):
    """model.generation_config holds the paper's settings, a GenerationConfig passed to generate
    replaces them (keyword arguments win over both), and it is saved and loaded with the model."""
    from transformers import GenerationConfig

    from sam_fast import SAM

    model = tiny_sam()
    assert SAM.can_generate()
    g = model.generation_config
    assert (g.num_beams, g.max_new_tokens, g.repetition_penalty, g.length_penalty) == (5, 256, 1.5, 1.0)
    feats, qids, qmask = ragged_batch(model, [2])
    ids, mask = _prompts(model, [2], [4])
    common = dict(image_features=feats, image_counts=[2], qformer_input_ids=qids, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        short = model.generate(**common, generation_config=GenerationConfig(max_new_tokens=3, num_beams=1))
        assert short.shape[1] <= 3  # the hard-coded defaults gave up to 256 tokens here
        assert model.generate(**common, generation_config=GenerationConfig(max_new_tokens=3, num_beams=1),
                              max_new_tokens=2).shape[1] <= 2
        assert model.generate(**common, generation_mode="lavis",
                              generation_config=GenerationConfig(max_new_tokens=3, num_beams=1)).shape[1] <= 3
    model.generation_config.num_beams = 2
    model.generation_config.max_new_tokens = 4
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "generation_config.json").is_file()
    back = SAM.from_pretrained(tmp_path / "m")
    assert (back.generation_config.num_beams, back.generation_config.max_new_tokens) == (2, 4)
    with torch.no_grad():
        assert back.generate(**common).shape[1] <= 4  # the saved settings are used


@pytest.mark.parametrize("beams", [1, 3])
def test_static_cache_gives_the_same_ids(beams):
    """``cache_implementation="static"`` (fixed-shape KV cache, which HF's generate compiles its
    decoding step for on a GPU) gives the ids of the dynamic cache; with beams the prompt is still
    prefilled once per sample, into a StaticCache given to every beam."""
    from transformers import StaticCache

    model = randomize_guidance(tiny_sam())
    counts = [1, 3, 2]
    feats, qids, qmask = ragged_batch(model, counts)
    ids, mask = _prompts(model, counts, [3, 9, 6])
    kw = dict(image_features=feats, image_counts=counts, qformer_input_ids=qids, qformer_attention_mask=qmask,
              input_ids=ids, attention_mask=mask, num_beams=beams, max_new_tokens=12, repetition_penalty=1.5,
              generation_mode="hf")
    lm = model.language_model
    caches = []
    real = lm.generate

    def spy(*args, **kwargs):
        caches.append(kwargs.get(cache_kwarg()))
        return real(*args, **kwargs)

    with torch.no_grad():
        dynamic = model.generate(**kw)
        lm.generate = spy
        try:
            static = model.generate(**kw, cache_implementation="static")
        finally:
            del lm.generate
    assert torch.equal(static, dynamic)
    assert len(_strip(dynamic[0].tolist())) >= 4
    if beams > 1:
        assert isinstance(caches[0], StaticCache)
        assert caches[0].get_max_length() == ids.shape[1] + 12


def _generate_inputs(model):
    feats, qids, qmask = ragged_batch(model, [1])
    ids, mask = _prompts(model, [1], [4])
    return dict(image_features=feats, image_counts=[1], qformer_input_ids=qids, qformer_attention_mask=qmask,
                input_ids=ids, attention_mask=mask)


BAD_SETTINGS = [
    ("lavis", "repetition_penalty", -1.0), ("lavis", "repetition_penalty", float("nan")),
    ("lavis", "repetition_penalty", 0), ("lavis", "length_penalty", float("inf")),
    ("lavis", "num_beams", 2.5), ("lavis", "num_beams", 0), ("lavis", "num_beams", True),
    ("lavis", "max_new_tokens", 2.7), ("lavis", "max_new_tokens", 0), ("lavis", "max_length", 1),
    ("lavis", "min_length", -1), ("lavis", "compile_decode", "yes"),
    ("hf", "num_beams", 0), ("hf", "num_beams", 2.5), ("hf", "num_beams", True), ("hf", "max_new_tokens", 2.7),
    ("hf", "repetition_penalty", -1.0), ("hf", "repetition_penalty", float("nan")), ("hf", "temperature", 0.0),
    ("hf", "top_p", 1.5), ("hf", "top_k", -3), ("hf", "length_penalty", float("nan")),
]


@pytest.mark.parametrize("mode,name,value", BAD_SETTINGS, ids=[f"{m}-{n}={v}" for m, n, v in BAD_SETTINGS])
def test_bad_generation_settings_are_refused_before_any_work(mode, name, value):
    """A setting out of range gave empty or garbage answers (lavis: penalty <= 0 or NaN), was
    truncated (2.7 new tokens -> 2) or failed deep (num_beams=0: ZeroDivisionError): it is refused
    in one line naming the setting and the value, before the images are encoded."""
    model = tiny_sam()
    model.encode_images = None  # any work before the check would fail on this, not on the check
    with pytest.raises(ValueError) as err:
        model.generate(**_generate_inputs(model), generation_mode=mode, **{name: value})
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{name}={value!r}" in msg, msg


@pytest.mark.parametrize("mode", ["hf", "lavis"])
def test_bad_settings_of_the_generation_config_are_refused(mode):
    """The model's generation_config (and one passed to generate) is checked as the keyword
    arguments are: lavis mode read repetition_penalty=0 and num_beams=0 from it as 1."""
    from transformers import GenerationConfig

    model = tiny_sam()
    inputs = _generate_inputs(model)
    model.generation_config.repetition_penalty = 0.0
    with pytest.raises(ValueError, match=r"generation_config\.repetition_penalty=0\.0 must be"):
        model.generate(**inputs, generation_mode=mode)
    model.generation_config.repetition_penalty = 1.5
    with pytest.raises(ValueError, match=r"generation_config\.num_beams=0 must be an integer >= 1"):
        model.generate(**inputs, generation_mode=mode, generation_config=GenerationConfig(num_beams=0))


def test_hf_max_length_must_exceed_the_prompt():
    """HF counts the prompt in max_length; one below the prompt's length said '-26' deep in HF."""
    model = tiny_sam()
    inputs = _generate_inputs(model)
    S = inputs["input_ids"].shape[1]
    for value in (S - 3, S):
        with pytest.raises(ValueError, match=rf"max_length={value} must exceed the prompt's length \({S}\)"):
            model.generate(**inputs, max_length=value, num_beams=1)
    with torch.no_grad():
        assert model.generate(**inputs, max_length=S + 2, num_beams=1).shape[1] <= 2


def test_good_settings_still_run_in_both_modes():
    """Integers given as numpy integers, penalties as ints: accepted (only bools, fractions,
    non-finite and out-of-range values are refused)."""
    import numpy as np

    model = tiny_sam()
    inputs = _generate_inputs(model)
    with torch.no_grad():
        for mode in ("hf", "lavis"):
            out = model.generate(**inputs, generation_mode=mode, num_beams=np.int64(2), max_new_tokens=3,
                                 repetition_penalty=2, length_penalty=-0.5)
            assert out.shape[0] == 1 and 1 <= out.shape[1] <= 3


def test_a_max_length_in_the_users_generation_config_is_honoured():
    """GenerationConfig(max_length=...) without max_new_tokens: the model's default max_new_tokens (256)
    won, so a max_length below the prompt was not refused and a short one did not shorten the answer."""
    from transformers import GenerationConfig

    model = tiny_sam()
    inputs = _generate_inputs(model)
    S = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=rf"generation_config\.max_length=2 must exceed the prompt's length \({S}\)"):
        model.generate(**inputs, generation_config=GenerationConfig(max_length=2, num_beams=1))
    with torch.no_grad():
        hf = model.generate(**inputs, generation_config=GenerationConfig(max_length=S + 2, num_beams=1,
                                                                          min_new_tokens=2))
        lavis = model.generate(**inputs, generation_mode="lavis",
                               generation_config=GenerationConfig(max_length=3, num_beams=1))
    assert hf.shape[1] == 2
    assert lavis.shape[1] <= 3 and lavis.shape[1] == model.generate(
        **inputs, generation_mode="lavis", max_length=3, num_beams=1).shape[1]


@pytest.mark.parametrize("mode", ["hf", "lavis"])
def test_generate_passes_the_cache_under_the_installed_name(mode):
    """transformers 5.25 renamed `past_key_values` to `cache` (the old name warns, then goes away):
    sam_fast's own calls use the name the installed version declares, so none of them warns."""
    import inspect
    import warnings

    from transformers import LlamaModel

    declared = inspect.signature(LlamaModel.forward).parameters
    assert cache_kwarg() in declared
    assert cache_kwarg() == ("cache" if "cache" in declared else "past_key_values")
    model = tiny_sam()
    kw = _generate_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            model.generate(**kw, generation_mode=mode, num_beams=3, max_new_tokens=4)


# -- the device-side lavis decoder against the list-based one it replaced -------------------------
from types import SimpleNamespace  # noqa: E402

from sam_fast.reference import lavis_decoder  # noqa: E402
from sam_fast.reference.lavis_decoder import reference_lavis_generate  # noqa: E402


class _HistoryLM(torch.nn.Module):
    """A stand-in LLM whose next-token logits are multiples of 0.5 that depend on the last token and
    on the sum of every token the row has seen, read back from its KV cache through the attention
    mask: candidates tie exactly, and a cache that gave a beam another beam's past would change the
    answer. A prompt position's "token" is its embedding [..., 0]."""

    def __init__(self, seed: int, vocab: int = 12):
        super().__init__()
        self.table = torch.randint(0, 3, (vocab, vocab), generator=torch.Generator().manual_seed(seed)).float()
        self.config = SimpleNamespace(_attn_implementation="sdpa")

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, cache=None, use_cache=True):  # the cache's name before / from 5.25
        from transformers import DynamicCache

        x = inputs_embeds[..., 0] if inputs_embeds is not None else input_ids.float()  # [R, q]
        cache = cache if cache is not None else past_key_values
        cache = cache if cache is not None else DynamicCache()
        keys, _ = cache.update(x[:, None, :, None], x[:, None, :, None], 0)
        mask = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, 0, :]  # 2D or HF's 4D
        history = (keys[:, 0, :, 0] * mask.float()).sum(-1)
        V = self.table.shape[0]
        logits = self.table[x[:, -1].long()] + ((history[:, None] + torch.arange(V)) % 3) * 0.5
        return SimpleNamespace(logits=logits[:, None, :].expand(-1, x.shape[1], -1), past_key_values=cache, cache=cache)


def _token_prompts(seed: int, lengths: list[int]):
    """Left-padded prompts of token ids 3..11 as 1-wide embeddings [B, S, 1], and their mask."""
    g = torch.Generator().manual_seed(100 + seed)
    S = max(lengths)
    embeds = torch.randint(3, 12, (len(lengths), S, 1), generator=g).float()
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        embeds[b, : S - n] = 0.0
    return embeds, mask


def _count_ties(monkeypatch) -> dict:
    """Count, in the list-based decoder, the answers chosen among equal best scores."""
    seen = {"best": 0}
    real = lavis_decoder._Hypotheses.best

    def best(self):
        scores = [s for s, _ in self.beams]
        seen["best"] += scores.count(max(scores)) > 1
        return real(self)

    monkeypatch.setattr(lavis_decoder._Hypotheses, "best", best)
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_lavis_decoder_breaks_ties_as_the_list_based_one(seed, monkeypatch):
    """Candidates and finished hypotheses with equal scores (logits in steps of 0.5): the
    device-side decoder keeps, drops and returns the hypotheses 4.33's lists did, eager and over
    the static cache of the compiled step."""
    seen = _count_ties(monkeypatch)
    model = _HistoryLM(seed)
    embeds, mask = _token_prompts(seed, [5, 2, 4])
    for beams in (3, 5):
        for penalty in (1.0, 1.5):
            kw = dict(num_beams=beams, max_length=20, repetition_penalty=penalty)
            want = reference_lavis_generate(model, embeds, mask, **kw)
            assert lavis_generate(model, embeds, mask, **kw).tolist() == want.tolist(), kw
            static = lavis_generate(model, embeds, mask, compile_decode={"backend": "eager"}, **kw)
            assert static.tolist() == want.tolist(), kw
    if seed in (1, 2, 3):
        assert seen["best"] > 0, "no tie among the best hypotheses: the case tests nothing"


def test_finished_hypotheses_store_matches_4_33s_lists():
    """Adds with scores from {-1, -2, -3} (many ties) into the device store and into 4.33's
    `BeamHypotheses`: the same hypotheses kept in the same order (the first of equal worst ones is
    the one dropped), the same best (the last of equal best ones) and the same done flags."""
    from sam_fast.models.generation import _Finished, _Rules, _Sequences

    B, K, L = 3, 4, 6
    g = torch.Generator().manual_seed(0)
    rules = _Rules(L, 1, 1.0, 1.0, 1, 2, 0)
    seq = _Sequences(B * K, L, 1, "cpu")
    for _ in range(L - 1):
        seq.append(torch.randint(3, 50, (B * K,), generator=g))
    store, lists = _Finished(B, K, L, "cpu"), [lavis_decoder._Hypotheses(K, 1.0) for _ in range(B)]
    rows = seq.view.tolist()
    for stamp in range(40):
        adding = torch.rand(B, generator=g) < 0.8
        sums = -torch.randint(1, 4, (B,), generator=g).double() * L  # normalised: -1, -2 or -3
        src = torch.arange(B) * K + torch.randint(0, K, (B,), generator=g)
        store.add(adding, rules.normalised(sums, L), src, seq, stamp)
        for b in range(B):
            if adding[b]:
                lists[b].add(rows[src[b]], float(sums[b]))
            kept = sorted((int(store.stamp[b, k]), float(store.score[b, k]), store.tokens[b * (K + 1) + k].tolist())
                          for k in range(int(store.count[b])))
            assert [(s, t) for _, s, t in kept] == lists[b].beams, (stamp, b)
        best_sum = -torch.randint(1, 4, (B,), generator=g).double() * (L + 1)
        assert store.done(best_sum, L + 1, rules).tolist() == [h.done(float(best_sum[b]), L + 1)
                                                              for b, h in enumerate(lists)]
    assert store.best(rules).tolist() == [h.best()[1:] + [] for h in lists]


@pytest.mark.parametrize("case", [
    dict(seed=0, boost=2.0, lengths=[7, 1, 4, 6], beams=5, max_length=40),  # ragged, finishing at different steps
    dict(seed=3, boost=2.0, lengths=[2, 7], beams=4, max_length=30, min_length=12),
    dict(seed=1, boost=2.0, lengths=[6, 3], beams=3, max_length=30, length_penalty=-0.5, min_length=3),
    dict(seed=2, boost=1.0, lengths=[3, 5], beams=5, max_length=2),  # one new token, no decoding step
    dict(seed=2, boost=1.0, lengths=[3, 5], beams=1, max_length=2),
    dict(seed=0, boost=2.0, lengths=[7, 1, 4], beams=1, max_length=30, min_length=9),
], ids=["ragged", "min_length", "negative-lp", "max_length2-beams", "max_length2-greedy", "greedy-min_length"])
def test_lavis_decoder_matches_the_list_based_one(case):
    """Ragged left-padded batches, min_length, a negative length penalty, max_length=2: the ids of
    the list-based decoder (itself equal to 4.33 on the recorded cases)."""
    case = dict(case)
    model = oracle.tiny_llama(case.pop("seed"), case.pop("boost"))
    embeds, mask = oracle.prompts(3, case.pop("lengths"))
    kw = dict(num_beams=case.pop("beams"), repetition_penalty=1.5, **case)
    want = reference_lavis_generate(model, embeds, mask, **kw)
    got = lavis_generate(model, embeds, mask, **kw)
    assert got.tolist() == want.tolist()
    if kw["max_length"] == 2:
        assert got.shape[1] == 1
    if kw.get("min_length", 1) > 1:
        assert all(2 not in row[: kw["min_length"] - 2] for row in got.tolist())


def test_samples_finish_at_different_steps():
    """Four samples whose beam searches end at different steps (a finished sample's beams keep
    running on padding until the last one is done): the list-based decoder's ids."""
    model = oracle.tiny_llama(0, 2.0)
    embeds, mask = oracle.prompts(0, [7, 4, 2, 6])
    ends = []
    real = lavis_decoder._Hypotheses.done

    def done(self, best, cur_len):
        out = real(self, best, cur_len)
        if out:
            ends.append((id(self), cur_len))
        return out

    lavis_decoder._Hypotheses.done = done
    try:
        want = reference_lavis_generate(model, embeds, mask, num_beams=5, max_length=40)
    finally:
        lavis_decoder._Hypotheses.done = real
    assert len({cur for _, cur in ends}) == 4, ends  # each sample done at its own step, all before max_length
    assert lavis_generate(model, embeds, mask, num_beams=5, max_length=40).tolist() == want.tolist()


@pytest.mark.parametrize("beams", [5, 1])
def test_lavis_decoding_reads_the_host_once_per_step(beams):
    """The lavis decoder reads one value per decoding step (whether every sample is done or any
    row runs); the list-based one read every candidate (about 4 reads a step with 5 beams) and HF's
    mask code read the mask every step. Measured as the reads of 16 new tokens minus those of 8."""
    from _host_reads import HostReads

    model = oracle.tiny_llama(4, -3.0)  # </s> never chosen: every run is max_length long
    embeds, mask = oracle.prompts(4, [5, 3])
    totals = []
    for new in (8, 16):
        with HostReads() as reads:
            out = lavis_generate(model, embeds, mask, num_beams=beams, max_length=new + 1)
        assert out.shape == (2, new)
        totals.append(reads)
    per_step = (totals[1].total - totals[0].total) / 8
    assert per_step <= 1, f"{per_step} reads per step: {totals[1].report()}"
    assert totals[1].total <= 16 + 4, totals[1].report()


def _step_allocations(model, run) -> list[int]:
    """Bytes allocated (positive allocation events of torch's profiler) between consecutive
    decoding forwards of `model` (calls with input_ids) while `run()` runs: one decoding step each."""
    from torch.profiler import ProfilerActivity, profile, record_function

    real = model.forward

    def marked(*args, **kwargs):
        if kwargs.get("input_ids") is not None:
            with record_function("decode-step-mark"):
                pass
        return real(*args, **kwargs)

    model.forward = marked
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    finally:
        del model.forward
    events = prof.profiler.kineto_results.events()
    marks = sorted(e.start_ns() for e in events if e.name() == "decode-step-mark")
    allocs = [(e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.nbytes() > 0]
    return [sum(n for t, n in allocs if a <= t < b) for a, b in zip(marks, marks[1:])]


def test_lavis_decoding_step_allocates_a_small_fraction_of_the_kv_cache():
    """5 beams, 2 prompts of 320 positions (SAM's prompts: 32 per image plus the instruction), 16
    new tokens: after warm-up a decoding step allocates <= 10% of the KV cache's size (the cache is
    preallocated and written in place; a reorder gathers into the second buffer; what a step does
    allocate is the tiny LLaMA's activations). DynamicCache allocated a copy of the whole cache
    twice a step (2.2x its size)."""
    model = oracle.tiny_llama(4, -3.0)
    embeds, mask = oracle.prompts(4, [320, 280])
    cfg = model.config
    rows, positions = 2 * 5, 320 + 16
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache_bytes = rows * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * positions * 4
    steps = _step_allocations(model, lambda: lavis_generate(model, embeds, mask, num_beams=5, max_length=17))
    assert len(steps) >= 12
    assert max(steps[3:]) <= 0.10 * cache_bytes, (steps, cache_bytes)


def test_compile_decode_is_eager_on_a_cpu_and_compiles_when_asked(monkeypatch):
    """``compile_decode=True`` compiles only on CUDA (torch.compile is not called here); a dict of
    torch.compile arguments compiles anywhere (eager backend: the same ids as the recorded 4.33
    answers); anything else is refused in one line. `SAM.generate` passes it on, from keyword
    arguments or the generation config."""
    from sam_fast.models import generation

    name, seed, boost, lengths, beams, max_length, penalty, lp = oracle.CASES[1]
    model = oracle.tiny_llama(seed, boost)
    embeds, mask = oracle.prompts(seed, lengths)
    kw = dict(num_beams=beams, max_length=max_length, repetition_penalty=penalty, length_penalty=lp)
    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **ckw: calls.append(ckw) or real(fn, **ckw))
    monkeypatch.setattr(generation, "_COMPILED_STEPS", {})
    assert lavis_generate(model, embeds, mask, compile_decode=True, **kw).tolist() == RECORDED["cases"][name]
    assert calls == []
    assert generation.decode_compile_kwargs(True, "cuda") == {"mode": "reduce-overhead"}
    assert generation.decode_compile_kwargs(True, "cpu") is None
    assert generation.decode_compile_kwargs(False, "cuda") is None
    got = lavis_generate(model, embeds, mask, compile_decode={"backend": "eager", "fullgraph": True}, **kw)
    assert got.tolist() == RECORDED["cases"][name]
    assert calls == [{"backend": "eager", "fullgraph": True}]
    with pytest.raises(ValueError, match=r"compile_decode='yes' must be a bool or a dict"):
        lavis_generate(model, embeds, mask, compile_decode="yes", **kw)
    sam = tiny_sam()
    inputs = _generate_inputs(sam)
    with torch.no_grad():
        want = sam.generate(**inputs, generation_mode="lavis", num_beams=2, max_new_tokens=4)
        sam.generation_config.compile_decode = {"backend": "eager"}
        assert torch.equal(sam.generate(**inputs, generation_mode="lavis", num_beams=2, max_new_tokens=4), want)
        assert torch.equal(sam.generate(**inputs, generation_mode="lavis", num_beams=2, max_new_tokens=4,
                                        compile_decode=False), want)
    assert calls[1:] == [{"backend": "eager"}]


@pytest.mark.parametrize("beams", [5, 1])
def test_hf_mode_reads_the_host_twice_per_step(beams):
    """HF's own generate (left as it is): two host reads per decoding step, HF's mask code asking
    whether the batch has padding and its stopping test; lavis mode reads once."""
    from _host_reads import HostReads

    model = tiny_sam()
    inputs = _generate_inputs(model)
    totals = []
    with torch.no_grad():
        for new in (8, 16):
            with HostReads() as reads:
                out = model.generate(**inputs, generation_mode="hf", num_beams=beams, max_new_tokens=new,
                                     min_new_tokens=new)
            assert out.shape[1] == new
            totals.append(reads.total)
    assert (totals[1] - totals[0]) / 8 <= 2, totals
