"""The batched Q/W-former of `SAM.encode_images` against the per-image reference model:
a 12-layer tiny Q-former with the interaction layers of the paper's Fig. 5 grid, mixed image
counts 1..6, both context modes, every guidance mode, gradients of the trainable modules; the
W-stream dedup of shared mode; the released code's schedule; the fused Triton attention through
the whole model (under the interpreter on CPU)."""

import copy
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam

from sam_fast import SAMConfig
from sam_fast.reference import reference_encode_images, released_schedule_encode_images

qformer_mod = importlib.import_module("sam_fast.modules.qformer")
ca = importlib.import_module("sam_fast.ops.cross_attention")

COUNTS = [3, 1, 6, 2, 5, 4]  # every count from 1 to 6, ragged order


def tiny12(**kw):
    """Tiny SAM whose Q-former has 12 layers (cross-attention in 0, 2, ..., 10), like BERT-base."""
    q = SAMConfig.tiny().qformer_config.to_dict()
    q["num_hidden_layers"] = 12
    return randomize_guidance(tiny_sam(qformer_config=q, **kw))


def _encode(model, feats, counts, ids, mask):
    return model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids,
                               qformer_attention_mask=mask)


def _check_equal_with_grads(model, counts, pad_sample=2, device="cpu"):
    """encode_images against the per-image reference on `device` (the model is moved there):
    values within 1e-5 and the trainable parameters' gradients."""
    model = model.to(device)
    feats, ids, mask = (t.to(device) for t in ragged_batch(model, counts, pad_sample=pad_sample))
    ours = _encode(model, feats, counts, ids, mask)
    ref = reference_encode_images(model, feats, counts, ids, mask)
    assert (ours - ref).abs().max().item() <= 1e-5
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn_like(ours)
    got = torch.autograd.grad(ours, params, g, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return ours, ref


GRID = [(layers, mode, "adaptive") for layers in [(3, 6), (6, 12), (12, 12)] for mode in ["leave_one_out", "shared"]]
GRID += [((6, 12), mode, "mean") for mode in ["leave_one_out", "shared"]]  # uniform weights: one pair is enough


@pytest.mark.parametrize("layers, context_mode, guidance", GRID)
def test_twelve_layers_interaction_grid_equals_reference(layers, context_mode, guidance):
    model = tiny12(context_mode=context_mode, guidance=guidance, interaction_layers=layers)
    ours, ref = _check_equal_with_grads(model, COUNTS)
    if guidance == "adaptive":  # the guidance is active: multi-image tokens differ from InstructBLIP's
        plain = tiny12(context_mode=context_mode, guidance="none", interaction_layers=layers)
        feats, ids, mask = ragged_batch(model, COUNTS, pad_sample=2)
        with torch.no_grad():
            base = _encode(plain, feats, COUNTS, ids, mask)
        assert (ours.detach() - base).abs().amax(dim=(1, 2))[torch.tensor(COUNTS).repeat_interleave(
            torch.tensor(COUNTS)) > 1].min() > 1e-4


def test_twelve_layers_no_guidance_equals_reference():
    model = tiny12(guidance="none")
    feats, ids, mask = ragged_batch(model, COUNTS)
    with torch.no_grad():
        assert (_encode(model, feats, COUNTS, ids, mask) - reference_encode_images(model, feats, COUNTS, ids, mask)
                ).abs().max().item() <= 1e-5


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_released_schedule_equals_reference(context_mode):
    model = tiny12(context_mode=context_mode, interaction_layers=(3, 6))
    feats, ids, mask = ragged_batch(model, COUNTS, pad_sample=0)
    with torch.no_grad():
        a = released_schedule_encode_images(model, feats, COUNTS, ids, mask)
        b = reference_encode_images(model, feats, COUNTS, ids, mask)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("context_mode, layers, rows_before_l", [
    ("shared", (12, 12), 5 + 2),  # T Q rows + one W row per sample
    ("shared", (3, 6), 5 + 2),
    ("leave_one_out", (12, 12), 5 + 5),  # T Q rows + one W row per image
])
def test_shared_mode_runs_w_stream_once_per_sample_before_l(monkeypatch, context_mode, layers, rows_before_l):
    model = tiny12(context_mode=context_mode, interaction_layers=layers)
    counts = [2, 3]
    seen = []
    real = qformer_mod.qformer_layer

    def spy(layer, hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return real(layer, hidden, *args, **kwargs)

    monkeypatch.setattr(qformer_mod, "qformer_layer", spy)
    feats, ids, mask = ragged_batch(model, counts)
    with torch.no_grad():
        ours = _encode(model, feats, counts, ids, mask)
        ref = reference_encode_images(model, feats, counts, ids, mask)
    assert (ours - ref).abs().max().item() <= 1e-5
    l, k = layers
    assert seen[: l - 1] == [rows_before_l] * (l - 1)
    assert seen[l - 1: k - 1] == [5 + 5] * (k - l)  # per image from layer l on
    assert seen[k - 1: k + 1] == [5, 5]  # layer k: W-stream, then Q-stream
    assert len(seen) == 12 + 1


@pytest.mark.parametrize("mode", ["leave_one_out", "shared"])
def test_one_image_samples_take_a_w_stream_in_shared_mode_only(monkeypatch, mode):
    """leave_one_out (paper): no contextual image, no W-stream. shared (released code): the
    W-stream runs over the sample's own image, one row per sample, batched with the Q-stream."""
    model = tiny12(context_mode=mode)
    seen = []
    real = qformer_mod.qformer_layer
    monkeypatch.setattr(qformer_mod, "qformer_layer", lambda layer, h, *a, **k: seen.append(h.shape[0]) or real(layer, h, *a, **k))
    feats, ids, mask = ragged_batch(model, [1, 1, 1])
    with torch.no_grad():
        ours = _encode(model, feats, [1, 1, 1], ids, mask)
        ref = reference_encode_images(model, feats, [1, 1, 1], ids, mask)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert seen == ([3] * 12 if mode == "leave_one_out" else [3 + 3] * 11 + [3, 3])


needs_triton = pytest.mark.skipif(ca._triton_import_error() is not None or not (
    torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
    reason="triton missing, or no CUDA and no interpreter")


@needs_triton
@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_fused_attention_through_the_model_with_gradients(monkeypatch, context_mode):
    """Every attention of encode_images on the Triton kernel (on the GPU where there is one, else
    the interpreter on CPU): values and the gradients of the trainable modules, the Adaptive
    Adjustment's included (its gradient reaches the scores through the W-stream's K/V), equal the
    reference's. (CPU tensors on a CUDA machine, where TRITON_INTERPRET is unset, would take SDPA.)"""
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)
    calls = []
    for dispatch, tag in ((ca._dispatch, "attention"), (ca._streams, "streams")):
        backend = next(b for b in dispatch.backends if b.name == "triton")
        monkeypatch.setattr(backend, "impl", lambda *a, _real=backend.impl, _tag=tag, **k: calls.append(_tag) or _real(*a, **k))
    # recompute_qformer=False: the calls below are counted once (recomputation would run them again)
    model = randomize_guidance(tiny_sam(context_mode=context_mode, interaction_layers=(1, 3), recompute_qformer=False))
    _check_equal_with_grads(model, [1, 3], pad_sample=1, device="cuda" if torch.cuda.is_available() else "cpu")
    # self-attention: layers 1, 2, 4 and layer 3 (= k) twice; cross-attention: layer 1 both
    # streams in one call, layer 3 the W-stream then the Q-stream
    assert calls.count("attention") == 5 and calls.count("streams") == 3


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_autocast_runs_and_trains_the_adaptive_adjustment(context_mode):
    """Under CPU autocast (bf16) the projections run in half precision: the guidance and the
    padding bias meet fp32 states; values stay near the fp32 reference and gradients flow."""
    model = randomize_guidance(tiny_sam(context_mode=context_mode, interaction_layers=(1, 3)))
    counts = [1, 3, 2]
    feats, ids, mask = ragged_batch(model, counts, pad_sample=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _encode(model, feats, counts, ids, mask)
    out.float().sum().backward()
    with torch.no_grad():
        ref = reference_encode_images(model, feats, counts, ids, mask)
    assert (out.float() - ref).abs().max().item() <= 2e-2
    assert model.adaptive_adjustment.weight.grad.abs().sum() > 0


guidance_mod = importlib.import_module("sam_fast.modules.guidance")
sam_mod = importlib.import_module("sam_fast.models.sam")


@needs_triton
@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_leave_one_out_k_v_formed_in_the_kernel_not_materialised(monkeypatch, guidance):
    """leave_one_out on the fused kernel: the merged K/V are never materialised (the
    re-weighting of the K/V buffer is not called; the kernel gets the images' K/V and a mixing
    plan), and values and trainable gradients equal the reference model's, on ragged counts
    (1, 3, 2: padded mixing slots) with the interaction at (2, 4)."""
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: True)

    def refuse(*a, **k):
        raise AssertionError("merged K/V materialised on the fused leave_one_out path")

    monkeypatch.setattr(guidance_mod.AdaptiveAdjustment, "merged_kv", refuse)
    plans = []
    real_streams = ca.cross_attention_streams_triton
    monkeypatch.setattr(next(b for b in ca._streams.backends if b.name == "triton"), "impl",
                        lambda *a, **k: plans.append(k.get("mix") is not None) or real_streams(*a, **k))
    model = randomize_guidance(tiny_sam(context_mode="leave_one_out", guidance=guidance, interaction_layers=(2, 4)))
    _check_equal_with_grads(model, [1, 3, 2], pad_sample=0)
    assert plans and all(plans)  # every cross-attention call of the W-stream used the mixing plan


@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_leave_one_out_mix_equals_the_re_weighting_op(guidance):
    """The mixing plan applied to the features is the leave_one_out I-hat of `context_reweight`
    (float64), for the images that have contextual images; the adaptive weights' gradient
    reaches the Adaptive Adjustment Linear."""
    from sam_fast.ops import context_reweight_ref, mix_kv

    torch.manual_seed(0)
    counts = [3, 1, 4, 2]
    E = torch.randn(sum(counts), 7, 12, dtype=torch.float64)
    lin = torch.nn.Linear(12, 1).double()
    index, weight = guidance_mod.leave_one_out_mix(E, lin, counts, guidance)
    assert index.shape == (9, 3) and weight.shape == (9, 3, 7)
    got, _ = mix_kv(E[:, None], E[:, None], (index, weight))
    cu = torch.tensor([0, 3, 4, 8, 10])
    scores = E @ lin.weight[0] + lin.bias if guidance == "adaptive" else torch.zeros(E.shape[:2], dtype=E.dtype)
    want = context_reweight_ref(E, scores, cu, "leave_one_out")
    ctx = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9])
    torch.testing.assert_close(got[:, 0], want[ctx], rtol=1e-12, atol=1e-12)
    if guidance == "adaptive":
        (g,) = torch.autograd.grad((got[:, 0] * torch.randn_like(got[:, 0])).sum(), lin.weight)
        assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="image counts"):
        guidance_mod.leave_one_out_mix(E, lin, [3, 1], guidance)


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_encode_images_reads_no_device_values_on_the_host(monkeypatch, context_mode):
    """encode_images builds its index plans from the (host) image counts and never reads a
    tensor's values back (`tolist`, `item`, `bool()`, `int()`, ...): on a GPU each such read is a
    sync that stalls the host's kernel launches. Checked on CPU by making those reads raise."""
    model = tiny12(context_mode=context_mode, interaction_layers=(3, 6))
    feats, ids, mask = ragged_batch(model, COUNTS, pad_sample=2)

    def no_read(self, *a, **k):
        raise AssertionError("a tensor's values were read on the host")

    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    with torch.no_grad():
        out = _encode(model, feats, COUNTS, ids, mask)
    monkeypatch.undo()
    assert out.shape[0] == sum(COUNTS)
    with pytest.raises(AssertionError, match="read on the host"):  # the trap works
        monkeypatch.setattr(torch.Tensor, "tolist", no_read)
        torch.tensor([1]).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs exist only on CUDA")
