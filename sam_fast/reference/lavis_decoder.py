"""The list-based "lavis" decoder, the oracle of the device-side one in `sam_fast.models.generation`
and its benchmark baseline: transformers 4.33's beam search written as 4.33 wrote it, with Python
lists of finished hypotheses per sample, host reads of every candidate (about four per step), and
a DynamicCache appended to and reordered whole every step. It equals 4.33 on every recorded golden
case of its test suite, so comparing the device-side decoder with it on ties, ragged batches and
length settings tests that decoder where no 4.33 answer was recorded."""

from __future__ import annotations

import torch

from sam_fast.models.generation import check_setting
from sam_fast.models.hf_compat import cache_kwarg, output_cache


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """LLaMA position ids of a left-padded batch: valid tokens count from 0, padding gets 1."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def _penalise(scores: torch.Tensor, seq: torch.Tensor, penalty: float) -> torch.Tensor:
    """4.33's repetition penalty: for every id in `seq` [R, n], its score [R, V] is multiplied by
    `penalty` if negative, divided by it otherwise."""
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seq)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seq, picked)


class _Hypotheses:
    """The num_beams best finished hypotheses of one sample (4.33's `BeamHypotheses`)."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, list[int]]] = []
        self.worst = 1e9

    def add(self, tokens: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(tokens) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst >= best_sum_logprobs / cur_len**self.length_penalty

    def best(self) -> list[int]:
        return sorted(self.beams, key=lambda b: b[0])[-1][1]


class _Decoder:
    """The LLM over a KV cache: the first call reads the prompt embeddings, later calls one token
    per row. Position ids follow the attention mask (left padding), as HF's LLaMA generation."""

    def __init__(self, language_model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        self.lm, self.embeds, self.mask, self.past = language_model, inputs_embeds, attention_mask.long(), None

    def logits(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.past is None:
            kw = dict(inputs_embeds=self.embeds)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
            kw = dict(input_ids=tokens[:, None])
        pos = _positions(self.mask)
        if self.past is not None:
            pos = pos[:, -1:]
        out = self.lm(**kw, attention_mask=self.mask, position_ids=pos, use_cache=True, **{cache_kwarg(): self.past})
        self.past = output_cache(out)
        return out.logits[:, -1, :].float()

    def expand(self, repeats: int) -> None:
        """Give each row's cache `repeats` consecutive copies (after the prefill: one per beam)."""
        self.past.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, 0)

    def reorder(self, rows: torch.Tensor) -> None:
        self.past.reorder_cache(rows)
        self.mask = self.mask.index_select(0, rows)


@torch.no_grad()
def reference_lavis_generate(
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
) -> torch.LongTensor:
    """The released SAM code's decoding as `sam_fast.models.generation.lavis_generate` (same arguments
    but `compile_decode`, same ids), list-based (see the module docstring).

    Args:
        language_model: a causal LM taking ``inputs_embeds`` / ``input_ids`` with a KV cache.
        inputs_embeds: [B, S, H] the prompts, left-padded.
        attention_mask: [B, S] 0 on the left padding.
        num_beams: 1 is greedy search.
        max_length: length of the running sequence, BOS included (so max_length - 1 new tokens).
        min_length: ``</s>`` is forbidden while the running sequence is shorter.

    Returns:
        [B, S_new] new token ids, ``</s>``-padded, with 0 replaced by 2 as LAVIS does.
    """
    for name, value in (("num_beams", num_beams), ("max_length", max_length), ("min_length", min_length),
                        ("repetition_penalty", repetition_penalty), ("length_penalty", length_penalty)):
        check_setting(name, value)
    if max_length < 2:
        raise ValueError(f"lavis_generate: max_length={max_length} must be >= 2 (it counts the seeded BOS)")
    dec = _Decoder(language_model, inputs_embeds, attention_mask)  # the prompt runs once per sample
    seq = torch.full((inputs_embeds.shape[0] * num_beams, 1), bos_token_id, dtype=torch.long,
                     device=inputs_embeds.device)

    def processed(scores: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        scores = _penalise(scores, seq, repetition_penalty)
        if seq.shape[1] < min_length:
            scores[:, eos_token_id] = float("-inf")
        return scores

    if num_beams == 1:
        out = _greedy(dec, seq, processed, max_length, eos_token_id, pad_token_id)
    else:
        out = _beam_search(dec, seq, processed, num_beams, max_length, length_penalty, eos_token_id, pad_token_id)
    return out.masked_fill(out == 0, 2)


def _greedy(dec: "_Decoder", seq, processed, max_length: int, eos: int, pad: int) -> torch.LongTensor:
    """Greedy search (the penalty acts on the logits): [B, S_new] new tokens, `pad` after ``</s>``."""
    running = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    tokens = None
    while True:
        tokens = processed(dec.logits(tokens), seq).argmax(-1)
        tokens = torch.where(running, tokens, torch.full_like(tokens, pad))
        seq = torch.cat([seq, tokens[:, None]], 1)
        running &= tokens != eos
        if not bool(running.any()) or seq.shape[1] >= max_length:
            return seq[:, 1:]


def _beam_search(dec: "_Decoder", seq, processed, K: int, max_length: int, length_penalty: float, eos: int,
                 pad: int) -> torch.LongTensor:
    """Beam search with `K` beams as transformers 4.33 ran it for LAVIS: [B, S_new] new tokens of
    each sample's best hypothesis, ``</s>`` then `pad` after it."""
    B, dev = seq.shape[0] // K, seq.device
    hyps = [_Hypotheses(K, length_penalty) for _ in range(B)]
    done = [False] * B
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    tokens = None
    while True:
        logits = dec.logits(tokens)
        if tokens is None:  # after the prefill: every beam starts from its sample's cache
            logits = logits.repeat_interleave(K, 0)
            dec.expand(K)
        scores = processed(torch.log_softmax(logits, dim=-1), seq) + beam_scores[:, None]
        V = scores.shape[-1]
        top, flat = scores.view(B, K * V).topk(2 * K, dim=1, largest=True, sorted=True)
        new_scores, new_tokens, new_rows = [], [], []
        for b, cand in enumerate(zip(top.tolist(), (flat // V).tolist(), (flat % V).tolist())):
            if done[b]:
                new_scores += [0.0] * K
                new_tokens += [pad] * K
                new_rows += [b * K] * K
                continue
            _next_beams(b, K, cand, seq, hyps[b], eos, new_scores, new_tokens, new_rows)
            done[b] = hyps[b].done(max(cand[0]), seq.shape[1] + 1)
        beam_scores = torch.tensor(new_scores, dtype=beam_scores.dtype, device=dev)
        tokens = torch.tensor(new_tokens, dtype=torch.long, device=dev)
        order = torch.tensor(new_rows, dtype=torch.long, device=dev)
        seq = torch.cat([seq.index_select(0, order), tokens[:, None]], 1)
        if all(done) or seq.shape[1] >= max_length:
            break
        dec.reorder(order)
    return _best_sequences(hyps, done, seq, beam_scores, K, max_length, eos, pad)


def _next_beams(b: int, K: int, cand, seq, hyps: "_Hypotheses", eos: int, scores: list, tokens: list,
                rows: list) -> None:
    """Sample b's next K beams from its 2K best candidates ``cand`` = (scores, source beams,
    tokens), appended to `scores`, `tokens`, `rows`; an ``</s>`` among the top K finishes its beam
    into `hyps` instead."""
    kept = 0
    for rank, (s, i, t) in enumerate(zip(*cand)):
        row = b * K + i
        if t == eos:
            if rank < K:  # only an </s> among the top num_beams candidates finishes a beam
                hyps.add(seq[row].tolist(), s)  # read only when a beam finishes
        else:
            scores.append(s)
            tokens.append(t)
            rows.append(row)
            kept += 1
        if kept == K:
            return


def _best_sequences(hyps, done, seq, beam_scores, K: int, max_length: int, eos: int, pad: int) -> torch.LongTensor:
    """[B, S_new] each sample's best hypothesis (the running beams of unfinished samples added
    first), BOS dropped, ``</s>`` after it when it fits, `pad` beyond."""
    rows, finals = seq.tolist(), beam_scores.tolist()
    best = []
    for b, h in enumerate(hyps):
        if not done[b]:
            for i in range(K):
                h.add(rows[b * K + i], finals[b * K + i])
        best.append(h.best())
    width = min(max(len(h) for h in best) + 1, max_length)
    out = torch.full((len(best), width), pad, dtype=torch.long)
    for b, h in enumerate(best):
        out[b, : len(h)] = torch.tensor(h)
        if len(h) < width:
            out[b, len(h)] = eos
    return out[:, 1:].to(seq.device)
