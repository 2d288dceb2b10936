"""annotations.json datasets: each bad-data error names the sample id and the file; --skip-bad counts;
the ragged collator with mixed image counts feeds SAM."""

import json

import pytest
import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import (
    AnnotationDataset,
    Collator,
    DataError,
    EvalTransform,
    PromptBuilder,
    model_inputs,
    tiny_tokenizers,
)
from sam_fast.data.synthetic import write_group_captions


@pytest.fixture
def ds_dir(tmp_path):
    return write_group_captions(tmp_path / "ds", n_samples=5, size=32, seed=1)


def _edit(root, fn):
    path = root / "annotations.json"
    recs = json.loads(path.read_text())
    fn(recs)
    path.write_text(json.dumps(recs))


BAD = {
    "missing image": (lambda r: r[2]["img_list"].append("images/nope.png"), "nope.png", "does not exist"),
    "empty img_list": (lambda r: r[2].update(img_list=[]), "annotations.json", "empty"),
    "no instruction": (lambda r: r[2].pop("instruction"), "annotations.json", "'instruction'"),
    "bad output": (lambda r: r[2].update(output=3), "annotations.json", "'output'"),
    "duplicate id": (lambda r: r[2].update(id=r[1]["id"]), "annotations.json", "duplicate id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_sample_and_file(ds_dir, case):
    edit, file_part, reason = BAD[case]
    _edit(ds_dir, edit)
    sid = 1 if case == "duplicate id" else 2
    with pytest.raises(DataError) as err:
        AnnotationDataset(ds_dir, EvalTransform(28))
    msg = str(err.value)
    assert f"sample id {sid!r}" in msg and file_part in msg and reason in msg
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert len(ds) == 4 and len(ds.skipped) == 1 and "skipped 1 bad sample" in ds.skipped.summary()


def test_corrupt_image(ds_dir):
    bad = ds_dir / "images" / "0003_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match=r"sample id 3: image file .*0003_0.png is not a readable image"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    # Undetected at open time (verify off): decoding fails in __getitem__, named the same way.
    ds = AnnotationDataset(ds_dir, EvalTransform(28), verify_images=False)
    with pytest.raises(DataError, match=r"sample id 3: image file .*0003_0.png could not be decoded"):
        ds[3]
    lazy = AnnotationDataset(ds_dir, EvalTransform(28), verify_images=False, skip_bad=True)
    assert lazy[3] is None and len(lazy.skipped) == 1


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no annotations.json"):
        AnnotationDataset(tmp_path, EvalTransform(28))
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        AnnotationDataset(tmp_path, EvalTransform(28))
    (tmp_path / "annotations.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a list"):
        AnnotationDataset(tmp_path, EvalTransform(28))
    (tmp_path / "annotations.json").write_text('[{"id": 7, "img_list": [], "instruction": "", "output": ""}]')
    with pytest.raises(DataError, match="no usable samples"):
        AnnotationDataset(tmp_path, EvalTransform(28), skip_bad=True)


def test_collator_mixed_counts_feeds_sam(ds_dir):
    cfg = SAMConfig.tiny()
    q, llm = tiny_tokenizers()
    pb = PromptBuilder.for_model(cfg, q, llm)
    ds = AnnotationDataset(ds_dir, EvalTransform(cfg.vision_config.image_size))
    items = [ds[i] for i in range(len(ds))]
    counts = [it["pixel_values"].shape[0] for it in items]
    assert len(set(counts)) > 1  # the fixture mixes image counts
    coll = Collator(pb, train=True)
    batch = coll(items[:2] + [None] + items[2:])
    assert coll.dropped == 1 and batch["ids"] == [0, 1, 2, 3, 4]
    assert batch["image_counts"].tolist() == counts
    torch.testing.assert_close(batch["pixel_values"], torch.cat([it["pixel_values"] for it in items]))  # sample-major
    assert (batch["input_ids"] == cfg.image_token_index).sum(1).tolist() == [n * cfg.num_query_tokens for n in counts]
    torch.manual_seed(0)
    model = SAM(cfg)
    out = model(**model_inputs(batch))
    assert torch.isfinite(out.loss)
    gen = Collator(pb, train=False)(items)
    assert "labels" not in gen and gen["attention_mask"][:, -1].all()  # left padded
    new = model.generate(**model_inputs(gen), num_beams=1, max_new_tokens=3)
    assert new.shape[0] == len(items)


def test_training_batches_carry_their_pack_plan(ds_dir):
    """A training batch holds the `PackPlan` of its packed step (its lengths, placeholders and
    targets spelled out from the token lists); a generation batch none."""
    from sam_fast.data import PackPlan

    cfg = SAMConfig.tiny()
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = AnnotationDataset(ds_dir, EvalTransform(cfg.vision_config.image_size))
    items = [ds[i] for i in range(3)]
    batch = Collator(pb, train=True)(items)
    plan = batch["pack_plan"]
    assert isinstance(plan, PackPlan)
    mask, labels, Q = batch["attention_mask"], batch["labels"], cfg.num_query_tokens
    lengths = mask.sum(1).tolist()
    assert plan.seqlens == tuple(lengths) and plan.batch_shape == tuple(mask.shape)
    assert plan.image_counts == tuple(batch["image_counts"].tolist())
    assert plan.image_rows.numel() == Q * sum(plan.image_counts)
    supervised = [(b, s) for b in range(len(items)) for s in range(1, lengths[b]) if labels[b, s] != -100]
    starts = [sum(lengths[:b]) for b in range(len(items))]
    assert plan.target_rows.tolist() == [starts[b] + s - 1 for b, s in supervised]
    assert plan.targets.tolist() == [int(labels[b, s]) for b, s in supervised]
    assert "pack_plan" not in Collator(pb, train=False)(items)


def test_a_bad_label_is_refused_by_the_collator_naming_the_sample(ds_dir, monkeypatch):
    cfg = SAMConfig.tiny()
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = AnnotationDataset(ds_dir, EvalTransform(cfg.vision_config.image_size))
    items = [ds[i] for i in range(2)]
    encode = pb.encode

    def bad_answer(instruction, n, answer=None, **kw):  # an answer id no tokenizer gives: -7
        e = encode(instruction, n, answer, **kw)
        if answer == items[1]["output"]:
            e.answer[0] = -7
        return e

    monkeypatch.setattr(pb, "encode", bad_answer)
    with pytest.raises(DataError, match=rf"sample id {items[1]['id']!r}: labels row 1 holds -7"):
        Collator(pb, train=True)(items)
