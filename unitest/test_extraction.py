"""Embedding extraction: once per image, cache hits on rerun, resume after an interruption, bad images."""

import json
import os
import shutil

import numpy as np
import pytest

from datasets.caption_dataset import CaptionDataset
from datasets.embeddings import (
    EmbeddingCache,
    ImageEncoder,
    clip_encoder,
    clip_model_id,
    extract_embeddings,
    extracted_with,
    load_embedded_dataset,
    save_embedded_dataset,
)
from datasets.synthetic_shapes import make_shapes_dataset, shape_features


class CountingEncoder(ImageEncoder):
    """`shape_features` that records every image it encodes; can raise after ``fail_after`` batches."""

    def __init__(self, model_id="shapes-v1", fail_after=None):
        self.calls, self.seen = 0, 0
        self.fail_after = fail_after
        super().__init__(self._encode, model_id)

    def _encode(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.seen += len(images)
        return shape_features(images)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_images=10, seed=0, image_size=32)


def _expected(paths):
    from PIL import Image

    return shape_features([Image.open(p) for p in paths])


def test_each_image_encoded_once_and_cached(shapes, tmp_path):
    paths = shapes.images + shapes.images[:4]  # duplicates: several captions of one image
    enc = CountingEncoder()
    first = extract_embeddings(paths, enc, cache_dir=tmp_path, batch_size=3, progress=False)
    assert enc.seen == 10 and first.computed == 10 and first.cache_hits == 0
    assert first.indices.tolist() == list(range(14))
    np.testing.assert_array_equal(first.embeddings, _expected(paths))
    again = CountingEncoder()
    second = extract_embeddings(paths, again, cache_dir=tmp_path, batch_size=3, progress=False)
    assert again.seen == 0 and second.cache_hits == 10
    np.testing.assert_array_equal(second.embeddings, first.embeddings)
    # a changed file (new mtime) is encoded again; another model id has its own cache
    os.utime(shapes.images[2], ns=(1, 1))
    third = CountingEncoder()
    extract_embeddings(shapes.images, third, cache_dir=tmp_path, progress=False)
    assert third.seen == 1
    other = CountingEncoder(model_id="another-model")
    extract_embeddings(shapes.images, other, cache_dir=tmp_path, progress=False)
    assert other.seen == 10


def test_content_keys_survive_a_copy(shapes, tmp_path):
    extract_embeddings(shapes.images[:3], CountingEncoder(), cache_dir=tmp_path / "c", key_mode="content",
                       progress=False)
    copies = []
    for p in shapes.images[:3]:
        copies.append(shutil.copy(p, tmp_path / os.path.basename(p)))
    enc = CountingEncoder()
    result = extract_embeddings(copies, enc, cache_dir=tmp_path / "c", key_mode="content", progress=False)
    assert enc.seen == 0 and result.cache_hits == 3


