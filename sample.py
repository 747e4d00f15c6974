"""Sample FLUX.2 [klein] with (sparse) reference images.

    python sample.py --model black-forest-labs/FLUX.2-klein-4B --prompt "a cat in a hat" \
        --ref cat.png --keep 0.1 --task subject --out out.png

The pipeline: text encoder -> references (preprocess, VAE-encode, select tokens) -> denoise with
the transformer -> VAE decode. Each component is loaded, used and freed in turn, so peak memory is
the largest component, not their sum.
"""

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model import Flux2, KVCache

# ----------------------------------------------------------------------------------------------
# Positions and schedule (pure functions)


def text_ids(length):
    """(L, 4) ids (0, 0, 0, i) for every text token, padding included."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def grid_ids(h, w, t=0):
    """(h * w, 4) ids (t, row, col, 0) of a token grid, row-major. Reference k has t = 10 (k + 1)."""
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(r, t), r, c, torch.zeros_like(r)], dim=-1).flatten(0, 1)


def pack(z):
    """(B, C, h, w) -> (B, h * w, C) tokens, row-major."""
    return z.flatten(2).transpose(1, 2)


def unpack(x, h, w):
    """(B, h * w, C) -> (B, C, h, w)."""
    return x.transpose(1, 2).unflatten(2, (h, w))


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
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    e = math.exp(empirical_mu(seq_len, num_steps))
    s = e / (e + (1 / s - 1))  # float32, as diffusers' scheduler computes it
    return torch.cat([torch.from_numpy(s).float(), torch.zeros(1)])


def denoise(model, x, img_ids, txt, txt_ids, sigmas, ref=None, ref_ids=None, kv_cache=False,
            guidance=1.0, neg_txt=None, neg_txt_ids=None, progress=False):  # fmt: skip
    """Flow-matching Euler from noise x (B, N, C) at sigmas[0] to sigmas[-1]; returns x.

    With guidance > 1 (base checkpoints) the velocity is v_u + g (v_c - v_u) from a second pass on
    neg_txt. kv_cache=True: step 0 computes the references in the KV pattern and caches their K/V;
    later steps reuse them. References never see text in that pattern, so both CFG passes share it.
    """
    cache = KVCache() if kv_cache and ref is not None else None
    B = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="denoising"):
        t = (sigmas[i] * 1000).expand(B).to(x.dtype) / 1000  # diffusers passes timesteps / 1000
        refs = dict(ref=ref, ref_ids=ref_ids) if cache is None or len(cache) == 0 else {}
        v = model(x, img_ids, txt, txt_ids, t, kv_cache=cache, **refs)
        if guidance > 1:
            v_u = model(x, img_ids, neg_txt, neg_txt_ids, t, kv_cache=cache, **refs if cache is None else {})
            v = v_u + guidance * (v - v_u)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
    return x


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


def load_image(path):
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def save_image_atomic(image, path):
    """Write to a temporary file next to path, then rename: never a half-written output."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"unknown image format for {path}; use .png, .jpg or .webp")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
