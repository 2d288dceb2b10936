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


def _tree(d):
    return sorted((p.relative_to(d).as_posix(), p.read_bytes() if p.is_file() else None) for p in d.rglob("*"))


def test_output_that_is_not_a_cache_is_never_replaced(setup, tmp_path):
    from sam_fast.data.feature_cache import CacheOutputError

    model, data, cache = setup
    before = _tree(data)
    with pytest.raises(CacheOutputError, match="is not a sam_fast feature cache.*not replacing it"):
        build_feature_cache(model, data, data)  # the dataset folder itself
    assert _tree(data) == before
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(CacheOutputError, match="not a directory"):
        build_feature_cache(model, data, f)
    assert f.read_text() == "mine"
    (cache / "notes.txt").write_text("mine")  # a real cache, but someone keeps a file in it
    with pytest.raises(CacheOutputError, match="also holds 'notes.txt'"):
        build_feature_cache(model, data, cache)
    assert (cache / "notes.txt").read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(CacheOutputError, match="symlink"):
        build_feature_cache(model, data, link)
    assert _tree(data) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_an_earlier_cache_or_empty_dir_is_replaced_atomically(setup, tmp_path):
    model, data, cache = setup
    old_manifest = (cache / "manifest.json").read_text()
    torch.manual_seed(5)
    other = SAM(SAMConfig.tiny()).eval()
    build_feature_cache(other, data, cache, dtype=torch.float32)
    assert (cache / "manifest.json").read_text() != old_manifest
    CachedFeatureDataset(data, cache, other)  # the new cache is complete and matches its model
    empty = tmp_path / "empty"
    empty.mkdir()
    build_feature_cache(model, data, empty, dtype=torch.float32)
    CachedFeatureDataset(data, empty, model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_leaves_the_old_cache_and_no_temporaries(setup, tmp_path):
    model, data, cache = setup
    before = _tree(cache)
    (data / "images" / "0003_0.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(Exception, match="0003_0.png"):
        build_feature_cache(model, data, cache)
    assert _tree(cache) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cache_is_refused_for_another_post_layernorm_eps(setup):
    """A cache built with HF's final-LayerNorm eps (the vision config's, 1e-6) is not reused for the same
    weights with LAVIS' ln_vision eps (1e-5), and vice versa; an eps equal to the config's keeps it valid."""
    model, data, cache = setup
    lavis = SAM(SAMConfig.tiny(post_layernorm_eps=1e-5)).eval()
    lavis.load_state_dict(model.state_dict())
    assert lavis.vision_model.post_layernorm.eps == 1e-5 != model.vision_model.post_layernorm.eps
    with pytest.raises(StaleCacheError, match="another vision model.*rebuild it"):
        CachedFeatureDataset(data, cache, lavis)
    same = SAM(SAMConfig.tiny(post_layernorm_eps=model.config.vision_config.layer_norm_eps)).eval()
    same.load_state_dict(model.state_dict())
    CachedFeatureDataset(data, cache, same)  # the same computation: the existing cache stays valid
    # and the other direction: a cache built with the LAVIS eps is refused for the HF-eps model
    build_feature_cache(lavis, data, cache, batch_size=3, dtype=torch.float32)
    CachedFeatureDataset(data, cache, lavis)
    with pytest.raises(StaleCacheError, match="another vision model"):
        CachedFeatureDataset(data, cache, model)
