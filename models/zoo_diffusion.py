"""Builders of the zoo's diffusion U-Nets (diffusers, random init from tiny configs, nothing downloaded).

Both export through the TorchScript exporter at opset 17 (`models.zoo_builders._export`), where every GroupNorm
becomes Reshape [N, G, -1] -> InstanceNormalization -> Reshape back -> Mul -> Add: the reshapes regroup the
channel axis, so one GroupNorm group of channels is one channel of the analysis (`rules/reshape.py`,
`_couple_regroup`). What the models hold, measured 2026-12 (diffusers 0.42.1, torch 2.13):

=====================  ======  ======  ======================================================================
entry                  params  groups  what it covers
=====================  ======  ======  ======================================================================
unet2d_tiny            1.11 M  29      3 levels (32, 64, 64), GroupNorm(8), attention at level 1 and mid,
                                       timestep MLP added per channel, skip Concats, nearest Resize up
unet2d_cond_tiny       0.79 M  34      2 levels (32, 64), Transformer2D blocks: self- and cross-attention on
                                       ``encoder_hidden_states`` [1, 8, 32], LayerNorms, GEGLU feed-forward
=====================  ======  ======  ======================================================================

A decoder GroupNorm over a skip Concat whose groups straddle the two inputs (``64 + 32`` channels in groups of
12) couples channels of both: the level-0 stream ends up in components of differing extent, none a group
(kept whole, exactly).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from models.zoo_builders import _export, _torchvision


def _diffusers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("torchvision") is not None:
        _torchvision()  # diffusers imports transformers, which imports torchvision: op schemas first
    import diffusers

    return diffusers


class _Sample:
    """Wraps a diffusers U-Net: its first output (the noise prediction) as a plain tensor."""

    @staticmethod
    def wrap(unet: Any) -> Any:
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample: Any, timestep: Any, *context: Any) -> Any:
                return self.unet(sample, timestep, *context, return_dict=False)[0]

        return Wrapped()


def unet2d_tiny(path: Path) -> None:
    """Unconditional `UNet2DModel`: sample [1, 3, 32, 32] + timestep [1] (int64) -> noise [1, 3, 32, 32]."""
    import torch

    diffusers = _diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        norm_num_groups=8, attention_head_dim=16,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    args = (torch.randn(1, 3, 32, 32), torch.tensor([10], dtype=torch.int64))
    _export(_Sample.wrap(unet), args, path, ["sample", "timestep"], ["noise"])


def unet2d_cond_tiny(path: Path) -> None:
    """Text-conditioned `UNet2DConditionModel` (Stable Diffusion's layout, shrunk): latent [1, 4, 16, 16],
    timestep [1], encoder_hidden_states [1, 8, 32] -> noise [1, 4, 16, 16]."""
    import torch

    diffusers = _diffusers()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    args = (torch.randn(1, 4, 16, 16), torch.tensor([10], dtype=torch.int64), torch.randn(1, 8, 32))
    _export(_Sample.wrap(unet), args, path, ["sample", "timestep", "encoder_hidden_states"], ["noise"])
