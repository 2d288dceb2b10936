"""Data that should not be read or trained on: image paths that leave the dataset folder, images that
only fail when decoded, the image placeholder text in an instruction, huge texts; safe file names
built from sample ids."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sam_fast.data import AnnotationDataset, Collator, DataError, EvalTransform, PromptBuilder, tiny_tokenizers
from sam_fast.data.dataset import load_records
from sam_fast.data.paths import UniqueNames, safe_filename
from sam_fast.data.synthetic import write_group_captions


@pytest.fixture
def ds_dir(tmp_path):
    return write_group_captions(tmp_path / "ds", n_samples=4, size=32, seed=1, max_images=1)


def _set(root, index, **fields):
    path = root / "annotations.json"
    recs = json.loads(path.read_text())
    recs[index].update(fields)
    path.write_text(json.dumps(recs))


def _outside_png(tmp_path):
    p = tmp_path / "outside.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(p)
    return p


# -- path containment -------------------------------------------------------------------------
def test_absolute_and_dotdot_paths_are_refused_unless_allowed(ds_dir, tmp_path):
    outside = _outside_png(tmp_path)
    for rel in (str(outside), "../outside.png", "images/../../outside.png"):
        _set(ds_dir, 2, img_list=[rel])
        with pytest.raises(DataError) as err:
            AnnotationDataset(ds_dir, EvalTransform(28))
        msg = str(err.value)
        assert "sample id 2" in msg and repr(rel) in msg and "allow-outside-paths" in msg, msg
        assert "\n" not in msg
        ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
        assert len(ds) == 3 and len(ds.skipped) == 1
        ok = AnnotationDataset(ds_dir, EvalTransform(28), allow_outside_paths=True)
        assert len(ok) == 4 and ok[2]["pixel_values"].shape == (1, 3, 28, 28)


def test_symlink_out_of_the_folder_is_refused_but_inside_is_fine(ds_dir, tmp_path):
    outside = _outside_png(tmp_path)
    (ds_dir / "images" / "link_out.png").symlink_to(outside)
    (ds_dir / "images" / "link_in.png").symlink_to(ds_dir / "images" / "0000_0.png")
    _set(ds_dir, 1, img_list=["images/link_in.png"])
    _set(ds_dir, 3, img_list=["images/link_out.png"])
    with pytest.raises(DataError, match=r"sample id 3: image path 'images/link_out.png' leaves the dataset folder"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert [r.id for r in ds.records] == [0, 1, 2]
    assert AnnotationDataset(ds_dir, EvalTransform(28), allow_outside_paths=True)[3] is not None


def test_refusal_does_not_tell_whether_an_outside_file_exists(ds_dir, tmp_path, monkeypatch):
    _outside_png(tmp_path)
    messages = []
    for rel in ("../outside.png", "../missing.png"):
        _set(ds_dir, 0, img_list=[rel])
        touched = []
        real_is_file = type(ds_dir).is_file
        monkeypatch.setattr(type(ds_dir), "is_file", lambda self: touched.append(self) or real_is_file(self))
        with pytest.raises(DataError) as err:
            load_records(ds_dir)
        monkeypatch.undo()
        assert not any(p.name in ("outside.png", "missing.png") for p in touched)  # checked before any access
        messages.append(str(err.value).replace(rel, "REL"))
    assert messages[0] == messages[1]
    assert "exist" not in messages[0] and "readable" not in messages[0]


# -- decoding at open time --------------------------------------------------------------------
def _truncated_jpeg(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_is_caught_when_the_dataset_opens(ds_dir):
    _truncated_jpeg(ds_dir / "images" / "cut.jpg")  # passes PIL's verify(), fails at decode
    _set(ds_dir, 1, img_list=["images/cut.jpg"])
    with pytest.raises(DataError, match=r"sample id 1: image file .*cut.jpg is not a readable image"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert [r.id for r in ds.records] == [0, 2, 3] and len(ds.skipped) == 1
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert all(ds[i] is not None for i in range(len(ds)))
    assert len(ds.skipped) == 1


def test_a_sample_failing_at_decode_is_counted_once_not_per_epoch(ds_dir):
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    (ds_dir / "images" / "0002_0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken after the dataset was opened")
    for epoch in range(3):
        ds.set_epoch(epoch)
        assert ds[2] is None
    assert len(ds.skipped) == 1 and "sample id 2" in ds.skipped.items[0][1]


# -- instructions -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["<image> what is common?", "look: <IMAGE>", "{image#1} < image > here"])
def test_placeholder_text_in_an_instruction_is_refused_with_the_id(ds_dir, text):
    _set(ds_dir, 2, instruction=text)
    with pytest.raises(DataError, match=r"sample id 2: 'instruction' contains the image placeholder text"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert [r.id for r in ds.records] == [0, 1, 3] and len(ds.skipped) == 1


def test_a_reference_to_an_image_the_sample_lacks_is_refused_at_load(ds_dir):
    _set(ds_dir, 1, instruction="{image#1} and {image#2}: what is common?")  # sample 1 has one image
    with pytest.raises(DataError, match=r"sample id 1: 'instruction' refers to \{image#2\} but the sample has "
                                         r"1 image"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert [r.id for r in ds.records] == [0, 2, 3] and len(ds.skipped) == 1


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_a_lone_surrogate_is_refused_at_load_not_in_the_first_batch(ds_dir, field):
    """JSON's "\\ud800" escape reads as a lone surrogate, which the tokenizer refused with a
    TypeError naming no sample in the first training batch; it is refused (or skipped) at load."""
    path = ds_dir / "annotations.json"
    recs = json.loads(path.read_text())
    recs[3][field] = "a dog \ud800"
    path.write_text(json.dumps(recs))  # ensure_ascii: written as the escape
    assert "\\ud800" in path.read_text()
    with pytest.raises(DataError, match=rf"sample id 3: '{field}' holds a lone surrogate '\\ud800' at character 6"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    ds = AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)
    assert [r.id for r in ds.records] == [0, 1, 2] and ds.skipped.items[0][0] == 3


def test_collator_names_the_sample_when_encoding_fails(ds_dir):
    pb = PromptBuilder(*tiny_tokenizers(), num_query_tokens=2, image_token_index=3)
    item = {"id": "s-7", "pixel_values": torch.zeros(1, 3, 28, 28), "instruction": "<image>", "output": "x"}
    with pytest.raises(DataError, match=r"sample id 's-7'"):
        Collator(pb)([item])


def test_huge_instruction_or_output_is_refused_at_load(ds_dir):
    _set(ds_dir, 1, instruction="a " * 40_000)
    with pytest.raises(DataError, match=r"sample id 1: 'instruction' is 80000 characters long, over the limit "
                                         r"of 65536"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    _set(ds_dir, 1, instruction="fine", output="b" * 70_000)
    with pytest.raises(DataError, match=r"sample id 1: 'output' is 70000 characters long"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    assert len(AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)) == 3
    records, _ = load_records(ds_dir, max_text_chars=100_000)
    assert len(records) == 4


# -- file names from ids ----------------------------------------------------------------------
def test_safe_filename_stays_one_component():
    for text in ["a/../../../../tmp/x", "..", ".", "", "/etc/passwd", "a\\b", "x\x00y", "é" * 300, "-rf"]:
        name = safe_filename(text)
        assert name and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
        assert len(name) <= 96 and name == os.path.basename(name)
    assert safe_filename("0007") == "0007" and safe_filename("img_1.a-b") == "img_1.a-b"  # plain ids unchanged
    assert safe_filename("a/b") != safe_filename("a_b")  # changed names carry a hash of the id


def test_unique_names_never_collide(tmp_path):
    names = UniqueNames()
    got = [names.name(i, "sample_", ".png") for i in (1, "1", "A", "a", "a/b", "a_b", "a/../../x")]
    assert len({g.lower() for g in got}) == len(got)
    assert got[:2] == ["sample_1.png", "sample_1-2.png"] and got[5] == "sample_a_b.png"
    for g in got:
        (tmp_path / g).write_text(g)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(got)


# -- fuzz: random bytes and random JSON give a DataError or a dataset, never another exception -------------
def _random_json(rng, depth=0):
    kind = rng.integers(0, 8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return [int(rng.integers(-5, 5)), 10**30, -(2**63)][int(rng.integers(0, 3))]
    if kind == 3:
        return [float("nan"), float("inf"), 1e308, -0.0, 2.5][int(rng.integers(0, 5))]
    if kind == 4:
        return ["", "images/0000_0.png", "../x", "/etc/hostname", "a" * 300, "<image>", "x\x00y", "é/..",
                "images", "."][int(rng.integers(0, 10))]
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    keys = ["id", "img_list", "instruction", "output", "extra"]
    return {k: _random_json(rng, depth + 1) for k in keys if rng.random() < 0.7}


def test_fuzz_annotations_and_image_bytes(ds_dir):
    rng = np.random.default_rng(11)
    ann = ds_dir / "annotations.json"
    for trial in range(90):
        if trial % 3 == 0:
            ann.write_bytes(rng.bytes(int(rng.integers(0, 200))))
        elif trial % 3 == 1:
            ann.write_text(json.dumps([_random_json(rng) for _ in range(int(rng.integers(0, 6)))]))
        else:  # well-formed records, one image file overwritten with random bytes (maybe a valid header)
            write_group_captions(ds_dir, n_samples=2, size=16, seed=trial, max_images=1)
            head = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"II*\x00"][trial % 5]
            (ds_dir / "images" / "0001_0.png").write_bytes(head + rng.bytes(int(rng.integers(0, 300))))
        for skip in (False, True):
            try:
                ds = AnnotationDataset(ds_dir, EvalTransform(16), skip_bad=skip)
            except DataError as e:
                assert "\n" not in str(e)
                continue
            for i in range(len(ds)):
                item = ds[i]
                assert item is None or torch.isfinite(item["pixel_values"]).all()


@pytest.mark.parametrize("rel", ["a" * 300, "images/" + "b/" * 2100 + "c.png", "images/loop.png", "images"])
def test_unusual_paths_give_a_data_error(ds_dir, rel):
    (ds_dir / "images" / "loop.png").symlink_to(ds_dir / "images" / "loop.png")
    _set(ds_dir, 1, img_list=[rel])
    with pytest.raises(DataError, match=r"sample id 1: image (file|path)"):
        AnnotationDataset(ds_dir, EvalTransform(28))
    assert len(AnnotationDataset(ds_dir, EvalTransform(28), skip_bad=True)) == 3


# -- model folders never run their own code ----------------------------------------------------------
_EVIL = ("import pathlib, os\npathlib.Path(os.environ['SAM_FAST_TEST_MARKER']).write_text('ran')\n"
         "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")


def _sam_folder(root):
    """A tiny saved SAM folder with its tokenizers (tokenizer/qformer, tokenizer/llm) and one image."""
    from sam_fast import SAM, SAMConfig
    from sam_fast.data import save_tokenizers

    torch.manual_seed(0)
    SAM(SAMConfig.tiny()).save_pretrained(root / "model")
    save_tokenizers(*tiny_tokenizers(), root / "model")
    Image.new("RGB", (32, 32), (120, 30, 200)).save(root / "a.png")
    return root / "model"


def _ask_for_code(config_path, key="AutoTokenizer"):
    config = json.loads(config_path.read_text())
    config["auto_map"] = {key: ["evil.EvilTokenizer", None]}
    config["tokenizer_class"] = "EvilTokenizer"  # no library class of that name: transformers asks, or runs it
    config_path.write_text(json.dumps(config))
    (config_path.parent / "evil.py").write_text(_EVIL)


def test_a_model_folder_whose_tokenizer_asks_to_run_code_is_refused(tmp_path):
    """sam-fast generate on a folder whose tokenizer_config.json has an auto_map (and the module beside
    it): transformers would ask "run the custom code? [y/N]" and, answered y, import it. Refused in
    one line naming the file; nothing of the folder's code runs, whatever the terminal answers."""
    import subprocess
    import sys

    model = _sam_folder(tmp_path)
    config = model / "tokenizer" / "llm" / "tokenizer_config.json"
    _ask_for_code(config)
    marker = tmp_path / "marker"
    env = {**os.environ, "SAM_FAST_TEST_MARKER": str(marker), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sam_fast.cli", "generate", "--model", str(model), "--images",
                           str(tmp_path / "a.png"), "--prompt", "what is it?", "--max-new-tokens", "2"],
                          input="y\ny\n", env=env, capture_output=True, text=True, timeout=120)
    assert not marker.exists()
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert str(config) in last and "never loads code" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["tokenizer/qformer/tokenizer_config.json", "config.json"])
def test_refuse_code_in_names_the_config_asking_for_code(tmp_path, where):
    from sam_fast.data.paths import RemoteCodeError, refuse_code_in
    from sam_fast.processing import SAMProcessor

    model = _sam_folder(tmp_path)
    refuse_code_in(model)  # a folder of library classes passes
    _ask_for_code(model / where, "AutoConfig")
    with pytest.raises(RemoteCodeError, match=f"{model / where}: asks to run Python code"):
        refuse_code_in(model)
    with pytest.raises(RemoteCodeError, match="asks to run Python code"):
        SAMProcessor.from_pretrained(model)


