"""Building blocks of the VRN hourglass: batch norm with a selectable mode, the
pre-activation bottleneck residual, and the recursive hourglass level.

The order in which each block registers its sub-modules is the depth-first order of
the Torch7 ``.t7`` file (``docs/reference.md``, "Module order"): :mod:`vrn.model.torch7`
relies on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MODES = ("running", "instance")


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with a normalisation mode.

    ``mode="running"``: standard batch norm (batch statistics in training, running
    statistics in evaluation). ``mode="instance"``: per-image statistics at all times,
    with the batch norm's affine parameters, which is how the released Torch7 model was
    run (every module was saved with ``train=True``; for one image, batch norm in
    training mode is instance norm). Exports to ONNX ``InstanceNormalization``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.mode = "running"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "instance":
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}"


class Residual(nn.Module):
    """Pre-activation bottleneck ``R(cin -> cout, mid)`` with ``mid = cout // 2``.

    ``BN ReLU conv1x1 BN ReLU conv3x3 BN ReLU conv1x1`` plus an identity skip, or a
    1x1 convolution skip when ``cin != cout``. Shape ``(N, cin, H, W) -> (N, cout, H, W)``.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.bn1 = BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.bn2 = BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1)
        self.bn3 = BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        return y + (x if self.skip is None else self.skip(x))


class ConvBNReLU(nn.Sequential):
    """``conv1x1 BN ReLU``, the linear layers between stacks and in the head."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 1), BatchNorm2d(cout), nn.ReLU(inplace=True))


class Level(nn.Module):
    """Hourglass level ``n``: ``R(A + B)`` where

    - branch A stays at the input resolution: ``residuals_a`` residuals, then
      ``Level(n - 1)`` when ``n > 1`` (VRN recurses in the *un-pooled* branch, so the
      network never pools more than once per level chain);
    - branch B: ``maxpool 2x2``, ``residuals_b`` residuals (``residuals_b_innermost``
      when ``n == 1``), nearest upsampling x2.

    Shape ``(N, C, H, W) -> (N, C, H, W)``; ``H`` and ``W`` must be even.
    """

    def __init__(self, n: int, features: int, residuals_a: int, residuals_b: int,
                 residuals_b_innermost: int):
        super().__init__()
        self.branch_a = nn.Sequential(*(Residual(features, features) for _ in range(residuals_a)))
        self.inner = (Level(n - 1, features, residuals_a, residuals_b, residuals_b_innermost)
                      if n > 1 else None)
        count_b = residuals_b_innermost if n == 1 else residuals_b
        self.branch_b = nn.Sequential(*(Residual(features, features) for _ in range(count_b)))
        self.out = Residual(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch_a(x)
        if self.inner is not None:
            a = self.inner(a)
        b = self.branch_b(F.max_pool2d(x, 2))
        b = F.interpolate(b, scale_factor=2.0, mode="nearest")
        return self.out(a + b)
