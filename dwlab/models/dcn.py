"""Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019) on torchvision's
``DeformConv2d``, as MMDetection places it (mmcv's ``ModulatedDeformConv2dPack``): a plain
conv predicts, per output location, 2 offsets and 1 modulation scalar for each of the k x k
kernel taps; the mask is their sigmoid. The offset conv starts at zero, so a new DCN samples
the regular grid with every mask at sigmoid(0) = 0.5: half the plain conv's output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, deform_conv2d


class ModulatedDeformConv2d(DeformConv2d):
    """DCNv2 with one offset group. ``weight`` / ``bias`` are the sampled conv's (the same
    keys as the ``nn.Conv2d`` it replaces); ``conv_offset`` predicts the offsets and the mask."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels, 3 * taps, kernel_size, stride=stride, padding=padding, dilation=dilation
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x ``Tensor[B, C_in, H, W]`` -> ``Tensor[B, C_out, H', W']`` (H', W' as the plain conv's),
        in ``x``'s dtype. The deformable conv itself runs in fp32: torchvision's kernel has no
        bf16 CPU version and autocast (CUDA) casts it to fp32 as well."""
        out = self.conv_offset(x).float()
        taps = out.shape[1] // 3
        offset, mask = out[:, : 2 * taps], torch.sigmoid(out[:, 2 * taps :])  # [B, 2kk, H', W'], [B, kk, H', W']
        bias = None if self.bias is None else self.bias.float()
        return deform_conv2d(
            x.float(), offset, self.weight.float(), bias, stride=self.stride, padding=self.padding,
            dilation=self.dilation, mask=mask,
        ).to(x.dtype)  # fmt: skip

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConv2d:
        """A DCNv2 with ``conv``'s geometry and its weight and bias (copied); a new ``conv_offset``."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot make a DCNv2 of {conv} (numeric zero padding only)")
        dcn = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        )  # fmt: skip
        dcn.to(conv.weight.device)
        with torch.no_grad():
            dcn.weight.copy_(conv.weight)
            if conv.bias is not None:
                dcn.bias.copy_(conv.bias)
        dcn.weight.requires_grad_(conv.weight.requires_grad)
        return dcn
