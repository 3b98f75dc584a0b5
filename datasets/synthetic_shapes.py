"""A synthetic captioning dataset: one coloured shape on a plain background, with a templated caption.

"a red circle on a blue background." — shapes, colours and a little jitter of position and size are drawn
from a seeded generator, so the same seed gives the same images (byte for byte) and captions. It is small
and offline: the training tests and the README's worked example use it to show that a ClipCap learns.
Captions come in English (default), French ("un cercle rouge sur fond bleu.") or Chinese
("蓝色背景上的红色圆形。"): `LANGUAGES`, to show a model learning another language.

Example::

    train = make_shapes_dataset("data/shapes/train", num_images=400, seed=0)   # PNGs + captions.json
    val = make_shapes_dataset("data/shapes/val", num_images=50, seed=1)
    train.captions[0]      # 'a green triangle on a white background.'
"""

import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datasets.caption_dataset import CaptionDataset
from datasets.coco import write_coco_annotations

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (240, 220, 40),
          "white": (250, 250, 250), "black": (15, 15, 15)}
ANNOTATIONS_FILENAME = "captions.json"
#: Each language's words and template. French: every shape and "fond" are masculine, so the colours take
#: their masculine form; Chinese: "{background}背景上的{color}{shape}。" (the full stop is "。").
LANGUAGES = {
    "en": {"template": "a {color} {shape} on a {background} background.",
           "words": {**{s: s for s in SHAPES}, **{c: c for c in COLORS}}},
    "fr": {"template": "un {shape} {color} sur fond {background}.",
           "words": {"circle": "cercle", "square": "carré", "triangle": "triangle", "red": "rouge",
                     "green": "vert", "blue": "bleu", "yellow": "jaune", "white": "blanc", "black": "noir"}},
    "zh": {"template": "{background}背景上的{color}{shape}。",
           "words": {"circle": "圆形", "square": "正方形", "triangle": "三角形", "red": "红色", "green": "绿色",
                     "blue": "蓝色", "yellow": "黄色", "white": "白色", "black": "黑色"}},
}


def _language(language):
    if language not in LANGUAGES:
        raise ValueError(f"unknown caption language {language!r}; expected one of {tuple(LANGUAGES)}")
    return LANGUAGES[language]


def caption_for(shape, color, background, language="en"):
    """The templated caption in ``language`` (`LANGUAGES`): ``"a {color} {shape} on a {background}
    background."``, ``"un {shape} {color} sur fond {background}."`` or ``"{background}背景上的{color}{shape}。"``."""
    spec = _language(language)
    words = spec["words"]
    return spec["template"].format(shape=words[shape], color=words[color], background=words[background])


def all_captions(language="en"):
    """Every caption the dataset can produce in ``language`` (e.g. to train a tokenizer)."""
    return [caption_for(s, c, b, language) for s, c, b in itertools.product(SHAPES, COLORS, COLORS) if c != b]


def render_shape(shape, color, background, image_size=64, center=(0.5, 0.5), radius=0.3):
    """A PIL RGB image of ``shape`` in ``color`` on ``background`` (colour names of `COLORS`).

    ``center`` and ``radius`` are fractions of the image side.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    for name in (color, background):
        if name not in COLORS:
            raise ValueError(f"unknown colour {name!r}; expected one of {tuple(COLORS)}")
    image = Image.new("RGB", (image_size, image_size), COLORS[background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * image_size, center[1] * image_size, radius * image_size
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)],
                     fill=COLORS[color])
    return image


def sample_shapes(num_images, seed=0):
    """``num_images`` (shape, colour, background, center, radius) tuples drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    out = []
    for _ in range(num_images):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color, background = (colors[i] for i in rng.choice(len(colors), size=2, replace=False))
        center = tuple(float(v) for v in 0.5 + rng.uniform(-0.04, 0.04, size=2))
        radius = float(rng.uniform(0.26, 0.34))
        out.append((shape, color, background, center, radius))
    return out


def shape_features(images, side=8):
    """Fixed features of shape images, a stand-in for CLIP in fast tests: (B, side*side + 6) float32.

    A ``side`` x ``side`` foreground mask (pixels whose colour differs from the corner pixel's, averaged over
    cells) followed by the mean foreground and background colours in [0, 1]. Any list of PIL images works.
    """
    out = []
    for image in images:
        pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0  # (H, W, 3)
        background = pixels[0, 0]
        foreground = np.abs(pixels - background).sum(-1) > 0.1  # (H, W)
        h, w = foreground.shape
        cells = foreground[: h - h % side, : w - w % side].reshape(side, h // side, side, w // side)
        mask = cells.mean(axis=(1, 3)).reshape(-1)
        fg = pixels[foreground].mean(0) if foreground.any() else background
        out.append(np.concatenate([mask, fg, background]))
    return np.stack(out).astype(np.float32)


def make_shapes_dataset(directory, num_images=200, seed=0, image_size=64, language="en"):
    """Render ``num_images`` images into ``directory/images/`` and write ``directory/captions.json`` (COCO),
    with captions in ``language`` (`LANGUAGES`; the images do not depend on it).

    Returns the `CaptionDataset` (one caption per image; image ids 0..N-1). Rendering again with the same
    arguments rewrites identical files.
    """
    _language(language)  # an unknown language: refused before any file is written
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for k, (shape, color, background, center, radius) in enumerate(sample_shapes(num_images, seed)):
        path = directory / "images" / f"{k:05d}.png"
        render_shape(shape, color, background, image_size, center, radius).save(path)
        paths.append(str(path))
        captions.append(caption_for(shape, color, background, language))
    dataset = CaptionDataset(paths, list(range(num_images)), captions, np.arange(num_images),
                             name=f"shapes:{directory.name}")
    write_coco_annotations(dataset, directory / ANNOTATIONS_FILENAME, image_dir=directory)
    return dataset


def train_shapes_tokenizer(directory, vocab_size=300, languages=("en",), texts=()):
    """A byte-level BPE trained on `all_captions` of ``languages`` and on ``texts`` (any other sentences),
    saved in GPT-2's format with ``<|endoftext|>`` (for the offline example, and models in other languages);
    `utils.gpt2_tokenizer.train_gpt2_tokenizer`. Returns the `GPT2Tokenizer`."""
    from utils.gpt2_tokenizer import train_gpt2_tokenizer

    corpus = [c for language in languages for c in all_captions(language)] + list(texts)
    return train_gpt2_tokenizer(directory, corpus, vocab_size=vocab_size, repeats=5)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Render the synthetic shapes dataset (COCO captions format).")
    parser.add_argument("directory")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--language", choices=tuple(LANGUAGES), default="en", help="the captions' language")
    parser.add_argument("--tokenizer", help="also train a GPT-2-format BPE tokenizer on the captions, saved here")
    args = parser.parse_args(argv)
    data = make_shapes_dataset(args.directory, args.num_images, args.seed, args.image_size, args.language)
    print(f"{data.summary()} -> {Path(args.directory) / ANNOTATIONS_FILENAME}")
    if args.tokenizer:
        tokenizer = train_shapes_tokenizer(args.tokenizer, languages=(args.language,))
        print(f"tokenizer of {len(tokenizer)} tokens -> {args.tokenizer}")


if __name__ == "__main__":
    main()
