"""`AdaptiveAdjustment` (Part B): scores, softmax weights and merged maps against hand-written
float64 formulas; the model's key set is unchanged by the module classes."""

import inspect
from pathlib import Path

import pytest
import torch
from _sam_helpers import randomize_guidance, tiny_sam

from sam_fast import SAM, SAMConfig
from sam_fast.modules import AdaptiveAdjustment, GuidanceIn, GuidanceOut, WFormer, leave_one_out_mix
from sam_fast.ops import mix_kv


def _aa(D=6, seed=0):
    torch.manual_seed(seed)
    aa = AdaptiveAdjustment(D).double()
    with torch.no_grad():
        aa.weight.normal_()
        aa.bias.normal_()
    return aa


def test_state_dict_keys_of_the_model_are_unchanged():
    """Recorded from SAM(SAMConfig.tiny()) before the paper parts became classes."""
    want = Path(__file__).with_name("sam_tiny_state_dict_keys.txt").read_text().split()
    model = SAM(SAMConfig.tiny())
    assert sorted(model.state_dict()) == sorted(want)
    named = list(model.named_parameters(remove_duplicate=False))
    assert len(named) == len({id(p) for _, p in named})  # no parameter registered twice
    assert isinstance(model.adaptive_adjustment, AdaptiveAdjustment)
    assert isinstance(model.guidance_in, GuidanceIn) and isinstance(model.guidance_out, GuidanceOut)
    assert isinstance(model.w_former, WFormer) and not list(model.w_former.parameters())


def test_scores_and_weights_follow_the_formula():
    aa = _aa()
    E = torch.randn(3, 5, 6, dtype=torch.float64)
    s = aa.scores(E)
    want = torch.einsum("mpd,d->mp", E, aa.weight[0].detach()) + aa.bias.detach()
    torch.testing.assert_close(s, want, rtol=1e-12, atol=1e-12)
    alpha = aa.weights(E)
    torch.testing.assert_close(alpha, torch.exp(want) / torch.exp(want).sum(0, keepdim=True))
    torch.testing.assert_close(aa.weights(E, "mean"), torch.full((3, 5), 1 / 3, dtype=torch.float64))
    assert aa.scores(E.float()).dtype == torch.float32 and aa.scores(E.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="guidance='none'"):
        aa.weights(E, "none")


@pytest.mark.parametrize("mode", ["shared", "leave_one_out"])
def test_merged_maps_equal_the_weighted_sum(mode):
    aa = _aa()
    counts = [3, 2]
    E = torch.randn(5, 4, 6, dtype=torch.float64)
    got = aa.merged_maps(E, torch.tensor([0, 3, 5]), mode, "adaptive")
    s = (E @ aa.weight[0].detach() + aa.bias.detach())
    rows, start = [], 0
    for n in counts:
        members = list(range(start, start + n))
        for i in (members[:1] if mode == "shared" else members):
            ctx = members if mode == "shared" else [m for m in members if m != i]
            a = torch.softmax(s[ctx], 0)
            rows.append((a[..., None] * E[ctx]).sum(0))
        start += n
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-10, atol=1e-10)


def test_leave_one_out_mix_and_the_plain_linear_form_agree():
    aa = _aa()
    lin = torch.nn.Linear(6, 1).double()
    with torch.no_grad():
        lin.weight.copy_(aa.weight)
        lin.bias.copy_(aa.bias)
    E = torch.randn(4, 3, 6, dtype=torch.float64)
    i1, w1 = aa.leave_one_out_mix(E, [3, 1], "adaptive")
    i2, w2 = leave_one_out_mix(E, lin, [3, 1], "adaptive")
    assert i1.tolist() == i2.tolist() == [[1, 2], [0, 2], [0, 1]]
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    mixed, _ = mix_kv(E[:, None], E[:, None], (i1, w1))
    torch.testing.assert_close(mixed[:, 0], aa.merged_maps(E, torch.tensor([0, 3, 4]), "leave_one_out",
                                                           "adaptive")[:3])
    (g,) = torch.autograd.grad(w2.sum() + (w2 * torch.randn_like(w2)).sum(), lin.weight)
    assert g.abs().sum() > 0  # the view shares the plain Linear's parameters


def test_of_refuses_a_linear_with_more_outputs():
    with pytest.raises(ValueError, match="out_features=2"):
        AdaptiveAdjustment.of(torch.nn.Linear(4, 2))


