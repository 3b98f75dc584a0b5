"""CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning"): the one
computation that evaluation (`custom_train_objects.evaluation.clip_score`) and re-ranking
(`models.image_captioning.rerank`) share.

CLIP-S(image, caption) = ``w * max(cos(E_image, E_text("A photo depicts " + caption)), 0)``, w = 2.5, with
the raw CLIP features L2-normalised in float64.

Example::

    scores = clip_scores(clip, clip.encode_image(["cat.jpg", "cat.jpg"]), ["a cat.", "a dog."])   # (2,)
"""

import numpy as np

CLIP_SCORE_PROMPT = "A photo depicts "
CLIP_SCORE_W = 2.5
#: most texts per call of the text encoder (longer lists are encoded in chunks of this size)
TEXT_BATCH = 256


def has_text_encoder(clip) -> bool:
    """Whether ``clip`` (a `models.siamese.clip.CLIP`) has its text encoder and tokenizer."""
    if clip is None:
        return False
    if hasattr(clip, "has_text"):  # a `CLIP`: also a text encoder saved and not loaded yet
        return bool(clip.has_text)
    return getattr(clip, "tokenizer", None) is not None and getattr(getattr(clip, "model", None), "text", None) is not None


def normalize(x):
    """Rows of ``x`` divided by their L2 norm, float64 (a zero row stays zero)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_texts(clip, texts, batch_size=TEXT_BATCH, compile_now=None):
    """Raw CLIP text features (N, D) of ``texts`` (truncated to CLIP's context), in chunks of ``batch_size``."""
    parts = [clip.encode_text(texts[i : i + batch_size], truncate=True, compile_now=compile_now)
             for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, clip.embed_dim), np.float32)


def clip_scores(clip, image_features, captions, w=CLIP_SCORE_W, prompt=CLIP_SCORE_PROMPT, compile_now=None):
    """CLIP-S of each (image, caption) pair: (N,) float64 for (N, D) raw image features and N captions.

    Returns ``(scores, text_features)``, the latter L2-normalised (RefCLIP-S compares them with references).
    Raises ValueError for a CLIP without its text encoder, or counts that differ."""
    if not has_text_encoder(clip):
        raise ValueError("CLIPScore needs a CLIP with its text encoder (this one was loaded image-only)")
    if len(image_features) != len(captions):
        raise ValueError(f"{len(image_features)} images but {len(captions)} captions")
    images = normalize(image_features)
    texts = normalize(encode_texts(clip, [prompt + c for c in captions], compile_now=compile_now))
    return w * np.clip(np.sum(images * texts, axis=1), 0, None), texts
