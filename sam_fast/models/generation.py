"""Generation from LLM input embeddings, in the two modes `SAM.generate` offers
(docs/model.md#generation compares them).

``"hf"``: transformers' own `generate` (greedy, beams, sampling, every HF option), with one
correction. transformers 5.x exempts the first k tokens of a row left-padded by k from the
repetition penalty (it treats the padding as a prompt), but with ``inputs_embeds`` the ids it
penalises are the generated ones only, so a left-padded row would skip the penalty on its first k
generated tokens and its answer would depend on its batch-mates. `generated_tokens_penalty`
penalises every generated token and never the prompt, in every row.

``"lavis"``: the released SAM code's decoding, which ran LAVIS on transformers 4.33 with only
``inputs_embeds`` and ``max_length``. `lavis_generate` reproduces that decoder step for step:

- the running sequence starts with one BOS id that the LLM never sees (the first step reads the
  embeddings) but that counts in the length: ``max_length=256`` allows 255 new tokens, and a
  finished beam of n tokens before its ``</s>`` is scored ``sum_logprobs / (n + 1) **
  length_penalty``; the early-stop test divides the best running score by the sequence length
  including the BOS and the next token;
- the repetition penalty applies to the log-probabilities (beams) or logits (greedy) of every id
  in that sequence: the generated tokens and the BOS id, never the prompt;
- beam search keeps 2 x num_beams candidates per step, adds a finished hypothesis only when its
  ``</s>`` is among the top num_beams candidates, keeps the num_beams best hypotheses, and stops a
  sample when no running beam can beat its worst kept hypothesis (``early_stopping=False``);
- logits are taken in fp32 (4.33's LLaMA upcast them) and, as LAVIS does afterwards, token 0
  becomes 2 (``</s>``) in the output.

The returned ids are the new tokens only (without the BOS), ``[B, S_new]``, padded with ``</s>``.

The lavis decoder runs on the device: beam scores, each sample's finished hypotheses (K slots and
an insertion stamp that breaks ties as 4.33's list did), the done flags, the penalty and the
min_length rule are tensors, so the host reads one value per step (whether every sample is done)
and the answer's width at the end. The KV cache is preallocated and written in place
(`sam_fast.models.kv_cache.BeamKVCache`, used by HF's own LLaMA forward); a beam reorder moves
only the generated positions. ``compile_decode=True`` compiles the decoding step over a static
cache on CUDA (`decode_compile_kwargs`). `sam_fast.reference.lavis_decoder` keeps the list-based
decoder this replaced, with the same ids.
"""

from __future__ import annotations

import math
import numbers

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from sam_fast._text import bounded_repr
from sam_fast.models.hf_compat import cache_kwarg, output_cache
from sam_fast.models.kv_cache import BeamKVCache

GENERATION_MODES = ("hf", "lavis")


def _integer(low: int):
    """A rule: an integer (numpy's too, never a bool: True would run one beam) of at least `low`;
    2.5 beams or 2.7 new tokens were truncated or failed deep in the decoder."""
    return (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low,
            f"an integer >= {low}")


def _number(test, rule: str):
    """A rule: a finite real number (not a bool) for which `test` holds; a NaN or negative penalty
    gave empty or garbage answers without an error."""
    return (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and test(v),
            rule)


# what each decoding setting must be; None (unset) is always allowed. Both modes check every
# setting they read, from keyword arguments and generation configs alike, before any work
SETTING_RULES = {
    "num_beams": _integer(1),
    "max_new_tokens": _integer(1),
    "max_length": _integer(1),
    "min_length": _integer(0),
    "min_new_tokens": _integer(0),
    "num_return_sequences": _integer(1),
    "num_beam_groups": _integer(1),
    "top_k": _integer(0),  # 0: no top-k filtering
    "no_repeat_ngram_size": _integer(0),
    "repetition_penalty": _number(lambda v: v > 0, "a finite number > 0"),
    "length_penalty": _number(lambda v: True, "a finite number"),
    "temperature": _number(lambda v: v > 0, "a finite number > 0"),
    "top_p": _number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "typical_p": _number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "epsilon_cutoff": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eta_cutoff": _number(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "diversity_penalty": _number(lambda v: v >= 0, "a finite number >= 0"),
}


