"""Datasets: COCO / Karpathy / table loaders, the synthetic shapes, the tf.data caption pipeline."""

import json

import numpy as np
import pytest
import torch

from datasets.caption_dataset import CaptionDataset, DatasetError
from datasets.captions_table import load_captions_table
from datasets.coco import load_coco, load_coco_results, write_coco_annotations, write_coco_results
from datasets.karpathy import load_karpathy
from datasets.synthetic_shapes import all_captions, make_shapes_dataset, render_shape, shape_features
from datasets.tf_dataset import (
    caption_batches,
    encode_captions,
    epoch_order,
    official_max_length,
    pad_tokens,
    tokenize_captions,
)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------------------------- loaders


def test_coco_loader_lists_each_image_once(tmp_path):
    ann = _write(tmp_path / "captions.json", {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 3, "caption": " A dog. "}, {"image_id": 7, "caption": "A cat."},
                        {"image_id": 3, "caption": "A brown dog."}]})
    data = load_coco(ann, tmp_path / "imgs")
    assert data.images == [str(tmp_path / "imgs" / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert data.image_ids == [7, 3, 9]
    assert data.captions == ["A dog.", "A cat.", "A brown dog."]
    assert data.image_index.tolist() == [1, 0, 1]
    assert data.references() == {7: ["A cat."], 3: ["A dog.", "A brown dog."], 9: []}
    # round trip through the writer
    write_coco_annotations(data, tmp_path / "again.json", image_dir=tmp_path / "imgs")
    again = load_coco(tmp_path / "again.json", tmp_path / "imgs")
    assert again.references() == data.references() and again.images == data.images
    write_coco_results([{"image_id": 7, "caption": "x"}], tmp_path / "res.json")
    assert load_coco_results(tmp_path / "res.json") == {7: "x"}


def test_coco_loader_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_coco(tmp_path / "missing.json")
    bad = _write(tmp_path / "bad.json", {"images": [{"id": 1, "file_name": "a.jpg"}],
                                         "annotations": [{"image_id": 2, "caption": "x"}]})
    with pytest.raises(DatasetError, match="unknown image id 2"):
        load_coco(bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(tmp_path / "broken.json")
    with pytest.raises(DatasetError, match="'images' and 'annotations'"):
        load_coco(_write(tmp_path / "list.json", []))
    ok = _write(tmp_path / "ok.json", {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []})
    with pytest.raises(DatasetError, match="missing"):
        load_coco(ok, check_images=True)


def test_karpathy_splits(tmp_path):
    entries = [
        {"filepath": "train2014", "filename": "t.jpg", "split": "train", "cocoid": 1, "imgid": 0,
         "sentences": [{"raw": "A train. ", "tokens": []}, {"raw": "Tracks.", "tokens": []}]},
        {"filepath": "val2014", "filename": "r.jpg", "split": "restval", "cocoid": 2, "imgid": 1,
         "sentences": [{"raw": "Rest.", "tokens": []}]},
        {"filepath": "val2014", "filename": "v.jpg", "split": "test", "cocoid": 3, "imgid": 2,
         "sentences": [{"raw": "Test.", "tokens": []}]},
    ]
    path = _write(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    train = load_karpathy(path, tmp_path / "coco", split="train")
    assert train.image_ids == [1, 2] and train.captions == ["A train.", "Tracks.", "Rest."]
    assert train.images[0] == str(tmp_path / "coco" / "train2014" / "t.jpg")
    assert load_karpathy(path, split="train", include_restval=False).image_ids == [1]
    assert load_karpathy(path, split="test").references() == {3: ["Test."]}
    with pytest.raises(DatasetError, match="unknown Karpathy split"):
        load_karpathy(path, split="dev")
    with pytest.raises(DatasetError, match="no image in split"):
        load_karpathy(_write(tmp_path / "dataset_x.json", {"images": entries[:1]}), split="test")


def test_captions_table_csv_and_jsonl(tmp_path):
    (tmp_path / "t.csv").write_text('image,caption\nimgs/a.png,"A cat, asleep."\nimgs/a.png,A cat.\n/abs/b.png,B.\n')
    data = load_captions_table(tmp_path / "t.csv")
    assert data.images == [str(tmp_path / "imgs" / "a.png"), "/abs/b.png"]
    assert data.captions == ["A cat, asleep.", "A cat.", "B."] and data.image_index.tolist() == [0, 0, 1]
    (tmp_path / "t.jsonl").write_text('{"file": "a.png", "text": "x"}\n\n{"file": "b.png", "text": "y"}\n')
    data = load_captions_table(tmp_path / "t.jsonl", image_root="/data", image_column="file", caption_column="text")
    assert data.pairs() == [("/data/a.png", "x"), ("/data/b.png", "y")]
    (tmp_path / "bad.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(DatasetError, match="no column"):
        load_captions_table(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{oops\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        load_captions_table(tmp_path / "bad.jsonl")
    (tmp_path / "deep.jsonl").write_text('{"image": "a.png", "caption": "x"}\n' + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetError, match="deep.jsonl:2: JSON nested more than"):  # not a RecursionError
        load_captions_table(tmp_path / "deep.jsonl")
    with pytest.raises(DatasetError, match="unknown table format"):
        load_captions_table(_write(tmp_path / "t.xml", {}))


def test_captions_table_errors_name_the_file_and_the_line(tmp_path):
    """A field over the csv module's limit (a quote left open), bytes that are not UTF-8 (CSV and JSONL), a
    line over MAX_LINE_BYTES: a DatasetError naming file and line (was csv.Error's traceback, or a
    UnicodeDecodeError naming neither); a UTF-8 byte-order mark (Excel's "CSV UTF-8") is not a column name."""
    from datasets import captions_table

    (tmp_path / "big.csv").write_text('image,caption\na.png,ok\nb.png,"' + "x" * 140_000 + '"\nc.png,ok\n')
    with pytest.raises(DatasetError, match=r"big\.csv:3: field larger than field limit \(131072\)"):
        load_captions_table(tmp_path / "big.csv")
    head = "image,caption\na.png,ok\nb.png,caf"
    (tmp_path / "latin.csv").write_bytes((head + "\xe9 au lait\n").encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"latin\.csv:3: not UTF-8 text \(byte {len(head)} of the file"):
        load_captions_table(tmp_path / "latin.csv")
    head = '{"image": "a.png", "caption": "ok"}\n{"image": "caf'
    (tmp_path / "latin.jsonl").write_bytes((head + '\xe9.png"}\n').encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"latin\.jsonl:2: not UTF-8 text \(byte {len(head)} of the file"):
        load_captions_table(tmp_path / "latin.jsonl")
    (tmp_path / "long.csv").write_text("image,caption\na.png," + "y" * (captions_table.MAX_LINE_BYTES + 1) + "\n")
    with pytest.raises(DatasetError, match=r"long\.csv:2: a line longer than"):
        load_captions_table(tmp_path / "long.csv")
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.png,\"two\nlines\"\nb.png,x\n".encode("utf-8"))
    assert load_captions_table(tmp_path / "bom.csv").captions == ["two\nlines", "x"]
    (tmp_path / "empty.csv").write_text('image,caption\na.png,"two\nlines"\nb.png,\n')
    with pytest.raises(DatasetError, match=r"empty\.csv:4: empty or missing"):  # the row's line, not its index
        load_captions_table(tmp_path / "empty.csv")


def test_crafted_annotation_files_fail_naming_the_entry(tmp_path):
    """Fields of the wrong type (a null or numeric caption, a list id, a numeric file name, images that are
    not objects, ``"images": null``): a DatasetError naming the file and the entry, not an AttributeError /
    TypeError from deep inside the loader."""
    image = {"id": 1, "file_name": "a.jpg"}
    coco = {
        "null_caption": ({"images": [image], "annotations": [{"image_id": 1, "caption": None}]},
                         r"annotations\[0\]: its 'caption' must be a string, got None"),
        "int_caption": ({"images": [image], "annotations": [{"image_id": 1, "caption": 5}]},
                        r"annotations\[0\]: its 'caption' must be a string, got 5"),
        "list_id": ({"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []},
                    r"images\[0\]: an image id must be an integer or a string, got \[1\]"),
        "list_image_id": ({"images": [image], "annotations": [{"image_id": [1], "caption": "x"}]},
                          r"annotations\[0\]: an image id must be"),
        "int_file_name": ({"images": [{"id": 1, "file_name": 7}], "annotations": []},
                          r"images\[0\]: its 'file_name' must be a string, got 7"),
        "int_image": ({"images": [3], "annotations": []}, r"images\[0\]: each image must be an object, got 3"),
        "null_images": ({"images": None, "annotations": []}, r"'images' must be a list, got None"),
        "str_annotation": ({"images": [image], "annotations": ["x"]}, r"annotations\[0\]: each annotation must be"),
    }
    for name, (data, message) in coco.items():
        with pytest.raises(DatasetError, match=rf"{name}\.json: {message}"):
            load_coco(_write(tmp_path / f"{name}.json", data))
    (tmp_path / "results.json").write_text('[{"image_id": {"a": 1}, "caption": "x"}]')
    with pytest.raises(DatasetError, match=r"entry 0: an image id must be"):
        load_coco_results(tmp_path / "results.json")
    entry = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "x"}]}
    karpathy = {
        "int_raw": ({**entry, "sentences": [{"raw": 3}]}, r"images\[0\]: sentences\[0\]: its 'raw' must be a string"),
        "str_entry": ("x", r"images\[0\]: each image must be an object, got 'x'"),
        "str_sentence": ({**entry, "sentences": ["x"]}, r"images\[0\]: sentences\[0\]: each sentence must be"),
        "null_sentences": ({**entry, "sentences": None}, r"images\[0\]: its 'sentences' must be a list"),
        "list_id": ({**entry, "cocoid": [1]}, r"images\[0\]: an image id must be"),
        "int_filename": ({**entry, "filename": 7}, r"images\[0\]: its 'filename' must be a string"),
    }
    for name, (data, message) in karpathy.items():
        with pytest.raises(DatasetError, match=rf"{name}\.json: {message}"):
            load_karpathy(_write(tmp_path / f"{name}.json", {"images": [data]}), split="test")
    (tmp_path / "t.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": 5, "caption": "a cat."}\n')
    with pytest.raises(DatasetError, match=r"t\.jsonl:2: 'image' must be a string, got 5"):
        load_captions_table(tmp_path / "t.jsonl")
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "caption": ["a cat."]}\n')
    with pytest.raises(DatasetError, match=r"c\.jsonl:1: 'caption' must be a string"):
        load_captions_table(tmp_path / "c.jsonl")


def test_caption_dataset_checks_and_subsets():
    data = CaptionDataset.from_pairs([("a", "1"), ("b", "2"), ("a", "3"), ("c", "4")])
    sub = data.select_images([2, 0])
    assert sub.images == ["c", "a"] and sub.captions == ["1", "3", "4"] and sub.image_index.tolist() == [1, 1, 0]
    with pytest.raises(DatasetError, match="out of range"):
        CaptionDataset(["a"], ["a"], ["x"], [1])
    with pytest.raises(DatasetError, match="not unique"):
        CaptionDataset(["a", "b"], [1, 1], [], [])


# ----------------------------------------------------------------------------------------------- shapes


def test_synthetic_shapes_are_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", num_images=12, seed=3, image_size=32)
    b = make_shapes_dataset(tmp_path / "b", num_images=12, seed=3, image_size=32)
    c = make_shapes_dataset(tmp_path / "c", num_images=12, seed=4, image_size=32)
    assert a.captions == b.captions and a.captions != c.captions
    for pa, pb in zip(a.images, b.images):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    assert set(a.captions) <= set(all_captions()) and len(all_captions()) == 3 * 6 * 5
    assert load_coco(tmp_path / "a" / "captions.json").references() == a.references()
    # the fixed features see the shape and both colours
    feats = shape_features([render_shape(s, "red", "blue", 32) for s in ("circle", "square", "triangle")])
    assert feats.shape == (3, 70) and len({tuple(f) for f in feats.round(3)}) == 3
    np.testing.assert_allclose(feats[0, -6:], [220 / 255, 30 / 255, 30 / 255, 40 / 255, 60 / 255, 220 / 255], atol=1e-6)
    with pytest.raises(ValueError, match="unknown colour"):
        render_shape("circle", "mauve", "blue")


# ------------------------------------------------------------------------------------------------ tf.data


class _FakeTokenizer:
    """Characters -> ids (a -> 0, b -> 1, ...; '.' -> 26): token id 0 is a real token here."""

    def encode(self, text, add_special_tokens=False):
        return [26 if ch == "." else ord(ch) - ord("a") for ch in text if ch == "." or ch.isalpha()]


def test_official_max_length_matches_the_torch_formula():
    lengths = [5, 7, 9, 11, 12, 40, 6, 8]
    t = torch.tensor(lengths, dtype=torch.float)
    expected = min(int(t.mean() + t.std() * 10), int(t.max()))  # the official ClipCocoDataset rule
    assert official_max_length(lengths) == expected
    assert official_max_length([3, 3, 3, 4]) == min(int(3.25 + 10 * np.std([3, 3, 3, 4], ddof=1)), 4)


def test_tokens_and_mask_keep_token_zero_and_cover_the_prefix():
    tok = _FakeTokenizer()
    assert tokenize_captions(tok, ["ab", "ba."]) == [[0, 1, 26], [1, 0, 26]]  # stop appended once
    assert tokenize_captions(tok, ["ab"], append_stop=False) == [[0, 1]]
    tokens, mask = pad_tokens([[0, 1, 26], [4]], max_length=4, prefix_length=2)
    assert tokens.tolist() == [[0, 1, 26, 0], [4, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    tokens, mask = pad_tokens([[1, 2, 3, 4, 5]], max_length=3, prefix_length=1)  # cut, as the official code
    assert tokens.tolist() == [[1, 2, 3]] and mask.tolist() == [[1, 1, 1, 1]]
    tokens, mask = encode_captions(tok, ["abc", "a", "ab"], prefix_length=3)
    assert tokens.shape == (3, 4) and mask.shape == (3, 7)  # max_length = max(4, 2, 3): mean + 10 std > max


def test_caption_batches_order_gather_and_skip():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(4, 3)).astype(np.float32)
    image_index = np.array([0, 0, 1, 2, 3, 3, 1])
    tokens = np.arange(7 * 2, dtype=np.int32).reshape(7, 2)
    mask = np.ones((7, 3), np.float32)
    batches = list(caption_batches(embeddings, image_index, tokens, mask, batch_size=2, seed=5, epoch=1))
    assert len(batches) == 3  # drop_remainder: 7 // 2
    order = epoch_order(7, 5, 1)
    for b, (emb, tok, m) in enumerate(batches):
        rows = order[2 * b : 2 * b + 2]
        np.testing.assert_array_equal(tok.numpy(), tokens[rows])
        np.testing.assert_array_equal(emb.numpy(), embeddings[image_index[rows]])
        assert m.shape == (2, 3)
    skipped = list(caption_batches(embeddings, image_index, tokens, mask, batch_size=2, seed=5, epoch=1,
                                   skip_batches=1))
    assert [t.numpy().tolist() for _, t, _ in skipped] == [t.numpy().tolist() for _, t, _ in batches[1:]]
    other_epoch = [t.numpy().tolist() for _, t, _ in caption_batches(embeddings, image_index, tokens, mask, 2,
                                                                      seed=5, epoch=2)]
    assert other_epoch != [t.numpy().tolist() for _, t, _ in batches]
    with pytest.raises(ValueError, match="out of range"):
        caption_batches(embeddings[:2], image_index, tokens, mask, batch_size=2)
