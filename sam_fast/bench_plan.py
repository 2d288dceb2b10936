"""Benchmark planning: a config with the real model's proportions, analytic FLOPs of one training
step, and a seeded realistic batch.

- `scaled_config`: every width of `SAMConfig.instructblip_vicuna7b` divided by 8, depths and token
  counts real (39 ViT blocks at P = 257 tokens, 12 Q-former layers with cross-attention every 2nd,
  32 query tokens, 32 LLM layers), LLM vocabulary 4000. Small enough for a CPU, yet the step's time
  splits between the ViT, the Q/W-former and the LLM as in the 7B model (`step_flops` shows it).
- `step_flops` / `flop_shares` / `plan_table`: the FLOPs of one training step, split into the
  frozen ViT forward, the Q/W-former (forward and backward), the frozen LLM forward and its
  backward (``sam-fast bench --plan`` prints the table for both configs).
- `model_flops` / `hardware_flops`: two ways to count a step. Model FLOPs are what the model
  itself needs, whoever runs it: real tokens only, the LM head at the supervised rows only, the
  Q/W-former as sam_fast schedules it, no recomputation; MFU divides these by the time. Hardware FLOPs
  are what one implementation computes: the released code pads the LLM batch, runs the LM head at
  every position and the Q/W-former 2N times per sample; sam_fast packs the real tokens, runs the
  LM head at the supervised rows and, where ``recompute_qformer`` says so (`recomputes`), the two
  streams twice. An MFU from hardware FLOPs would credit the work an implementation wastes.
- `realistic_shapes` / `realistic_batch`: B = 8 samples with 2-5 images, instructions of 20-128
  LLM tokens and answers of 8-200 tokens (short captions and long stories), as tensors in the
  layout `SAM.forward` takes (right-padded).

FLOP conventions: a multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax,
activations, embedding lookups and the optimizer are left out: a few per cent at most). Attention
counts the full score matrix (``4 * rows * keys * width`` per layer), as dense kernels compute it.
The backbone is frozen, so its backward computes input gradients only: every frozen Linear costs 1x
its forward FLOPs backwards (not 2x: no weight gradient) and the attention core 2x (dS and dV,
then dQ and dK). Trainable Linears add their weight gradient.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from sam_fast.config import SAMConfig, choose_recompute_qformer

PARTS = ("vit", "qwformer", "llm_forward", "llm_backward")
SCHEDULES = ("sam_fast", "released")


# -- configs -----------------------------------------------------------------------------------
def scaled_config(**overrides) -> SAMConfig:
    """The vicuna-7b config with every width divided by 8 and everything else real.

    ViT 1408 -> 176 wide (FFN 6144 -> 768), 2 heads: head dim 88 as in the 7B ViT (16 x 88).
    Q-former 768 -> 96 (FFN 3072 -> 384), 3 heads of 32: the 7B's head dim 64 does not divide 96;
    32 is the nearest power of two, which the fused GPU attention kernels take without padding
    (head count and head dim do not change the FLOPs). LLM 4096 -> 512 (FFN 11008 -> 1376), 4 heads:
    head dim 128 as in Vicuna-7B (32 x 128); vocabulary 32001 -> 4000. Q-former vocabulary
    30523 -> 3816. Unchanged: 39 ViT blocks, 224 px at patch 14 (P = 257 tokens), 12 Q-former
    layers with cross-attention every 2nd, 32 query tokens, 32 LLM layers, position limits.
    The image placeholder id is the vocabulary size (outside it, as the 7B config's 32001).
    Random weights get the larger initialisations of `SAMConfig.tiny` (vision 0.02, LLM 0.2) so
    that a random frozen backbone still responds to its inputs.
    """
    # widths (and the values that follow them) from the 7B config / 8; depths, token counts, eps as they are
    full = SAMConfig.instructblip_vicuna7b()
    vision = dict(full.vision_config.to_dict(), hidden_size=176, intermediate_size=768, num_attention_heads=2,
                  initializer_range=0.02)
    qformer = dict(full.qformer_config.to_dict(), vocab_size=3816, hidden_size=96, num_attention_heads=3,
                   intermediate_size=384, encoder_hidden_size=176)
    text = dict(full.text_config.to_dict(), vocab_size=4000, hidden_size=512, intermediate_size=1376,
                num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2)
    kw = dict(vision_config=vision, qformer_config=qformer, text_config=text,
              num_query_tokens=full.num_query_tokens, image_token_index=4000)
    kw.update(overrides)
    return SAMConfig(**kw)


# -- batch description ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleShape:
    """One training sample's sizes: images, instruction and answer lengths in LLM tokens, and the
    instruction's length in Q-former (BERT) tokens (None: the same as ``instruction``, capped
    at 128 as InstructBLIP truncates it)."""

    images: int
    instruction: int
    answer: int
    qformer_tokens: int | None = None

    def llm_tokens(self, query_tokens: int) -> int:
        """LLM positions of the sample: query_tokens placeholders per image, instruction, answer."""
        return query_tokens * self.images + self.instruction + self.answer

    def qformer_length(self) -> int:
        """Q-former text tokens of the instruction."""
        return min(self.instruction, 128) if self.qformer_tokens is None else self.qformer_tokens


IMAGES_RANGE = (2, 5)
INSTRUCTION_RANGE = (20, 128)
CAPTION_RANGE = (8, 48)  # short answers (captions, short replies)
STORY_RANGE = (64, 200)  # long answers (storytelling)
STORY_PROBABILITY = 2 / 3


def realistic_shapes(seed: int = 0, batch_size: int = 8) -> list[SampleShape]:
    """`batch_size` seeded samples: images uniform in 2..5, instruction 20..128 LLM tokens,
    answer a short caption (8..48 tokens, probability 1/3) or a long story (64..200 tokens).
    The same seed gives the same shapes on every machine (Python's `random.Random`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    r = random.Random(f"sam_fast.bench_plan:{seed}")
    out = []
    for _ in range(batch_size):
        images = r.randint(*IMAGES_RANGE)
        instruction = r.randint(*INSTRUCTION_RANGE)
        answer = r.randint(*STORY_RANGE) if r.random() < STORY_PROBABILITY else r.randint(*CAPTION_RANGE)
        out.append(SampleShape(images, instruction, answer))
    return out


def padding_fraction(shapes: Sequence[SampleShape], query_tokens: int = 32) -> float:
    """Fraction of a right-padded LLM batch's positions that are padding."""
    lengths = [s.llm_tokens(query_tokens) for s in shapes]
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths))


