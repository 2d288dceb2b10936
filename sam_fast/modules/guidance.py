"""Part B, contextual semantic generation, as modules:

- `AdaptiveAdjustment` scores every patch of every image, ``s = Linear(D -> 1)(E)``, and merges
  the contextual images of a sample patch by patch into I-hat with softmax weights over the images
  (eq. 1). It is the one place the scores are computed. The W-stream needs I-hat's cross-attention
  K/V: materialised from the images' K/V (`AdaptiveAdjustment.merged_kv`, CPU and shared mode) or,
  in leave_one_out mode on a fused attention kernel, only the weights of I-hat
  (`AdaptiveAdjustment.leave_one_out_mix`), the kernel forming I-hat's K/V tiles as it reads them.
- `GuidanceIn`, the first injection: ``w <- w + guidance_in(h_i)`` before W-former layer l.
- `GuidanceOut`, the second: ``c_i = guidance_out(w)`` after W-former layer k, added to the
  Q-stream's input to layer k.

The functions `merged_context_maps`, `merged_context_kv` and `leave_one_out_mix` are the same
computations for any ``Linear(D, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from sam_fast.modules.plans import device_tensor
from sam_fast.ops import MixPlan, context_reweight

GUIDANCE_WITH_MAPS = ("adaptive", "mean")


def _check_guidance(where: str, guidance: str) -> None:
    if guidance not in GUIDANCE_WITH_MAPS:
        raise ValueError(f"{where}: guidance={guidance!r} has no merged maps")


def _image_softmax(scores: torch.Tensor, dim: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 1's weights: the softmax of the scores over the images (axis `dim`), patch by patch;
    `keep` (broadcastable to the scores) leaves images out (leave_one_out: the image itself and
    unused slots). The one place outside `context_reweight` that writes the formula."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=dim)


def _leave_one_out_rows(counts: list[int], M: int) -> list[list[int]]:
    """Host rows of the leave_one_out mixing plan: for every image i of a sample with n > 1 images,
    the other images of the sample, then i for the unused of the M slots, then i once more."""
    rows, start = [], 0
    for n in counts:
        if n > 1:
            for i in range(start, start + n):
                others = [m for m in range(start, start + n) if m != i]
                rows.append(others + [i] * (M - len(others)) + [i])
        start += n
    return rows


class AdaptiveAdjustment(nn.Linear):
    """Adaptive Adjustment: ``Linear(D, 1)`` scoring each patch of each image (keys ``weight``
    [1, D], ``bias`` [1], as in the released checkpoints).

    ``alpha_{m,j} = softmax_m(s_{m,j})`` over the contextual images m of a sample, per patch j,
    and ``I-hat_j = sum_m alpha_{m,j} E_m[j]``. ``guidance="mean"`` uses uniform weights instead.
    """

    def __init__(self, in_features: int, **kwargs):
        super().__init__(in_features, 1, **kwargs)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """s [..., P] for features E [..., P, D], in fp32 (fp64 for fp64 features)."""
        acc = torch.promote_types(features.dtype, torch.float32)
        # The weight is copied into fresh (allocator-aligned) memory: a memory-mapped checkpoint can
        # leave it misaligned, and the vectorised product then rounds differently (bitwise-equal
        # outputs for equal weights are tested).
        w = self.weight.reshape(-1).to(acc).clone()
        return features.to(acc) @ w + self.bias.to(acc)

    def context_scores(self, features: torch.Tensor, guidance: str) -> torch.Tensor:
        """The scores [..., P] that `context_reweight` merges with: `scores` for ``"adaptive"``;
        zeros (uniform weights) for ``"mean"``, NaN where a patch's features are not finite, so that
        a non-finite feature makes its column NaN in both guidances (``Linear(E)`` is NaN there)."""
        if guidance == "adaptive":
            return self.scores(features)
        acc = torch.promote_types(features.dtype, torch.float32)
        with torch.no_grad():
            finite = torch.isfinite(features).all(-1)
        return torch.where(finite, 0.0, float("nan")).to(acc)

    def weights(self, features: torch.Tensor, guidance: str = "adaptive") -> torch.Tensor:
        """alpha [M, P]: the weights of the M images of one merged map (features [M, P, D]),
        softmax over the images per patch (uniform for ``guidance="mean"``)."""
        _check_guidance("AdaptiveAdjustment.weights", guidance)
        if guidance == "mean":  # equal scores (not `context_scores`: these weights ignore non-finite features)
            acc = torch.promote_types(features.dtype, torch.float32)
            return _image_softmax(features.new_zeros(features.shape[:2], dtype=acc), dim=0)
        return _image_softmax(self.scores(features), dim=0)

    def merged_maps(self, features: torch.Tensor, cu_images: torch.Tensor, context_mode: str,
                    guidance: str) -> torch.Tensor:
        """I-hat for every image (leave_one_out, [T, P, D]) or every sample (shared, [B, P, D]) of
        the features E [T, P, D] of a ragged batch (``cu_images`` [B+1] its offsets)."""
        _check_guidance("AdaptiveAdjustment.merged_maps", guidance)
        return context_reweight(features, self.context_scores(features, guidance), cu_images, context_mode)

    def merged_kv(self, features: torch.Tensor, kv: torch.Tensor, cu_images: torch.Tensor,
                  context_mode: str, guidance: str, offsets: list[int] | None = None) -> torch.Tensor:
        """The cross-attention K/V of I-hat, [T, P, C] (leave_one_out) or [B, P, C] (shared),
        from the K/V `kv` [T, P, C] of the images whose features are E [T, P, D]: the images' K/V
        re-weighted with the softmax of the scores ``s = Linear(E)`` (`context_reweight`; the
        gradient reaches s, hence this Linear). `offsets`: host copy of cu_images (see
        `context_reweight`).

        Exact, not an approximation: K/V are affine in E (``K = E W_k^T + b_k``) and the weights
        ``alpha_{m,j}`` of a merged map sum to 1 over m, so ``sum_m alpha_{m,j} K_m[j] =
        (sum_m alpha_{m,j} E_m[j]) W_k^T + b_k``, the K of I-hat. (A one-image leave_one_out sample
        has no weights and a zero map; it gets no W-stream row, so that row is unused.) Merging
        the K/V instead of the features saves projecting every I-hat (one more
        ``[P, D] x [D, n_cross*2*H]`` GEMM per merged map) for a weighted sum over a wider row;
        ``bench_merge_kv_vs_features`` in `bench/models/bench_encode_images.py` measures both.
        """
        _check_guidance("AdaptiveAdjustment.merged_kv", guidance)
        if tuple(kv.shape[:2]) != tuple(features.shape[:2]):
            raise ValueError(f"AdaptiveAdjustment.merged_kv: K/V {tuple(kv.shape)} and features "
                             f"{tuple(features.shape)} "
                             "differ in images or patches")
        return context_reweight(kv, self.context_scores(features, guidance), cu_images, context_mode,
                                offsets=offsets)

    def leave_one_out_mix(self, features: torch.Tensor, counts: list[int],
                          guidance: str) -> MixPlan:
        """The leave_one_out I-hat of every image that has contextual images, as a mixing plan over
        the images: ``MixPlan(index [Tw, M], weight [Tw, M, P])`` with M = max(counts) - 1 and Tw the images
        of the samples with more than one image, in image order. Row j (image i of sample b) lists
        the other images m of b in order and ``weight[j, s, p] = softmax_{m != i}(s_m[p])``
        (``guidance="adaptive"``) or ``1 / (n_b - 1)`` (``"mean"``); unused slots point at image i
        with weight 0. So ``I-hat_i[p] = sum_s weight[j, s, p] E_{index[j, s]}[p]``
        (`sam_fast.ops.mix_kv`), and, as in `merged_kv`, the same weights applied to the images'
        K/V give I-hat's K/V.

        Non-finite input follows `context_reweight`'s column rule, so that the K/V mixed from this
        plan equal `merged_kv`'s on every input: where the scores of any image of sample b at patch
        p are not finite (`context_scores`: ``Linear(E)``, or NaN where a feature is not finite
        under ``"mean"``), every row of b gets NaN weights at p, the row of that image itself
        included although its own softmax leaves the image out. The op's rule is the documented one
        (README, Safety), and an image with non-finite features gives non-finite tokens through its
        own Q-stream in any case; a finite W row for it would hide nothing.

        The index is built on the host from `counts` (no device sync); the weights are in fp32
        (fp64 for fp64 features), differentiable with respect to this Linear.
        """
        _check_guidance("AdaptiveAdjustment.leave_one_out_mix", guidance)
        T, P, _ = features.shape
        if sum(counts) != T or min(counts, default=1) < 1:
            raise ValueError(f"AdaptiveAdjustment.leave_one_out_mix: image counts {str(counts)[:80]} do not describe "
                             f"the {T} images of features")
        M = max(counts) - 1
        dev = features.device
        acc = torch.promote_types(features.dtype, torch.float32)
        rows = _leave_one_out_rows(counts, M)
        if not rows:
            return MixPlan(torch.zeros(0, max(M, 1), dtype=torch.long, device=dev),
                           torch.zeros(0, max(M, 1), P, dtype=acc, device=dev))
        plan_rows = device_tensor(rows, dev)  # [Tw, M + 1]: the slots' images, then the image itself
        slot_images, own_image = plan_rows[:, :M], plan_rows[:, M:]
        live_slots = (slot_images != own_image)[:, :, None]  # unused slots point at the image itself
        # the scores of the sample's images, the row's own included: its column's finiteness. Under
        # "mean" they are zeros (NaN where not finite), so the softmax gives the uniform weights.
        sample_scores = self.context_scores(features, guidance).index_select(0, plan_rows.reshape(-1))
        sample_scores = sample_scores.view(-1, M + 1, P)
        with torch.no_grad():
            poison = torch.where(torch.isfinite(sample_scores).all(1), 0.0, float("nan")).to(acc)[:, None, :]
        return MixPlan(slot_images, _image_softmax(sample_scores[:, :M], dim=1, keep=live_slots) + poison)

    @classmethod
    def of(cls, linear: nn.Linear) -> "AdaptiveAdjustment":
        """`linear` itself when it is one, else an AdaptiveAdjustment sharing its weight and bias
        (gradients reach `linear`'s parameters)."""
        if isinstance(linear, cls):
            return linear
        if linear.out_features != 1:
            raise ValueError(f"AdaptiveAdjustment: need a Linear(D, 1), got out_features={linear.out_features}")
        view = cls.__new__(cls)
        nn.Module.__init__(view)
        view.in_features, view.out_features = linear.in_features, 1
        view.weight, view.bias = linear.weight, linear.bias
        return view


class GuidanceIn(nn.Linear):
    """The first injection, H -> H (zero-initialised by the model): before W-former layer l the
    W-stream gets the initial visual tokens h_i of its image, ``w <- w + guidance_in(h_i)``."""

    def inject(self, w: torch.Tensor, h_i: torch.Tensor) -> torch.Tensor:
        """``w + guidance_in(h_i)``, both [R, Q+L, H]."""
        return w + self(h_i)


class GuidanceOut(nn.Linear):
    """The second injection, H -> H (zero-initialised by the model): after W-former layer k the
    contextual semantics ``c_i = guidance_out(w)`` are added to the Q-stream's input to layer k."""

    def inject(self, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [T, Q+L, H] with ``c_i = guidance_out(w[j])`` added to row ``target[j]`` (w [Tw, Q+L, H])."""
        return x.index_add(0, target, self(w).to(x.dtype))  # (autocast: c_i may be half precision)


def merged_context_maps(features, adaptive_adjustment: nn.Linear, cu_images, context_mode: str,
                        guidance: str) -> torch.Tensor:
    """`AdaptiveAdjustment.merged_maps` for any ``Linear(D, 1)``."""
    return AdaptiveAdjustment.of(adaptive_adjustment).merged_maps(features, cu_images, context_mode, guidance)


def merged_context_kv(features, kv, adaptive_adjustment: nn.Linear, cu_images, context_mode: str,
                      guidance: str, offsets: list[int] | None = None) -> torch.Tensor:
    """`AdaptiveAdjustment.merged_kv` for any ``Linear(D, 1)``."""
    return AdaptiveAdjustment.of(adaptive_adjustment).merged_kv(features, kv, cu_images, context_mode, guidance,
                                                                offsets)


def leave_one_out_mix(features, adaptive_adjustment: nn.Linear, counts: list[int],
                      guidance: str) -> MixPlan:
    """`AdaptiveAdjustment.leave_one_out_mix` for any ``Linear(D, 1)``."""
    return AdaptiveAdjustment.of(adaptive_adjustment).leave_one_out_mix(features, counts, guidance)
