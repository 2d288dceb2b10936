"""Feature cache: features equal the vision model's; stale caches (model, image, missing) are refused;
training from the cache runs."""

import os

import pytest
import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, Collator, EvalTransform, PromptBuilder, model_inputs, tiny_tokenizers
from sam_fast.data.feature_cache import CachedFeatureDataset, StaleCacheError, build_feature_cache
from sam_fast.data.synthetic import write_group_captions


@pytest.fixture
def setup(tmp_path):
    data = write_group_captions(tmp_path / "ds", n_samples=5, size=40, seed=2)
    torch.manual_seed(0)
    model = SAM(SAMConfig.tiny()).eval()
    build_feature_cache(model, data, tmp_path / "cache", batch_size=3, dtype=torch.float32, shard_images=4)
    return model, data, tmp_path / "cache"


def test_cached_features_equal_the_vision_model(setup):
    model, data, cache = setup
    cds = CachedFeatureDataset(data, cache, model)
    pds = AnnotationDataset(data, EvalTransform(28))
    assert len(list(cache.glob("shard-*.safetensors"))) >= 2
    for i in range(len(pds)):
        with torch.no_grad():
            want = model.vision_model(pixel_values=pds[i]["pixel_values"]).last_hidden_state
        torch.testing.assert_close(cds[i]["image_features"], want, rtol=1e-5, atol=1e-5)
    pb = PromptBuilder.for_model(model.config, *tiny_tokenizers())
    fb, pbatch = Collator(pb)([cds[i] for i in range(5)]), Collator(pb)([pds[i] for i in range(5)])
    with torch.no_grad():
        a, b = model(**model_inputs(fb)).loss, model(**model_inputs(pbatch)).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_stale_caches_are_refused(setup):
    model, data, cache = setup
    torch.manual_seed(1)
    other = SAM(SAMConfig.tiny())
    with pytest.raises(StaleCacheError, match="another vision model"):
        CachedFeatureDataset(data, cache, other)
    img = data / "images" / "0001_0.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match=r"0001_0.png \(sample id 1\) changed"):
        CachedFeatureDataset(data, cache, model)
    with pytest.raises(StaleCacheError, match="no manifest.json"):
        CachedFeatureDataset(data, data, model)
