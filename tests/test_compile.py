"""torch.compile: `encode_images` and the training forward capture as one graph (fullgraph=True),
with and without Triton importable, and give the eager outputs and gradients.

The capture tests use dynamo's "eager" / "aot_eager" backends (seconds); the CPU-inductor tests
compile C++ kernels (over 20 s on a cold cache on a small machine) and are marked slow.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
import torch._dynamo as dynamo

from _compile_helpers import realistic_batches, train_step, training_inputs
from _sam_helpers import randomize_guidance, tiny_sam

ca = importlib.import_module("sam_fast.ops.cross_attention")  # the module (sam_fast.ops.cross_attention is the op)

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["triton importable", "triton not installed"])
def triton_state(request, monkeypatch):
    """Reset the cached Triton probe; for "not installed" the probe reports the import failure
    (torch's own view of Triton cannot be changed in-process: `test_without_triton_subprocess`
    hides the package from a fresh interpreter instead)."""
    if request.param == "triton importable" and not HAS_TRITON:
        pytest.skip("triton is not installed here")
    if request.param == "triton not installed":
        monkeypatch.setattr(ca, "_probe_triton", lambda: "triton kernels not importable (ImportError: simulated)")
    monkeypatch.setattr(ca, "_triton_probe", ca._UNPROBED)
    dynamo.reset()
    yield request.param
    dynamo.reset()


@pytest.fixture(scope="module")
def model():
    return randomize_guidance(tiny_sam())


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_encode_images_fullgraph_capture(model, triton_state, context_mode, monkeypatch):
    """fullgraph=True (any graph break raises) without an eager warm-up: the Triton probe runs
    at trace time. Before the fixes dynamo.explain counted 3 breaks with Triton importable
    ("Data pointer comparison" of the K/V weight cache) and 25-28 without (an import attempt per
    attention call); the training forward 12 / 43-46."""
    monkeypatch.setattr(model.config, "context_mode", context_mode)
    enc, _ = training_inputs(model)
    compiled = torch.compile(model.encode_images, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(**enc)
        want = model.encode_images(**enc)
    torch.testing.assert_close(got, want)


def test_training_forward_fullgraph_aot(model, triton_state):
    """The training forward with labels (padded LLM call under compile) through AOT autograd:
    same loss and trainable gradients as the eager (packed) step."""
    _, fwd = training_inputs(model)
    model.train()
    try:
        want_loss, want_grads = train_step(model, model, fwd)
        got_loss, got_grads = train_step(torch.compile(model, fullgraph=True, backend="aot_eager"), model, fwd)
    finally:
        model.eval()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for g in got_grads.values())


def test_compiled_forward_still_checks_placeholders(model):
    """Under compile the placeholder count is checked on the device (no host read), not skipped."""
    _, fwd = training_inputs(model)
    fwd["input_ids"] = fwd["input_ids"].clone()
    fwd["input_ids"][0, 0] = 7  # sample 0 loses one placeholder
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="placeholders"):
        compiled(**fwd)


def test_triton_probe_runs_once(monkeypatch):
    """The import attempt is made once per process, not on every attention call."""
    calls = []
    monkeypatch.setattr(ca, "_triton_probe", ca._UNPROBED)
    monkeypatch.setattr(ca, "_probe_triton", lambda: calls.append(1) or "not here")
    q = torch.randn(2, 2, 4, 8)
    for _ in range(3):
        ca.cross_attention(q, q, q)
    assert ca._triton_import_error() == "not here"
    assert len(calls) == 1


def _relative_close(got, want, rel):
    assert (got - want).norm() <= rel * want.norm(), ((got - want).norm(), want.norm())


def _nonzero(grads):
    """The gradients that are not 0 up to rounding (adaptive_adjustment.bias never is: the softmax
    over images ignores it; its weight neither where no sample has two contextual images), the
    language projection's among them."""
    names = [n for n, g in grads.items() if g.abs().max() > 1e-6]
    assert "language_projection.weight" in names and "guidance_out.weight" in names, names
    return names


