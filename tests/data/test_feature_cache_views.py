"""Feature caches with V augmented views per image: each view equals the vision model on the train transform's
pixels drawn from (seed, image, view); training picks a view per (sample, epoch, image) deterministically and
resumes bit-exactly; views=1 stays the eval-transform cache; the size report matches the files; values that do
not fit float16 are refused."""

import json
import os

import pytest
import torch
from _killing import train_killed_at

from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, EvalTransform, PromptBuilder, TrainTransform, tiny_tokenizers
from sam_fast.data.feature_cache import (
    CacheDtypeError,
    CachedFeatureDataset,
    FeatureCache,
    StaleCacheError,
    build_feature_cache,
    cache_key,
    size_summary,
    view_generator,
    view_index,
)
from sam_fast.data.images import open_image
from sam_fast.data.synthetic import write_group_captions

V, SEED = 3, 7
_VC = SAMConfig.tiny().vision_config
P, D = (_VC.image_size // _VC.patch_size) ** 2 + 1, _VC.hidden_size  # the tiny ViT's output [P, D]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("views") / "ds", n_samples=5, size=40, seed=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SAM(SAMConfig.tiny()).eval()


def _images(data):
    return sorted({p for r in AnnotationDataset(data, EvalTransform(28)).records for p in r.images})


def _vit_on_view(model, data, path, seed, view):
    """The vision model's output on view `view` of `path`, recomputed from the public transform and generator."""
    pixels = TrainTransform(model.config.vision_config.image_size)(open_image(path),
                                                                   view_generator(seed, cache_key(data, path), view))
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels[None]).last_hidden_state[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_views_equal_the_vision_model_on_the_same_augmented_pixels(data, model, tmp_path, dtype):
    cache = tmp_path / "cache"
    m = build_feature_cache(model, data, cache, batch_size=4, dtype=dtype, shard_images=3, views=V, seed=SEED)
    assert m["views"] == V and m["seed"] == SEED and m["dtype"] == str(dtype).removeprefix("torch.")
    assert m["transform"] == TrainTransform(28).key()
    assert m["transform_params"]["scale"] == [0.5, 1.0] and m["transform_params"]["flip_p"] == 0.5
    fc = FeatureCache(cache)
    paths = _images(data)
    assert len(paths) >= 5
    for path in paths:
        key = cache_key(data, path)
        everything = fc.get(key)
        assert everything.shape == (V, P, D) and everything.dtype == dtype
        views = []
        for v in range(V):
            want = _vit_on_view(model, data, path, SEED, v)
            got = fc.get(key, v)
            assert torch.equal(got, everything[v])
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:  # float16 rounding: at most one ulp (2^-10 relative; batched matmuls may cross a rounding
                # boundary), i.e. about 1e-2 of the features' scale
                assert ((got.float() - want).abs() <= want.abs() * 2**-10 + 1e-5).all()
                assert (got.float() - want).abs().max() < 1e-2 * float(want.abs().max())
            views.append(want)
        for a in range(V):  # different crops / flips: different features
            for b in range(a + 1, V):
                assert (views[a] - views[b]).abs().max() > 1e-2
    eval_pixels = EvalTransform(28)(open_image(paths[0]))
    with torch.no_grad():
        plain = model.vision_model(pixel_values=eval_pixels[None]).last_hidden_state[0]
    assert not torch.allclose(fc.get(cache_key(data, paths[0]), 0).float(), plain, atol=1e-2)


def test_views_depend_on_seed_not_on_batching(data, model, tmp_path):
    a = build_feature_cache(model, data, tmp_path / "a", batch_size=1, dtype=torch.float32, views=2, seed=SEED)
    b = build_feature_cache(model, data, tmp_path / "b", batch_size=5, dtype=torch.float32, views=2, seed=SEED,
                            shard_images=2)
    c = build_feature_cache(model, data, tmp_path / "c", batch_size=5, dtype=torch.float32, views=2, seed=SEED + 1)
    fa, fb, fc = FeatureCache(tmp_path / "a"), FeatureCache(tmp_path / "b"), FeatureCache(tmp_path / "c")
    assert sorted(a["images"]) == sorted(b["images"]) == sorted(c["images"])
    for key in a["images"]:
        torch.testing.assert_close(fa.get(key), fb.get(key), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(fa.get(key), fc.get(key), atol=1e-2)
    g1, g2 = view_generator(SEED, "images/x.png", 1), view_generator(SEED, "images/x.png", 1)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    assert not torch.equal(torch.rand(4, generator=view_generator(SEED, "images/x.png", 2)),
                           torch.rand(4, generator=view_generator(SEED, "images/x.png", 1)))


@pytest.fixture
def v3_cache(data, model, tmp_path):
    build_feature_cache(model, data, tmp_path / "v3", batch_size=6, dtype=torch.float16, views=V, seed=SEED)
    return tmp_path / "v3"


def test_view_pick_is_deterministic_per_sample_and_epoch_and_changes_across_epochs(data, model, v3_cache):
    ds = CachedFeatureDataset(data, v3_cache, model, seed=11, train=True)
    again = CachedFeatureDataset(data, v3_cache, model, seed=11, train=True)
    assert ds.views == V
    picks = {}
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i, rec in enumerate(ds.records):
            got = ds.view_indices(i)
            assert got == [view_index(11, rec.id, epoch, j, V) for j in range(len(rec.images))]
            assert got == again.view_indices(i, epoch) and all(0 <= v < V for v in got)
            picks[epoch, i] = got
            item = ds[i]
            assert item["image_features"].dtype == torch.float32  # upcast to the model's dtype
            want = torch.stack([FeatureCache(v3_cache).get(cache_key(data, p), v) for p, v in
                                zip(rec.images, got, strict=True)]).float()
            assert torch.equal(item["image_features"], want)
    n = len(ds.records)
    assert any(picks[0, i] != picks[1, i] for i in range(n))  # a new epoch picks other views
    assert {v for p in picks.values() for v in p} == set(range(V))  # every view is used
    assert any(len(set(p)) > 1 for p in picks.values())  # images of one sample pick their own views
    assert view_index(11, 1, 0, 0, V) == view_index(11, 1, 0, 0, V)
    assert [view_index(12, 1, e, 0, V) for e in range(8)] != [view_index(11, 1, e, 0, V) for e in range(8)]
    with pytest.raises(ValueError, match="views=0"):
        view_index(0, 1, 0, 0, 0)


def test_evaluation_refuses_an_augmented_cache(data, model, v3_cache):
    with pytest.raises(StaleCacheError, match="3 augmented .*--views 1"):
        CachedFeatureDataset(data, v3_cache, model)


def test_views_1_is_the_eval_transform_cache_and_old_manifests_stay_readable(data, model, tmp_path):
    cache = tmp_path / "v1"
    m = build_feature_cache(model, data, cache, batch_size=3, dtype=torch.float32)
    assert m["views"] == 1 and m["transform"] == EvalTransform(28).key()
    ds = CachedFeatureDataset(data, cache, model)
    pds = AnnotationDataset(data, EvalTransform(28))
    for i in range(len(pds)):
        with torch.no_grad():
            want = model.vision_model(pixel_values=pds[i]["pixel_values"]).last_hidden_state
        torch.testing.assert_close(ds[i]["image_features"], want, rtol=1e-5, atol=1e-5)
        ds.set_epoch(i + 1)  # the epoch changes nothing for one view
    assert FeatureCache(cache).get(next(iter(m["images"]))).shape == (P, D)  # [P, D] per image, as before
    # a manifest written before views existed (no views / seed / transform_params) reads the same
    mf = json.loads((cache / "manifest.json").read_text())
    for k in ("views", "seed", "transform_params"):
        del mf[k]
    (cache / "manifest.json").write_text(json.dumps(mf))
    old = CachedFeatureDataset(data, cache, model)
    assert old.views == 1
    assert all(torch.equal(old[i]["image_features"], ds[i]["image_features"]) for i in range(len(pds)))


def test_size_report_matches_the_files_on_disk(data, model, v3_cache):
    m = json.loads((v3_cache / "manifest.json").read_text())
    from sam_fast.data.feature_cache import cache_size

    z = cache_size(v3_cache)
    n = len(_images(data))
    assert z["images"] == n and z["views"] == V
    assert z["bytes_per_view"] == P * D * 2  # P x D x float16
    assert z["bytes_per_image"] == V * P * D * 2
    assert z["feature_bytes"] == n * V * P * D * 2
    shards = [p for p in v3_cache.iterdir() if p.name.startswith("shard-")]
    assert z["shard_bytes"] == sum(os.path.getsize(p) for p in shards)
    assert z["total_bytes"] == sum(os.path.getsize(p) for p in v3_cache.iterdir())
    assert z["feature_bytes"] < z["shard_bytes"] < z["feature_bytes"] + 4096 * len(shards)  # + safetensors headers
    assert m["views"] == V
    line = size_summary(z)
    assert f"{V * P * D * 2 / 1000:.3g} kB per image (3 view(s) x {P * D * 2} B)" in line
    assert f"{z['total_bytes']} bytes on disk" in line


def test_built_manifest_reports_its_size(data, model, tmp_path):
    m = build_feature_cache(model, data, tmp_path / "c", dtype=torch.bfloat16, views=2, seed=1)
    assert m["size"]["total_bytes"] == sum(os.path.getsize(p) for p in (tmp_path / "c").iterdir())
    assert m["size"]["bytes_per_image"] == 2 * P * D * 2 and m["dtype"] == "bfloat16"


def test_features_beyond_float16_are_refused(data, tmp_path):
    torch.manual_seed(0)
    big = SAM(SAMConfig.tiny()).eval()
    with torch.no_grad():
        big.vision_model.post_layernorm.weight.mul_(1e6)  # outputs far beyond float16's 65504
    with pytest.raises(CacheDtypeError, match=r"\.png: a feature reaches .* beyond the range of float16.*float32"):
        build_feature_cache(big, data, tmp_path / "c", views=2)
    assert not os.path.lexists(tmp_path / "c")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    build_feature_cache(big, data, tmp_path / "c", views=2, dtype="bf16")  # bfloat16's range holds them
    assert torch.isfinite(FeatureCache(tmp_path / "c").get(cache_key(data, _images(data)[0]))).all()
    with pytest.raises(ValueError, match="dtype 'int8'"):
        build_feature_cache(big, data, tmp_path / "d", dtype="int8")
    with pytest.raises(ValueError, match="views=0"):
        build_feature_cache(big, data, tmp_path / "d", views=0)



def _trainer(data, cache, out):
    from sam_fast.train import TrainConfig, Trainer

    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = CachedFeatureDataset(data, cache, model, seed=0, train=True)
    return Trainer(model, ds, pb, TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2,
                                              save_every=2, keep_last=2, progress=False))


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread (and much faster on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_from_a_two_view_cache_resumes_bit_exactly(tmp_path, one_thread):
    from sam_fast.train import latest_checkpoint, load_checkpoint

    data = write_group_captions(tmp_path / "ds", n_samples=12, size=32, seed=3)
    torch.manual_seed(0)
    build_feature_cache(SAM(SAMConfig.tiny()).eval(), data, tmp_path / "cache", views=2, seed=5)
    full = _trainer(data, tmp_path / "cache", tmp_path / "full")
    seen = []
    real_load = full._load

    def recording_load(idx, epoch):
        seen.append((epoch, [tuple(full.dataset.view_indices(i, epoch)) for i in idx]))
        return real_load(idx, epoch)

    full._load = recording_load
    full.train()
    ref = _log(tmp_path / "full")
    assert [r["epoch"] for r in ref] == [0, 0, 0, 1, 1, 1]
    assert len({v for _, picks in seen for p in picks for v in p}) == 2  # both views are trained on

    part = _trainer(data, tmp_path / "cache", tmp_path / "part")
    train_killed_at(part, 5)  # killed while loading step 6's data (after checkpoint 4, log up to 5)
    resumed = _trainer(data, tmp_path / "cache", tmp_path / "part")
    resumed.train(resume=True)
    got = _log(tmp_path / "part")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bit-exact, views included
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_cache_features_views_then_train_and_refused_by_eval(tmp_path, capsys):
    from sam_fast.cli import main

    data = write_group_captions(tmp_path / "ds", n_samples=4, size=32, seed=4)
    cache = tmp_path / "cache"
    assert main(["cache-features", "--model", "tiny", "--data", str(data), "--output", str(cache), "--views", "2",
                 "--seed", "3", "--dtype", "fp16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = json.loads((cache / "manifest.json").read_text())
    assert m["views"] == 2 and m["seed"] == 3 and m["dtype"] == "float16"
    total = sum(os.path.getsize(p) for p in cache.iterdir())
    assert "x 2 augmented views (seed 3)" in out and f"({total} bytes on disk)" in out
    assert f"{2 * P * D * 2} B per image (2 view(s) x {P * D * 2} B)" in out  # 960 B: under a kB
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--seed", "3", "--data", str(data), "--features", str(cache),
                 "--output", str(run), "--batch-size", "2", "--max-steps", "2", "--no-progress"]) == 0
    assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(SystemExit, match="augmented .*--views 1"):
        main(["eval", "--model", str(run), "--data", str(data), "--features", str(cache), "--output",
              str(tmp_path / "ev"), "--no-progress"])
    with pytest.raises(SystemExit) as exc:
        main(["cache-features", "--model", "tiny", "--data", str(data), "--output", str(cache), "--views", "0"])
    assert exc.value.code == 2
