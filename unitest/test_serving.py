"""The serving SavedModel (`models.image_captioning.serving`, ``main.py export --format savedmodel``).

Each mapper kind is exported once (tiny random models: MLP greedy, transformer beam 3) through the CLI, then
loaded in a separate ``python -I`` process whose working directory and ``sys.path`` exclude the repository
(`unitest/savedmodel_client.py`). Its captions must equal `ClipCap`'s: token-exact (same text, same score)
for the ``embeddings`` signature; for image bytes, the demo photos (JPEG) and lossless PNG / BMP copies give
the captions of ``ClipCap.caption`` (the in-graph resize is within 1 grey level of PIL's, see
`utils.clip_preprocessing.tf_preprocess`, and here never changes a decision); a bad row gives "" and NaN.
"""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unitest.tiny_models import DEMO_DIR, build_tiny_clipcap, shared_tiny_files

CLIENT = Path(__file__).with_name("savedmodel_client.py")
KINDS = {"mlp": ["--method", "greedy"], "transformer": ["--method", "beam", "--beam-size", "3"]}
DEMO = sorted(DEMO_DIR.glob("*.jpg"))


def _lossless_copies(directory):
    """PNG and BMP copies of two demo photos (same pixels as the JPEG decoded by PIL) and a GIF."""
    paths = []
    for source, fmt in ((DEMO[0], "png"), (DEMO[1], "bmp"), (DEMO[2], "gif")):
        path = directory / f"{source.stem}.{fmt}"
        Image.open(source).convert("RGB").save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module", params=sorted(KINDS))
def exported(request, tmp_path_factory):
    """(kind, ClipCap, SavedModel directory, the client's JSON output, image paths)."""
    from main import main
    from models.image_captioning.clip_cap import ClipCap
    from models.image_captioning.pretrained import convert_model

    kind = request.param
    files = shared_tiny_files(tmp_path_factory)
    directory = tmp_path_factory.mktemp(f"serving_{kind}")
    checkpoint = build_tiny_clipcap(directory / "clipcap.pt", files["tokenizer"], kind=kind, stop_boost=1.5)
    convert_model(ClipCap, checkpoint, files["clip"], files["tokenizer"], directory / "model", name=f"serve_{kind}")
    model = ClipCap.load(str(directory / "model"))
    out = directory / "export"
    assert main(["export", str(directory / "model"), str(out), "--max-batch-size", "4", *KINDS[kind]]) == 0
    images = DEMO + _lossless_copies(directory)
    instances = [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in images]
    truncated = DEMO[0].read_bytes()[:600]
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    bomb = bytearray(bomb.getvalue())
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2  # the header announces 100000 x 100000 pixels
    for bad in (b"this is not an image", truncated, bytes(bomb), b""):
        instances.append({"b64": base64.b64encode(bad).decode()})
    embeddings = np.random.default_rng(3).normal(0, 0.5, (6, model.prefix_size)).astype(np.float32)
    embeddings[4] = np.nan
    request_path = directory / "request.json"
    request_path.write_text(json.dumps({"instances": instances, "embeddings": embeddings.tolist()}))
    result = directory / "result.json"
    cwd = directory / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-I", str(CLIENT), str(out), str(request_path), str(result)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return kind, model, out, json.loads(result.read_text()), images, embeddings


def _decoding(kind):
    return {"method": "greedy"} if kind == "mlp" else {"method": "beam", "beam_size": 3}


def test_signatures_and_metadata(exported):
    kind, model, out, result, _, _ = exported
    assert result["signatures"] == ["embeddings", "serving_default"]
    assert result["inputs"] == {"images": ["string", [None]]}
    meta = result["metadata"]
    assert meta["method"] == _decoding(kind)["method"] and meta["max_length"] == 67
    assert meta["beam_size"] == (3 if kind == "transformer" else None)
    assert meta["normalize_prefix"] is (kind == "transformer") and meta["max_batch_size"] == 4
    assert json.loads((out / "assets.extra" / "clipcap_serving.json").read_text()) == meta


