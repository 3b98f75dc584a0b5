"""Captions chosen by CLIP (`rerank="clip"`): CLIPScore against OpenAI's PyTorch CLIP on the same candidates,
the rerank_weight mix, the text encoder kept in saved folders, the error for image-only folders, the command
line, map.json keys, evaluate, batch's records and the web demo's control."""

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from clip import tokenize
from clip.clip import _transform
from clip.model import build_model
from PIL import Image

import main
from models.image_captioning import ClipCap
from models.image_captioning.rerank import MissingTextEncoderError, rerank_candidates

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted(glob.glob(str(ROOT / "demo" / "*.jpg")))
BEAM = dict(method="beam", beam_size=5, num_captions=5, max_length=12)
# hand-written candidates: enough of them that several have a positive cosine with each photo (a random CLIP)
TEXTS = ["a cat on a couch.", "a dog running on the beach.", "two people riding bikes.", "a plate of food.",
         "a red car parked on a street.", "a man holding an umbrella.", "a bowl of fruit on a table.",
         "a train at the station.", "a child flying a kite.", "a city at night."]


pytestmark = pytest.mark.usefixtures("isolated_home")  # conftest: a per-test model store, offline


@pytest.fixture(scope="module")
def reference(tiny_files):
    """OpenAI's PyTorch CLIP on the tiny model's CLIP file (fp32), and OpenAI's preprocessing."""
    state_dict = torch.load(str(tiny_files["clip"]), map_location="cpu", weights_only=True)
    model = build_model(dict(state_dict)).float().eval()
    return model, _transform(model.visual.input_resolution)


def reference_clip_scores(reference, photos, texts):
    """CLIP-S of Hessel et al. with OpenAI's CLIP: (len(photos), len(texts)), float64."""
    model, transform = reference
    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(Image.open(p)) for p in photos])).double()
        captions = model.encode_text(tokenize(["A photo depicts " + t for t in texts], truncate=True)).double()
    images = images / images.norm(dim=-1, keepdim=True)
    captions = captions / captions.norm(dim=-1, keepdim=True)
    return (2.5 * torch.clamp(images @ captions.T, min=0)).numpy()


def test_clip_scores_and_order_match_openai(tiny_clipcap, reference):
    """The same candidates for every photo: our CLIPScores within 1e-4 of OpenAI's, and the same order."""
    model = tiny_clipcap
    embeddings = model.clip.encode_image(PHOTOS, exif_transpose=False)  # OpenAI ignores the EXIF orientation
    candidates = [[{"text": t, "score": -float(i)} for i, t in enumerate(TEXTS)] for _ in PHOTOS]
    ranked = rerank_candidates(model.clip, embeddings, candidates)
    expected = reference_clip_scores(reference, PHOTOS, TEXTS)
    for i, group in enumerate(ranked):
        ours = {c["text"]: c["clip_score"] for c in group}
        np.testing.assert_allclose([ours[t] for t in TEXTS], expected[i], atol=1e-4)
        order = sorted(range(len(TEXTS)), key=lambda j: -expected[i][j])  # stable, as ours
        assert [c["text"] for c in group] == [TEXTS[j] for j in order]
        positive = np.sort(expected[i][expected[i] > 0])
        assert len(positive) >= 3 and np.diff(positive).min() > 2e-4  # an order to get wrong, beyond the tolerance


def test_generate_reranks_every_beam_and_keeps_the_best(tiny_clipcap, reference):
    """rerank="clip" scores all beam_size beams (their LM scores unchanged), returns them best CLIPScore first,
    num_captions the top of that order; on the demo photos the chosen caption has the best CLIPScore."""
    model = tiny_clipcap
    embeddings = model.clip.encode_image(PHOTOS, exif_transpose=False)
    plain = model.generate(embeddings, **BEAM)
    ranked = model.generate(embeddings, **BEAM, rerank="clip")
    top2 = model.generate(embeddings, **{**BEAM, "num_captions": 2}, rerank="clip")
    changed = 0
    for i, (before, after) in enumerate(zip(plain, ranked)):
        # the same beams with the same LM scores (up to the compiled decoder's rounding: the first call of a
        # shape runs eagerly, the next ones compiled)
        lm = {tuple(c["tokens"]): c["score"] for c in after}
        assert sorted(lm) == sorted(tuple(c["tokens"]) for c in before)
        np.testing.assert_allclose([lm[tuple(c["tokens"])] for c in before], [c["score"] for c in before], atol=1e-5)
        expected = reference_clip_scores(reference, PHOTOS[i : i + 1], [c["text"] for c in after])[0]
        np.testing.assert_allclose([c["clip_score"] for c in after], expected, atol=1e-4)
        assert after[0]["clip_score"] == max(c["clip_score"] for c in after)  # the chosen one: the best CLIP-S
        assert [c["clip_score"] for c in after] == sorted((c["clip_score"] for c in after), reverse=True)
        assert [c["tokens"] for c in top2[i]] == [c["tokens"] for c in after[:2]]
        changed += [c["tokens"] for c in before] != [c["tokens"] for c in after]
    assert changed  # re-ranking changed some order: the test can fail