@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_encode_images_has_no_device_sync_on_cuda(context_mode):
    model = tiny12(context_mode=context_mode, interaction_layers=(3, 6)).cuda().eval()
    feats, ids, mask = (t.cuda() for t in ragged_batch(model, COUNTS, pad_sample=2))
    _encode(model, feats, COUNTS, ids, mask)  # warm-up: kernel compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            _encode(model, feats, COUNTS, ids, mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of fn() (parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("setting", [True, "auto"])
@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_recomputed_streams_give_the_same_step_and_keep_less(context_mode, setting):
    """recompute_qformer (True, or "auto" over its budget): the two streams' activations are not kept
    for the backward but recomputed there. Same visual tokens and the same gradients of every
    trainable parameter, bit for bit, as keeping them; autograd keeps less than a third of the bytes."""
    counts = [1, 3, 2]
    kept = randomize_guidance(tiny12(context_mode=context_mode, recompute_qformer=False))
    again = copy.deepcopy(kept)
    again.config.recompute_qformer, again.config.recompute_budget_bytes = setting, 0
    kept.train(), again.train()
    feats, ids, mask = ragged_batch(kept, counts)
    results = []
    for model in (kept, again):
        out, nbytes = _saved_bytes(lambda m=model: _encode(m, feats, counts, ids, mask))
        params = [p for p in model.parameters() if p.requires_grad]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(out, params, g, allow_unused=True, materialize_grads=True)
        results.append((out.detach(), grads, nbytes))
    (o1, g1, b1), (o2, g2, b2) = results
    assert torch.equal(o1, o2)
    assert len(g1) >= 4 and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert any(a.abs().sum() > 0 for a in g1)
    assert b2 < b1 / 3, (b2, b1)
    with torch.no_grad():  # nothing to recompute without a gradient
        assert _saved_bytes(lambda: _encode(again, feats, counts, ids, mask))[1] == 0


