"""FLUX.2 [klein]'s shared conventions: token positions, the sampling schedule, the keep-count rule.

The sampler, training, the latent cache and the benchmarks all build their inputs from these, so they
live in one small place that imports nothing of this project.

    image (3, H, W) --VAE /8--> latent (32, H/8, W/8) --2x2 patch--> tokens (H/16 * W/16, 128)

Positions are 4-axis integer ids (t, h, w, l): text token i is (0, 0, 0, i), target token (0, row,
col, 0), token (row, col) of reference k is (10 (k + 1), row, col, 0). A kept reference token keeps
its id, so dropping tokens never moves the others.
"""

import math
import numbers

import numpy as np
import torch
from PIL import Image

PATCH = 16  # pixels per token side: the VAE downsamples 8x, then 2x2 latent patches become one token
REF_T = 10  # reference k sits at time position REF_T * (k + 1)
MAX_STEPS = 1000  # far beyond this the fitted shift underflows exp() and sigmas turn NaN


def text_ids(length):
    """(L, 4) ids (0, 0, 0, i) for every text token, padding included."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def grid_ids(h, w, t=0):
    """(h * w, 4) ids (t, row, col, 0) of a token grid, row-major."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(r, t), r, c, torch.zeros_like(r)], dim=-1).flatten(0, 1)


def reference_ids(k, h, w):
    """(h * w, 4) ids of reference k's token grid."""
    return grid_ids(h, w, t=REF_T * (k + 1))


def pack(z):
    """(B, C, h, w) latent grid -> (B, h * w, C) tokens, row-major (token index = row * w + col)."""
    return z.flatten(2).transpose(1, 2)


def unpack(tokens, h, w):
    """(B, h * w, C) -> (B, C, h, w); inverse of `pack`."""
    B, N, C = tokens.shape
    if N != h * w:
        raise ValueError(f"unpack: {N} tokens cannot fill a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(B, C, h, w)


def empirical_mu(seq_len, num_steps):
    """klein's schedule shift, fitted on the number of target tokens (references excluded)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if seq_len > 4300:
        return a2 * seq_len + b2
    m200, m10 = a2 * seq_len + b2, a1 * seq_len + b1
    a = (m200 - m10) / 190.0
    return a * num_steps + (m200 - 200.0 * a)


def schedule(num_steps, seq_len):
    """(num_steps + 1,) float32 sigmas from 1 to 0: linspace(1, 1/N, N), exponentially shifted."""
    if not (isinstance(num_steps, numbers.Integral) and 1 <= num_steps <= MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {num_steps!r}")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    e = math.exp(empirical_mu(seq_len, num_steps))
    s = e / (e + (1 / s - 1))  # float32, as diffusers' scheduler computes it
    return torch.cat([torch.from_numpy(s).float(), torch.zeros(1)])


def initial_noise(seed, channels, h, w, dtype):
    """(1, h * w, C) packed noise drawn as diffusers draws it: CPU generator, shape (1, C, h, w)."""
    g = torch.Generator("cpu").manual_seed(seed)
    return pack(torch.randn(1, channels, h, w, generator=g, dtype=dtype))


def n_keep(keep, n, multiple=1):
    """How many of n tokens a keep fraction keeps: the rule of every selector, training and the benchmark.

    multiple > 1 rounds the count up to a multiple of it (or n): a compiled transformer then meets
    a bounded number of sequence lengths.
    """
    return round_up(max(1, round(keep * n)), multiple, n)


def round_up(count, multiple, n):
    """count rounded up to a multiple of `multiple`, at most n."""
    return min(n, -(-count // multiple) * multiple)


# ----------------------------------------------------------------------------------------------
# Reference images


def prepare_reference(image, max_area=1024 * 1024):
    """PIL image (any mode) -> RGB PIL image exactly as klein prepares a reference.

    At least 64 px a side and aspect ratio at most 8; larger than max_area: LANCZOS-resized to that
    area; then center-cropped to multiples of 16.
    """
    w, h = image.size
    if w < 64 or h < 64:
        raise ValueError(f"reference image too small: {w}x{h}; both sides must be at least 64 px")
    if max(w / h, h / w) > 8:
        raise ValueError(f"reference aspect ratio too extreme: {w}x{h}; at most 8:1")
    if w * h > max_area:
        scale = math.sqrt(max_area / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = w // 16 * 16, h // 16 * 16
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).convert("RGB")


def to_tensor(image):
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)
    return (2 * x - 1).permute(2, 0, 1)[None]


def to_image(x):
    """(3, H, W) in [-1, 1] -> PIL image, rounded as diffusers' postprocess does."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((x * 255).round().astype(np.uint8))
