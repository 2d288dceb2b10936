"""Images read as the model should see them: 16-bit and float pixels scaled, EXIF orientation applied."""

import json

import numpy as np
import pytest
from PIL import Image

from sam_fast.data import AnnotationDataset, DataError, EvalTransform
from sam_fast.data.images import open_image, to_rgb
from sam_fast.data.transforms import to_tensor


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # read as high bit depth
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    assert rgb.shape == (4, 16, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(arr / 257.0).astype(np.uint8))
    assert (rgb == 255).mean() < 0.1  # PIL's plain convert("RGB") makes ~all pixels 255
    (tmp_path / "annotations.json").write_text(json.dumps(
        [{"id": 0, "img_list": ["g16.png"], "instruction": "x", "output": "y"}]))
    x = AnnotationDataset(tmp_path, EvalTransform(16))[0]["pixel_values"]  # what the model sees
    assert float(x[0, 0, :, :4].mean()) < 0 < float(x[0, 0, :, -4:].mean())  # dark left, bright right


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    arr = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (3, 1))
    Image.fromarray(arr).save(tmp_path / "f.tif")
    rgb = np.asarray(open_image(tmp_path / "f.tif"))
    np.testing.assert_allclose(rgb[0, :, 1], arr[0] * 255.0, atol=0.51)  # 0.5 -> 128 (rounded), 1.0 -> 255
    big = Image.fromarray(np.full((2, 2), 300.0, np.float32))  # not in [0, 1]: 0..255 values, clipped
    assert np.asarray(to_rgb(big)).max() == 255
    t = to_tensor(Image.fromarray(arr))  # direct PIL input to the transforms is scaled too
    assert abs(float(t.mean()) - 0.5) < 0.01


def test_float_image_with_nan_is_refused_with_sample_and_file(tmp_path):
    arr = np.full((8, 8), 0.5, np.float32)
    arr[3, 3] = np.nan
    (tmp_path / "images").mkdir()
    Image.fromarray(arr).save(tmp_path / "images" / "nan.tif")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    recs = [{"id": "n", "img_list": ["images/nan.tif"], "instruction": "x", "output": "y"},
            {"id": "o", "img_list": ["images/ok.png"], "instruction": "x", "output": "y"}]
    (tmp_path / "annotations.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"sample id 'n': image file .*nan.tif is not a readable image.*NaN"):
        AnnotationDataset(tmp_path, EvalTransform(8))
    assert len(AnnotationDataset(tmp_path, EvalTransform(8), skip_bad=True)) == 1


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)  # left red, right blue as stored
    stored[:, 16:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "images").mkdir()
    img.save(tmp_path / "images" / "rot.jpg", quality=95, exif=exif.tobytes())
    up = np.asarray(open_image(tmp_path / "images" / "rot.jpg")).astype(int)
    assert up.shape == (32, 16, 3)  # displayed portrait
    assert up[:12, :, 0].mean() > 200 and up[:12, :, 2].mean() < 60  # left column went to the top: red
    assert up[-12:, :, 2].mean() > 200 and up[-12:, :, 0].mean() < 60
    (tmp_path / "annotations.json").write_text(json.dumps(
        [{"id": 0, "img_list": ["images/rot.jpg"], "instruction": "x", "output": "y"}]))
    x = AnnotationDataset(tmp_path, EvalTransform(16))[0]["pixel_values"][0]  # CLIP-normalised [3, 16, 16]
    assert float(x[0, :6].mean()) > float(x[0, -6:].mean()) + 2  # red at the top in what the model sees