def test_rerank_weight_mixes_the_language_model_score(tiny_clipcap):
    """rank = clip_score + rerank_weight * score; a large weight gives back the beam order."""
    model = tiny_clipcap
    embeddings = model.encode_images(PHOTOS)
    plain = model.generate(embeddings, **BEAM)
    for weight in (0.05, 0.5, 1e4):
        mixed = model.generate(embeddings, **BEAM, rerank="clip", rerank_weight=weight)
        for group in mixed:
            rank = [c["clip_score"] + weight * c["score"] for c in group]
            assert rank == sorted(rank, reverse=True)
    assert [[c["tokens"] for c in g] for g in mixed] == [[c["tokens"] for c in g] for g in plain]
    with pytest.raises(ValueError, match="'beam' or 'sample'"):
        model.generate(embeddings, method="greedy", rerank="clip")
    with pytest.raises(ValueError, match="rerank must be"):
        model.generate(embeddings, **BEAM, rerank="blip")
    with pytest.raises(ValueError, match="only with rerank"):
        model.generate(embeddings, **BEAM, rerank_weight=1.0)
    with pytest.raises(ValueError, match="finite"):
        model.generate(embeddings, **BEAM, rerank="clip", rerank_weight=float("nan"))


def test_sample_candidates_are_reranked(tiny_clipcap):
    model = tiny_clipcap
    embeddings = model.encode_images(PHOTOS[:2])
    plain = model.generate(embeddings, method="sample", num_captions=4, seed=3, max_length=8)
    ranked = model.generate(embeddings, method="sample", num_captions=4, seed=3, max_length=8, rerank="clip")
    for before, after in zip(plain, ranked):
        assert sorted(c["tokens"] for c in before) == sorted(c["tokens"] for c in after)
        assert [c["clip_score"] for c in after] == sorted((c["clip_score"] for c in after), reverse=True)