def test_compiled_packed_step_realistic_mix(model):
    """`compile_packed_step` over 20 collated batches of the realistic mix (1-5 images per sample,
    plans bucketed to (256, 128)): one fullgraph capture per bucket, at most 4 in all, no graph
    break, and every step's loss and trainable gradients those of the eager packed step (rel 1e-5)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    batches = realistic_batches(model, 20)
    shapes = {(b["pack_plan"].packed_length, b["pack_plan"].targets.shape[0]) for b in batches}
    assert len({b["input_ids"].shape[1] for b in batches}) > 10 and 1 < len(shapes) <= 4  # ragged, few buckets
    dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    model.train()
    try:
        want = [train_step(model, model, batch) for batch in batches]
        model.compile_packed_step(backend=cnt)
        for batch, (want_loss, want_grads) in zip(batches, want):
            got_loss, got_grads = train_step(model, model, batch)
            _relative_close(got_loss, want_loss, 1e-5)
            for name in _nonzero(want_grads):
                _relative_close(got_grads[name], want_grads[name], 1e-5)
    finally:
        model.compile_packed_step(enable=False)
        model.eval()
    assert cnt.frame_count == len(shapes), (cnt.frame_count, shapes)  # one per bucket
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()


def test_compiled_packed_step_equals_padded_path(model):
    """The compiled packed step (bucketed plan) against the padded LLM call: same loss and
    gradients (fp32, rel 1e-5)."""
    batch = realistic_batches(model, 1, seed=3)[0]
    model.train()
    try:
        want_loss, want_grads = train_step(model, model, {**batch, "packing": False})
        model.compile_packed_step(backend="aot_eager")
        got_loss, got_grads = train_step(model, model, batch)
    finally:
        model.compile_packed_step(enable=False)
        model.eval()
    _relative_close(got_loss, want_loss, 1e-5)
    for name in _nonzero(want_grads):
        _relative_close(got_grads[name], want_grads[name], 1e-5)


def test_compiled_packed_step_with_fused_projections(model):
    """`compile_packed_step` of an LLM with fused Q/K/V and gate|up projections and the attention's
    own RoPE: one fullgraph capture, no graph break, the eager unfused step's loss and trainable
    gradients (rel 1e-5)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from sam_fast.models.llama_kernels import apply_fused_llama_kernels, remove_fused_llama_kernels

    batch = realistic_batches(model, 1, seed=5)[0]
    dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    model.train()
    try:
        want_loss, want_grads = train_step(model, model, batch)
        assert apply_fused_llama_kernels(model.language_model, force=True)["fused_projections"]["qkv_proj"] > 0
        model.compile_packed_step(backend=cnt)
        for _ in range(2):
            got_loss, got_grads = train_step(model, model, batch)
            _relative_close(got_loss, want_loss, 1e-5)
            for name in _nonzero(want_grads):
                _relative_close(got_grads[name], want_grads[name], 1e-5)
    finally:
        model.compile_packed_step(enable=False)
        remove_fused_llama_kernels(model.language_model)
        model.eval()
    assert cnt.frame_count == 1, cnt.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()


@pytest.mark.slow
def test_encode_images_inductor(model, triton_state):
    enc, _ = training_inputs(model)
    compiled = torch.compile(model.encode_images, fullgraph=True)  # CPU inductor
    with torch.no_grad():
        got = compiled(**enc)
        want = model.encode_images(**enc)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_forward_inductor(model, triton_state):
    _, fwd = training_inputs(model)
    model.train()
    try:
        want_loss, want_grads = train_step(model, model, fwd)
        got_loss, got_grads = train_step(torch.compile(model, fullgraph=True), model, fwd)
    finally:
        model.eval()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-4, msg=name)


_HIDDEN_TRITON_SCRIPT = r"""
import sys
sys.modules["triton"] = None  # before torch: as if the package were not installed
sys.path.insert(0, sys.argv[1])
import torch
from _compile_helpers import realistic_batches, train_step, training_inputs
from _sam_helpers import randomize_guidance, tiny_sam
import sam_fast.ops.cross_attention  # noqa: F401
ca = sys.modules["sam_fast.ops.cross_attention"]
m = randomize_guidance(tiny_sam())
enc, fwd = training_inputs(m)
with torch.no_grad():
    got = torch.compile(m.encode_images, fullgraph=True, backend="eager")(**enc)
    torch.testing.assert_close(got, m.encode_images(**enc))
assert "ImportError" in ca._triton_import_error() or "ModuleNotFoundError" in ca._triton_import_error()
m.train()
want_loss, want_grads = train_step(m, m, fwd)
got_loss, got_grads = train_step(torch.compile(m, fullgraph=True, backend="eager"), m, fwd)
torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
for name in want_grads:
    torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5)
print("OK")
"""


