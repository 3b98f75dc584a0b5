"""Build the ClipCap to train: a new mapper on any GPT-2-family language model, or a saved ClipCap.

The language model is a Hugging Face GPT-2-family checkpoint (``gpt2``, ``distilgpt2``, a French GPT-2 ...;
a directory or a name in the HF cache) with its tokenizer, or a randomly initialised `GPT2` from constructor
arguments (small models for tests and the offline example). The mapper is new (random, seeded by
``hparams.seed``) with the architecture of the hyper-parameters.

Example::

    model = build_clipcap_for_training(TrainingHParams(), prefix_size=512, tokenizer="gpt2", gpt2="gpt2",
                                       clip=CLIP.from_pretrained("ViT-B-32.pt"))
"""

import json
import os

import keras


def new_mapper(hparams, prefix_size, n_embd):
    """A new mapper of the hyper-parameters' architecture (random weights): the ``mapping_type``'s class
    (`mapper_registry.MAPPERS`) given ``prefix_size``, ``n_embd`` and every hyper-parameter named like one of its
    constructor arguments (`mapper_arguments`: ``prefix_length``, and the transformer's ``clip_length``,
    ``num_layers``, ``num_heads``); its other arguments keep the class's defaults."""
    from custom_architectures.transformers_arch.clip_cap_arch import build_mapper
    from custom_architectures.transformers_arch.mapper_registry import mapper_arguments

    values = {**hparams.to_dict(), "prefix_size": int(prefix_size), "n_embd": int(n_embd)}
    kwargs = {k: values[k] for k in mapper_arguments(hparams.mapping_type) if k in values}
    return build_mapper(hparams.mapping_type, **kwargs)


def _load_language_model(gpt2, gpt2_config, vocab_size, seed):
    from custom_architectures.transformers_arch.gpt2_arch import GPT2

    if (gpt2 is None) == (gpt2_config is None):
        raise ValueError("give a GPT-2 checkpoint (--gpt2) or a configuration for a random one (--gpt2-config)")
    if gpt2_config is not None:
        kwargs = json.loads(gpt2_config) if isinstance(gpt2_config, str) else dict(gpt2_config)
        kwargs.setdefault("vocab_size", vocab_size)
        keras.utils.set_random_seed(seed)
        return GPT2(**kwargs)
    if isinstance(gpt2, GPT2):
        return gpt2
    from models.image_captioning.gpt2_hub import fetch_gpt2_model, is_hub_name
    from utils.convert.hf_gpt2 import load_gpt2

    path = os.fspath(gpt2)
    if not os.path.exists(path):  # a hub repository: its config.json and model.safetensors (cache or fetched)
        path = fetch_gpt2_model(path)
        if is_hub_name(path) and not os.path.isdir(path):  # in the Hugging Face cache
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
    return load_gpt2(path)