class GenerationSettingError(ValueError):
    """A decoding setting `SAM.generate` refuses before any work (one line naming it): its own class
    so that the command line reports it as a usage error, not as a crash."""


def check_setting(name: str, value, source: str = "") -> None:
    """Raise one GenerationSettingError naming the setting (as ``source + name``: "generation_config." when it
    came from a config) and its value unless it is unset or follows `SETTING_RULES`."""
    if value is None or name not in SETTING_RULES:
        return
    ok, rule = SETTING_RULES[name]
    if not ok(value):
        raise GenerationSettingError(f"generate: {source}{name}={bounded_repr(value)} must be {rule}")


def check_compile_decode(value, source: str = "") -> None:
    """``compile_decode`` is a bool or a dict of `torch.compile` arguments (`decode_compile_kwargs`);
    a string such as "yes" would have been taken as True by a truth test."""
    if not isinstance(value, (bool, dict)):
        raise GenerationSettingError(f"generate: {source}compile_decode={bounded_repr(value)} must be a bool or a "
                                     f"dict of torch.compile arguments")


def generated_tokens_penalty(penalty: float) -> LogitsProcessorList:
    """A processor list that applies the repetition penalty to every id HF passes it (with
    ``inputs_embeds`` only: the generated tokens), whatever each row's left padding."""
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(float(penalty))])


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """LLaMA position ids of a left-padded batch: valid tokens count from 0, padding gets 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def prefill_for_beams(language_model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, num_beams: int,
                      static_cache_len: int | None = None):
    """A KV cache of every prompt position but the last, computed once per sample and repeated
    for its `num_beams` beams ([B, S-1] -> [B * num_beams, S-1] rows).

    Passed to HF `generate` as its KV cache (``cache``; ``past_key_values`` before transformers 5.25)
    with the full `inputs_embeds`, it makes generate run only the last prompt position per beam,
    instead of the whole prompt per beam (HF expands ``inputs_embeds`` to the beams before its
    prefill). The ids are the same.

    With `static_cache_len` (prompt plus new tokens) the cache is a transformers ``StaticCache``
    of that length (fixed shapes, what HF's generate compiles its decoding step for on a GPU)
    holding the same keys and values; otherwise a ``DynamicCache``.
    """
    from transformers import DynamicCache, StaticCache

    S = inputs_embeds.shape[1]
    cache = DynamicCache(config=language_model.config)
    if S > 1:
        language_model.model(inputs_embeds=inputs_embeds[:, : S - 1], attention_mask=attention_mask[:, : S - 1],
                             position_ids=_positions(attention_mask)[:, : S - 1], use_cache=True,
                             **{cache_kwarg(): cache})
        cache.batch_repeat_interleave(num_beams)
    if static_cache_len is None:
        return cache
    if static_cache_len < S:
        raise ValueError(f"static_cache_len={static_cache_len} is shorter than the prompt ({S} positions)")
    static = StaticCache(config=language_model.config, max_cache_len=static_cache_len)
    for i, layer in enumerate(cache.layers if S > 1 else []):
        static.update(layer.keys, layer.values, i)
    return static


def _penalise(scores: torch.Tensor, seq: torch.Tensor, penalty: float) -> torch.Tensor:
    """4.33's repetition penalty: for every id in `seq` [R, n], its score [R, V] is multiplied by
    `penalty` if negative, divided by it otherwise."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seq)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seq, picked)


class _Rules:
    """The settings every decoding step applies (4.33's logits processors and lengths)."""

    def __init__(self, max_length: int, min_length: int, penalty: float, length_penalty: float, bos: int, eos: int,
                 pad: int):
        self.max_length, self.min_length = max_length, min_length
        self.penalty, self.length_penalty = penalty, length_penalty
        self.bos, self.eos, self.pad = bos, eos, pad

    def processed(self, scores: torch.Tensor, seq: "_Sequences") -> torch.Tensor:
        """[R, V] scores after the repetition penalty over the running sequences (BOS included)
        and, while they are shorter than min_length, ``</s>`` forbidden."""
        scores = _penalise(scores, seq.view, self.penalty)
        if seq.len < self.min_length:
            scores[:, self.eos] = float("-inf")
        return scores

    def normalised(self, sum_logprobs: torch.Tensor, length: int) -> torch.Tensor:
        """4.33's hypothesis score in float64 (it was a Python float): the exponent is taken on the
        host as Python did, so the division is the one 4.33 made."""
        return sum_logprobs.double() / (length**self.length_penalty)


class _Sequences:
    """The running sequences [R, max_length] (the BOS first) in two buffers: a beam reorder gathers
    the filled length into the other one (``index_select(..., out=)``: no allocation)."""

    def __init__(self, rows: int, max_length: int, bos: int, device):
        self.bufs = [torch.full((rows, max_length), bos, dtype=torch.long, device=device) for _ in range(2)]
        self.live, self.len = 0, 1

    @property
    def view(self) -> torch.Tensor:
        """[R, len] the filled part."""
        return self.bufs[self.live][:, : self.len]

    def append(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Row r becomes row ``rows[r]`` (if given) followed by ``tokens[r]``."""
        if rows is not None:
            other = self.bufs[1 - self.live]
            torch.index_select(self.view, 0, rows, out=other[:, : self.len])
            self.live = 1 - self.live
        self.bufs[self.live][:, self.len] = tokens
        self.len += 1


class _Finished:
    """Each sample's K best finished hypotheses, 4.33's list-based `BeamHypotheses` on the device.

    Per sample K slots (score in float64, as 4.33's Python floats; token ids; length; an insertion
    stamp that stands for the position in 4.33's list, whose order breaks ties) and a (K+1)-th
    slot that takes the writes of the samples that add nothing this time.
    """

    def __init__(self, B: int, K: int, max_length: int, device):
        self.K = K
        self.score = torch.full((B, K + 1), float("-inf"), dtype=torch.float64, device=device)
        self.stamp = torch.zeros(B, K + 1, dtype=torch.long, device=device)
        self.length = torch.zeros(B, K + 1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(B * (K + 1), max_length, dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)
        self.first = torch.arange(B, device=device) * (K + 1)  # each sample's first row of `tokens`

    def add(self, adding: torch.Tensor, score: torch.Tensor, rows: torch.Tensor, seq: _Sequences, stamp: int) -> None:
        """4.33's ``add`` for the samples in `adding` [B] bool: running row ``rows[b]`` of `seq`
        with `score` [B] enters while fewer than K are kept or when it beats the worst, whose slot
        it takes (the worst by (score, list position): 4.33 deletes the first of equal worst)."""
        K = self.K
        kept = self.score[:, :K]
        worst = kept.min(1).values
        full = self.count == K
        accept = adding & (~full | (score > worst))
        oldest_worst = torch.where(kept == worst[:, None], self.stamp[:, :K], torch.iinfo(torch.long).max).argmin(1)
        slot = torch.where(full, oldest_worst, self.count.clamp(max=K - 1))
        slot = torch.where(accept, slot, K)[:, None]
        self.score.scatter_(1, slot, score[:, None])
        self.stamp.scatter_(1, slot, stamp)
        self.length.scatter_(1, slot, seq.len)
        self.tokens[:, : seq.len].index_copy_(0, self.first + slot[:, 0], seq.view.index_select(0, rows))
        self.count += (accept & ~full).long()

    def done(self, best_sum_logprobs: torch.Tensor, cur_len: int, rules: _Rules) -> torch.Tensor:
        """[B] 4.33's ``is_done``: K kept and none of the running beams can beat the worst."""
        worst = self.score[:, : self.K].min(1).values
        return (self.count == self.K) & (worst >= rules.normalised(best_sum_logprobs, cur_len))

    def best(self, rules: _Rules) -> torch.LongTensor:
        """[B, S_new] each sample's best hypothesis (the last of the highest scores in list order:
        4.33's stable sort), BOS dropped, ``</s>`` after it when it fits, `pad` beyond."""
        kept = self.score[:, : self.K]
        top = kept.max(1, keepdim=True).values
        slot = torch.where(kept == top, self.stamp[:, : self.K], -1).argmax(1)
        length = self.length.gather(1, slot[:, None])
        tokens = self.tokens.index_select(0, self.first + slot)
        width = min(int(length.max()) + 1, rules.max_length)  # the one host read of the answer's width
        pos = torch.arange(width, device=tokens.device)
        tail = torch.where(pos == length, rules.eos, rules.pad)
        return torch.where(pos < length, tokens[:, :width], tail)[:, 1:]


class _Decoder:
    """The LLM over a preallocated `BeamKVCache`: `prefill` runs the prompt embeddings once per
    sample, `step` one token per row (sample x beam) with no host read.

    Position ids follow the attention mask (left padding), as HF's LLaMA generation. The attention
    mask is built once over the cache's length in the form HF's own mask code gives the attention
    (a 4D boolean mask for SDPA, additive for eager attention), so HF builds none per step; the
    other attention implementations get a 2D mask and build their own.
    """

    def __init__(self, language_model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, beams: int,
                 max_length: int, compile_kwargs: dict | None):
        self.lm, self.embeds, self.mask2d = language_model, inputs_embeds, attention_mask.long()
        self.beams, self.max_length = beams, max_length
        self.static = compile_kwargs is not None
        self.forward = _decode_step if compile_kwargs is None else _compiled_step(compile_kwargs)
        self.rows = inputs_embeds.shape[0] * beams

    def prefill(self) -> torch.Tensor:
        """[B, V] fp32 logits of each prompt's last position; the cache then holds the prompt for
        every beam, with room for max_length - 2 fed tokens."""
        out = self.lm(inputs_embeds=self.embeds, attention_mask=self.mask2d, position_ids=_positions(self.mask2d),
                      use_cache=True)
        S = self.embeds.shape[1]
        self.cache = BeamKVCache.from_prefill(output_cache(out), self.beams, S + max(self.max_length - 2, 0),
                                              static=self.static)
        self.first_position = self.mask2d.sum(1, keepdim=True).repeat_interleave(self.beams, 0)
        self.mask = _attention_mask(self.lm, self.mask2d.repeat_interleave(self.beams, 0), self.cache.max_len,
                                    self.embeds.dtype)
        if self.static:
            torch._dynamo.mark_static_address(self.mask.full)
        return out.logits[:, -1, :].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """[R, V] fp32 logits after feeding `tokens` [R] at the next position."""
        n, S = self.cache.filled, self.cache.prompt_len
        self.mask.attend(n)
        positions = self.first_position + (n - S)
        mask = self.mask.full if self.static else self.mask.upto(n + 1)
        if self.static and tokens.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        logits = self.forward(self.lm, tokens[:, None], positions, mask, self.cache)
        self.cache.advance()
        return logits.clone() if self.static else logits  # a CUDA graph's output is overwritten next step

    def reorder(self, rows: torch.Tensor) -> None:
        """Row r continues row ``rows[r]`` (of the same sample: only generated positions move)."""
        self.cache.reorder_generated(rows)


class _AttentionMask:
    """The decoding attention mask over the cache's length, [R, 1, 1, L] (or [R, L] for
    attention implementations that build their own), written in place as positions fill."""

    def __init__(self, full: torch.Tensor, attend_value):
        self.full, self.attend_value = full, attend_value

    def attend(self, position: int) -> None:
        self.full[..., position] = self.attend_value

    def upto(self, length: int) -> torch.Tensor:
        return self.full[..., :length]


def _attention_mask(language_model, prompt_mask: torch.Tensor, length: int, dtype: torch.dtype) -> _AttentionMask:
    """The mask of rows with `prompt_mask` [R, S] (1: a token, 0: left padding) over `length`
    positions, every generated position hidden until `attend` shows it."""
    R, S = prompt_mask.shape
    keep = torch.zeros(R, length, dtype=torch.bool, device=prompt_mask.device)
    keep[:, :S] = prompt_mask.bool()
    impl = getattr(language_model.config, "_attn_implementation", None)
    if impl == "sdpa":
        return _AttentionMask(keep[:, None, None, :], True)
    if impl == "eager":  # HF's eager mask: 0 where attended, the dtype's minimum elsewhere
        low = torch.finfo(dtype).min
        return _AttentionMask(torch.zeros(R, 1, 1, length, dtype=dtype, device=keep.device).masked_fill_(
            ~keep[:, None, None, :], low), 0.0)
    return _AttentionMask(keep.long(), 1)


def _decode_step(language_model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 cache: BeamKVCache) -> torch.Tensor:
    """One decoding step of HF's own LLaMA forward: [R, 1] tokens -> [R, V] fp32 logits."""
    out = language_model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{cache_kwarg(): cache})
    return out.logits[:, -1, :].float()


_COMPILED_STEPS: dict[str, object] = {}


def _compiled_step(compile_kwargs: dict):
    """`_decode_step` under ``torch.compile(**compile_kwargs)``, compiled once per process and
    settings (the compile itself happens at the first call)."""
    key = repr(sorted(compile_kwargs.items()))
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(_decode_step, **compile_kwargs)
    return _COMPILED_STEPS[key]


def decode_compile_kwargs(compile_decode, device) -> dict | None:
    """What ``compile_decode`` asks of `lavis_generate` on `device`: None (eager) for False; for
    True ``mode="reduce-overhead"`` (CUDA graphs over the static cache) on CUDA and eager elsewhere
    (on a CPU a compiled step saves nothing measurable and costs the compile); a dict: those
    `torch.compile` arguments on any device (``{"backend": "eager"}`` tests the path on a CPU)."""
    if isinstance(compile_decode, dict):
        return dict(compile_decode)
    if compile_decode is True and torch.device(device).type == "cuda":
        return dict(mode="reduce-overhead")
    return None


@torch.no_grad()
def lavis_generate(
    language_model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int = 5,
    max_length: int = 256,
    min_length: int = 1,
    repetition_penalty: float = 1.5,
    length_penalty: float = 1.0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 0,
    compile_decode: bool | dict = False,
) -> torch.LongTensor:
    """The released SAM code's decoding (see the module docstring).

    Args:
        language_model: a causal LM taking ``inputs_embeds`` / ``input_ids`` with a KV cache.
        inputs_embeds: [B, S, H] the prompts, left-padded.
        attention_mask: [B, S] 0 on the left padding.
        num_beams: 1 is greedy search.
        max_length: length of the running sequence, BOS included (so max_length - 1 new tokens).
        min_length: ``</s>`` is forbidden while the running sequence is shorter.
        compile_decode: compile the decoding step over a static cache (`decode_compile_kwargs`).

    Returns:
        [B, S_new] new token ids, ``</s>``-padded, with 0 replaced by 2 as LAVIS does.
    """
    for name, value in (("num_beams", num_beams), ("max_length", max_length), ("min_length", min_length),
                        ("repetition_penalty", repetition_penalty), ("length_penalty", length_penalty)):
        check_setting(name, value)
    if max_length < 2:
        raise ValueError(f"lavis_generate: max_length={max_length} must be >= 2 (it counts the seeded BOS)")
    check_compile_decode(compile_decode)
    compile_kwargs = decode_compile_kwargs(compile_decode, inputs_embeds.device)
    dec = _Decoder(language_model, inputs_embeds, attention_mask, num_beams, max_length, compile_kwargs)
    rules = _Rules(max_length, min_length, repetition_penalty, length_penalty, bos_token_id, eos_token_id,
                   pad_token_id)
    out = _greedy(dec, rules) if num_beams == 1 else _beam_search(dec, num_beams, rules)
    return out.masked_fill(out == 0, 2)


def _greedy(dec: _Decoder, rules: _Rules) -> torch.LongTensor:
    """Greedy search (the penalty acts on the logits): [B, S_new] new tokens, `pad` after ``</s>``.
    One host read per step: whether a row still runs."""
    seq = _Sequences(dec.rows, rules.max_length, rules.bos, dec.embeds.device)
    running = torch.ones(dec.rows, dtype=torch.bool, device=dec.embeds.device)
    logits = dec.prefill()
    while True:
        tokens = rules.processed(logits, seq).argmax(-1)
        tokens = torch.where(running, tokens, rules.pad)
        seq.append(tokens)
        running &= tokens != rules.eos
        if seq.len >= rules.max_length or not bool(running.any()):
            return seq.view[:, 1:].clone()
        logits = dec.step(tokens)


def _beam_search(dec: _Decoder, K: int, rules: _Rules) -> torch.LongTensor:
    """Beam search with `K` beams as transformers 4.33 ran it for LAVIS: [B, S_new] new tokens of
    each sample's best hypothesis, ``</s>`` then `pad` after it. Everything stays on the device;
    the one host read per step is whether every sample is done."""
    B, dev = dec.embeds.shape[0], dec.embeds.device
    seq = _Sequences(B * K, rules.max_length, rules.bos, dev)
    hyps = _Finished(B, K, rules.max_length, dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    first_row = torch.arange(B, device=dev) * K
    logits = dec.prefill().repeat_interleave(K, 0)  # every beam starts from its sample's prompt
    stamp = 0
    while True:
        scores = rules.processed(torch.log_softmax(logits, dim=-1), seq) + beam_scores[:, None]
        V = scores.shape[-1]
        top, flat = scores.view(B, K * V).topk(2 * K, dim=1, largest=True, sorted=True)
        src, tok = first_row[:, None] + flat // V, flat % V
        is_eos, finishing = tok == rules.eos, rules.normalised(top, seq.len)
        for rank in range(K):  # only an </s> among the top K candidates finishes a beam, in rank order
            hyps.add(is_eos[:, rank] & ~done, finishing[:, rank], src[:, rank], seq, stamp)
            stamp += 1
        beam_scores, tokens, rows = _next_beams(top, tok, src, is_eos, done, first_row, K, rules.pad)
        done = done | hyps.done(top[:, 0], seq.len + 1, rules)
        seq.append(tokens, rows)
        if seq.len >= rules.max_length or bool(done.all()):
            break
        dec.reorder(rows)
        logits = dec.step(tokens)
    for i in range(K):  # the running beams of the samples not done, in beam order
        hyps.add(~done, rules.normalised(beam_scores.view(B, K)[:, i], seq.len), first_row + i, seq, stamp)
        stamp += 1
    return hyps.best(rules)


def _next_beams(top, tok, src, is_eos, done, first_row, K: int, pad: int):
    """The next K beams of each sample from its 2K candidates (scores `top`, tokens `tok`, source
    rows `src`, [B, 2K] in rank order): the first K that are not ``</s>``; a finished sample's
    beams get score 0, `pad` and its first row. Returns [R] scores, tokens, source rows."""
    B = top.shape[0]
    rank = (~is_eos).long().cumsum(1) - 1
    dest = torch.where(is_eos | (rank >= K), K, rank)  # column K takes what is not kept

    def kept(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(B, K + 1).scatter_(1, dest, x)[:, :K]

    finished = done[:, None]
    scores = kept(top).masked_fill(finished, 0.0)
    tokens = kept(tok).masked_fill(finished, pad)
    rows = torch.where(finished, first_row[:, None], kept(src))
    return scores.reshape(-1), tokens.reshape(-1), rows.reshape(-1)