@pytest.mark.slow
def test_without_triton_subprocess(tmp_path):
    """A fresh interpreter where ``import triton`` fails (torch included): fullgraph capture of
    encode_images (no warm-up) and of the training step, eager outputs and gradients."""
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "hidden_triton.py"
    script.write_text(_HIDDEN_TRITON_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "SAM_FAST_BACKEND"}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


# -- the whole packed step as one graph (compile_training_step) --------------------------------

def _check_step(model, batches, backend, **settings):
    """Each batch's compiled whole step against the eager packed step: loss and the trainable
    gradients that are not 0 (rel 1e-5)."""
    model.train()
    try:
        want = [train_step(model, model, batch) for batch in batches]
        model.compile_training_step(backend=backend, **settings)
        for batch, (want_loss, want_grads) in zip(batches, want):
            got_loss, got_grads = train_step(model, model, batch)
            _relative_close(got_loss, want_loss, 1e-5)
            for name in _nonzero(want_grads):
                _relative_close(got_grads[name], want_grads[name], 1e-5)
    finally:
        model.compile_training_step(enable=False)
        model.eval()


@pytest.mark.parametrize("context_mode", ["leave_one_out", "shared"])
def test_compiled_training_step_is_one_graph(model, context_mode, monkeypatch):
    """The whole step (features -> Q/W-former -> placement -> LLM -> loss, forward and backward)
    in one fullgraph capture: no graph break, one compilation for two batches of other image
    counts (13 and 15 images: one image bucket of 16) and instruction lengths, the eager step's
    loss and gradients. Before `compile_training_step` the images were encoded eagerly."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    monkeypatch.setattr(model.config, "context_mode", context_mode)
    batches = realistic_batches(model, 4, seed=5, batch_size=4, pack_buckets=(512, 256), images=(1, 5))
    batches = [b for b in batches if 9 <= sum(b["pack_plan"].image_counts) <= 16][:2]
    counts = [tuple(b["pack_plan"].image_counts) for b in batches]
    assert len(batches) == 2 and counts[0] != counts[1], counts
    dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    _check_step(model, batches, cnt, image_bucket=16)
    assert cnt.frame_count == 1, cnt.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()


def test_compiled_training_step_without_plan(model):
    """A batch without its pack plan: the step builds it (its host read) and buckets it, then
    runs the compiled whole step with the eager step's loss and gradients."""
    batch = realistic_batches(model, 1, seed=1, batch_size=2)[0]  # counts (1, 4)
    from torch._dynamo.testing import CompileCounterWithBackend

    batch = {k: v for k, v in batch.items() if k != "pack_plan"}
    dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    _check_step(model, [batch], cnt)
    assert cnt.frame_count == 1  # the step went through the graph
    dynamo.reset()


def test_compiled_training_step_from_pixels(model):
    """Pixels instead of cached features: the ViT runs inside the graph on the real and the
    (zero) filler images; the eager step's loss and gradients."""
    batch = dict(realistic_batches(model, 1, seed=3, batch_size=2)[0])  # counts (2, 3): 5 images, 3 fillers
    size = model.config.vision_config.image_size
    batch["pixel_values"] = torch.randn(batch.pop("image_features").shape[0], 3, size, size,
                                        generator=torch.Generator().manual_seed(0))
    from torch._dynamo.testing import CompileCounterWithBackend

    dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    _check_step(model, [batch], cnt)
    assert cnt.frame_count == 1
    dynamo.reset()