def test_explain_uses_the_adaptive_adjustment_weights():
    from sam_fast.eval.explain import patch_weights

    model = randomize_guidance(tiny_sam(context_mode="shared"))  # one softmax over all the images
    cfg = model.config.vision_config
    pix = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    w = patch_weights(model, pix)
    with torch.no_grad():
        E = model.vision_model(pixel_values=pix).last_hidden_state.double()
        s = E @ model.adaptive_adjustment.weight[0].double() + model.adaptive_adjustment.bias.double()
    want = torch.softmax(s, 0)[:, 1:].reshape(w.shape)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_non_finite_feature_poisons_its_column_in_both_guidances(monkeypatch, backend, guidance):
    """The merge gets its scores from the features (`context_scores`): a NaN feature makes its
    (sample, patch) column NaN in the merged maps and their K/V, for the uniform weights of "mean"
    as for Linear(E); other columns are the plain weighted sums."""
    from sam_fast import _ext

    if backend == "cpu" and _ext.load() is None:
        pytest.skip(f"extension not available: {_ext.info()['error']}")
    monkeypatch.setenv("SAM_FAST_BACKEND", backend)
    aa = _aa().float()
    E = torch.randn(5, 4, 6)
    E[1, 2, 3] = float("nan")  # sample 0 (images 0..2), patch 2
    cu = torch.tensor([0, 3, 5])
    kv = E @ torch.randn(6, 10)  # K/V affine in E: NaN in the same rows
    s = aa.context_scores(E, guidance)
    assert s.dtype == torch.float32 and torch.isnan(s[1, 2]) and torch.isfinite(s[[0, 2, 3, 4]]).all()
    if guidance == "mean":
        assert not s[torch.isfinite(s)].any()  # zeros: uniform weights
    for mode in ("leave_one_out", "shared"):
        for got, x in ((aa.merged_maps(E, cu, mode, guidance), E), (aa.merged_kv(E, kv, cu, mode, guidance), kv)):
            rows = [0] if mode == "shared" else [0, 1, 2]
            assert torch.isnan(got[rows, 2]).all(), (mode, guidance)
            keep = torch.ones(got.shape[:2], dtype=torch.bool)
            keep[rows, 2] = False
            assert torch.isfinite(got[keep]).all()
            if guidance == "mean" and mode == "shared":
                torch.testing.assert_close(got[1], x[3:5].mean(0))
                torch.testing.assert_close(got[0, :2], x[0:3, :2].mean(0))


@pytest.mark.parametrize("guidance", ["adaptive", "mean"])
def test_leave_one_out_mix_follows_the_column_rule_of_merged_kv(guidance):
    """The mixing plan (the leave_one_out K/V formed in the attention kernel) gives the K/V of
    `merged_kv` on non-finite features too: NaN for every image of the sample at that patch, the
    image holding the NaN or inf included (its own softmax leaves it out), finite and equal
    elsewhere."""
    aa = _aa().float()
    E = torch.randn(6, 4, 6)
    E[1, 2, 3] = float("nan")  # sample 0 (images 0..2), patch 2
    E[4, 0, 0] = float("inf")  # sample 2 (images 4, 5), patch 0
    kv = E @ torch.randn(6, 10)
    counts, cu = [3, 1, 2], torch.tensor([0, 3, 4, 6])
    index, weight = aa.leave_one_out_mix(E, counts, guidance)
    mixed, _ = mix_kv(kv[:, None], kv[:, None], (index, weight))  # [5, 1, P, C]
    want = aa.merged_kv(E, kv, cu, "leave_one_out", guidance)[[0, 1, 2, 4, 5]]
    bad = ~torch.isfinite(mixed[:, 0]).all(-1)
    assert bad.tolist() == [[False, False, True, False]] * 3 + [[True, False, False, False]] * 2
    assert torch.equal(torch.isfinite(mixed[:, 0]), torch.isfinite(want))
    torch.testing.assert_close(mixed[:, 0][~bad], want[~bad], rtol=1e-5, atol=1e-5)


def test_leave_one_out_mix_is_a_named_plan():
    """The plan is a `MixPlan` (fields index, weight), still a pair; "mean" weights are exactly
    1 / (n - 1) on the live slots and 0 on the unused ones."""
    from sam_fast.ops import MixPlan

    aa = AdaptiveAdjustment(4)
    E = torch.randn(5, 3, 4)
    plan = aa.leave_one_out_mix(E, [3, 2], "mean")
    assert isinstance(plan, MixPlan) and plan.index.shape == (5, 2) and plan.weight.shape == (5, 2, 3)
    index, weight = plan
    assert index is plan.index and weight is plan.weight
    assert index.tolist() == [[1, 2], [0, 2], [0, 1], [4, 3], [3, 4]]
    assert weight[:3].eq(0.5).all() and weight[3:, 0].eq(1.0).all() and weight[3:, 1].eq(0.0).all()


def test_guidance_writes_the_image_softmax_once():
    """Eq. 1's softmax over the images appears once in sam_fast/modules/guidance.py (`_image_softmax`),
    besides the op."""
    import sam_fast.modules.guidance as guidance

    text = inspect.getsource(guidance)
    assert text.count("torch.softmax(") == 1, "the softmax over images is written more than once"
