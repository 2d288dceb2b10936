"""Converters into annotations.json folders (sam_fast.data.formats): LLaVA conversations, datasets-style
rows, VIST stories. Fixtures are written here by hand; every expected annotation is spelled out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam_fast.data import AnnotationDataset, EvalTransform, load_records
from sam_fast.data.formats import FormatError, convert_hf, convert_llava, convert_vist


def _png(path: Path, color, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _annotations(out: Path) -> list:
    return json.loads((out / "annotations.json").read_text())


def _opens(out: Path, n: int) -> None:
    """The folder passes every check of load_records and AnnotationDataset (images decoded)."""
    records, skipped = load_records(out)
    assert len(records) == n and len(skipped) == 0
    ds = AnnotationDataset(out, EvalTransform(16))
    assert len(ds) == n and ds[0]["pixel_values"].shape[1:] == (3, 16, 16)


# -- LLaVA -------------------------------------------------------------------------------------------

RED, GREEN, BLUE = (200, 20, 20), (20, 200, 20), (20, 20, 200)


@pytest.fixture
def llava(tmp_path):
    imgs = tmp_path / "imgs"
    _png(imgs / "a.png", RED)
    _png(imgs / "x" / "b.png", GREEN)
    _png(imgs / "c.png", BLUE)
    records = [
        {"id": "a1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": 7, "image": ["x/b.png", "c.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <Image>."},
            {"from": "gpt", "value": "Green, then blue."}]},
    ]
    return _json(tmp_path / "llava.json", records), imgs


def test_llava_first_exchange(llava, tmp_path):
    src, imgs = llava
    out = tmp_path / "out"
    report = convert_llava(src, out, imgs)
    assert _annotations(out) == [
        {"id": "a1", "img_list": ["images/a.png"], "instruction": "{image#1}\nWhat is this?",
         "output": "A red square."},
        {"id": 7, "img_list": ["images/x/b.png", "images/c.png"], "instruction": "Compare {image#1} and {image#2}.",
         "output": "Green, then blue."},
    ]
    assert (report.samples, report.images, report.written, report.unused_turns) == (2, 3, 3, 1)
    assert "1 later conversation exchange(s) left out" in report.summary()
    assert (out / "images" / "x" / "b.png").read_bytes() == (imgs / "x" / "b.png").read_bytes()
    _opens(out, 2)


def test_llava_all_turns_carry_the_dialogue(llava, tmp_path):
    src, imgs = llava
    out = tmp_path / "out"
    report = convert_llava(src, out, imgs, turns="all")
    ann = _annotations(out)
    assert [a["id"] for a in ann] == ["a1", "a1#2", 7]
    assert ann[1] == {"id": "a1#2", "img_list": ["images/a.png"], "output": "Red.",
                      "instruction": "User: {image#1}\nWhat is this?\nAssistant: A red square.\nUser: And its colour?"}
    assert report.unused_turns == 0 and report.written == 3  # a.png copied once for both samples
    _opens(out, 3)


def test_llava_jsonl_and_default_image_folder(tmp_path):
    _png(tmp_path / "a.png", RED)
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"id": "j", "image": "a.png", "conversations": [
        {"from": "user", "value": "<image> Describe."}, {"from": "assistant", "value": "Red."}]}) + "\n\n")
    convert_llava(src, tmp_path / "out")
    assert _annotations(tmp_path / "out") == [
        {"id": "j", "img_list": ["images/a.png"], "instruction": "{image#1} Describe.", "output": "Red."}]


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


LLAVA_BAD = {  # record -> what the one-line refusal says besides the record id
    "count": ({"image": ["a.png", "c.png"], "conversations": [{"from": "human", "value": "<image> hi"},
                                                             {"from": "gpt", "value": "x"}]},
              ["1 <image> token(s)", "2 image(s)"]),
    "text only": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
                  ["has no 'image'"]),
    "order": ({"image": "a.png", "conversations": [{"from": "gpt", "value": "<image>"}]}, ["turn 1 is from 'gpt'"]),
    "no answer": ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}]},
                  ["turn 1 (human) has no answer"]),
    "empty answer": ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> q"},
                                                         {"from": "gpt", "value": "  "}]}, ["'output' is empty"]),
    "outside": ({"image": "../secret.png", "conversations": [{"from": "human", "value": "<image> q"},
                                                            {"from": "gpt", "value": "x"}]},
                ["'../secret.png' leaves the dataset folder"]),
}


@pytest.mark.parametrize("case", sorted(LLAVA_BAD))
def test_llava_bad_record_is_refused_in_one_line_and_nothing_is_written(tmp_path, case):
    record, parts = LLAVA_BAD[case]
    imgs = tmp_path / "imgs"
    _png(imgs / "a.png", RED)
    _png(imgs / "c.png", BLUE)
    _png(tmp_path / "secret.png", RED)
    good = {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image> q"},
                                                            {"from": "gpt", "value": "x"}]}
    src = _json(tmp_path / "l.json", [good, {"id": "bad", **record}])
    with pytest.raises(FormatError) as exc:
        convert_llava(src, tmp_path / "out", imgs)
    msg = _one_line(exc)
    assert msg.startswith(f"{src}: record id 'bad': ") and all(p in msg for p in parts), msg
    assert not (tmp_path / "out").exists()  # the first record's copy was removed with the folder
    report = convert_llava(src, tmp_path / "out", imgs, skip_bad=True)
    assert report.skipped[0][0] == "bad" and report.missing == 0
    assert [a["id"] for a in _annotations(tmp_path / "out")] == ["ok"]


def test_llava_missing_image_refused_or_skipped_and_counted(llava, tmp_path):
    src, imgs = llava
    (imgs / "c.png").unlink()
    with pytest.raises(FormatError) as exc:
        convert_llava(src, tmp_path / "out", imgs)
    msg = _one_line(exc)
    assert "record id 7: image file" in msg and "c.png does not exist" in msg
    report = convert_llava(src, tmp_path / "out", imgs, skip_missing=True)
    assert report.missing == 1 and [i for i, _ in report.skipped] == [7]
    assert "skipped 1 record(s), 1 for missing image files" in report.summary()
    assert [a["id"] for a in _annotations(tmp_path / "out")] == ["a1"]
    assert not (tmp_path / "out" / "images" / "x").exists()  # the skipped record's first image was not copied


def test_skip_missing_does_not_skip_other_problems(tmp_path):
    _png(tmp_path / "a.png", RED)
    src = _json(tmp_path / "l.json", [{"id": "n", "image": "a.png", "conversations": [
        {"from": "human", "value": "no token"}, {"from": "gpt", "value": "x"}]}])
    with pytest.raises(FormatError, match=r"record id 'n': 0 <image> token\(s\) .* but 1 image\(s\)"):
        convert_llava(src, tmp_path / "out", skip_missing=True)


def test_existing_annotations_are_refused_unless_overwrite(llava, tmp_path):
    src, imgs = llava
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_text("[]")
    with pytest.raises(FormatError) as exc:
        convert_llava(src, out, imgs)
    assert "annotations.json exists; pass --overwrite" in _one_line(exc)
    assert (out / "annotations.json").read_text() == "[]"
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json"]
    convert_llava(src, out, imgs, overwrite=True)
    assert len(_annotations(out)) == 2


def test_an_image_file_already_in_the_output_is_never_replaced(llava, tmp_path):
    src, imgs = llava
    out = tmp_path / "out"
    mine = _png(out / "images" / "a.png", (1, 2, 3))
    before = mine.read_bytes()
    report = convert_llava(src, out, imgs)
    assert mine.read_bytes() == before
    assert _annotations(out)[0]["img_list"] == ["images/a-2.png"]
    assert (out / "images" / "a-2.png").read_bytes() == (imgs / "a.png").read_bytes() and report.written == 3
    convert_llava(src, out, imgs, overwrite=True)  # again: the same bytes are found, nothing new is written
    assert _annotations(out)[0]["img_list"] == ["images/a-2.png"] and len(list((out / "images").rglob("*.png"))) == 4


def test_references_instead_of_copies(tmp_path):
    out = tmp_path / "ds"
    _png(out / "raw" / "a.png", RED)
    _png(tmp_path / "elsewhere.png", BLUE)
    rec = {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image> q"},
                                                       {"from": "gpt", "value": "x"}]}
    src = _json(tmp_path / "l.json", [rec])
    report = convert_llava(src, out, out / "raw", copy_images=False)
    assert _annotations(out)[0]["img_list"] == ["raw/a.png"] and report.written == 0
    assert not (out / "images").exists()
    _opens(out, 1)
    _json(src, [{**rec, "image": "elsewhere.png"}])
    with pytest.raises(FormatError, match=r"record id 1: image file .*elsewhere.png lies outside the output folder"):
        convert_llava(src, out, tmp_path, copy_images=False, overwrite=True)


# -- datasets-style rows ---------------------------------------------------------------------------------

class _Rows:
    """What convert_hf needs of a datasets.Dataset: len, [i] -> dict, column_names."""

    def __init__(self, rows):
        self.rows, self.column_names = rows, list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _encoded(color, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def test_hf_rows_of_pil_images(tmp_path):
    a, b = Image.new("RGB", (9, 7), RED), Image.new("L", (5, 5), 77)
    rows = [{"images": [a, b], "question": "What is common?", "answer": "Nothing."},
            {"images": a, "question": "Describe <image>.", "answer": "Red."}]
    out = tmp_path / "out"
    report = convert_hf(rows, out)
    assert _annotations(out) == [
        {"id": 0, "img_list": ["images/0_1.png", "images/0_2.png"],
         "instruction": "{image#1} {image#2} What is common?", "output": "Nothing."},
        {"id": 1, "img_list": ["images/0_1.png"], "instruction": "Describe {image#1}.", "output": "Red."},
    ]
    assert report.written == 2  # the same picture in two rows is stored once
    with Image.open(out / "images" / "0_2.png") as im:  # what the model sees: 8-bit RGB
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), np.full((5, 5, 3), 77, np.uint8))
    _opens(out, 2)


def test_hf_bytes_paths_ids_and_columns(tmp_path):
    path = _png(tmp_path / "src" / "p.png", BLUE)
    jpeg = _encoded(GREEN)
    ds = _Rows([{"key": "r1", "pics": [{"bytes": jpeg, "path": None}, {"bytes": None, "path": "p.png"}],
                 "prompt": "<image> then <image>: which is blue?", "reply": "The second."}])
    out = tmp_path / "out"
    convert_hf(ds, out, image_column="pics", instruction_column="prompt", output_column="reply", id_column="key",
               image_root=tmp_path / "src")
    assert _annotations(out) == [{"id": "r1", "img_list": ["images/r1_1.jpg", "images/r1_2.png"],
                                  "instruction": "{image#1} then {image#2}: which is blue?", "output": "The second."}]
    assert (out / "images" / "r1_1.jpg").read_bytes() == jpeg  # kept as encoded, not re-compressed
    assert (out / "images" / "r1_2.png").read_bytes() == path.read_bytes()
    _opens(out, 1)


def test_hf_refusals_name_the_row_and_the_columns(tmp_path):
    rows = _Rows([{"image": Image.new("RGB", (4, 4)), "text": "q", "answer": "a"}])
    with pytest.raises(FormatError) as exc:
        convert_hf(rows, tmp_path / "out")
    assert "no instruction column (looked for instruction, question; columns: ['image', 'text', 'answer'])" in \
        _one_line(exc)
    bad = [{"image": [Image.new("RGB", (4, 4))] * 2, "question": "<image> only one?", "answer": "a"}]
    with pytest.raises(FormatError, match=r"^dataset: row id 0: 1 <image> token\(s\) in the instruction but 2 image"):
        convert_hf(bad, tmp_path / "out")
    broken = [{"image": {"bytes": b"not an image", "path": None}, "question": "q", "answer": "a"}]
    with pytest.raises(FormatError, match=r"row id 0: column 'image' image 1: its bytes are not a readable image"):
        convert_hf(broken, tmp_path / "out")

    class Splits:
        column_names = {"train": ["image"], "test": ["image"]}

        def __len__(self):
            return 2

    with pytest.raises(FormatError, match=r"^dataset: a dataset of splits \(\['train', 'test'\]\): convert one split"):
        convert_hf(Splits(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_missing_path_skipped_and_counted(tmp_path):
    _png(tmp_path / "here.png", RED)
    rows = [{"id": "gone", "image": str(tmp_path / "gone.png"), "question": "q", "answer": "a"},
            {"id": "here", "image": str(tmp_path / "here.png"), "question": "q", "answer": "a"}]
    with pytest.raises(FormatError, match=r"row id 'gone': image file .*gone.png does not exist"):
        convert_hf(rows, tmp_path / "out")
    report = convert_hf(rows, tmp_path / "out", skip_missing=True)
    assert report.missing == 1 and report.skipped[0][0] == "gone"
    assert _annotations(tmp_path / "out") == [{"id": "here", "img_list": ["images/here_1.png"],
                                               "instruction": "{image#1} q", "output": "a"}]


# -- VIST --------------------------------------------------------------------------------------------------

def _vist(tmp_path, photos=("11", "12", "13", "14", "15")) -> tuple[Path, Path]:
    imgs = tmp_path / "vist_imgs"
    for k, pid in enumerate(["11", "12", "13", "14", "15", "21"]):
        _png(imgs / f"{pid}{'.png' if pid == '13' else '.jpg'}", (40 * k, 10, 10))
    texts = ["we went out .", "it was sunny .", "we ate .", "we swam .", "home again ."]
    originals = ["We went out.", "It was sunny!", "We ate.", "We swam.", "Home again."]
    order = [3, 0, 4, 1, 2]  # annotations listed out of story order
    anns = [[{"story_id": "900", "photo_flickr_id": photos[o], "worker_arranged_photo_order": o, "album_id": "5",
              "text": texts[o], "original_text": originals[o]}] for o in order]
    anns.insert(2, [{"story_id": "901", "photo_flickr_id": "21", "worker_arranged_photo_order": 0,
                     "text": "just one .", "original_text": "Just one."}])
    src = _json(tmp_path / "sis" / "train.story-in-sequence.json",
                {"images": [{"id": p, "url_o": f"http://x/{p}.jpg"} for p in photos], "albums": [{"id": "5"}],
                 "annotations": anns})
    return src, imgs


def test_vist_stories(tmp_path):
    src, imgs = _vist(tmp_path)
    out = tmp_path / "out"
    report = convert_vist(src, out, imgs)
    assert _annotations(out) == [
        {"id": "900", "img_list": ["images/11.jpg", "images/12.jpg", "images/13.png", "images/14.jpg", "images/15.jpg"],
         "instruction": "{image#1} {image#2} {image#3} {image#4} {image#5} Write a story about these 5 images.",
         "output": "we went out . it was sunny . we ate . we swam . home again ."},
        {"id": "901", "img_list": ["images/21.jpg"], "instruction": "{image#1} Write a story about this image.",
         "output": "just one ."},
    ]
    assert report.samples == 2 and report.images == 6
    _opens(out, 2)
    convert_vist(src, out, imgs, text_field="original_text", instruction="Tell {image#1}'s story ({n} photos).",
                 overwrite=True)
    first = _annotations(out)[0]
    assert first["instruction"] == "Tell {image#1}'s story (5 photos)."
    assert first["output"] == "We went out. It was sunny! We ate. We swam. Home again."


def test_vist_missing_photo_refused_naming_story_and_file_or_skipped_and_counted(tmp_path):
    src, imgs = _vist(tmp_path, photos=("11", "12", "99", "14", "15"))
    with pytest.raises(FormatError) as exc:
        convert_vist(src, tmp_path / "out", imgs)
    msg = _one_line(exc)
    assert "story id '900': image file" in msg and "99.jpg (or .jpeg, .png, .gif) does not exist" in msg
    report = convert_vist(src, tmp_path / "out", imgs, skip_missing=True)
    assert report.missing == 1 and [i for i, _ in report.skipped] == ["900"] and report.samples == 1
    assert [a["id"] for a in _annotations(tmp_path / "out")] == ["901"]


def test_vist_instruction_must_name_images_the_story_has(tmp_path):
    src, imgs = _vist(tmp_path)
    with pytest.raises(FormatError, match=r"story id '900': 'instruction' refers to \{image#6\} but the sample has 5"):
        convert_vist(src, tmp_path / "out", imgs, instruction="{image#6} story")
    with pytest.raises(FormatError, match=r"instruction template: 'instruction' contains the image placeholder"):
        convert_vist(src, tmp_path / "out", imgs, instruction="<image> story")


def test_an_interrupted_conversion_removes_only_what_it_wrote(tmp_path):
    out = tmp_path / "out"
    mine = _png(out / "images" / "0_1.png", (1, 2, 3))
    before = mine.read_bytes()

    class Stops(_Rows):
        def __getitem__(self, i):
            if i == 1:
                raise KeyboardInterrupt  # Ctrl-C while the second row is read
            return super().__getitem__(i)

    rows = Stops([{"images": Image.new("RGB", (4, 4), RED), "question": "q", "answer": "a"}] * 2)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(rows, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["images", "images/0_1.png"]
    assert mine.read_bytes() == before  # the first row's copy went to images/0_1-2.png, now removed
