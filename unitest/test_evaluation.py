"""Evaluation: pycocoevalcap metrics through our wrapper (same numbers), Java handling, CLIPScore."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from custom_train_objects import evaluation
from custom_train_objects.evaluation import caption_metrics, clip_score, simple_ptb_tokenize

REFERENCES = {1: ["A man is riding a horse.", "A person rides a brown horse on a beach."],
              2: ["Two dogs play in the park.", "Dogs playing with a frisbee."]}
PREDICTIONS = {1: "A man riding a horse on the beach.", 2: "Two dogs playing in a park."}
# pycocoevalcap 1.2 on exactly these inputs, called directly (PTBTokenizer, then each scorer's compute_score)
EXPECTED = {"Bleu_1": 0.8645582953159417, "Bleu_2": 0.6344123460055201, "Bleu_3": 0.3346370880960949,
            "Bleu_4": 4.569858985204063e-05, "METEOR": 0.4150223065610193, "ROUGE_L": 0.6999198717948718,
            "CIDEr": 2.1680108068881845}


def _direct_pycocoevalcap(references, predictions):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tok.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res)[0]))
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@pytest.mark.skipif(not evaluation.java_available(), reason="java is needed for PTBTokenizer and METEOR")
def test_metrics_match_pycocoevalcap():
    ours = caption_metrics(REFERENCES, PREDICTIONS)
    for name, value in EXPECTED.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-12), name
    direct = _direct_pycocoevalcap(REFERENCES, PREDICTIONS)
    for name, value in direct.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-12), name
    assert "PTBTokenizer" in ours["tokenizer"] and ours["num_images"] == 2
    assert set(ours["per_image"][1]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    if evaluation.spice_missing_jars():  # offline install: SPICE cannot fetch Stanford CoreNLP
        assert "SPICE" not in ours["metrics"] and "stanford-corenlp-3.6.0.jar" in ours["skipped"]["SPICE"]
        assert "get_stanford_models" in ours["skipped"]["SPICE"]


def test_bleu_by_hand():
    # one reference of 3 words, candidate of its first 2: every n-gram matches, brevity penalty exp(1 - 3/2)
    scores = caption_metrics({0: ["a cat sat"]}, {0: "a cat"}, metrics=("BLEU",), tokenize=False)["metrics"]
    assert scores["Bleu_1"] == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(math.exp(1 - 3 / 2), rel=1e-6)
    # an exact match of 4+ words scores 1 at every order
    same = caption_metrics({0: ["the cat sat on the mat"]}, {0: "the cat sat on the mat"}, metrics=("BLEU",),
                           tokenize=False)["metrics"]
    assert all(same[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6) for n in range(1, 5))
    # 1 of the 4 unigrams of "the dog ran down" occurs in the reference (BLEU-1 = BP * 1/4)
    part = caption_metrics({0: ["the cat sat on the mat"]}, {0: "the dog ran down"}, metrics=("BLEU",),
                           tokenize=False)["metrics"]
    bp = math.exp(1 - 6 / 4)
    assert part["Bleu_1"] == pytest.approx(bp * 1 / 4, rel=1e-5)


def test_without_java_meteor_and_spice_are_skipped(monkeypatch):
    monkeypatch.setattr(evaluation.shutil, "which", lambda name: None)
    out = caption_metrics(REFERENCES, PREDICTIONS)
    assert set(out["skipped"]) == {"METEOR", "SPICE"}
    assert all("java was not found" in reason for reason in out["skipped"].values())
    assert "java not found" in out["tokenizer"]
    # the Python tokenization agrees with PTBTokenizer on these captions: same BLEU / ROUGE / CIDEr
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert out["metrics"][name] == pytest.approx(EXPECTED[name], abs=1e-12)
    assert simple_ptb_tokenize("A dog's toy, isn't it?") == "a dog 's toy is n't it"


def test_bad_inputs():
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: ["x"]}, {2: "y"})
    with pytest.raises(ValueError, match="unknown metrics"):
        caption_metrics({1: ["x"]}, {1: "y"}, metrics=("BLEU", "WER"))


def test_clip_score_formula(tmp_path):
    from models.siamese.clip import CLIP
    from testing.tiny_models import build_tiny_clip

    clip = CLIP.from_pretrained(str(build_tiny_clip(tmp_path / "clip.pt", seed=1)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    features = clip.encode_image(list(images))
    captions = ["a red circle.", "a dog on a beach.", "two cats."]
    refs = [["a circle."], ["a dog.", "a beach with a dog."], ["cats."]]
    out = clip_score(clip, features, captions, references=refs)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    text = unit(clip.encode_text(["A photo depicts " + c for c in captions]).astype(np.float64))
    cos = np.sum(unit(features.astype(np.float64)) * text, axis=1)
    expected = 2.5 * np.maximum(cos, 0)
    np.testing.assert_allclose(out["per_image"], expected, atol=1e-6)
    assert out["CLIPScore"] == pytest.approx(expected.mean(), abs=1e-6)
    ref_best = np.array([max(float(np.max(unit(clip.encode_text(r)) @ t)), 0) for r, t in zip(refs, text)])
    harmonic = np.where(expected + ref_best > 0, 2 * expected * ref_best / (expected + ref_best + 1e-300), 0)
    np.testing.assert_allclose(out["ref_per_image"], harmonic, atol=1e-6)
    # negative cosine -> 0 (the max(., 0) of the paper)
    flipped = clip_score(clip, -features, captions)
    np.testing.assert_allclose(flipped["per_image"], 2.5 * np.maximum(-cos, 0), atol=1e-6)
    visual_only = CLIP.from_pretrained(str(tmp_path / "clip.pt"), visual_only=True)
    with pytest.raises(ValueError, match="text encoder"):
        clip_score(visual_only, features, captions)


def test_clip_score_with_another_clip_encodes_the_images_with_it(tmp_path):
    """CLIPScore by a scoring CLIP other than the model's own uses that CLIP's image features."""
    from datasets.synthetic_shapes import make_shapes_dataset
    from models.image_captioning import ClipCap
    from models.siamese.clip import CLIP
    from testing.tiny_models import build_tiny_clip, build_tiny_model

    model = ClipCap.load(build_tiny_model(tmp_path / "model", seed=0))
    scorer = CLIP.from_pretrained(str(build_tiny_clip(tmp_path / "scorer.pt", seed=5)))
    data = make_shapes_dataset(tmp_path / "data", num_images=3, seed=0, image_size=32)
    report = evaluation.evaluate_model(model, data, tmp_path / "eval", metrics=("BLEU",), clip_for_score=scorer,
                                       progress=False, max_length=8)
    captions = [c for c in json.loads((tmp_path / "eval" / "results.json").read_text())]
    expected = clip_score(scorer, scorer.encode_image(data.images), [c["caption"] for c in captions])
    assert report["metrics"]["CLIPScore"] == pytest.approx(expected["CLIPScore"], abs=1e-6)
    wrong = clip_score(scorer, model.encode_images(data.images), [c["caption"] for c in captions])
    assert abs(wrong["CLIPScore"] - expected["CLIPScore"]) > 1e-4  # the two CLIPs differ: the test can fail


def test_evaluation_outputs_never_overwrite_a_user_file(tmp_path):
    """results.json / metrics.json of a previous evaluation are replaced; a user's file of that name is
    refused before any work (model and dataset are not even looked at)."""
    from custom_train_objects.evaluation import _is_metrics_file, _is_results_file, evaluate_model
    from datasets.coco import write_coco_results
    from utils.file_utils import UnsafePathError, write_json_atomic

    for name in ("results.json", "metrics.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("[1, 2, 3]")
        with pytest.raises(UnsafePathError, match=f"{name} exists and is not"):
            evaluate_model(None, None, out)
        assert (out / name).read_text() == "[1, 2, 3]"
    write_coco_results([{"image_id": 1, "caption": "a cat."}], tmp_path / "r.json")
    write_json_atomic(tmp_path / "m.json", {"metrics": {}, "per_image": {}, "method": "greedy"})
    assert _is_results_file(tmp_path / "r.json") and _is_metrics_file(tmp_path / "m.json")
    assert not _is_results_file(tmp_path / "m.json") and not _is_metrics_file(tmp_path / "r.json")


def test_evaluate_with_no_readable_image_fails_clearly_and_writes_nothing(tmp_path, capsys):
    """Every image unreadable: exit 1, each one listed, no results.json (was a numpy broadcast message after an
    empty results.json was written)."""
    from datasets.synthetic_shapes import make_shapes_dataset
    from main import main
    from testing.tiny_models import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", seed=0)
    data = make_shapes_dataset(tmp_path / "data", num_images=2, seed=0, image_size=32)
    for image in data.images:
        Path(image).write_bytes(b"not an image")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "data" / "captions.json"), "--model", str(model_dir), "--output",
                 str(out), "--metrics", "BLEU", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert all(f"skipped {image}" in err for image in data.images) and "could be read" in err, err
    assert "Traceback" not in err and "broadcast" not in err
    assert not out.exists()


def test_per_image_scores_follow_each_scorers_id_order(monkeypatch, tmp_path):
    """pycocoevalcap's Spice returns its per-image scores in sorted(image id) order, Bleu / Rouge / Cider in the
    order of the ids given: each score goes to its own image whatever the dataset order (SPICE's were paired
    with the ids in dataset order). Only SPICE's Java program is replaced: by a stand-in writing its output
    format, f = 1 when the candidate equals the first reference."""
    import pycocoevalcap.spice.spice as spice_module

    def fake_java(cmd, cwd=None):
        with open(cmd[4]) as f:  # java -jar -Xmx8G spice-1.0.jar IN -cache DIR -out OUT ...
            data = json.load(f)
        with open(cmd[cmd.index("-out") + 1], "w") as f:
            json.dump([{"image_id": d["image_id"], "scores": {"All": {"f": float(d["test"] == d["refs"][0]),
                                                                       "pr": 0.0, "re": 0.0}}} for d in data], f)

    monkeypatch.setattr(spice_module.subprocess, "check_call", fake_java)
    monkeypatch.setattr(spice_module, "get_stanford_models", lambda: None)
    monkeypatch.setattr(spice_module, "__file__", str(tmp_path / "spice.py"))  # its tmp/ and cache/ here
    monkeypatch.setattr(evaluation, "spice_missing_jars", lambda: [])
    monkeypatch.setattr(evaluation, "java_available", lambda: True)
    references = {3: ["a red circle on a blue background"], 1: ["a blue square on a green background"],
                  2: ["a green star on a red background"]}  # dataset order 3, 1, 2 (COCO files are not sorted)
    predictions = {3: "a red circle on a blue background", 1: "nothing alike here", 2: "nothing alike here"}
    out = caption_metrics(references, predictions, metrics=("BLEU", "ROUGE_L", "CIDEr", "SPICE"), tokenize=False)
    per_image = out["per_image"]
    assert {k: v["SPICE"] for k, v in per_image.items()} == {3: 1.0, 1: 0.0, 2: 0.0}
    for name in ("Bleu_1", "ROUGE_L", "CIDEr"):
        assert per_image[3][name] > max(per_image[1][name], per_image[2][name]), name
    assert per_image[3]["ROUGE_L"] == pytest.approx(1.0)