def test_embeddings_signature_is_token_exact(exported):
    kind, model, _, result, _, embeddings = exported
    good = [i for i in range(len(embeddings)) if i != 4]
    # the signature runs the XLA-compiled mapper and loop: the same captions as generate's; scores within 1e-5
    # (under "auto" generate's mapper or loop may run uncompiled for a shape it has not seen before: its scores
    # then differ in their last bits)
    expected = model.generate(embeddings[good], compile_now=True, **_decoding(kind))
    got = result["embeddings"]
    assert [got["captions"][i] for i in good] == [c[0]["text"] for c in expected]
    np.testing.assert_allclose([got["scores"][i] for i in good], [c[0]["score"] for c in expected], rtol=0, atol=1e-5)
    assert got["captions"][4] == "" and np.isnan(got["scores"][4])  # a NaN row: no caption, the others kept
    assert any(len(c) > 3 for c in got["captions"])  # real captions, not only the stop token


def test_bytes_signature_matches_caption(exported):
    kind, model, _, result, images, _ = exported
    lossless = images[: len(DEMO) + 2]  # the JPEG photos, the PNG and the BMP copies
    expected = model.caption([str(p) for p in lossless], **_decoding(kind))
    got = result["images"]
    agreement = sum(a == b for a, b in zip(got["captions"], expected))
    print(f"{kind}: {agreement} of {len(expected)} captions equal ClipCap.caption's")
    assert got["captions"][: len(expected)] == expected
    reference = [c[0]["score"] for c in model.generate(model.encode_images([str(p) for p in lossless]),
                                                       **_decoding(kind))]
    np.testing.assert_allclose(got["scores"][: len(expected)], reference, atol=2e-3)
    gif = len(expected)
    assert got["captions"][gif] and np.isfinite(got["scores"][gif])  # the GIF decodes (palette: not compared)
    for i in range(gif + 1, len(got["captions"])):  # text, truncated, decompression bomb, empty
        assert got["captions"][i] == "" and np.isnan(got["scores"][i]), i


def test_export_refuses_a_user_folder(tmp_path, exported):
    from main import main

    _, _, out, _, _, _ = exported
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["export", str(out.parent / "model"), str(user)]) == 2
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1
    assert main(["export", str(out.parent / "model"), str(out)]) == 2  # ours, but no --overwrite
    assert main(["export", str(out.parent / "model"), str(tmp_path / "x.pt"), "--method", "beam"]) == 2


def test_tokens_to_text_equals_tokenizer_decode(gpt2_tokenizer_dir):
    import tensorflow as tf

    from models.image_captioning.serving_ops import token_pieces, tokens_to_text
    from unitest.tokenizer_utils import SAMPLE_TEXT
    from utils.tokenizer import load_gpt2_tokenizer

    tok = load_gpt2_tokenizer(gpt2_tokenizer_dir)  # trained here, on text with non-ASCII characters
    pieces = tf.constant(token_pieces(tok, len(tok) + 5).tolist(), tf.string)  # 5 ids beyond the tokenizer
    texts = SAMPLE_TEXT + ["  Crème brûlée à la française — naïve café  ", "日本語のテキスト", "\t.\n"]
    rows = [tok.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    rows += [rng.integers(0, len(tok), size=n).tolist() for n in (1, 3, 9, 30) for _ in range(25)]
    rows += [tok.encode("é")[:1], [0, 14, 0]]  # half a UTF-8 character; the special token
    assert any(len(t.encode()) != len(t) for t in texts)  # non-ASCII is covered
    width = max(len(r) for r in rows)
    tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
    lengths = np.array([len(r) for r in rows], np.int64)
    got = [t.decode() for t in tokens_to_text(pieces, tf.constant(tokens), tf.constant(lengths)).numpy()]
    assert got == [tok.decode(r).strip() for r in rows]


def test_decode_images_drops_bad_rows():
    import tensorflow as tf

    from models.image_captioning.serving_ops import decode_images

    good = DEMO[0].read_bytes()
    wide = io.BytesIO()
    Image.new("RGB", (3000, 1)).save(wide, "PNG")  # resized to 672000 x 224 before the crop
    rows, pixels = decode_images(tf.constant([b"x", good, good[:300], wide.getvalue(), good]), 224,
                                 max_pixels=1 << 30)
    assert rows.numpy().tolist() == [1, 4] and pixels.shape == (2, 224, 224, 3)
    rows, _ = decode_images(tf.constant([good]), 224, max_pixels=100)  # the pixel bound
    assert rows.numpy().tolist() == []