def _w_former_calls(model, counts=(1, 3, 2)) -> int:
    """How often one training step of `model` runs the Q/W-former: 1 kept, 2 recomputed in the backward."""
    feats, ids, mask = ragged_batch(model, counts)
    calls, forward = [], model.w_former.forward

    def counted(*args, **kwargs):  # module hooks do not fire in checkpoint's recomputation
        calls.append(1)
        return forward(*args, **kwargs)

    model.w_former.forward = counted
    try:
        _encode(model.train(), feats, list(counts), ids, mask).sum().backward()
    finally:
        del model.w_former.forward
    return len(calls)


def test_auto_recompute_is_decided_once_from_the_first_training_batch():
    """recompute_qformer="auto" (default): the tiny model's streams keep a few hundred KB, within the
    CPU budget: kept (one Q/W-former call per step); a zero budget recomputes (two calls); the choice
    and its reason are kept on the model and not revisited when the budget changes; True / False
    are honoured; no choice is made without a gradient."""
    model = tiny12()
    with torch.no_grad():
        _encode(model, *(lambda f, i, m: (f, [1, 3, 2], i, m))(*ragged_batch(model, [1, 3, 2])))
    assert model.recompute_qformer_choice is None  # eval forward: nothing to decide
    assert _w_former_calls(model) == 1
    on, why = model.recompute_qformer_choice
    assert on is False and why.startswith("auto: ") and "6 images" in why and "CPU budget" in why and "kept" in why
    model.config.recompute_budget_bytes = 0
    assert _w_former_calls(model) == 1  # decided once
    fresh = tiny12(recompute_budget_bytes=0)
    assert _w_former_calls(fresh) == 2 and fresh.recompute_qformer_choice[0] is True
    assert "recomputed in the backward" in fresh.recompute_qformer_choice[1]
    assert _w_former_calls(tiny12(recompute_qformer=True)) == 2
    assert _w_former_calls(tiny12(recompute_qformer=False, recompute_budget_bytes=0)) == 1


