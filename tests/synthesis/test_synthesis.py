"""sam_fast.synthesis and `sam-fast synthesize`: tiny random models built from configs, offline, CPU.

Sources are drawn here: each object is a solid-colour rectangle on a white background, so the threshold
segmenter's mask, the compositor's placements and the filters' verdicts can be stated exactly."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the _tiny helper

from sam_fast.synthesis import (  # noqa: E402
    FilterConfig,
    Manifest,
    OpenAITextWriter,
    RandomCompositor,
    SamSegmenter,
    SynthesisError,
    Synthesizer,
    ThresholdSegmenter,
    TransformersTextWriter,
    largest_component,
    load_prompts,
    plan_samples,
    discover_sources,
)
from sam_fast.synthesis import filters as F  # noqa: E402
from sam_fast.synthesis.pipeline import parse_refined  # noqa: E402

COLOURS = {"apple": (200, 30, 30), "boat": (30, 60, 200), "chair": (30, 160, 60), "drum": (200, 160, 20)}


def rect_image(colour, box, size=(48, 40)) -> Image.Image:
    """White image with a solid `colour` rectangle at box = (x0, y0, x1, y1), x1/y1 exclusive."""
    a = np.full((size[1], size[0], 3), 255, np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = colour
    return Image.fromarray(a)


def write_sources(root: Path, groups=COLOURS, tiny: tuple[str, int] | None = None) -> Path:
    """Two views per object: the rectangle at two places/sizes. `tiny=(group, view)` makes that view's
    object 2x2 pixels (a segmentation 'failure' the mask-area filter must catch)."""
    for name, colour in groups.items():
        (root / name).mkdir(parents=True)
        for v, box in enumerate([(8, 6, 30, 30), (14, 10, 40, 28)]):
            if tiny == (name, v):
                box = (20, 20, 22, 22)
            rect_image(colour, box).save(root / name / f"view{v}.png")
    return root


# -- stub components (the pipeline's bookkeeping, without model time) ------------------------------
class KeepInpainter:
    """Paints the background a colour derived from the seed; keeps object pixels."""

    def __init__(self, wipe: set[str] | None = None):
        self.wipe, self.calls = wipe or set(), []

    def inpaint(self, image, mask, prompt, seed):
        self.calls.append(prompt)
        a = np.asarray(image).copy()
        m = np.asarray(mask) > 127
        a[m] = (seed % 200, 100, 50)
        if any(w in prompt for w in self.wipe):
            a[:] = 0  # destroys the objects
        return Image.fromarray(a)

    def describe(self):
        return {"kind": "stub"}


class FixedCaptioner:
    def caption(self, image):
        return f"a {image.getpixel((24, 20))} coloured block"

    def describe(self):
        return {"kind": "stub"}


class EchoWriter:
    """Background: 'a studio for OBJECT'; refine: a deterministic answer, or per-object overrides."""

    def __init__(self, answers: dict[str, str] | None = None, fail_after: int | None = None):
        self.answers, self.fail_after, self.calls = answers or {}, fail_after, 0

    def complete(self, prompt, seed):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # as a kill in the middle of a sample
        if "photograph of " in prompt:  # the shipped background prompt names the object
            obj = prompt.split("photograph of ")[1].split(":")[0]
            return f"a quiet studio for the {obj} with soft light number {seed % 97}"
        obj = prompt.split("The object is ")[1].split(".")[0]
        return self.answers.get(obj, f"it is a {obj} shown twice, seed {seed % 1000}")

    def describe(self):
        return {"kind": "stub"}


def stub_synth(**kw) -> Synthesizer:
    args = dict(segmenter=ThresholdSegmenter(), compositor=RandomCompositor(64, (0.3, 0.4), 0.0),
                inpainter=KeepInpainter(), captioner=FixedCaptioner(), writer=EchoWriter())
    args.update(kw)
    return Synthesizer(**args)


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# -- segmentation ----------------------------------------------------------------------------
def test_threshold_segmenter_keeps_the_largest_component():
    a = np.full((30, 40, 3), 250, np.uint8)
    a[2:12, 3:20] = (10, 10, 10)  # 170 px
    a[20:25, 30:35] = (10, 10, 10)  # 25 px
    a[15, 0:40] = (245, 252, 250)  # near the background colour: not foreground
    mask = ThresholdSegmenter(30).segment(Image.fromarray(a))
    want = np.zeros((30, 40), bool)
    want[2:12, 3:20] = True
    assert mask.dtype == bool and np.array_equal(mask, want)


def test_largest_component_is_4_connected():
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # diagonal: three components of 1
    m[3:5, 3:5] = True  # 4 px
    out = largest_component(m)
    assert out.sum() == 4 and out[3:5, 3:5].all()
    assert not largest_component(np.zeros((3, 3), bool)).any()


def tiny_sam_parts():
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                      patch_size=8, output_channels=16, global_attn_indexes=[1], mlp_dim=64,
                                      window_size=4, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_attention_heads=2, mlp_dim=32,
                                                 iou_head_hidden_dim=16))
    proc = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                          mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16}))
    return SamModel(cfg).eval(), proc


@pytest.mark.parametrize("prompt", ["center", "saliency"])
def test_sam_segmenter_from_local_directory(tmp_path, prompt):
    model, proc = tiny_sam_parts()
    model.save_pretrained(tmp_path / "sam")
    proc.save_pretrained(tmp_path / "sam")
    seg = SamSegmenter.from_pretrained(tmp_path / "sam", prompt=prompt)
    mask = seg.segment(rect_image((200, 30, 30), (8, 6, 30, 30)))
    assert mask.shape == (40, 48) and mask.dtype == bool
    assert seg.describe() == {"kind": "sam", "model": str(tmp_path / "sam"), "prompt": prompt}
    with pytest.raises(SynthesisError, match="--sam-model .*nowhere"):
        SamSegmenter.from_pretrained(tmp_path / "nowhere")


def test_saliency_box_is_the_box_of_non_background_pixels():
    from sam_fast.synthesis.segmentation import saliency_box

    assert saliency_box(np.asarray(rect_image((0, 0, 0), (8, 6, 30, 30)))) == [8.0, 6.0, 29.0, 29.0]
    assert saliency_box(np.full((10, 12, 3), 9, np.uint8)) == [0.0, 0.0, 11.0, 9.0]


# -- compositing -----------------------------------------------------------------------------
def obj(colour, w, h):
    """A w x h solid object on a white margin, and its exact mask."""
    img = rect_image(colour, (3, 2, 3 + w, 2 + h), size=(w + 6, h + 4))
    m = np.zeros((h + 4, w + 6), bool)
    m[2:2 + h, 3:3 + w] = True
    return img, m


def test_compositing_exact_placements_masks_and_overlap_limit():
    S = 64
    comp = RandomCompositor(S, (0.25, 0.5), max_overlap=0.0, background=(127, 127, 127))
    objects = [obj((200, 0, 0), 20, 10), obj((0, 0, 200), 12, 24)]
    seen = set()
    for seed in range(25):
        c = comp.compose(objects, seed)
        canvas = np.asarray(c.image)
        inpaint = np.asarray(c.inpaint_mask) == 255
        union = np.zeros((S, S), bool)
        for p, m, (_, src), colour in zip(c.placements, c.object_masks, objects, [(200, 0, 0), (0, 0, 200)],
                                           strict=True):
            # the longer side is scale * S, the aspect ratio of the mask's box is kept
            longer, shorter = (p.w, p.h) if src.sum(0).max() < src.sum(1).max() else (p.h, p.w)
            assert longer == round(p.scale * S) and 0.25 <= p.scale <= 0.5
            assert 0 <= p.x <= S - p.w and 0 <= p.y <= S - p.h  # max_outside=0: inside the canvas
            box = np.zeros((S, S), bool)
            box[p.y:p.y + p.h, p.x:p.x + p.w] = True
            assert np.array_equal(m, box)  # a full-box object's mask is exactly its placed box
            assert p.area == p.inside == p.visible == p.w * p.h
            assert (canvas[m] == colour).all()
            assert not (union & m).any()  # max_overlap 0: disjoint
            union |= m
        assert np.array_equal(inpaint, ~union)
        assert (canvas[~union] == (127, 127, 127)).all()
        again = comp.compose(objects, seed)
        assert [p.to_dict() for p in again.placements] == [p.to_dict() for p in c.placements]
        assert np.array_equal(np.asarray(again.image), canvas)
        seen.add(tuple((p.x, p.y, p.w) for p in c.placements))
    assert len(seen) > 20  # the seed matters


def test_compositing_overlap_limit_and_impossible_layouts():
    S = 64
    objects = [obj((200, 0, 0), 20, 20), obj((0, 0, 200), 20, 20)]
    comp = RandomCompositor(S, (0.4, 0.4), max_overlap=0.25, max_tries=1000)
    for seed in range(10):
        c = comp.compose(objects, seed)
        full = []
        for p in c.placements:
            b = np.zeros((S, S), bool)
            b[p.y:p.y + p.h, p.x:p.x + p.w] = True
            full.append(b)
        assert (full[0] & full[1]).sum() / full[0].sum() <= 0.25
        assert c.placements[0].visible == full[0].sum() - (full[0] & full[1]).sum()  # covered by the later one
    with pytest.raises(SynthesisError, match="object 1 could not be placed within max_overlap=0.0"):
        RandomCompositor(S, (0.9, 0.9), max_overlap=0.0, max_tries=20).compose(objects, 0)
    with pytest.raises(SynthesisError, match="empty mask"):
        comp.compose([(objects[0][0], np.zeros_like(objects[0][1]))], 0)


def test_compositing_max_outside_records_the_cut():
    S = 64
    comp = RandomCompositor(S, (0.5, 0.5), max_overlap=1.0, max_outside=0.5)
    cut = 0
    for seed in range(20):
        for p, m in zip(*(lambda c: (c.placements, c.object_masks))(comp.compose([obj((9, 9, 9), 10, 10)], seed)),
                        strict=True):
            xs = max(0, min(p.x + p.w, S) - max(p.x, 0))
            ys = max(0, min(p.y + p.h, S) - max(p.y, 0))
            assert p.inside == p.visible == xs * ys == m.sum() and p.area == p.w * p.h == 32 * 32
            cut += p.inside < p.area
    assert cut > 0


# -- filters ---------------------------------------------------------------------------------
def test_filter_functions_exact():
    cfg = FilterConfig(min_mask_area=0.1, max_mask_area=0.5, min_visible=0.9, max_object_change=0.2,
                       max_repetition=0.5)
    m = np.zeros((10, 10), bool)
    m[:3, :3] = True  # 0.09
    d = F.mask_area(m, "source A1", cfg)
    assert (d.name, d.passed, d.value) == ("mask_area", False, 0.09) and "0.0900" in d.reason
    m[:5, :10] = True  # 0.5: on the limit
    assert F.mask_area(m, "x", cfg).passed
    assert F.object_cut(100, 90, "o", cfg).passed and not F.object_cut(100, 89, "o", cfg).passed
    before = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    after = np.zeros((4, 4, 3), np.uint8)
    after[0, 0] = 204  # one pixel of 16 changed by 204 on every channel: 204 / 16 / 255 = 0.05
    mask = np.ones((4, 4), bool)
    d = F.object_change(before, Image.fromarray(after), mask, "o", cfg)
    assert d.passed and d.value == pytest.approx(0.05)
    mask[:] = False
    mask[0, 0] = True  # only the changed pixel: 0.8
    d = F.object_change(before, Image.fromarray(after), mask, "o", cfg)
    assert not d.passed and d.value == pytest.approx(0.8) and d.name == "object_changed"
    assert F.repetition("a b a b a b") == pytest.approx(1 - 2 / 5)
    assert F.repetition("red red") == 0.5 and F.repetition("") == 0.0
    assert not F.text_quality("answer", "  ", cfg).passed
    assert "repetitive" in F.text_quality("answer", "the cat the cat the cat the cat", cfg).reason
    assert F.text_quality("answer", "a small red boat with a white sail", cfg).passed
    assert "image placeholder" in F.text_quality("instruction", "<image> what is it", cfg).reason
    with pytest.raises(SynthesisError, match="min_mask_area=0.6 is above max_mask_area=0.5"):
        FilterConfig(min_mask_area=0.6, max_mask_area=0.5).validate()


def test_instruction_referring_to_a_third_image_is_dropped():
    """A synthesized sample has two images: an instruction (from the refine reply) naming {image#3}
    would be refused by the dataset reader, so the text filter drops it, saying why."""
    cfg = FilterConfig()
    d = F.text_quality("instruction", "{image#1} {image#3} what do these share?", cfg)
    assert not d.passed and d.name == "text"
    assert d.reason == ("instruction: 'instruction' refers to {image#3} but the sample has 2 images "
                        "({image#1} to {image#2})")
    assert F.text_quality("instruction", "{image#1} {image#2} what do these share?", cfg).passed


def test_pipeline_drops_exactly_the_bad_samples_and_says_why(tmp_path):
    """apple: view 1 is a 2x2 object (mask_area); boat: inpainting wipes it (object_changed); chair: the
    refined answer is empty (text); drum: repetitive answer (text)."""
    src = write_sources(tmp_path / "src", tiny=("apple", 1))
    groups = discover_sources(src)
    # a seed whose plan gives the tiny view to apple's own sample only (partners are drawn too)
    seed = next(sd for sd in range(100) if all("apple/view1.png" not in [img for _, img in s.partners]
                                              for s in plan_samples(groups, 1, sd)))
    writer = EchoWriter({"chair": "", "drum": "drum drum drum drum drum drum"})
    synth = stub_synth(inpainter=KeepInpainter(wipe={"boat"}), writer=writer, seed=seed)
    res = synth.run(src, tmp_path / "out", progress=False)
    entries = {e["id"]: e for e in read_manifest(tmp_path / "out")}
    assert {sid: e["dropped_by"] for sid, e in entries.items()} == {
        "apple-0": "mask_area", "boat-0": "object_changed", "chair-0": "text", "drum-0": "text"}
    assert re.fullmatch(r"source A[12] \(apple/view1\.png\): mask covers 0\.0021 of the image, outside "
                        r"\[0\.02, 0\.9\]", entries["apple-0"]["reason"])
    assert entries["boat-0"]["reason"].startswith("canvas 1 object 0: inpainting changed the object's pixels by")
    assert entries["chair-0"]["reason"] == "answer is empty"
    assert entries["drum-0"]["reason"] == "answer is repetitive (repetition 0.800, maximum 0.5)"
    assert res.kept == 0 and res.dropped == 4 and json.loads((tmp_path / "out" / "annotations.json").read_text()) == []
    # every decision up to the failing one is recorded, all but the last passed
    for e in entries.values():
        assert [d["passed"] for d in e["decisions"]] == [True] * (len(e["decisions"]) - 1) + [False]


def test_parse_refined():
    assert parse_refined("Instruction: What is it?\nAnswer: a boat.") == ("What is it?", "a boat.")
    assert parse_refined("Answer: a boat") == (None, "a boat")
    assert parse_refined("  a red boat ") == (None, "a red boat")


# -- resume and the output folder --------------------------------------------------------------
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    src = write_sources(tmp_path / "src")
    full = tmp_path / "full"
    stub_synth(samples_per_group=2).run(src, full, progress=False)
    want = json.loads((full / "annotations.json").read_text())
    assert len(want) == 8  # nothing dropped: every sample is in

    out = tmp_path / "out"
    # killed during sample 4 (3 text calls per sample: two backgrounds and the refinement)
    with pytest.raises(KeyboardInterrupt):
        stub_synth(samples_per_group=2, writer=EchoWriter(fail_after=3 * 3 + 1)).run(src, out, progress=False)
    assert [e["id"] for e in read_manifest(out)] == [r["id"] for r in want[:3]]
    assert json.loads((out / "annotations.json").read_text()) == want[:3]  # written on the way out
    assert not (out / ".lock").exists()
    with open(out / "manifest.jsonl", "ab") as f:  # a line cut by a kill while it was written
        f.write(b'{"id": "chair-1", "status": "ke')
    res = stub_synth(samples_per_group=2).run(src, out, progress=False)
    assert (res.resumed, res.kept, res.kept_total) == (3, 5, 8)
    ids = [e["id"] for e in read_manifest(out)]
    assert ids == [r["id"] for r in want] and len(set(ids)) == 8
    assert json.loads((out / "annotations.json").read_text()) == want
    for r in want:  # the same pixels as the uninterrupted run
        for rel in r["img_list"]:
            assert np.array_equal(np.asarray(Image.open(out / rel)), np.asarray(Image.open(full / rel)))
    # a run with nothing left to do changes nothing
    res = stub_synth(samples_per_group=2).run(src, out, progress=False)
    assert (res.resumed, res.kept, res.dropped) == (8, 0, 0) and len(read_manifest(out)) == 8


class CountingSegmenter(ThresholdSegmenter):
    """The threshold segmenter, counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def segment(self, image):
        self.calls += 1
        return super().segment(image)


def test_a_source_changed_under_the_same_name_is_recomputed_on_resume(tmp_path):
    """Masks were cached by the source's path and finished samples kept: after apple/view0.png got new
    pixels a resumed run reused its old mask and old samples, mixing old and new results. Now the mask
    cache is keyed by the file's sha256 and a sample records its sources' sha256: the changed source is
    segmented again and the samples made from it are redone (said in the manifest); the others, and a
    source rewritten with the same bytes, are reused."""
    src = write_sources(tmp_path / "src")
    out = tmp_path / "out"
    first = CountingSegmenter()
    stub_synth(segmenter=first).run(src, out, progress=False)
    assert first.calls == 8  # every source once
    before = read_manifest(out)
    changed = "apple/view0.png"
    users = {s.id for s in plan_samples(discover_sources(src), 1, 0)
             if changed in (*s.a_images, *(img for _, img in s.partners))}
    assert 0 < len(users) < 4

    rect_image(COLOURS["apple"], (20, 4, 44, 20)).save(src / changed)  # same name, the object moved
    same = (src / "boat" / "view1.png").read_bytes()
    (src / "boat" / "view1.png").write_bytes(same)  # rewritten with the same bytes: still reusable
    fresh = tmp_path / "fresh"
    stub_synth().run(src, fresh, progress=False)

    again, inpainter = CountingSegmenter(), KeepInpainter()
    res = stub_synth(segmenter=again, inpainter=inpainter).run(src, out, progress=False)
    assert again.calls == 1  # only the changed source
    assert (res.resumed, res.redone, res.kept_total) == (4 - len(users), len(users), 4)
    assert len(inpainter.calls) == 2 * len(users)  # two canvases per redone sample, none for the others
    after = read_manifest(out)
    assert after[:4] == before  # appended, never rewritten
    assert {e["id"] for e in after[4:]} == users
    for e in after[4:]:
        assert e["replaces"].startswith(f"source {changed} changed since the sample was made (sha256 ")
    # no mix of old and new: the dataset is the one a fresh run on the changed sources makes
    want = json.loads((fresh / "annotations.json").read_text())
    assert json.loads((out / "annotations.json").read_text()) == want
    for r in want:
        for rel in r["img_list"]:
            assert np.array_equal(np.asarray(Image.open(out / rel)), np.asarray(Image.open(fresh / rel))), rel
    # and a further resume finds nothing to redo
    res = stub_synth(segmenter=(last := CountingSegmenter())).run(src, out, progress=False)
    assert (res.resumed, res.redone, last.calls) == (4, 0, 0) and len(read_manifest(out)) == 4 + len(users)
    with pytest.raises(SynthesisError, match="line 5: sample id .* recorded twice"):  # a copy is not a redo
        lines = (out / "manifest.jsonl").read_text().splitlines()
        (out / "manifest.jsonl").write_text("\n".join(lines[:4] + [json.dumps(before[0])]) + "\n")
        Manifest(out)


def test_limit_then_continue_with_a_bar_per_stage(tmp_path, capsys):
    src = write_sources(tmp_path / "src")
    stub_synth().run(src, tmp_path / "out", limit=2, progress=True)
    assert len(read_manifest(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    for stage in ("segment", "compose", "caption", "background", "inpaint", "refine", "write"):
        assert re.search(stage + r" *: *100%", err), stage
    res = stub_synth().run(src, tmp_path / "out", progress=False)
    assert (res.resumed, res.kept_total) == (2, 4)


def test_refuses_a_foreign_folder_and_other_settings(tmp_path):
    src = write_sources(tmp_path / "src")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SynthesisError, match=r"is not empty and is not a sam-fast synthesis run \(no synthesis.json\)"):
        stub_synth().run(src, mine, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    stub_synth().run(src, tmp_path / "out", limit=1, progress=False)
    with pytest.raises(SynthesisError, match=r"made with other settings \(filters.max_object_change, seed\)"):
        stub_synth(seed=1, filters=FilterConfig(max_object_change=0.3)).run(src, tmp_path / "out", progress=False)


def test_sources_need_two_images_and_three_objects(tmp_path):
    src = write_sources(tmp_path / "src", groups={"apple": COLOURS["apple"], "boat": COLOURS["boat"]})
    with pytest.raises(SynthesisError, match="2 object folder"):
        discover_sources(src)
    (src / "chair").mkdir()
    rect_image((1, 2, 3), (1, 1, 5, 5)).save(src / "chair" / "only.png")
    with pytest.raises(SynthesisError, match=r"chair has 1 image\(s\)"):
        discover_sources(src)


def test_manifest_refuses_duplicates(tmp_path):
    m = Manifest(tmp_path)
    m.append({"id": "a", "status": "kept"})
    with pytest.raises(SynthesisError, match="'a' is already recorded"):
        m.append({"id": "a", "status": "kept"})
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "a", "status": "dropped"}\n')
    with pytest.raises(SynthesisError, match="line 2: sample id 'a' recorded twice"):
        Manifest(tmp_path)


# -- text ------------------------------------------------------------------------------------
def test_prompts_file_is_shipped_and_checked(tmp_path):
    p = load_prompts()
    assert "{object}" in p.background and all("{images}" in t for t in p.instructions)
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"background": "a {place}", "refine": "{caption}", "instructions": ["{images} x"]}))
    with pytest.raises(SynthesisError, match=r"p.json: 'background' uses unknown field\(s\) \['place'\]"):
        load_prompts(bad)
    with pytest.raises(SynthesisError, match="no such file"):
        load_prompts(tmp_path / "missing.json")


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_openai_writer_request_and_errors(monkeypatch):
    sent = []

    def opener(req, timeout):
        sent.append((req, timeout))
        return FakeResponse(json.dumps({"choices": [{"message": {"content": "  a sunny beach  "}}]}).encode())

    monkeypatch.setenv("MY_KEY", "sk-test")
    w = OpenAITextWriter("http://localhost:8000/v1/", "vicuna", api_key_env="MY_KEY", timeout=5, opener=opener)
    assert w.complete("describe", seed=7) == "a sunny beach"
    req, timeout = sent[0]
    assert req.full_url == "http://localhost:8000/v1/chat/completions" and req.get_method() == "POST" and timeout == 5
    assert req.get_header("Authorization") == "Bearer sk-test"
    body = json.loads(req.data)
    assert body["model"] == "vicuna" and body["seed"] == 7 and body["messages"] == [{"role": "user", "content": "describe"}]
    assert "sk-test" not in json.dumps(w.describe())

    def failing(req, timeout):
        raise urllib.error.HTTPError(req.full_url, 503, "Service Unavailable", {}, None)

    with pytest.raises(SynthesisError, match="HTTP 503 Service Unavailable"):
        OpenAITextWriter("https://x/v1/chat/completions", "m", opener=failing).complete("p", 0)
    with pytest.raises(SynthesisError, match="not an OpenAI chat completion"):
        OpenAITextWriter("https://x/v1", "m", opener=lambda r, timeout: FakeResponse(b'{"error": 1}')).complete("p", 0)
    for url in ("file:///etc/passwd", "ftp://host/v1", "localhost:8000"):
        with pytest.raises(SynthesisError, match="must be an http:// or https:// URL"):
            OpenAITextWriter(url, "m")
    with pytest.raises(SynthesisError, match="not in the URL"):
        OpenAITextWriter("http://user:secret@host/v1", "m")


