"""The whole packed training step as one graph of fixed shapes (`SAM.compile_training_step`):
features or pixels -> Q/W-former -> visual tokens placed into the packed row -> LLM -> loss,
forward and backward under one ``torch.compile(fullgraph=True, dynamic=False)``.

The eager `SAM.encode_images` shapes its Q/W-former by the batch's image counts (host lists: how
many W rows, which K/V rows each merged map reads), so a compiled copy of it would be specialised,
and recompiled, per count pattern. Here every per-sample structure is a device tensor of a size
that depends only on buckets:

- the image count T is rounded up to a multiple of ``image_bucket`` (Tb) with filler images (zero
  features or pixels) after the real ones; they belong to no sample;
- `ImageBatchPlan` holds, for the Tb rows, the sample of each (``sample_of``), which images each
  merged map I-hat reads (``context`` [Tb, Tb]: same sample, and not itself in leave_one_out
  mode) and which rows are guided (``guided`` [Tb]); built on the host from the counts;
- every row runs a W-stream row whose I-hat K/V are one dense softmax over the Tb images masked
  by ``context`` (a filler or unguided row reads zeros and its c_i is gated to 0), so the W rows
  and their K/V have Tb rows whatever the counts;
- the visual tokens reach the packed row by a gather over its N rows (``visual_index``,
  ``is_visual`` [N], from the pack plan's image rows): N is the pack plan's bucket;
- the Q-former instruction is padded to a multiple of ``text_bucket`` tokens (mask 0).

Filler images and padded instruction tokens are masked out of every softmax that a real row
takes and out of the placement, so the loss and the gradients are the eager step's (up to the
order of float sums). One compilation per (token bucket, target bucket, image bucket, text
bucket). Not the eager path: `SAM.forward` without `compile_training_step` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from sam_fast.config import CONTEXT_MODES
from sam_fast.models.packing import ATTENTION_NAME, static_planned_loss_sum, use_attention
from sam_fast.modules.plans import device_tensor
from sam_fast.modules.qformer import CrossKV, WStream, attention_bias

IMAGE_BUCKET = 8  # Tb: T rounded up to this multiple (B=8 samples of 2-5 images: 2-3 buckets)
TEXT_BUCKET = 64  # the Q-former instruction's length rounded up to this multiple
CAPTURE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // int(multiple)) * int(multiple)


@dataclass(frozen=True)
class ImageBatchPlan:
    """Where the Tb image rows of a bucketed batch go (module docstring).

    Host: ``counts`` [B] images per sample, ``num_images`` T, ``bucket_size`` Tb >= T.
    Device: ``sample_of`` [Tb] long (fillers: 0), ``context`` [Tb, Tb] bool (row i's merged map
    reads image m), ``guided`` [Tb] bool (row i gets c_i: a real image with contextual images).
    """

    counts: tuple[int, ...]
    num_images: int
    bucket_size: int
    sample_of: torch.Tensor
    context: torch.Tensor
    guided: torch.Tensor

    @classmethod
    def build(cls, counts: Sequence[int], context_mode: str, guidance: str, image_bucket: int = IMAGE_BUCKET,
              device="cpu") -> "ImageBatchPlan":
        """The plan of a batch of ``len(counts)`` samples of ``counts[b] >= 1`` images, its image
        rows rounded up to a multiple of `image_bucket`; host lists only (no device read)."""
        counts = tuple(int(n) for n in counts)
        if not counts or min(counts) < 1 or context_mode not in CONTEXT_MODES or image_bucket < 1:
            raise ValueError(f"ImageBatchPlan: counts {list(counts)[:20]} (each >= 1), context_mode="
                             f"{context_mode!r}, image_bucket={image_bucket!r} (>= 1)")
        T = sum(counts)
        Tb = round_up(T, image_bucket)
        owner = [b for b, n in enumerate(counts) for _ in range(n)] + [-1] * (Tb - T)
        own = context_mode == "shared"  # shared: the sample's map includes the image itself
        context = [[owner[i] >= 0 and owner[i] == owner[m] and (own or i != m) for m in range(Tb)]
                   for i in range(Tb)]
        guided = [guidance != "none" and any(row) for row in context]
        return cls(counts=counts, num_images=T, bucket_size=Tb,
                   sample_of=device_tensor([max(b, 0) for b in owner], device),
                   context=device_tensor(context, device, torch.bool),
                   guided=device_tensor(guided, device, torch.bool))


@dataclass(frozen=True, eq=False)
class GatedWStream(WStream):
    """A W row for every one of the Tb image rows (``target`` = 0..Tb-1, read the K/V row of the
    same index); ``gate`` [Tb] bool: c_i reaches the Q-stream only where True (guided rows)."""

    gate: torch.Tensor

    def inject_out(self, guidance_out, x, w_out):
        c = guidance_out(w_out).to(x.dtype)
        return x + torch.where(self.gate[:, None, None], c, torch.zeros_like(c))


def dense_merged_kv(adjustment, E: torch.Tensor, kv: torch.Tensor, context: torch.Tensor,
                    guidance: str) -> torch.Tensor:
    """I-hat's K/V [Tb, P, C] for every row: ``sum_m alpha[i, m, p] kv[m, p]`` with alpha the
    softmax over the images m that ``context[i]`` [Tb, Tb] allows of the scores of E [Tb, P, D]
    (`AdaptiveAdjustment.context_scores`), the images' K/V `kv` [Tb, P, C]. A row without
    context reads zeros, with no NaN in its gradient (its softmax runs over zeros, then is
    masked). Training only: a non-finite feature makes the step's loss NaN in the eager step too,
    but here it also reaches the W rows of other samples (``0 * NaN`` in the dense sum), and
    `context_reweight`'s column rule is not applied."""
    scores = adjustment.context_scores(E, guidance)  # [Tb, P] fp32
    allowed = context[:, :, None]  # [i, m, 1]
    has = context.any(1)[:, None, None]
    logits = scores[None].expand(context.shape[0], -1, -1).masked_fill(~allowed, float("-inf"))
    logits = torch.where(has, logits, torch.zeros_like(logits))
    alpha = torch.softmax(logits, dim=1) * allowed.to(scores.dtype)  # [i, m, p]
    merged = torch.einsum("imp,mpc->ipc", alpha, kv.to(scores.dtype))
    return merged.to(kv.dtype)