def test_filler_images_change_nothing(model):
    """The same batch with its images padded to 3 buckets (no filler, 3 and 13 filler images):
    the real images' visual tokens and every gradient are those of the unbucketed rows (no
    compile: the static step's encoding run eagerly)."""
    from sam_fast.models.static_step import ImageBatchPlan, encode_image_rows

    enc, _ = training_inputs(model)  # COUNTS = [2, 1, 3]: one one-image sample
    outs = []
    for bucket in (1, 9, 19):
        plan = ImageBatchPlan.build(enc["image_counts"], model.config.context_mode, model.config.guidance, bucket)
        feats = torch.cat([enc["image_features"], torch.randn(plan.bucket_size - 6, *enc["image_features"].shape[1:])])
        model.zero_grad(set_to_none=True)
        tokens = encode_image_rows(model, feats, enc["qformer_input_ids"], enc["qformer_attention_mask"],
                                   plan.sample_of, plan.context, plan.guided)[:6]
        (tokens * torch.linspace(-1, 1, tokens.numel()).view_as(tokens)).sum().backward()
        outs.append((tokens.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    want_tokens = model.encode_images(**enc).detach()
    for tokens, grads in outs:
        torch.testing.assert_close(tokens, want_tokens, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, outs[0][1][name], rtol=1e-5, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def test_image_batch_plan_masks_fillers_and_unguided_rows():
    """Hand-checked plan of counts [2, 1] bucketed to 4: leave_one_out reads the other image of
    the sample only, shared its own too; the one-image sample is guided only in shared mode; the
    filler row reads nothing and nothing reads it."""
    from sam_fast.models.static_step import ImageBatchPlan

    loo = ImageBatchPlan.build([2, 1], "leave_one_out", "adaptive", 4)
    assert loo.bucket_size == 4 and loo.sample_of.tolist() == [0, 0, 1, 0]
    assert loo.context.int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert loo.guided.tolist() == [True, True, False, False]
    shared = ImageBatchPlan.build([2, 1], "shared", "adaptive", 4)
    assert shared.context.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert shared.guided.tolist() == [True, True, True, False]
    assert not ImageBatchPlan.build([2, 1], "shared", "none", 4).guided.any()
    with pytest.raises(ValueError, match="image_bucket=0"):
        ImageBatchPlan.build([2, 1], "shared", "adaptive", 0)


def test_compiled_training_step_reads_nothing_from_the_host(model):
    """With the batch's plan the compiled whole step makes no host read: its eager part (checks,
    the image plan, the inputs of the graph) and the backward are counted; the captured graph
    cannot hold one (fullgraph: a read would be a graph break, i.e. an error), and dynamo would
    retrace it under the counting mode, so the graph's forward call runs outside the mode."""
    from torch.overrides import _pop_mode_temporarily

    from _host_reads import HostReads

    batch = realistic_batches(model, 1, seed=2, batch_size=2)[0]
    model.train()
    try:
        model.compile_training_step(backend="aot_eager")
        step, settings = model.__dict__["_compiled_training_step"]

        def outside_mode(*args):
            if not torch._C._len_torch_function_stack():  # the warm-up call
                return step(*args)
            with _pop_mode_temporarily():
                return step(*args)

        model.__dict__["_compiled_training_step"] = (outside_mode, settings)
        train_step(model, model, batch)  # compiled before counting
        with HostReads() as reads:
            train_step(model, model, batch)
    finally:
        model.compile_training_step(enable=False)
        model.eval()
    assert reads.total == 0, reads.report()


def test_compile_training_step_modes(model):
    """The capture mode is stored and named (`training_step_mode`, reported by ``sam-fast env``);
    an unknown mode or bucket is one error naming it; enable=False goes back to eager."""
    model.compile_training_step(mode="reduce-overhead")
    try:
        assert model.training_step_mode == "reduce-overhead"
        assert "_compiled_training_step" in model.__dict__
    finally:
        model.compile_training_step(enable=False)
    assert "_compiled_training_step" not in model.__dict__ and not hasattr(model, "training_step_mode")
    with pytest.raises(ValueError, match="mode='fast'"):
        model.compile_training_step(mode="fast")
    with pytest.raises(ValueError, match="image_bucket=0"):
        model.compile_training_step(image_bucket=0)


@pytest.mark.slow
def test_compiled_training_step_realistic_mix(model):
    """The whole step over 20 batches of the realistic mix (8 samples of 2-5 images, plans
    bucketed to (1024, 512)): at most 4 compilations (one per image bucket here), no graph
    break, every step's loss and gradients those of the eager step (rel 1e-5)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    batches = realistic_batches(model, 20, batch_size=8, pack_buckets=(1024, 512), images=(2, 5))
    assert len({tuple(b["pack_plan"].image_counts) for b in batches}) == 20
    dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    _check_step(model, batches, cnt)
    assert 1 < cnt.frame_count <= 4, cnt.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()
