"""DRN-D-22 for semantic segmentation (Yu, Koltun and Funkhouser, 2017, "Dilated Residual Networks").

A ResNet-18-like network that keeps an output stride of 8: the last two
residual stages dilate (2, then 4) instead of striding. The D variant
replaces the max-pooling stem with convolutions and ends with two plain
(non-residual) dilated convolutions, dilation 2 then 1, which remove the
gridding artefacts of dilation. Stages and channels of DRN-D-22:

    level  1   2   3      4      5           6           7     8
    kind   conv conv block  block  block,d=2   block,d=4   conv,d=2  conv,d=1
    layers 1   1   2      2      2           2           1     1
    chans  16  32  64     128    256         512         512   512
    stride 1   2   2      2      1           1           1     1

(level 1 follows a 7x7 stem convolution of 16 channels at stride 1).
The segmentation head is a 1x1 convolution to the classes and a bilinear
upsampling of the stride-8 logits back to the input size.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    pad = dilation * (kernel - 1) // 2
    return [nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class DilatedBasicBlock(nn.Module):
    """Two 3x3 convolutions with dilations (d1, d2) and a shortcut (1x1 projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: tuple[int, int] = (1, 1)):
        super().__init__()
        d1, d2 = dilation
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, d1, dilation=d1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, d2, dilation=d2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _blocks(cin: int, cout: int, count: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    layers = [DilatedBasicBlock(cin, cout, stride, (dilation, dilation))]
    layers += [DilatedBasicBlock(cout, cout, 1, (dilation, dilation)) for _ in range(count - 1)]
    return nn.Sequential(*layers)


class DRND22(nn.Module):
    """DRN-D-22 backbone (output stride 8) with a 1x1 classifier and bilinear upsampling to the input size."""

    channels = (16, 32, 64, 128, 256, 512, 512, 512)

    def __init__(self, num_classes: int = 19, in_channels: int = 3):
        super().__init__()
        c = self.channels
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, c[0], kernel=7))
        self.level1 = nn.Sequential(*_conv_bn_relu(c[0], c[0]))
        self.level2 = nn.Sequential(*_conv_bn_relu(c[0], c[1], stride=2))
        self.level3 = _blocks(c[1], c[2], 2, stride=2)
        self.level4 = _blocks(c[2], c[3], 2, stride=2)
        self.level5 = _blocks(c[3], c[4], 2, dilation=2)
        self.level6 = _blocks(c[4], c[5], 2, dilation=4)
        # Degridding: plain convolutions, no shortcut, dilation back down to 1.
        self.level7 = nn.Sequential(*_conv_bn_relu(c[5], c[6], dilation=2))
        self.level8 = nn.Sequential(*_conv_bn_relu(c[6], c[7], dilation=1))
        self.classifier = nn.Conv2d(c[7], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        for level in (self.stem, self.level1, self.level2, self.level3, self.level4, self.level5, self.level6,
                      self.level7, self.level8):
            x = level(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
