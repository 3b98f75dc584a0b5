"""OpenAI's CLIP variants as the arguments of ``clip.model.CLIP``: the one list of the tests and benchmarks.

Plain data, imported without torch (the cold-start benchmark reads it before choosing what to import).
"""

# OpenAI's released variants: the arguments of clip.model.CLIP that build_model infers from their weights
OPENAI_CONFIGS = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, transformer_width=512, transformer_heads=8),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64,
                  vision_patch_size=None, transformer_width=512, transformer_heads=8),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   vision_patch_size=None, transformer_width=640, transformer_heads=10),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8), vision_width=96,
                    vision_patch_size=None, transformer_width=768, transformer_heads=12),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10), vision_width=128,
                    vision_patch_size=None, transformer_width=1024, transformer_heads=16),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=32, transformer_width=512, transformer_heads=8),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                     vision_patch_size=16, transformer_width=512, transformer_heads=8),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                     vision_patch_size=14, transformer_width=768, transformer_heads=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, transformer_width=768, transformer_heads=12),
}
for _config in OPENAI_CONFIGS.values():
    _config.update(context_length=77, vocab_size=49408, transformer_layers=12)

# small configurations exercising the same code paths (strided stages with downsample, several blocks)
TINY_CONFIGS = {
    "tiny-ViT": dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                     context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=2),
    "tiny-RN": dict(embed_dim=32, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16,
                    vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                    transformer_heads=1, transformer_layers=2),
}

#: the benchmarks' text tower: ViT-B/32's width and heads, one layer (they time the image path and decoding)
BENCH_TEXT = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                  transformer_layers=1)
_VISION_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size")


def bench_clip_config(name, **text):
    """OpenAI's ``name`` image tower with the benchmarks' text tower (`BENCH_TEXT`, ``text`` overriding it,
    e.g. ``transformer_layers=12``): the arguments of ``clip.model.CLIP``."""
    return {**{key: OPENAI_CONFIGS[name][key] for key in _VISION_KEYS}, **BENCH_TEXT, **text}