def realistic_batch(config: SAMConfig, shapes: Sequence[SampleShape] | None = None, seed: int = 0) -> dict:
    """A training batch for `SAM.forward` with the sizes of `shapes` (default `realistic_shapes(seed)`).

    Keys: pixel_values [T, 3, s, s] (random), image_counts (list), qformer_input_ids and
    qformer_attention_mask [B, max Q-former length] (right-padded with 0), input_ids [B, S] (per
    sample ``Q * images`` placeholders, then the instruction, then the answer; right-padded with the
    pad id), attention_mask [B, S], labels [B, S] (-100 except on the answer tokens). Token ids
    are drawn from ``[4, vocab)``, so they never equal the pad/bos/eos ids or the placeholder.
    Tensors come from a torch generator seeded with `seed`: the same seed gives the same batch.
    """
    shapes = realistic_shapes(seed) if shapes is None else list(shapes)
    if not shapes:
        raise ValueError("realistic_batch: no samples")
    g = torch.Generator().manual_seed(seed)
    tc, qc = config.text_config, config.qformer_config
    Q, s, tok = config.num_query_tokens, config.vision_config.image_size, config.image_token_index
    low = 4
    if tc.vocab_size <= low or qc.vocab_size <= low:
        raise ValueError(f"realistic_batch: vocabularies ({tc.vocab_size}, {qc.vocab_size}) must exceed {low}")
    pad = tc.pad_token_id if tc.pad_token_id is not None else 0
    rows, answers = [], []
    for i, sh in enumerate(shapes):
        if sh.images < 1 or sh.instruction < 0 or sh.answer < 1:
            raise ValueError(f"realistic_batch: sample {i} {sh} needs >= 1 image and >= 1 answer token")
        text = torch.randint(low, tc.vocab_size, (sh.instruction + sh.answer,), generator=g)
        text = text.masked_fill(text == tok, low)  # a placeholder id inside the vocabulary stays unused
        rows.append(torch.cat([torch.full((sh.images * Q,), tok), text]))
        answers.append(sh.answer)
    B, S = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, S), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (r, a) in enumerate(zip(rows, answers)):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
        labels[b, len(r) - a : len(r)] = r[-a:]
    ql = [sh.qformer_length() for sh in shapes]
    q_ids = torch.zeros(B, max(max(ql), 1), dtype=torch.long)
    q_mask = torch.zeros_like(q_ids)
    for b, n in enumerate(ql):
        q_ids[b, :n] = torch.randint(low, qc.vocab_size, (n,), generator=g)
        q_mask[b, :n] = 1
    T = sum(sh.images for sh in shapes)
    return dict(pixel_values=torch.randn(T, 3, s, s, generator=g), image_counts=[sh.images for sh in shapes],
                qformer_input_ids=q_ids, qformer_attention_mask=q_mask, input_ids=ids, attention_mask=mask,
                labels=labels)