def test_a_diffusers_folder_with_local_components_is_refused(tmp_path):
    from sam_fast.synthesis import SynthesisError
    from sam_fast.synthesis.errors import load_local

    (tmp_path / "sd").mkdir()
    index = {"_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "safety_checker": [None, None], "scheduler": ["my_scheduler", "Sched"]}
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    loaded = []
    with pytest.raises(SynthesisError, match=r"--inpaint-model .*model_index.json: .*local modules \(scheduler\)"):
        load_local("--inpaint-model", tmp_path / "sd", "a pipeline", lambda: loaded.append(1))
    assert not loaded
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    load_local("--inpaint-model", tmp_path / "sd", "a pipeline", lambda: loaded.append(1))
    assert loaded == [1]


@pytest.mark.parametrize("how", ["nested", "padded", "unparsable"])
def test_an_auto_map_anywhere_in_a_config_is_refused(tmp_path, how):
    """An auto_map nested inside another entry (processor_config.json's image_processor), one in a file
    padded past any size a scanner might skip, and one in a file too damaged to parse are found too."""
    from sam_fast.data.paths import RemoteCodeError, refuse_code_in

    folder = tmp_path / "sam"
    folder.mkdir()
    entry = {"auto_map": {"AutoImageProcessor": "evil.EvilIP"}}
    text = {"nested": json.dumps({"processor_class": "SamProcessor", "image_processor": entry}),
            "padded": json.dumps(entry) + " " * (17 << 20),
            "unparsable": "[" * 100_000 + json.dumps(entry)}[how]
    (folder / "processor_config.json").write_text(text)
    with pytest.raises(RemoteCodeError, match=r"processor_config\.json: asks to run Python code .*an auto_map entry"):
        refuse_code_in(folder)


def test_a_config_too_large_to_be_one_is_refused_unread(tmp_path):
    from sam_fast.data.paths import RemoteCodeError, refuse_code_in

    (tmp_path / "config.json").touch()
    os.truncate(tmp_path / "config.json", 65 << 20)  # sparse: nothing is written
    with pytest.raises(RemoteCodeError, match=r"config\.json: 68157440 bytes, too large to be a config"):
        refuse_code_in(tmp_path)


def test_an_empty_answer_is_refused_at_load_with_the_id(ds_dir, tmp_path):
    ds = tmp_path / "copy"
    shutil.copytree(ds_dir, ds)
    recs = json.loads((ds / "annotations.json").read_text())
    recs[1]["output"] = " \n "
    (ds / "annotations.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=f"{recs[1]['id']}.*'output' is empty"):
        load_records(ds)
    records, skipped = load_records(ds, skip_bad=True)
    assert len(records) == len(recs) - 1 and skipped.items[0][0] == recs[1]["id"]
    assert len(load_records(ds, require_output=False)[0]) == len(recs)  # generation data: no answer needed
