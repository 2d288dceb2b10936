"""The W-stream schedules (`sam_fast.modules.schedules`): the rows each one runs and the K/V it
hands the attention op; the decision, made from device type, dtype and sizes without a tensor; the
two leave_one_out schedules equal, on finite and on non-finite features."""

import importlib

import pytest
import torch
from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam
from torch.overrides import TorchFunctionMode

from sam_fast.modules import (
    ImagePlan,
    LeaveOneOutInKernel,
    LeaveOneOutMaterialised,
    SharedSchedule,
    attention_bias,
    choose_w_schedule,
)
from sam_fast.ops import mix_kv

ca = importlib.import_module("sam_fast.ops.cross_attention")
COUNTS = [3, 1, 2]
TRITON = ca._triton_import_error() is None


def _build(schedule, guidance="adaptive", counts=COUNTS, feats=None):
    """(model, W-stream of `schedule`) for a random batch of `counts` through a tiny SAM."""
    model = randomize_guidance(tiny_sam(context_mode=schedule.context_mode, guidance=guidance))
    f, ids, mask = ragged_batch(model, counts)
    f = f if feats is None else feats
    plan = ImagePlan.build(counts, schedule.context_mode, guidance, "cpu")
    embed, full_mask = model._instruction_embeddings(ids, mask)
    kv = model.w_former.project_kv(f)
    ws = schedule.build(plan, model.adaptive_adjustment, f, kv, guidance, embed, attention_bias(full_mask, f.dtype))
    return model, ws, kv


@torch.no_grad()
def test_shared_schedule_runs_once_per_sample_then_fans_out():
    _, ws, kv = _build(SharedSchedule)
    assert ws.hidden.shape[0] == ws.self_bias.shape[0] == 3  # one row per sample before layer l
    assert ws.fan.tolist() == [0, 0, 0, 1, 2, 2] and ws.target.tolist() == [0, 1, 2, 3, 4, 5]
    assert ws.kv.buffer.shape[0] == 3  # one merged map per sample
    h, b = ws.fan_out(ws.hidden, ws.self_bias)
    assert torch.equal(h, ws.hidden[[0, 0, 0, 1, 2, 2]]) and torch.equal(b, ws.self_bias[[0, 0, 0, 1, 2, 2]])
    k, v = kv.layer(0)
    assert set(ws.layer_kv(k, v, 0, fanned=False).second) == {"key2", "value2"}
    assert torch.equal(ws.layer_kv(k, v, 0, fanned=True).second["rows2"], ws.fan)
    assert ws.alone_kv(0).k.shape[0] == 6 and not ws.alone_kv(0).second


@torch.no_grad()
@pytest.mark.parametrize("schedule", [LeaveOneOutMaterialised, LeaveOneOutInKernel])
def test_leave_one_out_schedules_run_one_row_per_guided_image(schedule):
    _, ws, kv = _build(schedule)
    assert ws.hidden.shape[0] == 5 and ws.target.tolist() == [0, 1, 2, 4, 5]  # not the one-image sample
    k, v = kv.layer(1)
    second = ws.layer_kv(k, v, 1, fanned=True).second
    if schedule is LeaveOneOutMaterialised:
        assert ws.kv.buffer.shape[0] == 5 and set(second) == {"key2", "value2"}  # the unused merged map dropped
        assert ws.alone_kv(1).k.shape[0] == 5
    else:
        assert ws.kv is kv and set(second) == {"key2", "value2", "mix"}  # the images' own K/V and a plan
        assert ws.mix[0].tolist() == [[1, 2], [0, 2], [0, 1], [5, 4], [4, 5]]  # unused slots: the image itself
        alone = ws.alone_kv(1)
        assert alone.k.shape[0] == 0 and alone.second["mix"] is ws.mix


def _effective_kv(ws, c):
    """[Tw, heads, P, d] K and V the W rows of `ws` read in cross layer c (a mixing plan applied)."""
    k2, v2 = ws.kv.layer(c)
    return mix_kv(k2, v2, ws.mix) if isinstance(ws, LeaveOneOutInKernel) else (k2, v2)


@torch.no_grad()
@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_leave_one_out_schedules_agree_on_finite_and_non_finite_features(guidance):
    """The K/V the W rows read: equal between the two leave_one_out schedules, and on non-finite
    features the same NaN pattern, the re-weighting op's column rule: every image of the sample
    NaN at that patch, the image holding the NaN (image 1) or the inf (image 4) included."""
    model = tiny_sam(guidance=guidance)
    f = ragged_batch(model, COUNTS)[0]
    f[1, 2, 3] = float("nan")  # sample 0, patch 2
    f[4, 0, 1] = float("inf")  # sample 2, patch 0
    got = [_effective_kv(_build(s, guidance, feats=f)[1], 1) for s in (LeaveOneOutMaterialised, LeaveOneOutInKernel)]
    for a, b in zip(*got):  # K, then V: [Tw=5, heads, P, d]
        bad = ~torch.isfinite(a).all(-1).all(1)  # [5, P]
        want = torch.zeros(5, f.shape[1], dtype=torch.bool)
        want[:3, 2] = True  # the rows of sample 0's images at patch 2
        want[3:, 0] = True  # the rows of sample 2's images at patch 0
        assert torch.equal(bad, want), bad
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-5, atol=1e-6)


def test_choose_w_schedule_from_device_dtype_and_sizes(monkeypatch):
    monkeypatch.delenv("SAM_FAST_BACKEND", raising=False)
    assert choose_w_schedule("shared", 12, 64, "cpu", torch.float32) is SharedSchedule
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: False)
    assert choose_w_schedule("leave_one_out", 12, 64, "cpu", torch.float32) is LeaveOneOutMaterialised
    assert choose_w_schedule("leave_one_out", 12, 64, "meta", torch.float32) is LeaveOneOutMaterialised
    with pytest.raises(ValueError, match="'both'"):
        choose_w_schedule("both", 12, 64, "cpu", torch.float32)
    if not TRITON:
        pytest.skip("triton kernels not importable here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)
    assert choose_w_schedule("leave_one_out", 12, 64, "cpu", torch.float32) is LeaveOneOutInKernel
    assert choose_w_schedule("leave_one_out", 12, 64, "cuda", torch.bfloat16) is LeaveOneOutInKernel
    assert choose_w_schedule("shared", 12, 64, "cuda", torch.bfloat16) is SharedSchedule
    # what the kernel cannot run: fp64, a head dim not a multiple of 8, attention dropout
    assert choose_w_schedule("leave_one_out", 12, 64, "cpu", torch.float64) is LeaveOneOutMaterialised
    assert choose_w_schedule("leave_one_out", 12, 12, "cuda", torch.float16) is LeaveOneOutMaterialised
    assert choose_w_schedule("leave_one_out", 12, 64, "cuda", torch.float16, 0.1) is LeaveOneOutMaterialised
    monkeypatch.setenv("SAM_FAST_BACKEND", "reference")  # the op would materialise per layer: merge once instead
    assert choose_w_schedule("leave_one_out", 12, 64, "cuda", torch.float16) is LeaveOneOutMaterialised


class _AnyTorchCall(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("allowed", [False, True])
def test_the_decision_makes_no_tensor(monkeypatch, allowed):
    """No probe: choosing calls no torch function at all (no tensor made, the dispatcher not run)."""
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: allowed)
    with _AnyTorchCall() as mode:
        for dev, dtype in (("cpu", torch.float32), ("cuda", torch.float16), ("cpu", torch.float64)):
            choose_w_schedule("leave_one_out", 12, 64, dev, dtype)
    assert mode.calls == []