# -- FLOPs -------------------------------------------------------------------------------------
def _get(cfg, name, default=None):
    return getattr(cfg, name, default)


def vit_flops(config: SAMConfig, images: int, *, attention_core: bool = True) -> float:
    """Forward FLOPs of the frozen ViT over `images` images (patch embedding + all blocks);
    ``attention_core=False`` leaves out the attention products (scores, weights x values)."""
    vc = config.vision_config
    D, F, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    P = (vc.image_size // p) ** 2 + 1
    patch = 2 * (P - 1) * 3 * p * p * D
    block = 2 * P * (4 * D * D + 2 * D * F) + 4 * P * P * D * attention_core  # qkv + proj, fc1 + fc2; scores, A.V
    return float(images * (patch + vc.num_hidden_layers * block))


def _qformer_layer(H: int, F: int, Q: int, L: int, P: int, cross: bool, text_ffn: bool = True):
    """(linear FLOPs, attention-core FLOPs) of one Q-former layer for one row of Q query and L text
    tokens, without the cross-attention K/V projection of the image (counted by the caller)."""
    n = Q + L
    lin = 2 * n * 4 * H * H  # self-attention q, k, v, out
    core = 4 * n * n * H
    if cross:
        lin += 2 * Q * 2 * H * H  # cross q and out (query rows only)
        core += 4 * Q * P * H
    lin += 2 * Q * 2 * H * F + (2 * L * 2 * H * F if text_ffn else 0)  # query FFN, text FFN
    return float(lin), float(core)


def qwformer_flops(config: SAMConfig, shapes: Sequence[SampleShape], schedule: str = "sam_fast", *,
                   attention_core: bool = True) -> dict:
    """FLOPs of the Q-former's two streams, the guidance modules and ``language_projection`` for
    one training step: ``{"forward": ..., "backward": ...}``. Instructions are padded to the
    batch's longest in the Q-former (both schedules run it that way).

    ``schedule="sam_fast"``: K/V of every cross-attention layer projected once per image and shared
    by both streams; the W-stream's K/V re-weighted from them (leave_one_out: one W row per image of
    a multi-image sample; shared: one per sample before layer l, then one per image); layers
    before k run both streams as one batch; the last Q-stream layer skips the text rows.
    ``schedule="released"``: the released code's 2N full passes per sample (each image's Q-stream
    pass and its W-stream pass project their K/V, the W-stream's from the merged map, and run
    every layer in full).

    Backward (input gradients through the frozen layers, weight gradients of the trainable
    modules): the Q-stream from layer k on (where ``c_i`` enters), the W-stream through every
    layer up to k when the Adaptive Adjustment is trained (its softmax weights reach every
    cross-attention layer's K/V), else from layer l on; sam_fast's batched layers before k take
    their Q-stream rows through the backward too (one batch). With ``config.recompute_qformer``
    (True, or ``"auto"`` where `recomputes` says so) the backward also runs the two streams'
    forward again (the K/V projection, merged K/V and scores are kept). ``attention_core=False``
    leaves out the attention products (scores, weights x values).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    qc, vc = config.qformer_config, config.vision_config
    H, F, Q = qc.hidden_size, qc.intermediate_size, config.num_query_tokens
    Dv = vc.hidden_size
    P = (vc.image_size // vc.patch_size) ** 2 + 1
    Hl = config.text_config.hidden_size
    n_layers = qc.num_hidden_layers
    freq = _get(qc, "cross_attention_frequency", 2) or 2
    cross = [n % freq == 0 for n in range(n_layers)]  # 0-based, as HF
    l, k = config.interaction_layers
    shared = config.context_mode == "shared"
    adaptive = config.guidance == "adaptive"
    L = max(sh.qformer_length() for sh in shapes)
    core_w = 1.0 if attention_core else 0.0

    def cost(c, text_ffn=True, backward=False):
        lin, core = _qformer_layer(H, F, Q, L, P, c, text_ffn)
        return lin + core_w * core * (2 if backward else 1)

    def layers(first, last, **kw):  # 1-based, inclusive
        return sum(cost(cross[n - 1], **kw) for n in range(first, last + 1))

    def bwd_cost(n):  # backward of W-stream layer n (1-based)
        if n == 1 and l > 1 and cross[0]:
            # the first layer's input needs no gradient (frozen embeddings): only the way from its
            # output back to the cross-attention K/V (query FFN, output projection, attention)
            return 2 * Q * 2 * H * F + 2 * Q * H * H + core_w * 2 * 4 * Q * P * H
        return cost(cross[n - 1], backward=True)

    kv_proj = 2 * P * Dv * 2 * H  # K and V of one image for one cross-attention layer
    n_cross, n_cross_k = sum(cross), sum(cross[:k])
    last_text = schedule == "released"  # sam_fast's last Q-stream layer skips the text rows
    q_fwd = layers(1, n_layers - 1) + cost(cross[-1], text_ffn=last_text) + n_cross * kv_proj
    q_bwd = layers(k, n_layers - 1, backward=True) * (k < n_layers) \
        + cost(cross[-1], text_ffn=last_text, backward=True)
    q_streams = q_fwd - n_cross * kv_proj  # what runs inside the two streams (K/V projected before)
    fwd = bwd = streams = 0.0
    for sh in shapes:
        N = sh.images
        guided = config.guidance != "none" and (shared or N > 1)
        fwd += N * q_fwd
        bwd += N * q_bwd
        streams += N * q_streams
        if guided:
            ctx = N if shared else N - 1  # images merged into one I-hat
            first = 1 if adaptive else l
            if schedule == "sam_fast":
                w_rows_before_l = 1 if shared else N
                w_layers = w_rows_before_l * layers(1, l - 1) + N * layers(l, k)
                fwd += w_layers
                streams += w_layers
                fwd += (1 if shared else N) * n_cross_k * 2 * ctx * P * 2 * H  # I-hat K/V from the images' K/V
                fwd += 2 * N * P * Dv  # Adaptive Adjustment scores
                # layers first..k-1 ran as one batch with the Q-stream rows: all of it goes backward
                rows = lambda n: (w_rows_before_l if n < l else N) + N  # noqa: E731
                bwd += sum(rows(n) * bwd_cost(n) for n in range(first, k)) + N * bwd_cost(k)
            else:
                fwd += N * (layers(1, k) + n_cross_k * kv_proj)  # each pass projects I-hat's K/V
                fwd += N * 2 * ctx * P * Dv + 2 * N * ctx * P * Dv  # I-hat, Adaptive Adjustment scores
                bwd += N * sum(bwd_cost(n) for n in range(first, k + 1))
                if adaptive:
                    bwd += N * n_cross_k * kv_proj  # gradient into I-hat through its K/V projection
            rows_in = N * (Q + L)
            fwd += 2 * 2 * rows_in * H * H  # guidance_in, guidance_out
            streams += 2 * 2 * rows_in * H * H
            bwd += 2 * 2 * rows_in * H * H + 2 * rows_in * H * H  # weight grads of both, input grad of one
        proj = 2 * N * Q * H * Hl
        fwd += proj
        bwd += 2 * proj if guided else proj  # weight gradient (+ input gradient toward c_i)
    if schedule == "sam_fast" and recomputes(config, shapes) and config.guidance != "none":
        bwd += streams  # the two streams run again in the backward (SAMConfig.recompute_qformer)
    return {"forward": float(fwd), "backward": float(bwd)}


def recomputes(config: SAMConfig, shapes: Sequence[SampleShape], dtype_bytes: int = 4, device="cpu", *,
               total_memory: int | None = None) -> bool:
    """Whether a training step on `shapes` recomputes the two streams in its backward
    (`sam_fast.config.choose_recompute_qformer`; ``"auto"`` judged as `SAM` would on `device`, by
    default a CPU in fp32 as the benchmarks run)."""
    return recompute_choice(config, shapes, dtype_bytes, device, total_memory=total_memory)[0]


def recompute_choice(config: SAMConfig, shapes: Sequence[SampleShape], dtype_bytes: int = 4, device="cpu", *,
                     total_memory: int | None = None) -> tuple[bool, str]:
    """`choose_recompute_qformer` for a step on `shapes`: (recompute?, why)."""
    shapes = list(shapes)
    images, tokens = sum(sh.images for sh in shapes), max((sh.qformer_length() for sh in shapes), default=0)
    return choose_recompute_qformer(config, images, tokens, dtype_bytes, device, total_memory=total_memory)


LM_HEAD_ROWS = ("all", "supervised")


def llm_flops(config: SAMConfig, shapes: Sequence[SampleShape], padded: bool = True, *,
              attention_core: bool = True, lm_head: str = "all") -> dict:
    """Forward and backward FLOPs of the frozen LLM: ``{"forward": ..., "backward": ...}``.

    ``padded=True``: every sample right-padded to the batch's longest (B x S positions, S x S
    attention per row, as a dense padded step computes them); False: each sample on its own
    length. ``lm_head="all"``: logits over the whole vocabulary at every position, as HF computes
    them; ``"supervised"``: only at the rows that predict an answer token (``answer`` per sample), as
    sam_fast's fused loss does. Backward: input gradients only (the LLM is frozen): 1x the Linears'
    forward, 2x the attention core; the gradient reaches the visual tokens at the start of the
    sequence, so every layer and position takes part. ``attention_core=False`` leaves out the
    attention products.
    """
    if lm_head not in LM_HEAD_ROWS:
        raise ValueError(f"lm_head={lm_head!r} is not one of {LM_HEAD_ROWS}")
    tc = config.text_config
    Q = config.num_query_tokens
    H, F, V, n = tc.hidden_size, tc.intermediate_size, tc.vocab_size, tc.num_hidden_layers
    heads = tc.num_attention_heads
    kv_heads = _get(tc, "num_key_value_heads", None) or heads
    head_dim = _get(tc, "head_dim", None) or H // heads
    lengths = [sh.llm_tokens(Q) for sh in shapes]
    if padded:
        lengths = [max(lengths)] * len(lengths)
    per_token = n * 2 * (2 * H * heads * head_dim + 2 * H * kv_heads * head_dim + 3 * H * F)
    head_rows = sum(lengths) if lm_head == "all" else sum(sh.answer for sh in shapes)
    linear = sum(lengths) * per_token + head_rows * 2 * H * V
    core = n * sum(4 * s * s * heads * head_dim for s in lengths) * attention_core
    return {"forward": float(linear + core), "backward": float(linear + 2 * core)}


def step_flops(config: SAMConfig, shapes: Sequence[SampleShape], schedule: str = "sam_fast",
               padded: bool = True, *, lm_head: str = "all", recompute: bool | None = None) -> dict:
    """FLOPs of one training step from pixels, by part: ``vit`` (frozen forward), ``qwformer``
    (forward + backward, see `qwformer_flops`), ``llm_forward``, ``llm_backward``, and ``total``.
    `lm_head` as in `llm_flops`; `recompute` overrides ``config.recompute_qformer`` (None: the
    config's)."""
    shapes = list(shapes)
    if not shapes:
        raise ValueError("step_flops: no samples")
    if recompute is not None:
        config = _with(config, recompute_qformer=recompute if recompute == "auto" else bool(recompute))
    qw = qwformer_flops(config, shapes, schedule)
    llm = llm_flops(config, shapes, padded, lm_head=lm_head)
    out = {"vit": vit_flops(config, sum(sh.images for sh in shapes)), "qwformer": qw["forward"] + qw["backward"],
           "llm_forward": llm["forward"], "llm_backward": llm["backward"]}
    out["total"] = sum(out[p] for p in PARTS)
    return out


def _with(config: SAMConfig, **fields) -> SAMConfig:
    """A copy of `config` with `fields` set (the caller's config is left as it is)."""
    import copy

    out = copy.copy(config)
    for k, v in fields.items():
        setattr(out, k, v)
    return out


def model_flops(config: SAMConfig, shapes: Sequence[SampleShape]) -> dict:
    """The FLOPs the model needs for one training step, whatever runs it (the numerator of MFU),
    as `step_flops` parts: the real tokens only (no padding), the LM head at the supervised rows,
    the Q/W-former as sam_fast schedules it (shared K/V projections), nothing recomputed."""
    return step_flops(config, shapes, "sam_fast", padded=False, lm_head="supervised", recompute=False)


def hardware_flops(config: SAMConfig, shapes: Sequence[SampleShape], schedule: str = "sam_fast") -> dict:
    """The FLOPs one implementation computes for the step, as `step_flops` parts: ``"released"``:
    the padded LLM batch with logits at every position and 2N Q/W-former passes per sample;
    ``"sam_fast"``: as `config` sets it up (packed real tokens and the LM head at the supervised rows
    with ``packed_loss``, else padded with all logits; the streams recomputed with
    ``recompute_qformer``)."""
    if schedule == "released":
        return step_flops(config, shapes, "released", padded=True, lm_head="all", recompute=False)
    packed = bool(getattr(config, "packed_loss", True))
    return step_flops(config, shapes, "sam_fast", padded=not packed, lm_head="supervised" if packed else "all")


def flop_shares(config: SAMConfig, shapes: Sequence[SampleShape], schedule: str = "sam_fast",
                padded: bool = True) -> dict:
    """`step_flops` as fractions of the step's total (the four PARTS sum to 1)."""
    f = step_flops(config, shapes, schedule, padded)
    return {p: f[p] / f["total"] for p in PARTS}


def plan_table(shapes: Sequence[SampleShape] | None = None) -> str:
    """The FLOP table of one training step for the vicuna-7b config and `scaled_config` side by
    side (per schedule: the released code's and sam_fast's), on `shapes` (default: the seed-0
    realistic batch), padded LLM batch."""
    shapes = realistic_shapes(0) if shapes is None else list(shapes)
    configs = {"vicuna-7b": SAMConfig.instructblip_vicuna7b(), "scaled (/8)": scaled_config()}
    Q = 32
    lines = [
        f"One training step, {len(shapes)} samples, {sum(s.images for s in shapes)} images, "
        f"{sum(s.llm_tokens(Q) for s in shapes)} LLM tokens ({100 * padding_fraction(shapes, Q):.0f}% padding "
        f"in the padded batch); images/sample {[s.images for s in shapes]}",
        "FLOPs: 2 per multiply-add; frozen backbone: backward = input gradients only (LLM backward ~1x "
        "its forward, attention core 2x)",
    ]
    lines.append("model FLOPs (MFU's numerator): real tokens, LM head at the supervised rows, no recomputation; "
                 "hardware FLOPs: what each schedule computes")
    tables = [("model FLOPs", {name: model_flops(cfg, shapes) for name, cfg in configs.items()})]
    tables += [(f"hardware FLOPs, {schedule}", {name: hardware_flops(cfg, shapes, schedule)
                                                for name, cfg in configs.items()}) for schedule in SCHEDULES]
    for title, flops in tables:
        lines.append("")
        lines.append(title)
        head = f"{'part':<14}" + "".join(f"{name + ' GFLOP':>22}{'share':>8}" for name in configs)
        lines.append(head)
        for part in (*PARTS, "total"):
            row = f"{part:<14}"
            for name in configs:
                f = flops[name]
                row += f"{f[part] / 1e9:>22,.1f}{100 * f[part] / f['total']:>7.1f}%"
            lines.append(row)
        worst = max(abs(flops["vicuna-7b"][p] / flops["vicuna-7b"]["total"]
                        - flops["scaled (/8)"][p] / flops["scaled (/8)"]["total"]) for p in PARTS)
        lines.append(f"largest share difference: {100 * worst:.1f} points")
    return "\n".join(lines + [""] + recompute_lines(configs, shapes))


#: (label, device, dtype bytes, total memory) where `recompute_lines` shows the "auto" choice
RECOMPUTE_SCENARIOS = (("CPU fp32", "cpu", 4, None), ("80 GiB GPU bf16", "cuda", 2, 80 << 30),
                       ("40 GiB GPU bf16", "cuda", 2, 40 << 30))


def recompute_lines(configs: dict, shapes: Sequence[SampleShape]) -> list[str]:
    """What ``recompute_qformer="auto"`` chooses for each config on `shapes` in each of
    `RECOMPUTE_SCENARIOS`, and what recomputing would add to the step's FLOPs (the hardware FLOPs
    above count the CPU fp32 choice)."""
    lines = ['recompute_qformer="auto" (the Q/W-former recomputed in the backward when the activations it '
             'keeps exceed the budget: 1/16 of a GPU\'s memory, 8 GiB on a CPU):']
    for name, cfg in configs.items():
        extra = step_flops(cfg, shapes, recompute=True)["total"] - step_flops(cfg, shapes, recompute=False)["total"]
        lines.append(f"  {name} (recomputing adds {extra / 1e9:,.1f} GFLOP), activations kept without it:")
        for label, device, nbytes, memory in RECOMPUTE_SCENARIOS:
            why = recompute_choice(cfg, shapes, nbytes, device, total_memory=memory)[1]
            lines.append(f"    {label}: {why.removeprefix('auto: the Q/W-former would keep ')}")
    return lines


if __name__ == "__main__":  # pragma: no cover
    print(plan_table())
