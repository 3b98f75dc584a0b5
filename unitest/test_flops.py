"""benchmarks/flops.py: the FLOPs per image the encoder benchmarks report equal PyTorch's FlopCounterMode
on OpenAI's modules, plus the attention products that FlopCounterMode does not see in
``nn.MultiheadAttention`` (2 x 2 T_q T_k C per attention)."""

# torchvision (imported by the clip package) must be loaded before TensorFlow
import torch  # noqa: I001
import torchvision  # noqa: F401
import pytest
from clip.model import CLIP as TorchCLIP
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import image_encoder_flops
from custom_architectures.clip_arch import ModifiedResNet, VisionTransformer

TEXT = dict(context_length=8, vocab_size=64, transformer_width=32, transformer_heads=2, transformer_layers=1)


def _torch_flops(visual, n_px):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        visual(torch.randn(1, 3, n_px, n_px))
    return counter.get_total_flops()


@pytest.mark.parametrize("layers,width,patch,n_px", [(2, 64, 8, 32), (1, 128, 16, 64)])
def test_vit_flops(layers, width, patch, n_px):
    reference = TorchCLIP(embed_dim=24, image_resolution=n_px, vision_layers=layers, vision_width=width,
                          vision_patch_size=patch, **TEXT).eval()
    ours = VisionTransformer(input_resolution=n_px, patch_size=patch, width=width, layers=layers,
                             heads=width // 64, output_dim=24)
    tokens = (n_px // patch) ** 2 + 1
    assert image_encoder_flops(ours) == _torch_flops(reference.visual, n_px) + layers * 4 * tokens**2 * width


@pytest.mark.parametrize("stages,width,n_px", [((1, 1, 1, 1), 8, 64), ((2, 1, 2, 1), 16, 96)])
def test_resnet_flops(stages, width, n_px):
    reference = TorchCLIP(embed_dim=24, image_resolution=n_px, vision_layers=stages, vision_width=width,
                          vision_patch_size=None, **TEXT).eval()
    ours = ModifiedResNet(stages, 24, width * 32 // 64, n_px, width)
    tokens = (n_px // 32) ** 2 + 1
    assert image_encoder_flops(ours) == _torch_flops(reference.visual, n_px) + 4 * tokens * width * 32


def test_not_an_encoder():
    with pytest.raises(TypeError, match="not a CLIP image encoder"):
        image_encoder_flops(object())
