"""FLUX.2 [klein]'s shared conventions: token positions, the sampling schedule, the keep-count rule.

The sampler, training, the latent cache and the benchmarks all build their inputs from these, so they
live in one small place that imports nothing of this project.

    image (3, H, W) --VAE /8--> latent (32, H/8, W/8) --2x2 patch--> tokens (H/16 * W/16, 128)

Positions are 4-axis ids (t, h, w, l): text token i is (0, 0, 0, i), target token (0, row, col, 0),
token (row, col) of reference k is (10 (k + 1), row, col, 0). A kept reference token keeps its id, so
dropping tokens never moves the others. A compact reference (downscaled, `Compact`) has fewer tokens
at fractional ids that span the positions of the full-size grid it stands for.
"""

import math
import numbers
from dataclasses import dataclass

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


def reference_ids(k, h, w, span=None):
    """(h * w, 4) ids of reference k's token grid. span (H, W): the grid is a compact reference of an
    H x W grid, so its float ids span the same positions: token i sits at the centre of the full-size
    tokens it covers, (i + 0.5) H / h - 0.5 (2i + 0.5 at factor 2). OminiControl2's position_scale
    multiplies ids by the factor alone (2i), a half-token shift off centre."""
    ids = grid_ids(h, w, t=REF_T * (k + 1))
    if span is None or tuple(span) == (h, w):
        return ids
    ids = ids.float()
    ids[:, 1] = (ids[:, 1] + 0.5) * span[0] / h - 0.5
    ids[:, 2] = (ids[:, 2] + 0.5) * span[1] / w - 0.5
    return ids


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


@dataclass
class Compact:
    """A reference given downscaled by an integer `factor` per side, for `pipeline.load_references`:
    every position at lower resolution instead of a subset of tokens at full resolution (OminiControl2's
    compact tokens, RefRoute's downsampled references). image: a path or a PIL image."""

    image: object
    factor: int


def compact_grid(h, w, factor):
    """The token grid of an h x w token grid downscaled by factor per side (rounded half up, at least 1 x 1)."""
    return max(1, math.floor(h / factor + 0.5)), max(1, math.floor(w / factor + 0.5))


def compact_reference(image, factor):
    """A prepared reference (PIL, sides multiples of 16) downscaled by factor per side to whole tokens,
    each pixel the mean of the area it covers (area_weights; exact, where PIL's BOX filter rounds its
    fixed-point weights). The image remembers the token grid it stands for in info["span"] (PIL copies
    info through convert and crop): `span` reads it."""
    h, w = image.height // PATCH, image.width // PATCH
    hc, wc = compact_grid(h, w, factor)
    x = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    x = np.einsum("yh,hwc,xw->yxc", area_weights(image.height, hc * PATCH), x, area_weights(image.width, wc * PATCH), optimize=True)
    small = Image.fromarray(np.floor(x + 0.5).clip(0, 255).astype(np.uint8))
    small.info["span"] = (h, w)
    return small


def area_weights(n_in, n_out):
    """(n_out, n_in) weights of an area downscale: output pixel j is the mean of the input interval
    [j r, (j + 1) r), r = n_in / n_out, a pixel cut by an edge counted by its overlap."""
    edges = np.arange(n_out + 1) * n_in / n_out
    x = np.arange(n_in)[None]
    overlap = np.minimum(edges[1:, None], x + 1) - np.maximum(edges[:-1, None], x)
    return overlap.clip(0, None) / (n_in / n_out)


def span(image):
    """(h, w): the token grid a prepared reference stands for (a compact one's full-size grid)."""
    return tuple(image.info.get("span") or (image.height // PATCH, image.width // PATCH))


def to_tensor(image):
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)
    return (2 * x - 1).permute(2, 0, 1)[None]


def to_image(x):
    """(3, H, W) in [-1, 1] -> PIL image, rounded as diffusers' postprocess does."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((x * 255).round().astype(np.uint8))