def tiny_causal_lm(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sam_fast.data import tiny_tokenizers

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizers()[1].save_pretrained(path)
    return path


def test_transformers_writer_is_seeded(tmp_path):
    w = TransformersTextWriter.from_pretrained(tiny_causal_lm(tmp_path / "lm"), max_new_tokens=6, do_sample=True)
    a, b = w.complete("a red boat", 3), w.complete("a red boat", 3)
    assert a == b and a and w.complete("a red boat", 4) != a
    assert w.describe()["model"] == str(tmp_path / "lm")



def test_transformers_writer_never_turns_on_hub_kernels(tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(kwargs.pop("use_kernels", "absent"))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(spy))
    TransformersTextWriter.from_pretrained(tiny_causal_lm(tmp_path / "lm"), max_new_tokens=2)
    assert seen == [False]

# -- the whole pipeline with the real components -------------------------------------------------
def tiny_inpaint_dir(path: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64))
    tok_dir = path.parent / "clip_tok"
    tok_dir.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tiny_instructblip_dir(path: Path) -> Path:
    from _tiny import tiny_instructblip

    from sam_fast.data import tiny_tokenizers

    tiny_instructblip().save_pretrained(path)
    q, llm = tiny_tokenizers(qformer_vocab_size=100, llm_vocab_size=119)  # the tiny HF config's sizes
    q.save_pretrained(path / "qformer_tokenizer")
    llm.save_pretrained(path)
    return path


