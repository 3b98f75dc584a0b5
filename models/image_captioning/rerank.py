"""Captions chosen by what CLIP sees: re-ranking a decoder's candidates by CLIPScore (Hessel et al. 2021).

The decoder gives W candidates per image (beam: the ``beam_size`` beams; sample: the ``num_captions`` draws).
Each is scored by CLIP-S = ``2.5 * max(cos(image, "A photo depicts " + caption), 0)``
(`models.siamese.clip_score`, the computation `evaluate` reports), and ranked by

    rank score = clip_score + rerank_weight * score

where ``score`` is the language model's average log-probability per token (<= 0). ``rerank_weight=0`` (the
default): CLIP-S alone decides; ties keep the decoder's order. Both options are declared and checked with
the other decoding options (`custom_architectures.decoding_options.RERANK`; only for the methods that give
several candidates per image, `custom_architectures.decoding.decoding`). The text encoder runs once over the B * W
candidates of a batch (`CLIP.encode_text`: padded to a power of two, compiled as the image encoder is).

Example::

    model.generate(embeddings, method="beam", beam_size=5, num_captions=3, rerank="clip")
    # [[{"text", "tokens", "score", "clip_score"}, ...3 best of 5 by CLIP-S...], ...]
"""

import numpy as np

from models.siamese.clip_score import clip_scores, has_text_encoder


class MissingTextEncoderError(ValueError):
    """Re-ranking asked of a model whose CLIP has no text encoder (an image-only ``clip/`` folder)."""


def text_encoder_help(model_name=None, needs="re-ranking") -> str:
    """How to give a ClipCap model CLIP's text encoder (the error of `check_text_encoder`, and of MAGIC)."""
    from models.image_captioning.presets import MODELS

    name = model_name or "NAME"
    convert = (f"python main.py download {name} --force" if name in MODELS else
               f"python main.py convert CHECKPOINT --clip CLIP --name {name} --overwrite")
    return (f"{needs} needs CLIP's text encoder, and this model's CLIP is image-only (a clip/ folder saved "
            f"before text encoders were kept, or none). Add it: convert the model again ({convert}), or load it "
            f"with a CLIP that has one: ClipCap.load({name!r}, clip='ViT-B/32' or the path of an OpenAI CLIP .pt "
            "file or of a saved CLIP folder)")


def check_text_encoder(model):
    """Raise `MissingTextEncoderError` (saying how to add one) unless ``model.clip`` has its text encoder."""
    if not has_text_encoder(getattr(model, "clip", None)):
        raise MissingTextEncoderError(text_encoder_help(getattr(model, "name", None)))


def rerank_candidates(clip, embeddings, candidates, rerank_weight=0.0, compile_now=None):
    """Score and re-order every image's candidates in place of the decoder's order.

    Args:
        clip: the `CLIP` (with its text encoder) whose image features ``embeddings`` are.
        embeddings: (B, D) raw CLIP image features, one row per image.
        candidates: B lists of dicts with ``text`` and ``score`` (the LM's average log-probability).
        rerank_weight: A in ``clip_score + A * score``.

    Returns:
        B lists of the same dicts with ``clip_score`` added, sorted by the rank score, best first (stable).
    """
    counts = [len(c) for c in candidates]
    flat = [c for group in candidates for c in group]
    if not flat:
        return [list(group) for group in candidates]
    images = np.repeat(np.asarray(embeddings), counts, axis=0)
    scores, _ = clip_scores(clip, images, [c["text"] for c in flat], compile_now=compile_now)  # one text pass
    out, start = [], 0
    for count in counts:
        group = [{**c, "clip_score": float(s)} for c, s in zip(flat[start:start + count], scores[start:start + count])]
        rank = [s + rerank_weight * c["score"] for c, s in zip(group, scores[start:start + count])]
        order = sorted(range(count), key=lambda i: -rank[i])  # stable: ties keep the decoder's order
        out.append([group[i] for i in order])
        start += count
    return out