def with_zero_weight(tokens: torch.Tensor, modules) -> torch.Tensor:
    """`tokens` plus ``0 * sum(p)`` for every trainable parameter of `modules` (those a batch did
    not use: the guidance modules for a batch of one-image leave_one_out samples, the Adaptive
    Adjustment under ``guidance="mean"``). Values are unchanged; the parameters get a zero
    gradient instead of none, which standard DDP (``find_unused_parameters=False``) requires."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return tokens
    return tokens + sum(p.sum() for p in params).to(tokens.dtype) * 0


def encode_image_rows(model, E: torch.Tensor, q_ids: torch.Tensor, q_mask: torch.Tensor, sample_of: torch.Tensor,
                      context: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """Visual tokens [Tb, Q, llm_hidden] of the Tb image rows with features E [Tb, P, D], the
    instructions `q_ids`, `q_mask` [B, L] and an `ImageBatchPlan`'s device tensors: the Q-stream
    and a W row for every image row (`GatedWStream`), shapes set by Tb, B and L alone."""
    cfg = model.config
    B, Tb = q_ids.shape[0], E.shape[0]
    emb = model.qformer.embeddings(input_ids=q_ids, query_embeds=model.query_tokens.expand(B, -1, -1))
    mask = torch.cat([q_mask.new_ones(B, cfg.num_query_tokens), q_mask], 1)
    x = emb.index_select(0, sample_of)
    bias = attention_bias(mask, x.dtype).index_select(0, sample_of)
    kv = model.w_former.project_kv(E.to(x.dtype))
    ws, unused = None, [model.guidance_in, model.guidance_out, model.adaptive_adjustment]
    if cfg.guidance != "none":
        kv_hat = dense_merged_kv(model.adaptive_adjustment, E, kv.buffer, context, cfg.guidance)
        target = torch.arange(Tb, device=E.device)
        ws = GatedWStream(x, bias, CrossKV(kv_hat, kv.heads, kv.hidden), target, gate=guided)
        unused = [] if cfg.guidance == "adaptive" else [model.adaptive_adjustment]
    tokens = model.language_projection(model.w_former(x, bias, kv, ws))
    return with_zero_weight(tokens, unused)


def static_training_step(model, features, pixel_values, q_ids, q_mask, sample_of, context, guided, packed_ids,
                         visual_index, is_visual, position_ids, cu_seqlens, target_rows, targets):
    """(summed loss, visual tokens [Tb, Q, H]) of one packed training step, tensors in, tensors
    out: what `SAM.compile_training_step` captures (`step_inputs` makes the arguments). E from
    `features` [Tb, P, D] or the ViT on `pixel_values` [Tb, 3, H, W]; the packed row's ids
    `packed_ids` [N] (0 at image rows and filler), its image rows ``is_visual`` [N] reading
    visual token ``visual_index`` [N]; the rest is the pack plan's (`static_planned_loss_sum`).
    Call it inside ``use_attention(model.language_model)``."""
    E = features if pixel_values is None else model.vision_model(pixel_values=pixel_values).last_hidden_state
    visual = encode_image_rows(model, E, q_ids, q_mask, sample_of, context, guided)
    text = model.get_input_embeddings()(packed_ids)
    flat = visual.to(text.dtype).reshape(-1, text.shape[-1])
    embeds = torch.where(is_visual[:, None], flat.index_select(0, visual_index), text)
    loss = static_planned_loss_sum(model.language_model, embeds, position_ids, cu_seqlens, target_rows, targets)
    return loss, visual


def _pad_rows(t: torch.Tensor | None, rows: int, value=0) -> torch.Tensor | None:
    """`t` [T, ...] with zero rows appended up to `rows` (filler images)."""
    if t is None or t.shape[0] == rows:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]), value=value)


def step_inputs(model, pixel_values, image_features, q_ids, q_mask, input_ids, plan, image_bucket: int = IMAGE_BUCKET,
                text_bucket: int = TEXT_BUCKET) -> tuple[tuple, int]:
    """(the arguments of `static_training_step` after the model, T) for a checked batch and its
    pack `plan` on the batch's device. Host values only come from the plan and the shapes: no
    host read. The image rows are padded to a multiple of `image_bucket`, the instruction to a
    multiple of `text_bucket`, the ids gathered into the packed row (filler and image rows 0)."""
    cfg, dev = model.config, input_ids.device
    iplan = ImageBatchPlan.build(plan.image_counts, cfg.context_mode, cfg.guidance, image_bucket, dev)
    images = pixel_values if pixel_values is not None else image_features
    if images is None or images.shape[0] != iplan.num_images:
        got = None if images is None else tuple(images.shape)
        raise ValueError(f"the pack plan's image counts {list(iplan.counts)[:20]} sum to {iplan.num_images} but the "
                         f"images are {got}")
    Tb, L = iplan.bucket_size, q_ids.shape[1]
    q_ids = F.pad(q_ids, (0, round_up(L, text_bucket) - L))
    q_mask = F.pad(q_mask, (0, round_up(L, text_bucket) - L))  # padded instruction tokens: masked
    rows, n = plan.image_rows, plan.packed_length
    ids = input_ids.reshape(-1).index_select(0, plan.index)
    if plan.filler_tokens:
        ids = torch.cat([ids[:plan.num_tokens], ids.new_zeros(plan.filler_tokens)])
    ids = ids.index_fill(0, rows, 0)  # the placeholder id may lie outside the vocabulary
    visual_index = torch.zeros(n, dtype=torch.long, device=dev).index_copy(
        0, rows, torch.arange(rows.shape[0], device=dev))
    is_visual = torch.zeros(n, dtype=torch.bool, device=dev).index_fill(0, rows, True)
    args = (_pad_rows(image_features, Tb), _pad_rows(pixel_values, Tb), q_ids, q_mask, iplan.sample_of,
            iplan.context, iplan.guided, ids, visual_index, is_visual, plan.position_ids, plan.cu_seqlens,
            plan.target_rows, plan.targets)
    return args, iplan.num_images


def run_training_step(step, model, pixel_values, image_features, q_ids, q_mask, input_ids, plan,
                      num_items_in_batch=None, image_bucket: int = IMAGE_BUCKET, text_bucket: int = TEXT_BUCKET,
                      cuda_graphs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, visual tokens [T, Q, H]) of the batch through `step`, a compiled
    `static_training_step` (`SAM.compile_training_step`); the divisor is applied outside the graph
    (its value is no guard). `cuda_graphs`: mark a new step for CUDA graph trees first."""
    if plan.num_targets == 0:
        raise ValueError("labels have no supervised next-token position (all -100 after each sample's first token)")
    args, T = step_inputs(model, pixel_values, image_features, q_ids, q_mask, input_ids, plan, image_bucket,
                          text_bucket)
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with use_attention(model.language_model, ATTENTION_NAME):
        total, visual = step(model, *args)
    visual = visual[:T].clone() if cuda_graphs else visual[:T]  # a CUDA graph's output is overwritten next step
    return total / (plan.num_targets if num_items_in_batch is None else num_items_in_batch), visual
