"""``main.py extract --runner DirectRunner``: CLIP embeddings on Apache Beam (datasets/beam_extraction.py).

The Beam job must write the file the local extraction writes (same images, captions, embeddings, model id,
failures), which is what ``train`` reads.
"""

import numpy as np

from datasets.embeddings import load_embedded_dataset
from datasets.synthetic_shapes import make_shapes_dataset


def test_extract_on_beam_writes_what_local_extract_writes(tmp_path, capsys):
    from main import main
    from testing.tiny_models import build_tiny_clip

    clip_path = build_tiny_clip(tmp_path / "clip.pt", seed=0)
    data = make_shapes_dataset(tmp_path / "data", num_images=10, seed=0, image_size=32)
    (tmp_path / "data" / "images" / "00003.png").write_bytes(b"not a png")  # reported, left out
    (tmp_path / "data" / "images" / "00005.png").write_bytes(b"")
    captions = str(tmp_path / "data" / "captions.json")
    common = ["extract", captions, "--clip", str(clip_path), "--batch-size", "4", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "local.npz"), "--cache-dir", str(tmp_path / "cache")]) == 1
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "beam.npz"), "--runner", "DirectRunner",
                          "--direct_num_workers=1"]) == 1
    out = capsys.readouterr()
    assert "encoded on DirectRunner" in out.out and "00003.png" in out.err and "00005.png" in out.err
    assert list((tmp_path / "beam.npz.shards").glob("part-embeddings-*.tfrecord"))

    local, local_emb, local_meta = load_embedded_dataset(tmp_path / "local.npz")
    beam, beam_emb, beam_meta = load_embedded_dataset(tmp_path / "beam.npz")
    assert beam.images == local.images and beam.captions == local.captions and len(beam.images) == 8
    assert beam_meta["model_id"] == local_meta["model_id"] and beam_meta["model_id"].startswith("clip:")
    assert set(beam_meta["failed"]) == set(local_meta["failed"]) == {data.images[3], data.images[5]}
    assert "empty file" in beam_meta["failed"][data.images[5]]
    np.testing.assert_allclose(beam_emb, local_emb, rtol=1e-5, atol=1e-6)
    assert np.abs(beam_emb).sum(axis=1).min() > 0

    # Beam options without --runner are refused
    assert main(common + ["--output", str(tmp_path / "x.npz"), "--direct_num_workers=1"]) == 2
