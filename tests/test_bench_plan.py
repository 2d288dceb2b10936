"""The benchmark plan: the scaled config's FLOP shares match the 7B model's, the FLOP terms agree
with hand counts and with torch's FLOP counter, the realistic batch keeps its ranges and seed,
and `sam-fast bench --plan` prints both configs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sam_fast import SAM, SAMConfig
from sam_fast.bench_plan import (
    PARTS,
    SampleShape,
    flop_shares,
    llm_flops,
    padding_fraction,
    qwformer_flops,
    realistic_batch,
    realistic_shapes,
    scaled_config,
    vit_flops,
)
from sam_fast.cli import main


def test_scaled_config_has_the_7b_depths_and_token_counts_at_an_eighth_of_the_widths():
    big, small = SAMConfig.instructblip_vicuna7b(), scaled_config()
    for sub in ("vision_config", "qformer_config", "text_config"):
        b, s = getattr(big, sub), getattr(small, sub)
        assert s.num_hidden_layers == b.num_hidden_layers
        assert s.hidden_size * 8 == b.hidden_size
        assert abs(s.intermediate_size * 8 - b.intermediate_size) < 8
    assert small.vision_config.image_size == 224 and small.vision_config.patch_size == 14  # P = 257
    assert small.qformer_config.cross_attention_frequency == 2
    assert small.num_query_tokens == 32 and small.text_config.vocab_size == 4000
    assert small.vision_config.hidden_size // small.vision_config.num_attention_heads == 88  # as the 7B ViT
    assert small.text_config.hidden_size // small.text_config.num_attention_heads == 128  # as Vicuna-7B


@pytest.mark.parametrize("schedule", ["sam_fast", "released"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaled_flop_shares_within_5_points_of_the_7b(schedule, seed):
    shapes = realistic_shapes(seed)
    big = flop_shares(SAMConfig.instructblip_vicuna7b(), shapes, schedule)
    small = flop_shares(scaled_config(), shapes, schedule)
    assert set(big) == set(PARTS) and abs(sum(small.values()) - 1) < 1e-9
    for part in PARTS:
        assert abs(big[part] - small[part]) < 0.05, (part, big[part], small[part])
    assert big["llm_forward"] + big["llm_backward"] > 0.75  # the LLM dominates a real step
    # the Q/W-former is a few % of a real step (sam_fast's recomputation of the streams included)
    assert 0.10 < big["vit"] < 0.20 and big["qwformer"] < 0.06


def test_7b_vit_forward_is_about_half_a_teraflop_per_image():
    # 39 blocks x 257 tokens x 2 FLOPs x ~1B parameters
    f = vit_flops(SAMConfig.instructblip_vicuna7b(), 1)
    assert 5.0e11 < f < 5.5e11


def test_llm_forward_equals_two_flops_per_parameter_and_token_plus_attention():
    cfg = SAMConfig.tiny()
    lm = SAM(cfg).language_model
    # parameters of every matrix the tokens go through (the embedding is a lookup, norms are not counted)
    params = sum(m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Linear))
    tc = cfg.text_config
    assert params == tc.num_hidden_layers * (4 * 64 * 64 + 3 * 64 * 128) + 64 * 128
    shapes = [SampleShape(images=2, instruction=5, answer=3), SampleShape(images=1, instruction=2, answer=4)]
    S = [8 * 2 + 5 + 3, 8 + 2 + 4]  # 24 and 14 positions
    attention = tc.num_hidden_layers * 4 * tc.hidden_size  # per (query, key) pair, all layers
    packed = llm_flops(cfg, shapes, padded=False)
    assert packed["forward"] == 2 * params * sum(S) + attention * sum(s * s for s in S)
    padded = llm_flops(cfg, shapes, padded=True)
    assert padded["forward"] == 2 * params * 2 * 24 + attention * 2 * 24 * 24
    # frozen: input gradients only, 1x the matrices, 2x the attention core
    assert padded["backward"] == 2 * params * 2 * 24 + 2 * attention * 2 * 24 * 24


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_matrix_flops_agree_with_torch_flop_counter():
    """torch's counter sees the matmuls and convolutions (not CPU SDPA): compare without the
    attention core."""
    torch.manual_seed(0)
    cfg = SAMConfig.tiny()
    model = SAM(cfg).train()
    shapes = [SampleShape(2, 10, 5), SampleShape(3, 4, 7), SampleShape(1, 6, 3)]
    x = realistic_batch(cfg, shapes)
    with torch.no_grad():
        assert _count(lambda: model.vision_model(pixel_values=x["pixel_values"])) == \
            vit_flops(cfg, 6, attention_core=False)
        E = model.vision_model(pixel_values=x["pixel_values"]).last_hidden_state
    ph = x["input_ids"] == cfg.image_token_index
    emb = model.get_input_embeddings()(x["input_ids"].masked_fill(ph, 0)).detach().requires_grad_(True)
    out = []
    fwd = _count(lambda: out.append(model.language_model(inputs_embeds=emb, attention_mask=x["attention_mask"],
                                                         labels=x["labels"]).loss))
    bwd = _count(lambda: out[0].backward())
    want = llm_flops(cfg, shapes, attention_core=False)
    assert (fwd, bwd) == (want["forward"], want["backward"])
    kw = {k: x[k] for k in ("image_counts", "qformer_input_ids", "qformer_attention_mask")}
    vis = []
    fwd = _count(lambda: vis.append(model.encode_images(image_features=E, **kw)))
    bwd = _count(lambda: vis[0].sum().backward())
    want = qwformer_flops(cfg, shapes, attention_core=False)
    assert abs(want["forward"] / fwd - 1) < 0.05, (want, fwd)
    assert abs(want["backward"] / bwd - 1) < 0.10, (want, bwd)


def test_released_schedule_projects_more_cross_attention_kv():
    cfg = scaled_config()
    shapes = realistic_shapes(0)
    fast, released = qwformer_flops(cfg, shapes, "sam_fast"), qwformer_flops(cfg, shapes, "released")
    assert released["forward"] > fast["forward"]
    with pytest.raises(ValueError, match="schedule='bogus'"):
        qwformer_flops(cfg, shapes, "bogus")


def test_realistic_shapes_ranges_and_seed():
    all_shapes = [s for seed in range(50) for s in realistic_shapes(seed)]
    assert len(realistic_shapes(3)) == 8
    assert {s.images for s in all_shapes} == {2, 3, 4, 5}
    assert min(s.instruction for s in all_shapes) >= 20 and max(s.instruction for s in all_shapes) <= 128
    answers = [s.answer for s in all_shapes]
    assert min(answers) >= 8 and max(answers) <= 200
    assert any(a <= 48 for a in answers) and any(a >= 150 for a in answers)  # captions and stories
    assert realistic_shapes(7) == realistic_shapes(7) and realistic_shapes(7) != realistic_shapes(8)
    assert 0.15 < padding_fraction(realistic_shapes(0)) < 0.35
    with pytest.raises(ValueError, match="batch_size=0"):
        realistic_shapes(0, batch_size=0)


def test_realistic_batch_layout_labels_and_determinism():
    cfg = SAMConfig.tiny()
    shapes = realistic_shapes(5)
    x = realistic_batch(cfg, shapes, seed=5)
    y = realistic_batch(cfg, shapes, seed=5)
    for k in x:
        assert torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])), k
    assert not torch.equal(x["input_ids"], realistic_batch(cfg, shapes, seed=6)["input_ids"])
    Q, tok = cfg.num_query_tokens, cfg.image_token_index
    B, S = x["input_ids"].shape
    assert B == 8 and x["image_counts"] == [s.images for s in shapes]
    assert x["pixel_values"].shape == (sum(x["image_counts"]), 3, 28, 28)
    assert S == max(s.images * Q + s.instruction + s.answer for s in shapes)
    for b, s in enumerate(shapes):
        n = s.images * Q + s.instruction + s.answer
        row, lab = x["input_ids"][b], x["labels"][b]
        assert (row[: s.images * Q] == tok).all() and not (row[s.images * Q: n] == tok).any()
        assert x["attention_mask"][b].tolist() == [1] * n + [0] * (S - n)
        assert (row[n:] == cfg.text_config.pad_token_id).all()
        # labels only on the answer, equal to its ids
        assert (lab[: n - s.answer] == -100).all() and (lab[n:] == -100).all()
        assert torch.equal(lab[n - s.answer: n], row[n - s.answer: n])
        assert x["qformer_attention_mask"][b].sum() == s.qformer_length()
    padding = 1 - x["attention_mask"].float().mean().item()
    assert abs(padding - padding_fraction(shapes, Q)) < 1e-6


def test_realistic_batch_trains_a_tiny_model():
    torch.manual_seed(0)
    cfg = SAMConfig.tiny()
    x = realistic_batch(cfg, [SampleShape(2, 20, 8), SampleShape(3, 25, 30)])
    loss = SAM(cfg).train()(**x).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_realistic_batch_refuses_empty_samples():
    with pytest.raises(ValueError, match="sample 1"):
        realistic_batch(SAMConfig.tiny(), [SampleShape(2, 20, 8), SampleShape(0, 20, 8)])


def test_cli_bench_plan_prints_both_configs(capsys):
    assert main(["bench", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "vicuna-7b" in out and "scaled" in out
    for part in (*PARTS, "total"):
        assert part in out
    assert "hardware FLOPs, released" in out and "hardware FLOPs, sam_fast" in out


def test_lm_head_at_supervised_rows_counts_one_head_per_answer_token():
    cfg = SAMConfig.tiny()
    tc = cfg.text_config
    shapes = [SampleShape(images=2, instruction=5, answer=3), SampleShape(images=1, instruction=2, answer=4)]
    head = 2 * tc.hidden_size * tc.vocab_size  # one row's logits
    full = llm_flops(cfg, shapes, padded=False)
    sup = llm_flops(cfg, shapes, padded=False, lm_head="supervised")
    positions = (8 * 2 + 5 + 3) + (8 + 2 + 4)
    assert full["forward"] - sup["forward"] == head * (positions - 7)
    assert full["backward"] - sup["backward"] == head * (positions - 7)  # the head's input gradient
    with pytest.raises(ValueError, match="lm_head='rows'"):
        llm_flops(cfg, shapes, lm_head="rows")


def test_model_flops_of_the_7b_realistic_step_are_the_hand_count():
    """Vicuna-7B, the seed-0 realistic batch (30 images, 2599 LLM tokens, 1023 supervised): ViT forward
    15.6 TFLOP, Q/W-former forward + backward 3.6, LLM forward 34.4 (real tokens, LM head at the
    supervised rows), its input-gradient backward 34.9: 88.4 TFLOP. The hardware counts differ from
    it as each implementation does (padding and all logits; sam_fast's recomputation)."""
    from sam_fast.bench_plan import hardware_flops, model_flops, step_flops

    cfg, shapes = SAMConfig.instructblip_vicuna7b(), realistic_shapes(0)
    assert sum(s.answer for s in shapes) == 1023 and sum(s.llm_tokens(32) for s in shapes) == 2599
    m = model_flops(cfg, shapes)
    for part, want in (("vit", 15.6e12), ("qwformer", 3.6e12), ("llm_forward", 34.4e12), ("llm_backward", 34.9e12)):
        assert abs(m[part] / want - 1) < 0.03, (part, m[part])
    assert abs(m["total"] / 88.4e12 - 1) < 0.03
    released = hardware_flops(cfg, shapes, "released")
    assert released == step_flops(cfg, shapes, "released")  # padded, all logits: what the plan used to print
    recompute = SAMConfig.instructblip_vicuna7b(recompute_qformer=True)
    fast = hardware_flops(recompute, shapes, "sam_fast")
    assert fast["qwformer"] > m["qwformer"]  # the streams run twice
    assert fast["llm_forward"] == m["llm_forward"] and released["llm_forward"] > 1.3 * m["llm_forward"]
    no_recompute = SAMConfig.instructblip_vicuna7b(recompute_qformer=False)
    assert hardware_flops(no_recompute, shapes, "sam_fast") == m
    assert hardware_flops(cfg, shapes, "sam_fast") == m  # "auto": 5.7 GiB in fp32 on a CPU, within 8 GiB: kept
    assert step_flops(cfg, shapes, recompute=True) == step_flops(recompute, shapes)
    assert recompute.recompute_qformer is True and cfg.recompute_qformer == "auto"  # the callers' configs stay


def test_cli_bench_plan_says_what_auto_recompute_chooses_and_why(capsys):
    """The 7B step on the realistic batch keeps 2.87 GiB of Q/W-former activations in bf16
    (tests/models/test_sam.py counts it by hand): kept on an 80 GiB GPU, recomputed on a 40 GiB one."""
    assert main(["bench", "--plan"]) == 0
    out = capsys.readouterr().out
    seven_b = out[out.index("  vicuna-7b (recomputing adds"):out.index("  scaled (/8) (recomputing adds")]
    assert "80 GiB GPU bf16: 2.87 GiB of activations" in seven_b and "(1/16 of the device's 80 GiB): kept" in seven_b
    assert "40 GiB GPU bf16: 2.87 GiB" in seven_b and "over the budget of 2.50 GiB" in seven_b
    assert "recomputed in the backward" in seven_b
    assert "CPU fp32: 5.73 GiB" in seven_b and "within the budget of 8.00 GiB (the CPU budget): kept" in seven_b


def test_cli_bench_plan_prints_model_and_hardware_flops(capsys):
    assert main(["bench", "--plan"]) == 0
    out = capsys.readouterr().out
    for title in ("model FLOPs", "hardware FLOPs, sam_fast", "hardware FLOPs, released"):
        assert f"\n{title}\n" in out
    assert "88,449.4" in out  # the 7B model FLOPs total, in GFLOP