@pytest.mark.parametrize("kw", [{}, dict(context_mode="shared"), dict(guidance="mean"),
                                dict(interaction_layers=(6, 9))])
def test_activation_estimate_is_near_what_autograd_keeps(kw):
    """`qformer_activation_bytes` (what "auto" weighs against its budget) against the bytes autograd
    really keeps for the Q/W-former's backward: never under them, at most 2.5x over (the estimate
    counts one W row per image, shared mode has one per sample before layer l)."""
    from sam_fast.config import qformer_activation_bytes

    model = tiny12(recompute_qformer=False, **kw).train()
    counts = [2, 3, 4]
    feats, ids, mask = ragged_batch(model, counts, text_len=20)
    _, measured = _saved_bytes(lambda: _encode(model, feats, counts, ids, mask))
    est = qformer_activation_bytes(model.config, sum(counts), ids.shape[1], 4)
    assert measured <= est <= 2.5 * measured, (est, measured)


# -- the W-stream schedules (sam_fast.modules.schedules) ------------------------------------------

schedules_mod = importlib.import_module("sam_fast.modules.schedules")
GOLDEN = Path(__file__).resolve().parents[1] / "golden"  # the recorded tokens and their script
sys.path.insert(0, str(GOLDEN))
import encode_images_schedules_oracle as oracle  # noqa: E402

