"""The reader of format-1 ClipCap folders (written before format 2): they still load, with the same captions.

A format-1 folder holds ``config.json`` (``format_version`` 1, ``architecture`` "clipcap", the mapper's
arguments flat at the top level: ``mapping_type``, ``prefix_size``, ``prefix_length``, ``n_embd`` and for a
transformer ``clip_length``, ``num_layers``, ``num_heads``, ``mlp_ratio``; ``normalize_prefix``; ``gpt2``: GPT-2's
arguments; ``tokenizer`` / ``clip``: sub-folder names; ``name``, ``checkpoint``, ``clip_name``),
``mapper.weights.h5`` and ``gpt2.weights.h5`` (Keras ``save_weights`` of each), ``tokenizer/`` and ``clip/`` (a
format-1 CLIP folder, read by `models.siamese.clip.CLIP.load`). Nothing writes this format any more; save a
loaded model again to convert it to format 2.
"""

from models.image_captioning.saving import ModelLoadError, build_or_explain, load_parts

MAPPER_WEIGHTS = "mapper.weights.h5"
GPT2_WEIGHTS = "gpt2.weights.h5"
_NOT_MAPPER = {"mapping_type", "normalize_prefix", "gpt2", "tokenizer", "clip", "name", "checkpoint", "clip_name",
               "format_version", "architecture", "checkpoint_sha256"}


def load_format1(cls, directory, config, clip=None, jit_compile="auto"):
    """A `ClipCap` from a format-1 folder whose parsed ``config.json`` is ``config``."""
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone, build_mapper
    from custom_architectures.transformers_arch.gpt2_arch import GPT2

    config_path = directory / "config.json"
    for key in ("mapping_type", "prefix_length", "prefix_size", "gpt2", "tokenizer"):
        if key not in config:
            raise ModelLoadError(f"{config_path} lacks the key {key!r}: the saved model is damaged or "
                                 "was not written by ClipCap.save; save or convert it again")
    if not isinstance(config["gpt2"], dict):
        raise ModelLoadError(f"{config_path}: key 'gpt2' must be an object of GPT2 arguments, got "
                             f"{type(config['gpt2']).__name__}")
    for filename in (MAPPER_WEIGHTS, GPT2_WEIGHTS):
        if not (directory / filename).is_file():
            raise FileNotFoundError(f"{directory} is an incomplete ClipCap model: {filename} missing")
    from utils.preset_utils import check_model_size

    # nothing is built larger than its weights file: a config edited to n_layer 10**9 is refused, not built
    check_model_size({"class_name": "GPT2", "config": config["gpt2"]}, directory / GPT2_WEIGHTS, config_path,
                     ModelLoadError)
    check_model_size({"config": config}, directory / MAPPER_WEIGHTS, config_path, ModelLoadError)
    mapper_kwargs = {k: v for k, v in config.items() if k not in _NOT_MAPPER}
    mapper = build_or_explain("mapper", config_path, lambda: build_mapper(config["mapping_type"], **mapper_kwargs))
    build_or_explain("mapper weights", directory / MAPPER_WEIGHTS,
                     lambda: mapper.load_weights(str(directory / MAPPER_WEIGHTS)))
    # a config of before GPT-2's Linear projections: from_config reads their kernels as Dense stored them (in, out)
    gpt2 = build_or_explain("GPT-2", config_path, lambda: GPT2.from_config(config["gpt2"]))
    build_or_explain("GPT-2 weights", directory / GPT2_WEIGHTS,
                     lambda: gpt2.load_weights(str(directory / GPT2_WEIGHTS)))
    backbone = build_or_explain("model", config_path, lambda: ClipCapBackbone(
        mapper, gpt2, normalize_prefix=bool(config.get("normalize_prefix", False))))
    return load_parts(cls, directory, config, backbone, clip, jit_compile)
