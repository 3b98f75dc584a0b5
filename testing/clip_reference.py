"""PyTorch references for the CLIP tests and benchmarks: OpenAI's own ``clip.model`` with random,
fp16-rounded weights (the configurations: `testing.clip_configs`, also readable here).

Imports torch and the ``clip`` package: import it before TensorFlow (torchvision first, as conftest does).
"""

import torch
from clip.model import CLIP as TorchCLIP
from clip.model import build_model

from testing.clip_configs import OPENAI_CONFIGS, TINY_CONFIGS  # noqa: F401  (the tests read them here)


def random_clip_state_dict(config, seed=0):
    """A random CLIP state dict, every float tensor rounded to fp16 (kept as fp32).

    Starts from OpenAI's initialisation, then randomises what it initialises to constants (LayerNorm and
    BatchNorm affine parameters, biases, the zero-initialised ``bn3`` of every Bottleneck) so that no weight
    can be mis-converted unnoticed, and measures the BatchNorm statistics on random images (then perturbs
    them, so that none is the identity's).
    """
    torch.manual_seed(seed)
    model = TorchCLIP(**config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bn1.weight", "bn2.weight", "downsample.1.weight")):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("bn3.weight"):  # zero in OpenAI's init; small keeps the deep stack well-conditioned
                param.copy_(0.25 + 0.05 * torch.randn_like(param) if name.startswith("visual.layer") else
                            1.0 + 0.1 * torch.randn_like(param))
            elif param.numel() > 1 and float(param.std()) == 0.0:  # LayerNorm affine, biases
                param.add_(0.1 * torch.randn_like(param))
        if isinstance(config["vision_layers"], (tuple, list)):
            # BatchNorm statistics measured on random images, so that the image signal survives the depth
            # (arbitrary statistics let the biases drown it and every image gets the same embedding)
            batch_norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            for bn in batch_norms:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average
            model.visual.train()
            n_px = config["image_resolution"]
            model.visual(torch.randn(2, 3, n_px, n_px))
            model.visual.eval()
            for bn in batch_norms:  # channels dead on 2 images would divide round-off by sqrt(1e-5)
                bn.running_var.clamp_(min=0.1)
                # then moved off what was measured, so that no statistic is (nearly) the identity's (the stem's
                # measured means are ~0): the BN folding is tested only if each BN does something
                bn.running_mean.add_(0.5 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
                bn.running_var.mul_(torch.exp(0.3 * torch.randn_like(bn.running_var)))
    state_dict = {}
    for key, value in model.state_dict().items():
        value = value.detach().clone()
        state_dict[key] = value.half().float() if value.is_floating_point() else value
    return state_dict


def reference_model(state_dict):
    """OpenAI's ``build_model`` on a copy of the state dict, run in fp32 (eval mode)."""
    return build_model(dict(state_dict)).float().eval()


def as_fp16_checkpoint(state_dict):
    """What OpenAI's files hold: every float tensor in fp16 (non-float buffers untouched)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def max_rel_diff(reference, ours):
    """max |reference - ours| / max |reference|."""
    import numpy as np

    reference, ours = np.asarray(reference, np.float64), np.asarray(ours, np.float64)
    assert reference.shape == ours.shape, (reference.shape, ours.shape)
    return float(np.abs(reference - ours).max() / np.abs(reference).max())
