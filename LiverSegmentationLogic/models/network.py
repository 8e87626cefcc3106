"""A compact 2D U-Net for 2.5D (neighbour-slice) input."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class ConvBlock(nn.Module):
    """Two 3x3 conv + BatchNorm + ReLU, with an optional residual short skip and dropout."""

    def __init__(self, in_ch: int, out_ch: int, residual: bool = False, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.skip = None
        if residual:
            self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.dropout(self.act(y))


class UNet2D(nn.Module):
    """2D U-Net.

    Args:
        in_channels: input channels (2k + 1 for k neighbour slices on each side).
        n_classes: output classes, background included.
        width: feature maps of the first level; doubled at each level down.
        depth: number of down-sampling steps (the input size must be a multiple of 2**depth).
        residual: add residual short skips inside each block.
        dropout: Dropout2d probability in the two deepest blocks.
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_classes: int = 2,
        width: int = 16,
        depth: int = 4,
        residual: bool = False,
        dropout: float = 0.1,
    ):
        super().__init__()
        if in_channels < 1 or n_classes < 2:
            raise ValueError(f"need in_channels >= 1 and n_classes >= 2, got {in_channels}, {n_classes}")
        if width < 1 or depth < 1:
            raise ValueError(f"need width >= 1 and depth >= 1, got {width}, {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.config = dict(
            in_channels=in_channels, n_classes=n_classes, width=width, depth=depth, residual=residual, dropout=dropout
        )
        chans = [width * 2**i for i in range(depth + 1)]
        deep = {depth - 1, depth}  # the two deepest blocks carry dropout
        self.down = nn.ModuleList()
        prev = in_channels
        for level, ch in enumerate(chans):
            self.down.append(ConvBlock(prev, ch, residual, dropout if level in deep else 0.0))
            prev = ch
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * chans[level], chans[level], residual))
        self.head = nn.Conv2d(chans[0], n_classes, 1)

    @property
    def stride(self) -> int:
        return 2 ** self.config["depth"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, block in zip(self.up, self.up_blocks):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


class UNetEnsemble(nn.Module):
    """U-Nets of one configuration, trained apart (other seeds), whose probabilities are averaged.

    ``forward`` returns the log of the mean softmax, so whatever takes a softmax or an argmax of a
    U-Net's output (inference, uncertainty, the Dice + CE loss when fine-tuning) sees the mean.

    Args:
        members: the trained networks (at least 2, same ``config``).
    """

    def __init__(self, members: list[UNet2D]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        if any(m.config != members[0].config for m in members):
            raise ValueError("ensemble members must share one network configuration")
        self.members = nn.ModuleList(members)
        self.config = dict(members[0].config, members=len(members))

    @property
    def stride(self) -> int:
        return self.members[0].stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([m(x).float().softmax(1) for m in self.members]).mean(0)
        return mean.clamp_min(1e-7).log()  # the clamp keeps -inf out of the loss when fine-tuning


def build_network(config: dict) -> nn.Module:
    """The (untrained) network a model card's ``network`` entry describes: a :class:`UNet2D`, or a
    :class:`UNetEnsemble` when it has ``members``."""
    options = dict(config)
    members = int(options.pop("members", 1))
    if members == 1:
        return UNet2D(**options)
    return UNetEnsemble([UNet2D(**options) for _ in range(members)])


def inference_network(network: nn.Module) -> nn.Module:
    """A copy of ``network`` for inference: eval mode, each BatchNorm folded into the convolution
    before it (the same function up to float rounding, one pass over the activations fewer per
    convolution; about 20 % faster on a CPU). The trained ``network`` is left as it is."""
    folded = copy.deepcopy(network).eval()
    for block in folded.modules():
        if isinstance(block, ConvBlock):
            layers, kept = list(block.body), []
            for layer in layers:
                if isinstance(layer, nn.BatchNorm2d) and kept and isinstance(kept[-1], nn.Conv2d):
                    kept[-1] = fuse_conv_bn_eval(kept[-1], layer)
                else:
                    kept.append(layer)
            block.body = nn.Sequential(*kept)
    return folded


def count_flops_per_slice(model: nn.Module, height: int, width: int) -> float:
    """Multiply-adds x 2 of one forward pass on a (1, C, height, width) input (conv layers only)."""
    flops = 0.0

    def hook(module, inputs, output):
        nonlocal flops
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            flops += 2.0 * k * output.numel()
        elif isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            flops += 2.0 * k * inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(torch.zeros(1, model.config["in_channels"], height, width))
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return flops
