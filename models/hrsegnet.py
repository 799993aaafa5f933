"""HrSegNet (Li et al., Automation in Construction 2023) in PyTorch.

One class; the published variants B16/B32/B48 differ only in ``base``, the
channel width of the high-resolution path.

The network keeps a high-resolution path at 1/4 of the input size and, in each
of three SegBlocks, a semantic-guidance path at 1/8, 1/16 or 1/32 whose
features are fused back into the high-resolution path three times.  The fusion
is ``conv1x1(upsample(low)) + high``.  A 1x1 convolution commutes exactly with
bilinear upsampling (the interpolation weights sum to one, so the bias passes
through unchanged), so this implementation applies the 1x1 convolution at low
resolution first: the same function with about 18 % fewer multiply-adds.
``HrSegNet(conv_before_upsample=False)`` computes the literal published order;
a test checks that both agree.

Average pooling: the reference (PaddleSeg) ``AvgPool2D`` excludes the zero
padding from the average at the border (``exclusive=True``), PyTorch's default
includes it. ``exclusive_pool=True`` (the default) matches the reference;
``hrsegnet-b16`` 1.0.0 was trained with the padding included and is loaded with
``exclusive_pool=False``, so it computes exactly what it always did. Weight
files record the choice (``"avg_pool"``); see :func:`pool_kwargs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def upsample(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class SegBlock(nn.Module):
    """A high-resolution path (base channels, constant size) guided by a low-resolution one."""

    def __init__(
        self, base: int, stage: int, conv_before_upsample: bool = True, exclusive_pool: bool = True
    ) -> None:
        super().__init__()
        low = base * 2**stage
        self.conv_before_upsample = conv_before_upsample
        self.h_conv = nn.ModuleList(nn.Sequential(*conv_bn_relu(base, base)) for _ in range(3))
        pool = nn.AvgPool2d(3, 2, 1, count_include_pad=not exclusive_pool)
        if stage == 1:
            first = conv_bn_relu(base, low, stride=2)
        elif stage == 2:
            first = [pool, *conv_bn_relu(base, low, stride=2)]
        else:
            first = [pool, *conv_bn_relu(base, low, stride=2), *conv_bn_relu(low, low, stride=2)]
        self.l_conv = nn.ModuleList(
            [
                nn.Sequential(*first),
                nn.Sequential(*conv_bn_relu(low, low)),
                nn.Sequential(*conv_bn_relu(low, low)),
            ]
        )
        self.l2h_conv = nn.ModuleList(nn.Conv2d(low, base, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        high, low = x, x
        for h_conv, l_conv, l2h in zip(self.h_conv, self.l_conv, self.l2h_conv):
            high = h_conv(high)
            low = l_conv(low)
            if self.conv_before_upsample:
                high = high + upsample(l2h(low), size)
            else:
                high = high + l2h(upsample(low, size))
        return high


class SegHead(nn.Module):
    """BN-ReLU, then a 2x transposed conv (main head) or a 3x3 conv (auxiliary heads), then 1x1 to classes."""

    def __init__(self, base: int, num_classes: int, aux: bool = False) -> None:
        super().__init__()
        middle = (
            nn.Conv2d(base, base, 3, 1, 1)
            if aux
            else nn.ConvTranspose2d(base, base, 3, stride=2, padding=1, output_padding=1)
        )
        self.layers = nn.Sequential(
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            middle,
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.Conv2d(base, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class HrSegNet(nn.Module):
    """HrSegNet for RGB input in [0, 1]; returns class logits at input size.

    In training mode ``forward`` returns ``[main, aux1, aux2]`` logits, all at
    input size; in eval mode only the main logits.
    """

    mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    std: torch.Tensor

    def __init__(
        self,
        base: int = 16,
        num_classes: int = 2,
        in_channels: int = 3,
        conv_before_upsample: bool = True,
        exclusive_pool: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.exclusive_pool = exclusive_pool
        self.stem = nn.Sequential(
            *conv_bn_relu(in_channels, base // 2, stride=2), *conv_bn_relu(base // 2, base, stride=2)
        )
        self.blocks = nn.ModuleList(
            SegBlock(base, stage, conv_before_upsample, exclusive_pool) for stage in (1, 2, 3)
        )
        self.head = SegHead(base, num_classes)
        self.aux_heads = nn.ModuleList(SegHead(base, num_classes, aux=True) for _ in range(2))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The high-resolution features after each SegBlock, for normalized input."""
        x = self.stem(x)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        features = self.features((x - self.mean) / self.std)
        logits = upsample(self.head(features[-1]), size)
        if not self.training:
            return logits
        aux = [upsample(head(f), size) for head, f in zip(self.aux_heads, features)]
        return [logits, *aux]


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias (float64) of a convolution followed by eval-mode ``bn``, as one convolution.

    ``weight`` has the output channels first.
    """
    assert bn.running_mean is not None and bn.running_var is not None, "eval-mode statistics"
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded_bias = (bias.double() - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()
    return weight.double() * scale.view(shape), folded_bias


# A transposed 3x3 convolution of stride 2 (padding 1, output padding 1): output row 2i + a
# reads input rows i + d through kernel row TAP[a, d]; (a, d) pairs not listed read nothing.
TAP = {(0, 0): 1, (1, 0): 2, (1, 1): 0}


def subpixel_conv(up: nn.Module, bn: nn.Module) -> nn.Conv2d:
    """``bn(up(x))`` as a 2x2 convolution at the input's resolution, then ``pixel_shuffle(2)``.

    The convolution (input padded by one row and column at the bottom and right) returns the
    four output phases: channel ``o * 4 + a * 2 + b`` is output channel ``o`` at pixels
    ``(2i + a, 2j + b)``, the order ``pixel_shuffle`` expects.  Exact in real arithmetic: it
    is the same sum, regrouped.
    """
    if (
        not isinstance(up, nn.ConvTranspose2d)
        or not isinstance(bn, nn.BatchNorm2d)
        or up.kernel_size != (3, 3)
        or up.stride != (2, 2)
        or up.padding != (1, 1)
        or up.output_padding != (1, 1)
        or up.groups != 1
        or up.dilation != (1, 1)
        or up.bias is None
    ):
        raise TypeError(
            f"expected a 3x3 stride-2 transposed convolution with bias and a batch norm, not {up}, {bn}"
        )
    w = up.weight.detach().double()  # (in, out, 3, 3)
    cin, cout = w.shape[:2]
    phases = torch.zeros(cout, 2, 2, cin, 2, 2, dtype=torch.float64)  # (o, a, b, c, di, dj)
    for (a, di), u in TAP.items():
        for (b, dj), v in TAP.items():
            phases[:, a, b, :, di, dj] = w[:, :, u, v].T
    weight, bias = fold_batch_norm(
        phases.reshape(cout * 4, cin, 2, 2), up.bias.detach().repeat_interleave(4), bn_repeated(bn, 4)
    )
    conv = nn.Conv2d(cin, cout * 4, 2)
    with torch.no_grad():
        conv.weight.copy_(weight.to(up.weight.dtype))
        conv.bias.copy_(bias.to(up.weight.dtype))  # type: ignore[union-attr]
    return conv


def bn_repeated(bn: nn.BatchNorm2d, times: int) -> nn.BatchNorm2d:
    """``bn`` for ``times`` consecutive copies of each channel (channel ``o * times + k``)."""
    out = nn.BatchNorm2d(bn.num_features * times, eps=bn.eps).eval()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(out, name).copy_(getattr(bn, name).detach().repeat_interleave(times))
    return out


class CrackProbability(nn.Module):
    """Inference: uint8-range RGB chips (N, 3, H, W) float -> crack probability (N, H, W).

    Computes ``softmax(net(chips / 255))[:, 1]`` with fewer operations, each step exact in
    real arithmetic:

    - the scaling and mean/std normalization are folded into the first convolution, and the
      chips are padded with the mean grey (127.5), which normalizes to the zero padding the
      network was trained with; an INT8 graph then reads the uint8 chips as they are
      (``models.quantize``);
    - the head's transposed convolution (3x3, stride 2) and the batch norm after it are one
      2x2 convolution at 1/4 resolution giving the four output phases, which
      ``pixel_shuffle`` interleaves (``subpixel_conv``): ONNX Runtime has no INT8 kernel for
      a transposed convolution, and it was 17 % of the INT8 graph's time;
    - with two classes, softmax of class 1 is ``sigmoid(logit1 - logit0)``, and the
      difference of the final 1x1 convolution's two outputs is itself a 1x1 convolution
      (weights ``w1 - w0``, bias ``b1 - b0``), applied to each phase before the shuffle;
    - bilinear upsampling is linear, so that one-channel margin is upsampled instead of two
      logit channels.

    On ONNX Runtime the full-resolution softmax and the second channel's upsampling were
    ~30 % of B16's time.  ``literal=True`` computes the published order (softmax of the
    upsampled logits): the reference in tests.
    """

    def __init__(self, net: HrSegNet, literal: bool = False) -> None:
        super().__init__()
        self.net = net.eval()
        self.literal = literal
        std = net.std.detach().double().flatten()
        mean = net.mean.detach().double().flatten()
        if not (torch.all(mean == mean[0]) and torch.all(std == std[0])):
            raise ValueError("folding the normalization needs one mean and one std for all channels")
        self.pad_value = float(mean[0] * 255.0)  # normalizes to 0
        stem = net.stem[0]
        if (
            not isinstance(stem, nn.Conv2d)
            or stem.kernel_size != (3, 3)
            or stem.stride != (2, 2)
            or stem.padding != (1, 1)
            or stem.bias is None
        ):
            raise TypeError(
                f"the stem must begin with a 3x3 stride-2 convolution with bias and padding 1, not {stem}"
            )
        # conv(x / (255 std) - mean / std) = conv'(x): weights / (255 std), bias - sum(w) mean / std
        self.first = nn.Conv2d(stem.in_channels, stem.out_channels, 3, 2, 0)
        w = stem.weight.detach().double()
        with torch.no_grad():
            self.first.weight.copy_((w / (255.0 * std[0])).to(stem.weight.dtype))
            self.first.bias.copy_(  # type: ignore[union-attr]
                (stem.bias.detach().double() - w.sum(dim=(1, 2, 3)) * mean[0] / std[0]).to(stem.weight.dtype)
            )
        layers = net.head.layers
        final = layers[-1]
        if not isinstance(final, nn.Conv2d) or final.bias is None or final.out_channels != 2:
            raise TypeError(f"the head must end in a 1x1 convolution to two classes with bias, not {final}")
        self.phases = subpixel_conv(layers[2], layers[3])
        # the margin w1 - w0 of each of the four phases: block-diagonal, 4 * base -> 4 channels
        margin_w = (final.weight[1] - final.weight[0]).detach().flatten()
        self.margin = nn.Conv2d(4 * final.in_channels, 4, 1)
        with torch.no_grad():
            self.margin.weight.zero_()
            weight = self.margin.weight.view(
                4, final.in_channels, 4
            )  # (phase, o, phase') over o * 4 + phase'
            for phase in range(4):
                weight[phase, :, phase] = margin_w
            self.margin.bias.fill_(float(final.bias[1] - final.bias[0]))  # type: ignore[union-attr]

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if self.literal:
            return torch.softmax(self.net(chips * (1.0 / 255.0)), dim=1)[:, 1]
        net = self.net
        x = self.first(F.pad(chips, (1, 1, 1, 1), value=self.pad_value))
        x = net.stem[1:](x)
        for block in net.blocks:
            x = block(x)
        head = net.head.layers
        x = F.relu(self.phases(F.pad(head[1](head[0](x)), (0, 1, 0, 1))))
        margin = F.pixel_shuffle(self.margin(x), 2)
        return torch.sigmoid(upsample(margin, chips.shape[-2:]))[:, 0]


VARIANTS = {"b16": 16, "b32": 32, "b48": 48}
AVG_POOL = ("exclusive", "inclusive")


def pool_kwargs(avg_pool: str | None) -> dict:
    """Constructor arguments for a recorded ``avg_pool`` setting.

    Weight files and checkpoints written before the setting existed (``None``)
    were trained with the padding included.

    >>> pool_kwargs(None), pool_kwargs("exclusive")
    ({'exclusive_pool': False}, {'exclusive_pool': True})
    """
    avg_pool = avg_pool or "inclusive"
    if avg_pool not in AVG_POOL:
        raise ValueError(f"avg_pool must be one of {AVG_POOL}, not {avg_pool!r}")
    return {"exclusive_pool": avg_pool == "exclusive"}


def avg_pool_name(net: HrSegNet) -> str:
    """The ``avg_pool`` setting to record for ``net``."""
    return "exclusive" if net.exclusive_pool else "inclusive"


def create(variant: str, **kwargs) -> HrSegNet:
    """Build an HrSegNet variant by name: ``b16``, ``b32`` or ``b48``."""
    if variant not in VARIANTS:
        raise KeyError(f"Unknown HrSegNet variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return HrSegNet(base=VARIANTS[variant], **kwargs)
