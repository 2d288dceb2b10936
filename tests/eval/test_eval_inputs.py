"""Evaluation inputs: non-positive limit / batch size refused; files and PIL images read upright with
high-bit-depth pixels scaled, in `answer` and `explain_sample` as in datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from sam_fast import SAM, SAMConfig
from sam_fast.data import EvalTransform, PromptBuilder, tiny_tokenizers
from sam_fast.data.synthetic import write_group_captions
from sam_fast.eval import answer, evaluate
from sam_fast.eval.explain import explain_sample


@pytest.fixture
def model_pb():
    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny()).eval()
    return model, PromptBuilder.for_model(model.config, *tiny_tokenizers())


@pytest.mark.parametrize("kwargs, match", [({"limit": -1}, "limit must be >= 1"), ({"limit": 0}, "limit must be"),
                                           ({"batch_size": 0}, "batch_size must be >= 1")])
def test_evaluate_refuses_non_positive_sizes(model_pb, tmp_path, kwargs, match):
    model, pb = model_pb
    data = write_group_captions(tmp_path / "ds", n_samples=2, size=28, seed=0, max_images=1)
    with pytest.raises(ValueError, match=match):
        evaluate(model, data, pb, tmp_path / "ev", num_beams=1, max_new_tokens=2, **kwargs)
    assert not (tmp_path / "ev").exists()



def test_answer_tokens_count_each_row_up_to_its_end_of_sequence():
    from sam_fast.eval.runner import _answer_tokens

    ids = torch.tensor([[5, 6, 2, 2], [5, 5, 5, 5], [2, 0, 0, 0]])
    assert _answer_tokens(ids, 2) == 3 + 4 + 1
    assert _answer_tokens(ids, [2, 6]) == 2 + 4 + 1
    assert _answer_tokens(ids, None) == 12


def test_metrics_json_records_generation_throughput(model_pb, tmp_path):
    """metrics.json says how fast the answers came: tokens per second and per decoding step."""
    import json

    model, pb = model_pb
    data = write_group_captions(tmp_path / "ds", n_samples=3, size=28, seed=0, max_images=2)
    evaluate(model, data, pb, tmp_path / "ev", num_beams=2, max_new_tokens=3, batch_size=2)
    t = json.loads((tmp_path / "ev" / "metrics.json").read_text())["throughput"]
    preds = json.loads((tmp_path / "ev" / "pred.json").read_text())
    assert 3 <= t["new_tokens"] <= 3 * 3 and len(preds) == 3  # 1 to 3 answer tokens per sample
    sec = t["generate_seconds"]  # rounded to the millisecond; the rate is from the unrounded time
    assert sec > 0 and t["new_tokens"] / (sec + 5e-4) <= t["new_tokens_per_s"] <= t["new_tokens"] / max(sec - 5e-4, 1e-6)
    assert 0 < t["decode_step_ms"] <= 1000 * t["generate_seconds"]


def test_eval_batch_size_keeps_decoding_memory_bound_and_within_free_memory():
    from sam_fast.eval.runner import eval_batch_size

    cfg = SAMConfig.instructblip_vicuna7b()
    assert eval_batch_size(cfg, 5, 255, "cpu")[0] == 8
    # 7B: K and V of 32 layers x 4096 wide in bf16 = 524288 bytes per position, 300 + 255 positions
    # per row; 70% of 64 GiB holds 165 rows -> 33 samples of 5 beams
    batch, why = eval_batch_size(cfg, 5, 255, "cuda", 2, free_bytes=64 * 2**30)
    assert batch == 33 and "165 rows" in why
    assert eval_batch_size(cfg, 5, 255, "cuda", 2, free_bytes=2**40)[0] == 40  # 200 rows at most
    assert eval_batch_size(cfg, 1, 255, "cuda", 2, free_bytes=2**40)[0] == 200
    assert eval_batch_size(cfg, 5, 255, "cuda", 2, free_bytes=2**20)[0] == 1  # never 0

def _rotated_jpeg(path):
    stored = np.zeros((14, 28, 3), np.uint8)
    stored[:, :14] = (255, 0, 0)
    stored[:, 14:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    img.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").transpose(Image.Transpose.ROTATE_270))  # as displayed


def test_answer_feeds_exif_rotated_and_16bit_images_as_displayed(model_pb, tmp_path, monkeypatch):
    model, pb = model_pb
    upright = _rotated_jpeg(tmp_path / "rot.jpg")
    g16 = np.tile(np.linspace(0, 65535, 28).astype(np.uint16), (28, 1))
    Image.fromarray(g16).save(tmp_path / "g16.png")
    seen = []
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["pixel_values"]) or torch.tensor([[2]]))
    with Image.open(tmp_path / "rot.jpg") as pil:
        answer(model, pb, [tmp_path / "rot.jpg", pil, tmp_path / "g16.png"], "what?")
    tf = EvalTransform(28)
    want_rot = tf(Image.fromarray(upright))
    torch.testing.assert_close(seen[0][0], want_rot)
    torch.testing.assert_close(seen[0][1], want_rot)  # a PIL image with EXIF orientation too
    want_g16 = tf(Image.fromarray(np.repeat(np.rint(g16 / 257.0).astype(np.uint8)[..., None], 3, -1)))
    torch.testing.assert_close(seen[0][2], want_g16)


def test_explain_reads_images_upright(model_pb, tmp_path):
    model, _ = model_pb
    _rotated_jpeg(tmp_path / "rot.jpg")
    explain_sample(model, [tmp_path / "rot.jpg"], tmp_path / "x.png", tile=28)
    out = np.asarray(Image.open(tmp_path / "x.png").convert("RGB")).astype(int)[20:]  # below the 20-px label
    assert out[:10, :, 2].mean() + 60 < out[-10:, :, 2].mean()  # blue at the bottom, as displayed
