"""`ClipCap.load`: which reader a saved folder needs (format 2, `models.image_captioning.saving`; format 1,
`models.image_captioning.format1`), or an official name converted once. Kept apart from both readers so that
neither imports the other back."""

from models.image_captioning.saving import ARCHITECTURE, ModelLoadError, load_parts
from utils.model_store import model_dir, recover_model_dir


def load_clipcap(cls, name_or_directory, clip=None, jit_compile="auto"):
    """`ClipCap.load`: a format-2 folder, a format-1 folder, or an official name (converted once)."""
    from utils.preset_utils import CONFIG_FILE, read_saved_header

    directory = recover_model_dir(model_dir(name_or_directory))  # a save killed half-way: finished first
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() and clip is None:
        from models.image_captioning.presets import MODELS
        from models.image_captioning.pretrained import get_pretrained

        if str(name_or_directory) in MODELS:  # an official model: downloaded and converted once
            return get_pretrained(cls, str(name_or_directory))
    config = read_saved_header(directory, ARCHITECTURE, ModelLoadError, "ClipCap")
    if config.get("format_version") == 1:
        from models.image_captioning.format1 import GPT2_WEIGHTS, MAPPER_WEIGHTS, load_format1
        from utils.preset_utils import check_finite_weights

        model = load_format1(cls, directory, config, clip=clip, jit_compile=jit_compile)
        check_finite_weights(model.mapper, directory / MAPPER_WEIGHTS, ModelLoadError)  # before any caption
        check_finite_weights(model.gpt2, directory / GPT2_WEIGHTS, ModelLoadError)
        return model
    return _load_format2(cls, directory, clip, jit_compile)


def _load_format2(cls, directory, clip, jit_compile):
    from custom_architectures.quantization import check_int8_weights
    from custom_architectures.transformers_arch.clip_cap_arch import ClipCapBackbone
    from utils.preset_utils import CONFIG_FILE, WEIGHTS_FILE, load_preset_model, read_preset_config

    config = read_preset_config(directory, ARCHITECTURE, ModelLoadError, required=("tokenizer",))
    backbone = load_preset_model(directory, config, ModelLoadError, expected=ClipCapBackbone)
    if not isinstance(backbone, ClipCapBackbone):
        raise ModelLoadError(f"{directory / CONFIG_FILE}: 'model' is a {type(backbone).__name__}, not a "
                             "ClipCapBackbone; save or convert the model again")
    # float weights are checked finite by load_preset_model; an int8 GPT-2's q and scales here, before any caption
    check_int8_weights(backbone.gpt2, directory / WEIGHTS_FILE, ModelLoadError)
    return load_parts(cls, directory, config, backbone, clip, jit_compile)