def test_the_text_encoder_is_kept_saved_and_loaded_exactly(tiny_model_dir, tiny_files, tmp_path):
    """convert keeps CLIP's text encoder; save + load gives back the same weights exactly (stored as the image
    tower's: float32, mapped at load), the checkpoint's values exactly."""
    model = ClipCap.load(str(tiny_model_dir))
    assert model.clip.model.text is None and model.clip.has_text  # saved, read when first used
    assert model.clip.load_text().model.text is not None and model.clip.tokenizer is not None
    state_dict = torch.load(str(tiny_files["clip"]), map_location="cpu", weights_only=True)
    text = {v.path: v.numpy() for v in model.clip.model.text.weights}
    embedding = [w for path, w in text.items() if "token_embedding" in path]
    assert len(embedding) == 1
    np.testing.assert_array_equal(embedding[0], state_dict["token_embedding.weight"].float().numpy())
    model.save(tmp_path / "again")
    loaded = ClipCap.load(str(tmp_path / "again"))
    for a, b in zip(model.clip.model.text.weights, loaded.clip.load_text().model.text.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert "text encoder (re-ranking): included" in (tmp_path / "again" / "README.md").read_text()


@pytest.fixture(scope="module")
def image_only_dir(tiny_model_dir, tiny_files, tmp_path_factory):
    """A model saved as before text encoders were kept: clip/ is image-only."""
    from models.siamese.clip import CLIP

    model = ClipCap.load(str(tiny_model_dir))
    model.clip = CLIP.from_pretrained(str(tiny_files["clip"]), visual_only=True)
    return model.save(tmp_path_factory.mktemp("old") / "old_model")


def test_an_image_only_folder_loads_and_rerank_says_how_to_add_the_text_encoder(image_only_dir, tiny_files,
                                                                                 tmp_path):
    model = ClipCap.load(image_only_dir)
    assert model.caption(PHOTOS[:1], max_length=5)  # captioning without re-ranking works as before
    with pytest.raises(MissingTextEncoderError, match=r"convert CHECKPOINT --clip CLIP --name tiny --overwrite.*clip='ViT-B/32'"):
        model.generate(model.encode_images(PHOTOS[:1]), **BEAM, rerank="clip")
    with pytest.raises(MissingTextEncoderError, match="text encoder"):  # raised before any image is read
        model.predict(["no such image.jpg"], **BEAM, rerank="clip", save=False)
    for clip in (tiny_files["clip"], str(tiny_files["clip"])):  # the fix the error names: a CLIP file given
        fixed = ClipCap.load(image_only_dir, clip=clip)
        assert "clip_score" in fixed.generate(fixed.encode_images(PHOTOS[:1]), **BEAM, rerank="clip")[0][0]


def _run(capsys, *argv):
    code = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_rerank_end_to_end_and_map_json_keyed_by_it(tiny_model_dir, image_only_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = ["caption", *PHOTOS[:2], "--model", tiny_model_dir, "--output-dir", out_dir, "--method", "beam",
            "--num-captions", 3, "--max-length", 8, "--no-progress", "--json"]
    code, out, err = _run(capsys, *args, "--rerank", "clip")
    assert code == 0, err
    results = json.loads(out)
    for r in results:
        scores = [c["clip_score"] for c in r["candidates"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True) and r["caption"] == r["candidates"][0]["text"]
    settings = json.loads((out_dir / "map.json").read_text())[os.path.abspath(PHOTOS[0])]["settings"]
    assert settings["rerank"] == "clip" and settings["rerank_weight"] == 0.0
    # the same run again is answered from map.json; without --rerank, or with a weight, it is not
    code, out, _ = _run(capsys, *args, "--rerank", "clip", "--rerank-weight", 0)
    assert code == 0 and all(r["cached"] for r in json.loads(out))
    for extra in ([], ["--rerank", "clip", "--rerank-weight", 0.5]):
        code, out, err = _run(capsys, *args, *extra)
        assert code == 0, err
        assert not any(r["cached"] for r in json.loads(out)), extra
    code, out, err = _run(capsys, *args[:-1], "--rerank", "clip")
    assert code == 0 and all(r["cached"] for r in json.loads(_run(capsys, *args, "--rerank", "clip")[1]))
    # an image-only model: exit 2 with the way to add the text encoder; greedy + rerank: a usage error
    code, _, err = _run(capsys, *args, "--rerank", "clip", "--model", image_only_dir, "--no-save")
    assert code == 2 and "--overwrite" in err
    code, _, err = _run(capsys, "caption", PHOTOS[0], "--model", tiny_model_dir, "--rerank", "clip", "--no-save")
    assert code == 2 and "'beam' or 'sample'" in err


def test_evaluate_with_rerank_captions_by_clip_score(tiny_model_dir, tmp_path):
    from custom_train_objects.evaluation import evaluate_model
    from datasets.synthetic_shapes import make_shapes_dataset

    model = ClipCap.load(str(tiny_model_dir))
    data = make_shapes_dataset(tmp_path / "data", num_images=3, seed=0, image_size=32)
    report = evaluate_model(model, data, tmp_path / "eval", metrics=("BLEU",), progress=False, method="beam",
                            beam_size=4, max_length=8, rerank="clip")
    captions = [c["caption"] for c in json.loads((tmp_path / "eval" / "results.json").read_text())]
    expected = model.generate(model.encode_images(data.images), method="beam", beam_size=4, max_length=8,
                              rerank="clip")
    assert captions == [g[0]["text"] for g in expected]
    assert report["generate_kwargs"]["rerank"] == "clip"
    parser = main.build_parser()
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    assert evaluate.parse_args(["x", "--model", "m", "--output", "o", "--rerank", "clip",
                                "--rerank-weight", "0.5"]).rerank_weight == 0.5


def test_batch_records_and_web_demo_carry_clip_scores(tiny_model_dir, tiny_clipcap):
    from models.image_captioning import beam_inference
    from models.image_captioning.web_demo import Captioner

    handler = beam_inference.ClipCapModelHandler(str(tiny_model_dir), batch_size=2, **BEAM, rerank="clip")
    model = handler.load_model()
    pixels = [model.clip.preprocess(p) for p in PHOTOS[:2]]
    results = handler.run_inference(list(zip(PHOTOS[:2], pixels)), model)
    record = beam_inference.make_record(PHOTOS[0], {}, candidates=results[0].inference)
    scores = [c["clip_score"] for c in record["candidates"]]
    assert scores == sorted(scores, reverse=True) and record["caption"] == record["candidates"][0]["text"]
    rows = Captioner(tiny_clipcap).caption(PHOTOS[:1], method="beam", beam_size=3, num_captions=2, max_length=6,
                                           rerank=True)
    assert [c["clip_score"] for c in rows[0]["candidates"]] == sorted((c["clip_score"] for c in rows[0]["candidates"]),
                                                                      reverse=True)
    from models.image_captioning.web_demo import _summary  # what the API (gradio_client) answers

    assert _summary(rows)["results"][0]["clip_scores"] == [c["clip_score"] for c in rows[0]["candidates"]]