def build_clipcap_for_training(hparams, prefix_size, tokenizer="gpt2", gpt2=None, gpt2_config=None,
                               init_model=None, clip=None, name=None):
    """A `ClipCap` ready for `Trainer`: new mapper + language model, or ``init_model`` (a saved ClipCap).

    Args:
        hparams: `TrainingHParams` (mapper architecture, prefix length, normalisation, seed).
        prefix_size: the CLIP embedding size D.
        tokenizer: a GPT-2-family tokenizer (object, directory or hub name).
        gpt2: a `GPT2`, a Hugging Face checkpoint directory or hub name.
        gpt2_config: instead of ``gpt2``: GPT2 constructor kwargs (dict or JSON) for a random model.
        init_model: a saved ClipCap directory to continue training (its tokenizer and GPT-2 are used).
        clip: the `CLIP` the embeddings come from (kept in the model so that it captions images).
        name: the model's name.
    """
    from models.image_captioning.clip_cap import ClipCap

    if init_model is not None:
        model = ClipCap.load(os.fspath(init_model))
        for key in ("prefix_length", "mapping_type", "prefix_size"):
            wanted = {"prefix_length": hparams.prefix_length, "mapping_type": hparams.mapping_type,
                      "prefix_size": prefix_size}[key]
            if model.config.get(key) != wanted:
                raise ValueError(f"{init_model} has {key}={model.config.get(key)!r} but training asks for {wanted!r}")
        if clip is not None:
            model.clip = clip
        if hparams.stop_token is not None and hparams.stop_token != model.stop_token:
            model.stop_token = hparams.stop_token  # checked against its tokenizer
        return model

    from models.image_captioning.gpt2_hub import fetch_gpt2_tokenizer
    from utils.tokenizer import DEFAULT_STOP_TOKEN, load_gpt2_tokenizer, stop_token_id

    if isinstance(tokenizer, str | os.PathLike):  # a hub name: the cache, or fetched as convert fetches it
        tokenizer = load_gpt2_tokenizer(fetch_gpt2_tokenizer(os.fspath(tokenizer)))
    if hparams.stop_token is not None:  # before loading the language model
        stop_token_id(tokenizer, hparams.stop_token)
    gpt2 = _load_language_model(gpt2, gpt2_config, len(tokenizer), hparams.seed)
    if gpt2.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the language model only {gpt2.vocab_size}")
    if clip is not None and clip.embed_dim != prefix_size:
        raise ValueError(f"the CLIP embeds to {clip.embed_dim} dimensions, the embeddings have {prefix_size}")
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone

    keras.utils.set_random_seed(hparams.seed)
    mapper = new_mapper(hparams, prefix_size, gpt2.n_embd)
    backbone = ClipCapBackbone(mapper, gpt2, normalize_prefix=hparams.normalize)
    # the stop token is recorded with the model, and refused here unless it is one token of the vocabulary
    stop_token = DEFAULT_STOP_TOKEN if hparams.stop_token is None else hparams.stop_token
    return ClipCap(backbone, tokenizer, clip=clip, info={"name": name, "stop_token": stop_token})


def embeddings_clip_problem(clip, model_id, source, clip_name="the model's CLIP", reference=None):
    """Why embeddings labelled ``model_id`` (an embeddings file's metadata, read from ``source``) cannot train or
    validate this model, or None. ``clip``: the CLIP the trained model will keep (``--clip``, else the
    ``--init-model``'s; None: none; named ``clip_name``), which must be the one that produced them
    (`extracted_with`: the ids as `datasets.embeddings` computes them); without one, ``reference`` (the training
    file's ``model_id``, for ``--val``) must equal ``model_id``. Unknown ids ("" or not a CLIP's), and ids of two
    recipes (``clip:<hash>`` and ``clip:v2:<hash>``, which a CLIP alone can relate), are not compared."""
    from datasets.embeddings import extracted_with

    model_id = str(model_id or "")
    if not model_id.startswith("clip:"):
        return None
    if clip is not None:
        if not extracted_with(clip, model_id):
            return (f"{source} was extracted with another CLIP than {clip_name}, which the trained model keeps "
                    "(it would caption with a CLIP it was not trained on): extract it with that CLIP, or give "
                    "--clip the CLIP it was extracted with")
        return None
    reference = str(reference or "")
    if same_id_scheme(reference, model_id) and reference != model_id:
        return (f"{source} was extracted with another CLIP (or another EXIF setting) than the training "
                "embeddings: extract both with the same CLIP")
    return None



def same_id_scheme(a, b):
    """Whether two embeddings ``model_id``s are both known CLIP ids of the same recipe (``clip:<hash>``,
    ``clip:v2:<hash>``...): only then does "different" mean "another CLIP"."""
    a, b = str(a or ""), str(b or "")
    return a.startswith("clip:") and b.startswith("clip:") and a.rsplit(":", 1)[0] == b.rsplit(":", 1)[0]
