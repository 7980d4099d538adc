"""Image corruptions for robustness under distribution shift, in the spirit of CIFAR-10-C.

Hendrycks & Dietterich (2019) corrupt each test image at five severities.  This module
rebuilds a subset of their corruptions in plain torch so a shifted test set can be made for
any image size (the 8x8 digits as well as 32x32 CIFAR), plus two geometric shifts (rotation,
translation).  Noise amounts are CIFAR-10-C's values for images in [0, 1]; geometric amounts
are size-free (degrees, fractions of the width), so the same severity means the same shift on
every data set.

The random draws of one call depend on ``(seed, name)`` only, not on the severity: the five
severities of a corruption share one draw (the same noise pattern, pixel hits, directions) and
differ only in its amount, so a severity curve measures the amount, not a fresh draw.
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

SEVERITIES = (1, 2, 3, 4, 5)

# Amount per severity 1..5.  Noise: CIFAR-10-C's parameters.  Blur: CIFAR-10-C's sigma in
# pixels at 32x32, scaled with the size above 32 (see _gaussian_blur for below).  Rotation:
# degrees.  Translation: fraction of the width / height.
SEVERITY_TABLE: Dict[str, Tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),   # noise std
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),     # photons at full intensity (fewer = noisier)
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),    # fraction of values set to 0 or 1
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),         # sigma in pixels at 32x32
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),            # factor towards the image's mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),          # added to the HSV value
    "rotation": (6.0, 12.0, 18.0, 24.0, 30.0),          # degrees, random sign per image
    "translation": (0.05, 0.10, 0.15, 0.20, 0.25),      # shift / size, random direction, zero fill
}
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "gaussian_blur", "contrast", "brightness",
               "rotation", "translation")


def _gaussian_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _shot_noise(x: torch.Tensor, photons: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * photons, generator=g) / photons


def _impulse_noise(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    # one uniform per value decides whether it is hit, so a higher amount hits a superset
    hit = torch.rand(x.shape, generator=g, dtype=x.dtype) < amount
    salt = (torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def _gaussian_blur(x: torch.Tensor, sigma32: float, g: torch.Generator) -> torch.Tensor:
    # Scaled with the size for images larger than CIFAR's; below 32 px CIFAR's pixel sigmas are
    # kept, since a Gaussian of sigma < 0.4 px is a no-op on the pixel grid (8x8 digits would
    # see no blur at all).
    n, c, h, w = x.shape
    flat = x.reshape(n * c, 1, h, w)
    for axis, size in ((3, w), (2, h)):
        sigma = sigma32 * max(size, 32) / 32
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        if axis == 3:
            flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        else:
            flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def _contrast(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x: torch.Tensor, delta: float, g: torch.Generator) -> torch.Tensor:
    # CIFAR-10-C adds to V in HSV with hue and saturation kept: that scales the pixel's
    # channels by new V / V (V = max over channels); a black pixel (V = 0) turns grey.
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + delta).clamp(max=1.0)
    scale = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotation(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(x.dtype)
    angle = sign * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    # a rotation in pixels, written in affine_grid's [-1, 1] coordinates (aspect-corrected)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    return _warp(x, theta)


def _translation(x: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    direction = torch.rand(n, generator=g, dtype=x.dtype) * (2 * math.pi)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # [-1, 1] spans the image, so a shift of `fraction` of the size is 2 * fraction there
    theta[:, 0, 2] = 2 * fraction * direction.cos()
    theta[:, 1, 2] = 2 * fraction * direction.sin()
    return _warp(x, theta)


_BUILDERS: Dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur, "contrast": _contrast, "brightness": _brightness,
    "rotation": _rotation, "translation": _translation,
}


def _stream_seed(seed: int, name: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, which would break determinism
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``images`` (float ``[N, C, H, W]`` in [0, 1]) with corruption ``name`` at ``severity`` 1..5.

    Returns a new tensor of the same shape, dtype and device, clamped to [0, 1]; the same
    ``(seed, name, severity)`` always gives the same result (a private ``torch.Generator``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [N, C, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if images.numel() == 0:
        return images.clone()
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; corrupt the images "
                         "before normalization (Splits.test_images01), then normalize")
    # the work runs on the CPU in float32 (float64 stays float64) so draws match on every device
    work = images.detach().to("cpu", torch.float64 if images.dtype == torch.float64 else torch.float32)
    g = torch.Generator().manual_seed(_stream_seed(seed, name))
    out = _BUILDERS[name](work, SEVERITY_TABLE[name][severity - 1], g)
    return out.clamp_(0.0, 1.0).to(images.device, images.dtype)