RECORDED = json.loads((GOLDEN / "encode_images_schedules.json").read_text())
CAN_TRITON = ca._triton_import_error() is None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
S = schedules_mod


def _forced(schedule, monkeypatch, kernel: bool, **kw):
    """The oracle's tiny SAM with `schedule` forced; `kernel`: the fused kernel allowed on CPU
    tensors (under the interpreter). The other schedules' merge refuses to run."""
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: kernel)
    model = randomize_guidance(tiny_sam(context_mode=schedule.context_mode, interaction_layers=(1, 3), **kw)) \
        if kw else oracle.model_for(schedule.context_mode)
    model.w_schedule = schedule
    for other in {S.LeaveOneOutMaterialised, S.LeaveOneOutInKernel} - {schedule}:
        monkeypatch.setattr(other, "merge", classmethod(lambda *a, _o=other: pytest.fail(f"{_o.__name__} ran")))
    return model


# (schedule, the recorded path whose tokens it gives, kernel allowed on CPU tensors, tolerance)
RECORDED_CASES = [
    (S.SharedSchedule, "shared", False, 1e-6),
    (S.LeaveOneOutMaterialised, "leave_one_out", False, 1e-6),
    (S.LeaveOneOutInKernel, "leave_one_out-kernel", True, 1e-6),
    # the mixing plan on the op's reference backend (mix_kv then SDPA, per layer): the materialised tokens
    (S.LeaveOneOutInKernel, "leave_one_out", False, 1e-5),
]


@pytest.mark.parametrize("schedule, path, kernel, atol", RECORDED_CASES,
                         ids=[f"{c[0].__name__}-{c[1]}" for c in RECORDED_CASES])