@pytest.mark.slow
def test_synthesize_command_builds_a_dataset_that_trains(tmp_path, capsys):
    """sam-fast synthesize with tiny random diffusers / InstructBLIP / causal LM directories, then one training
    step of sam-fast train on the result."""
    from sam_fast.cli import main
    from sam_fast.data import load_records

    src = write_sources(tmp_path / "src", groups={k: COLOURS[k] for k in ("apple", "boat", "chair")})
    out = tmp_path / "data"
    args = ["synthesize", "--sources", str(src), "--output", str(out), "--segmenter", "threshold",
            "--inpaint-model", str(tiny_inpaint_dir(tmp_path / "sd")), "--inpaint-steps", "2", "--guidance-scale", "1",
            "--caption-model", str(tiny_instructblip_dir(tmp_path / "blip")), "--caption-beams", "1",
            "--caption-max-tokens", "4", "--text-model", str(tiny_causal_lm(tmp_path / "lm")),
            "--text-max-tokens", "8", "--text-temperature", "1.0", "--canvas-size", "32", "--scale-range", "0.3", "0.4",
            # random models: the pixels and texts they produce are noise, so only the layout filters bite
            "--max-object-change", "1", "--max-repetition", "1", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert "kept 3, dropped 0" in capsys.readouterr().out
    records, skipped = load_records(out)
    assert len(records) == 3 and not skipped
    entries = read_manifest(out)
    for e, r in zip(entries, records, strict=True):
        assert e["status"] == "kept" and e["record"]["id"] == r.id
        assert r.instruction.startswith("{image#1} {image#2} ") and len(r.images) == 2
        assert Image.open(r.images[0]).size == (32, 32)
        assert e["models"]["inpainting"]["model"] == str(tmp_path / "sd")
        assert e["models"]["captioning"]["model"] == str(tmp_path / "blip")
        assert e["models"]["text"]["model"] == str(tmp_path / "lm")
        assert {d["name"] for d in e["decisions"]} == {"mask_area", "object_cut", "text", "object_changed"}
        mask = np.asarray(Image.open(out / e["masks"][0])) == 255
        assert 0 < mask.mean() < 1
    # rerunning the same command has nothing left to do
    assert main(args) == 0 and "synthesized 0 sample(s) (3 done before)" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", str(out), "--output", str(run), "--max-steps", "1",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert (run / "log.jsonl").read_text().strip()


def test_synthesize_command_errors_are_one_line(tmp_path):
    from sam_fast.cli import main

    src = write_sources(tmp_path / "src")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    common = ["synthesize", "--sources", str(src), "--inpaint-model", str(tmp_path / "sd"),
              "--caption-model", str(tmp_path / "c"), "--segmenter", "threshold"]
    with pytest.raises(SystemExit, match="give one text writer"):
        main([*common, "--output", str(busy)])
    with pytest.raises(SystemExit, match="--segmenter sam needs --sam-model"):
        main([*common[:-2], "--output", str(busy), "--text-url", "http://h/v1", "--text-api-model", "m"])
    with pytest.raises(SystemExit, match=r"^sam-fast synthesize: --inpaint-model .*/sd: cannot load"):
        main([*common, "--output", str(busy), "--text-url", "http://h/v1", "--text-api-model", "m"])


def test_synthesize_command_wiring_and_interrupt(tmp_path, monkeypatch, capsys):
    """The options reach the components; Ctrl-C ends with one line and exit status 130, and a rerun finishes."""
    import sam_fast.synthesis as S
    from sam_fast.cli import main

    got = {}

    def fake(kind, stub):
        def load(cls, path, **kw):
            got[kind] = (str(path), kw)
            return stub
        return classmethod(load)

    writer = EchoWriter(fail_after=4)
    monkeypatch.setattr(S.DiffusersInpainter, "from_pretrained", fake("inpaint", KeepInpainter()))
    monkeypatch.setattr(S.SAMCaptioner, "from_pretrained", fake("caption", FixedCaptioner()))
    monkeypatch.setattr(S, "OpenAITextWriter", lambda url, model, **kw: got.setdefault("text", (url, model, kw))
                        and writer)
    src = write_sources(tmp_path / "src")
    args = ["synthesize", "--sources", str(src), "--output", str(tmp_path / "out"), "--segmenter", "threshold",
            "--inpaint-model", "SD", "--inpaint-steps", "7", "--caption-model", "BLIP", "--caption-prompt",
            "{image#1} What is this?", "--text-url", "http://h:1/v1", "--text-api-model", "m", "--canvas-size", "64",
            "--scale-range", "0.3", "0.4", "--device", "cpu", "--no-progress"]
    assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith("rerun the same command to continue")
    assert got["inpaint"] == ("SD", {"device": "cpu", "dtype": None, "steps": 7, "guidance_scale": 7.5})
    assert got["caption"][0] == "BLIP" and got["caption"][1]["prompt"] == "{image#1} What is this?"
    assert got["text"][:2] == ("http://h:1/v1", "m")
    writer.fail_after = None
    assert main(args) == 0 and "synthesized 3 sample(s) (1 done before): kept 3" in capsys.readouterr().out


def _stub_command(tmp_path, monkeypatch, writer):
    """`sam-fast synthesize` arguments over stub models (inpainting, captioning, text by `writer`)."""
    import sam_fast.synthesis as S

    def fake(stub):
        return classmethod(lambda cls, path, **kw: stub)

    monkeypatch.setattr(S.DiffusersInpainter, "from_pretrained", fake(KeepInpainter()))
    monkeypatch.setattr(S.SAMCaptioner, "from_pretrained", fake(FixedCaptioner()))
    monkeypatch.setattr(S, "OpenAITextWriter", lambda url, model, **kw: writer)
    src = write_sources(tmp_path / "src")
    return ["synthesize", "--sources", str(src), "--output", str(tmp_path / "out"), "--segmenter", "threshold",
            "--inpaint-model", "SD", "--caption-model", "BLIP", "--text-url", "http://h:1/v1", "--text-api-model",
            "m", "--canvas-size", "64", "--scale-range", "0.3", "0.4", "--device", "cpu", "--no-progress"]


def test_synthesize_stopped_by_sigterm_writes_its_dataset_and_releases_the_lock(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (a job preempted and requeued, maybe on another node): the finished
    samples are in annotations.json, the lock is gone, and the rerun continues."""
    import signal

    from sam_fast.cli import main

    class Terminating(EchoWriter):
        def complete(self, prompt, seed):
            if self.fail_after is not None and self.calls >= self.fail_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().complete(prompt, seed)

    writer = Terminating(fail_after=4)
    args = _stub_command(tmp_path, monkeypatch, writer)
    assert main(args) == 143
    assert capsys.readouterr().err.strip().endswith("rerun the same command to continue")
    out = tmp_path / "out"
    done = [e["record"]["id"] for e in read_manifest(out) if e["status"] == "kept"]
    assert len(done) == 1 and [r["id"] for r in json.loads((out / "annotations.json").read_text())] == done
    assert not (out / ".lock").exists()
    writer.fail_after = None
    assert main(args) == 0 and "synthesized 3 sample(s) (1 done before): kept 3" in capsys.readouterr().out


def test_a_full_disk_while_synthesizing_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from sam_fast.cli import main
    from sam_fast.synthesis import manifest

    real, calls = manifest.os.fsync, []

    def filling(fd):
        calls.append(fd)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(manifest.os, "fsync", filling)
    with pytest.raises(SystemExit, match=r"^sam-fast synthesize: no space left on the device; free space"):
        main(_stub_command(tmp_path, monkeypatch, EchoWriter()))
    left = [p.relative_to(tmp_path) for p in (tmp_path / "out").rglob(".*.tmp-*")]
    assert left == [] and len(calls) >= 6


def test_the_old_package_name_is_a_deprecated_alias():
    """sam_fast.data.synthesis (where synthesis lived inside the data layer) still imports, warns that it
    moved, and gives the same objects, stage modules included, as sam_fast.synthesis."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from sam_fast.data.synthesis.errors import load_local\n"
            "    from sam_fast.data.synthesis import Synthesizer, SynthesisError, __all__ as names\n"
            "    import sam_fast.data.synthesis as old\n"
            "import sam_fast.synthesis as new\n"
            "from sam_fast.synthesis import errors\n"
            "print([(x.category.__name__, str(x.message)) for x in w])\n"
            "print(load_local is errors.load_local, Synthesizer is new.Synthesizer, SynthesisError is new.SynthesisError,\n"
            "      all(getattr(old, n) is getattr(new, n) for n in new.__all__), names == new.__all__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    warned, same = r.stdout.strip().splitlines()
    assert warned == str([("DeprecationWarning",
                           "sam_fast.data.synthesis moved to sam_fast.synthesis; import it from there")])
    assert same == "True True True True True"


def test_the_prompts_file_ships_from_its_package():
    """setup.py's package_data names prompts.json under the package the default prompts are read from."""
    import ast

    from sam_fast.synthesis import DEFAULT_PROMPTS

    setup = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    data = next(ast.literal_eval(k.value) for n in ast.walk(setup) if isinstance(n, ast.Call)
                for k in n.keywords if k.arg == "package_data")
    assert DEFAULT_PROMPTS.is_file() and DEFAULT_PROMPTS.parent.name == "synthesis"
    assert DEFAULT_PROMPTS.name in data["sam_fast.synthesis"], data
