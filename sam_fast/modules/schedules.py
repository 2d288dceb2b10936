"""The W-stream schedules of Part B: which rows the W-stream runs, how it forms the K/V of the
merged maps I-hat, and what it hands the cross-attention op, as three classes behind one
interface (`WSchedule`, a `WStream` whose instances are the W-stream of one batch):

- `SharedSchedule` (``context_mode="shared"``, the released code): one merged map per sample,
  its K/V materialised once for all layers by the re-weighting op; the rows before layer l run
  once per sample (every image of a sample sees the same I-hat there) and fan out to one row per
  image at l, each reading its sample's K/V row (the op's ``rows2``).
- `LeaveOneOutMaterialised` (``"leave_one_out"``, the paper): one merged map per guided image,
  its K/V materialised once for all layers by the re-weighting op; row j reads K/V row j.
- `LeaveOneOutInKernel` (``"leave_one_out"`` where the attention op has a fused kernel for it):
  the K/V are never materialised; the op gets the images' K/V and a mixing plan
  (`AdaptiveAdjustment.leave_one_out_mix`) and forms I-hat's K/V tiles as it reads them.

Which one runs is a property of the model (context mode, the Q-former's device, dtype, heads and
attention dropout), not of a batch: `choose_w_schedule` decides it from those alone (no tensor is
made, the op's dispatcher is not asked), and `SAM` calls it when it is built and again when it is
moved or cast, never per forward (`SAM.w_schedule`). The two leave_one_out schedules give the same
values, non-finite input included (`AdaptiveAdjustment.leave_one_out_mix` follows the re-weighting
op's column rule), so a choice made before ``SAM_FAST_BACKEND`` changed costs speed, never values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from sam_fast.modules.guidance import AdaptiveAdjustment
from sam_fast.modules.plans import ImagePlan, device_tensor
from sam_fast.modules.qformer import CrossKV, LayerKV, WStream
from sam_fast.ops.cross_attention import mixes_in_kernel


@dataclass(frozen=True, eq=False)
class WSchedule(WStream):
    """The interface of a W-stream schedule. Class-level: ``context_mode``, ``summary`` (how the
    K/V are formed, in words: ``sam-fast env``), `row_samples` (the W rows before layer l) and
    `merge` (the K/V the rows read and the schedule's own fields); `build` puts them together.
    Instance-level (`WStream`): what each layer hands the attention op."""

    context_mode: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @classmethod
    def row_samples(cls, plan: ImagePlan) -> list[int]:
        """The sample of each W row before layer l (host): one per guided image by default."""
        return [plan.image_samples[t] for t in plan.targets]

    @classmethod
    def merge(cls, plan: ImagePlan, adjustment: AdaptiveAdjustment, E: torch.Tensor, kv: CrossKV, guidance: str,
              rows: torch.Tensor, target: torch.Tensor) -> tuple[CrossKV, dict]:
        """(the K/V the W rows read, the schedule's own fields) from the images' features E
        [T, P, D] and K/V `kv` ([T, P, n_cross*2*H]); `rows` [R0] and `target` [Tw] on the device."""
        raise NotImplementedError

    @classmethod
    def build(cls, plan: ImagePlan, adjustment: AdaptiveAdjustment, E: torch.Tensor, kv: CrossKV, guidance: str,
              embed: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor) -> "WSchedule":
        """The W-stream of the batch of `plan` (guided): its input rows ``embed(rows)`` with the
        padding `bias` [B, 1, 1, Q+L] of their samples, and the K/V from `merge`."""
        dev = E.device
        rows = device_tensor(cls.row_samples(plan), dev)
        target = device_tensor(plan.targets, dev)
        w_kv, fields = cls.merge(plan, adjustment, E, kv, guidance, rows, target)
        return cls(embed(rows), bias.index_select(0, rows), w_kv, target, **fields)


def _materialised_kv(plan: ImagePlan, adjustment: AdaptiveAdjustment, E, kv: CrossKV, guidance: str,
                     keep: torch.Tensor, kept: int) -> CrossKV:
    """I-hat's K/V, merged once for all cross layers by the re-weighting op (one row per sample in
    shared mode, per image in leave_one_out), of which the rows `keep` when they are `kept` <
    all of them."""
    cu = device_tensor(plan.offsets, E.device, torch.int32)
    kv_hat = adjustment.merged_kv(E, kv.buffer, cu, plan.context_mode, guidance, offsets=plan.offsets)
    if kept < kv_hat.shape[0]:
        kv_hat = kv_hat.index_select(0, keep)
    return CrossKV(kv_hat, kv.heads, kv.hidden)


@dataclass(frozen=True, eq=False)
class SharedSchedule(WSchedule):
    """Shared mode: W rows before layer l one per sample, from l on one per guided image
    (``fan`` [Tw]: the per-sample row, and K/V row, of each)."""

    fan: torch.Tensor
    context_mode: ClassVar[str] = "shared"
    summary: ClassVar[str] = "one merged map per sample, materialised once per batch by context_reweight"
    fans_out: ClassVar[bool] = True

    @classmethod
    def row_samples(cls, plan: ImagePlan) -> list[int]:
        return sorted({plan.image_samples[t] for t in plan.targets})

    @classmethod
    def merge(cls, plan, adjustment, E, kv, guidance, rows, target):
        samples = cls.row_samples(plan)
        slot = {b: j for j, b in enumerate(samples)}
        fan = device_tensor([slot[plan.image_samples[t]] for t in plan.targets], E.device)
        return _materialised_kv(plan, adjustment, E, kv, guidance, rows, len(samples)), dict(fan=fan)

    def fan_out(self, hidden, bias):
        return hidden.index_select(0, self.fan), bias.index_select(0, self.fan)

    def layer_kv(self, k, v, c, fanned):
        k2, v2 = self.kv.layer(c)
        return LayerKV(k, v, dict(key2=k2, value2=v2, rows2=self.fan) if fanned else dict(key2=k2, value2=v2))

    def alone_kv(self, c):
        k2, v2 = self.kv.layer(c)
        return LayerKV(k2.index_select(0, self.fan), v2.index_select(0, self.fan))


@dataclass(frozen=True, eq=False)
class LeaveOneOutMaterialised(WSchedule):
    """leave_one_out with I-hat's K/V materialised once per batch: row j reads K/V row j."""

    context_mode: ClassVar[str] = "leave_one_out"
    summary: ClassVar[str] = "materialised once per batch by context_reweight"

    @classmethod
    def merge(cls, plan, adjustment, E, kv, guidance, rows, target):
        return _materialised_kv(plan, adjustment, E, kv, guidance, target, len(plan.targets)), {}


@dataclass(frozen=True, eq=False)
class LeaveOneOutInKernel(WSchedule):
    """leave_one_out with I-hat's K/V formed inside the attention kernel: `kv` holds the images'
    K/V and ``mix`` = (index [Tw, M], weight [Tw, M, P]) says how row j mixes them."""

    mix: tuple[torch.Tensor, torch.Tensor]
    context_mode: ClassVar[str] = "leave_one_out"
    summary: ClassVar[str] = "formed inside the fused attention kernel (never materialised)"

    @classmethod
    def merge(cls, plan, adjustment, E, kv, guidance, rows, target):
        return kv, dict(mix=adjustment.leave_one_out_mix(E, plan.counts, guidance))

    def layer_kv(self, k, v, c, fanned):
        k2, v2 = self.kv.layer(c)
        return LayerKV(k, v, dict(key2=k2, value2=v2, mix=self.mix))

    def alone_kv(self, c):
        k2, v2 = self.kv.layer(c)
        return LayerKV(k2[:0], v2[:0], dict(key2=k2, value2=v2, mix=self.mix))


SCHEDULES = (SharedSchedule, LeaveOneOutMaterialised, LeaveOneOutInKernel)


def choose_w_schedule(context_mode: str, heads: int, head_dim: int, device, dtype: torch.dtype,
                      dropout_p: float = 0.0) -> type[WSchedule]:
    """The W-stream schedule for `context_mode` when the Q-former's cross-attention has `heads` x
    `head_dim` in `dtype` on `device` with attention dropout `dropout_p` (0 unless training with
    it): leave_one_out mixes in the kernel where the attention op would form mixed K/V there
    (`sam_fast.ops.cross_attention.mixes_in_kernel`: device type, dtype and sizes only, no tensor
    made), else it materialises them once per batch. Shared mode has one schedule."""
    if context_mode == "shared":
        return SharedSchedule
    if context_mode != "leave_one_out":
        raise ValueError(f"choose_w_schedule: context_mode={context_mode!r} is not 'leave_one_out' or 'shared'")
    if mixes_in_kernel(heads, head_dim, dtype, device, dropout_p):
        return LeaveOneOutInKernel
    return LeaveOneOutMaterialised