def test_every_schedule_gives_the_recorded_tokens(monkeypatch, schedule, path, kernel, atol):
    """Each schedule forced gives the tokens the code gave before the schedules were classes
    (tests/golden/encode_images_schedules.json; bitwise on the machine that recorded them) on
    batches of 1, 2, 3 images and a ragged [3, 1, 2]."""
    if kernel and not CAN_TRITON:
        pytest.skip("triton missing, or no CUDA and no interpreter")
    assert RECORDED["torch"].split("+")[0] == torch.__version__.split("+")[0] or atol >= 1e-6
    model = _forced(schedule, monkeypatch, kernel)
    for counts in oracle.COUNTS:
        got = torch.tensor(oracle.fingerprint(oracle.encode(model, counts)), dtype=torch.float64)
        want = torch.tensor(RECORDED["paths"][path][str(counts)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m, c=counts: f"{counts}: {m}")


def _count_calls(monkeypatch, module, name, log):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: log.append(name) or real(*a, **k))


def test_the_schedule_is_chosen_once_and_again_on_a_move_or_cast(monkeypatch):
    """`choose_w_schedule` runs when the model is built, never in a forward (eval, training with
    gradients), and again on `train()`, when `.double()` / `.to(dtype)` / `.float()` cast the model
    (fp64 has no fused kernel: the choice changes with the dtype), when the context mode is changed
    and when the Q-former's attention dropout is switched on. The op's backend is never probed."""
    decisions, probes = [], []
    _count_calls(monkeypatch, S, "choose_w_schedule", decisions)
    _count_calls(monkeypatch, S, "mixes_in_kernel", probes)
    _count_calls(monkeypatch, ca, "streams_backend", probes)
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: CAN_TRITON)
    kernel = S.LeaveOneOutInKernel if CAN_TRITON else S.LeaveOneOutMaterialised
    model = randomize_guidance(tiny_sam(interaction_layers=(1, 3)))
    assert len(decisions) == 2 and model.w_schedule is kernel  # SAM(config), then tiny_sam's eval()
    feats, ids, mask = ragged_batch(model, [3, 1, 2])
    decisions.clear(), probes.clear()
    # the forwards on the op's reference backend (the interpreter is slow): the op checks per call,
    # the model's schedule stays (a stale choice costs speed, never values)
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: False)
    with torch.no_grad():
        for _ in range(3):
            _encode(model, feats, [3, 1, 2], ids, mask)
    assert decisions == [] and probes == []
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: CAN_TRITON)
    model.train()  # decided again; the frozen Q-former stays in eval mode: no dropout, same schedule
    assert len(decisions) == 1 and model.w_schedule is kernel
    decisions.clear(), probes.clear()
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: False)
    _encode(model, feats, [3, 1, 2], ids, mask).sum().backward()
    assert decisions == [] and probes == [] and model.w_schedule is kernel
    monkeypatch.setattr(ca, "_interpreter_allowed", lambda: CAN_TRITON)
    model.double()
    assert len(decisions) == 1 and model.w_schedule is S.LeaveOneOutMaterialised
    with torch.no_grad():
        _encode(model, feats.double(), [3, 1, 2], ids, mask)
    assert len(decisions) == 1
    model.to(torch.float32)
    assert len(decisions) == 2 and model.w_schedule is kernel
    model.float()
    assert len(decisions) == 3 and model.w_schedule is kernel
    model.config.context_mode = "shared"
    with torch.no_grad():
        _encode(model, feats, [3, 1, 2], ids, mask), _encode(model, feats, [3, 1, 2], ids, mask)
    assert len(decisions) == 4 and model.w_schedule is S.SharedSchedule
    model.config.context_mode = "leave_one_out"
    model.qformer.train()  # its attention dropout on: the kernel has none
    assert model.w_schedule is S.LeaveOneOutMaterialised and len(decisions) == 5


def test_a_loaded_model_decides_where_its_weights_are(tmp_path, monkeypatch):
    """`from_pretrained` builds the model on the meta device (in training mode) and places the
    weights without `_apply`: the schedule is decided again for the loaded model (its final
    ``eval()``), so its forwards decide nothing; so for the LAVIS/InstructBLIP loaders."""
    from _tiny import tiny_instructblip

    from sam_fast import SAM

    tiny_sam().save_pretrained(tmp_path)
    decisions = []
    _count_calls(monkeypatch, S, "choose_w_schedule", decisions)
    for load in (lambda: SAM.from_pretrained(tmp_path), lambda: SAM.from_instructblip(tiny_instructblip(seed=0))):
        model = load()
        assert decisions
        decisions.clear()
        feats, ids, mask = ragged_batch(model, [2, 1])
        with torch.no_grad():
            _encode(model, feats, [2, 1], ids, mask), _encode(model, feats, [2, 1], ids, mask)
        assert decisions == [] and model.w_schedule is S.LeaveOneOutMaterialised