def test_resume_after_interruption(shapes, tmp_path):
    enc = CountingEncoder(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(shapes.images, enc, cache_dir=tmp_path, batch_size=3, progress=False)
    assert enc.seen == 6
    cache_dir = EmbeddingCache(tmp_path, "shapes-v1").directory
    # an interruption while indexing: a torn last line and an unindexed shard are ignored
    with open(cache_dir / "index.jsonl", "a") as f:
        f.write('{"shard": "shard_000099.npy", "keys": ["x"')
    np.save(cache_dir / "shard_000099.npy", np.zeros((1, 70), np.float32))
    assert len(EmbeddingCache(tmp_path, "shapes-v1")) == 6
    resumed = CountingEncoder()
    result = extract_embeddings(shapes.images, resumed, cache_dir=tmp_path, batch_size=3, progress=False)
    assert resumed.seen == 4 and result.cache_hits == 6  # only what was not stored
    np.testing.assert_array_equal(result.embeddings, _expected(shapes.images))
    assert len(EmbeddingCache(tmp_path, "shapes-v1")) == 10  # appending went on after the torn line
    with open(cache_dir / "index.jsonl") as f:
        assert [json.loads(line)["shard"] for line in f.read().split("\n")[-3:-1]] == [
            "shard_000100.npy", "shard_000101.npy"]


def test_unreadable_images_are_reported_not_zero_filled(shapes, tmp_path, caplog):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(shapes.images[0], "rb").read()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = [shapes.images[0], str(truncated), str(tmp_path / "missing.png"), shapes.images[1], str(text),
             str(empty)]
    data = CaptionDataset.from_pairs([(p, f"caption {i}") for i, p in enumerate(paths)])
    enc = CountingEncoder()
    with caplog.at_level("WARNING"):
        result = extract_embeddings(data.images, enc, cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    assert result.indices.tolist() == [0, 3] and result.embeddings.shape == (2, 70)
    assert sorted(result.failed) == [1, 2, 4, 5]
    assert "no such image file" in result.failed[2] and "empty file" in result.failed[5]
    assert "not an image" in result.failed[4] and "truncated" in result.failed[1]
    assert all(np.abs(row).sum() > 0 for row in result.embeddings)
    assert "missing.png" in caplog.text and "notes.jpg" in caplog.text
    saved = save_embedded_dataset(tmp_path / "emb.npz", data, result, "shapes-v1")
    kept, embeddings, meta = load_embedded_dataset(saved)
    assert kept.images == [paths[0], paths[3]] and kept.captions == ["caption 0", "caption 3"]
    np.testing.assert_array_equal(embeddings, result.embeddings)
    assert set(meta["failed"]) == {paths[1], paths[2], paths[4], paths[5]} and meta["model_id"] == "shapes-v1"
    assert len(EmbeddingCache(tmp_path / "cache", "shapes-v1")) == 2  # failures are not cached


def test_bare_callables_cannot_cache(shapes, tmp_path):
    result = extract_embeddings(shapes.images[:2], shape_features, progress=False)
    assert result.embeddings.shape == (2, 70)
    with pytest.raises(ValueError, match="model_id"):
        extract_embeddings(shapes.images[:2], shape_features, cache_dir=tmp_path, progress=False)


def test_clip_encoder_matches_encode_image_and_identifies_the_weights(shapes, tmp_path):
    from models.siamese.clip import CLIP
    from testing.tiny_models import build_tiny_clip

    clip = CLIP.from_pretrained(str(build_tiny_clip(tmp_path / "clip.pt", seed=0)), visual_only=True)
    encoder = clip_encoder(clip)
    result = extract_embeddings(shapes.images[:4], encoder, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(result.embeddings, clip.encode_image(shapes.images[:4]), atol=1e-6)
    assert encoder.model_id == clip_model_id(clip)
    assert clip_model_id(clip, exif_transpose=False) != encoder.model_id
    # ... but both EXIF settings identify the same CLIP (train accepts either)
    assert extracted_with(clip, clip_model_id(clip, exif_transpose=False)) and extracted_with(clip, encoder.model_id)
    clip.visual.weights[0].assign(clip.visual.weights[0] + 1.0)
    assert clip_model_id(clip) != encoder.model_id


def test_cache_keeps_non_utf8_names_and_reads_only_its_shards(tmp_path):
    """A key holding a file name's undecodable bytes (surrogate escapes) is written as valid UTF-8 and found
    again after a reload; an index line naming a file outside the cache's own shards is ignored."""
    name = os.fsdecode(b"photos/caf\xe9.jpg")
    cache = EmbeddingCache(tmp_path, "shapes-v1")
    cache.add([name, "plain.jpg"], np.arange(8, dtype=np.float32).reshape(2, 4))
    index = cache.directory / "index.jsonl"
    index.read_bytes().decode("utf-8")  # valid UTF-8
    reloaded = EmbeddingCache(tmp_path, "shapes-v1")
    assert name in reloaded and "plain.jpg" in reloaded
    np.testing.assert_array_equal(reloaded.get(name), [0, 1, 2, 3])
    np.save(tmp_path / "outside.npy", np.zeros((1, 4), np.float32))
    with open(index, "a", encoding="utf-8") as f:
        f.write(json.dumps({"shard": "../../outside.npy", "keys": ["evil.jpg"]}) + "\n")
    assert "evil.jpg" not in EmbeddingCache(tmp_path, "shapes-v1")


def test_a_bad_image_named_by_several_entries_fails_at_each(shapes, tmp_path):
    """One missing file (or one unreadable file) referenced by two image ids: both are reported failed, and
    the file is written (a failure recorded at the first index only made save_embedded_dataset raise "does
    not cover every image" after the whole extraction)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    missing = str(tmp_path / "gone.png")
    images = [shapes.images[0], missing, missing, str(broken), shapes.images[1], str(broken)]
    data = CaptionDataset(images, list(range(6)), [f"caption {i}" for i in range(6)], np.arange(6))
    enc = CountingEncoder()
    result = extract_embeddings(data.images, enc, cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    assert result.indices.tolist() == [0, 4] and sorted(result.failed) == [1, 2, 3, 5]
    assert result.failed[1] == result.failed[2] and "no such image file" in result.failed[2]
    assert result.failed[3] == result.failed[5]
    assert result.computed == 2 and enc.seen == 2
    kept, embeddings, meta = load_embedded_dataset(save_embedded_dataset(tmp_path / "emb.npz", data, result))
    assert kept.image_ids == [0, 4] and embeddings.shape == (2, 70)
    assert set(meta["failed"]) == {missing, str(broken)}


def test_clip_id_is_its_image_encoders_alone(tmp_path):
    """A CLIP's id depends on its image encoder (config, weights) and the EXIF setting only: the same loaded
    with or without its text tower (extract_on_beam loads it visual-only, `train --clip` with it), saved
    and loaded lazily (the CLIP inside a trained ClipCap), and a versioned id that old ids never match."""
    from models.siamese.clip import CLIP
    from testing.tiny_models import build_tiny_clip

    path = str(build_tiny_clip(tmp_path / "clip.pt", seed=0))
    full = CLIP.from_pretrained(path)
    visual = CLIP.from_pretrained(path, visual_only=True)
    assert full.model.config["vocab_size"] != visual.model.config["vocab_size"]  # the text tower's fields differ
    assert clip_model_id(full) == clip_model_id(visual)
    assert clip_model_id(full, exif_transpose=False) == clip_model_id(visual, exif_transpose=False)
    assert extracted_with(full, clip_model_id(visual)) and extracted_with(visual, clip_model_id(full))
    full.save(tmp_path / "saved")
    lazy = CLIP.load(tmp_path / "saved", lazy_text=True)
    assert clip_model_id(lazy) == clip_model_id(full)
    assert clip_model_id(full).startswith("clip:v2:")  # another recipe than the unversioned "clip:<hash>"
    assert EmbeddingCache(tmp_path / "c", clip_model_id(full)).directory == \
        EmbeddingCache(tmp_path / "c", clip_model_id(visual)).directory
    other = CLIP.from_pretrained(str(build_tiny_clip(tmp_path / "other.pt", seed=1)), visual_only=True)
    assert clip_model_id(other) != clip_model_id(full) and not extracted_with(other, clip_model_id(full))