def test_a_forced_schedule_must_fit_the_context_mode():
    model = tiny_sam(context_mode="shared")
    with pytest.raises(ValueError, match=r"LeaveOneOutInKernel is not a schedule of context_mode='shared' "
                                         r"\(one of \['SharedSchedule'\]\)"):
        model.w_schedule = S.LeaveOneOutInKernel
    with pytest.raises(ValueError, match="is not a schedule"):
        model.w_schedule = "fast"
    assert model.w_schedule is S.SharedSchedule


@pytest.mark.parametrize("schedule", [S.SharedSchedule, S.LeaveOneOutMaterialised, S.LeaveOneOutInKernel])
def test_no_schedule_reads_a_device_value_on_the_host(monkeypatch, schedule):
    """Host reads of encode_images (tests/_host_reads.py) under every schedule, with and without a
    gradient: none, as measured on all three paths (the kernel's under the interpreter included)
    before the schedules were classes. (The mix on the op's reference backend: the schedule's own
    work, the interpreter being slow.)"""
    from _host_reads import HostReads

    model = _forced(schedule, monkeypatch, kernel=False)
    feats, ids, mask = ragged_batch(model, [3, 1, 2], pad_sample=0)
    _encode(model, feats, [3, 1, 2], ids, mask)  # warm-up: caches
    for grad in (False, True):
        with torch.set_grad_enabled(grad), HostReads() as reads:
            _encode(model, feats, [3, 1, 2], ids, mask)
        assert reads.total == 0, reads.report()


@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_both_leave_one_out_schedules_agree_on_non_finite_features(monkeypatch, guidance):
    """A NaN in image 1 (sample 0) and an inf in image 4 (sample 2): the materialised and the mixed
    schedules (the mix on the op's reference backend, and in the fused kernel where it runs) give
    the same non-finite pattern and equal finite values, in the W-stream's output c_i as in the
    tokens. Every W row of those samples is non-finite, the rows of images 1 and 4 included (with
    the injection at layer 1 nothing else makes them so); the one-image sample stays finite."""
    runs = [(S.LeaveOneOutMaterialised, False), (S.LeaveOneOutInKernel, False)]
    runs += [(S.LeaveOneOutInKernel, True)] if CAN_TRITON else []
    got = []
    for schedule, kernel in runs:
        model = _forced(schedule, monkeypatch, kernel, guidance=guidance)
        feats, ids, mask = ragged_batch(model, [3, 1, 2])
        feats[1, 2, 3], feats[4, 0, 1] = float("nan"), float("inf")
        c = []
        hook = model.guidance_out.register_forward_hook(lambda m, i, out: c.append(out))
        with torch.no_grad():
            tokens = _encode(model, feats, [3, 1, 2], ids, mask)
        hook.remove()
        got.append((c[0], tokens))
        monkeypatch.undo()
    (c0, t0) = got[0]
    assert (~torch.isfinite(c0)).flatten(1).any(1).tolist() == [True] * 5  # W rows of images 0, 1, 2, 4, 5
    assert (~torch.isfinite(t0)).flatten(1).any(1).tolist() == [True, True, True, False, True, True]
    for c, t in got[1:]:
        for a, b in ((c0, c), (t0, t)):
            rows = [(~torch.isfinite(x)).flatten(1).any(1).tolist() for x in (a, b)]
            assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"non-finite rows {rows[0]} vs {rows[1]}"
            torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=1e-5, atol=1e-5)
