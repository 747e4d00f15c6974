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

from model import Flux2, KVCache, resolve_component
from text_encoder import TextEncoder
from token_selectors import draw_selection, select_reference_tokens
from vae import AutoEncoder, pack, unpack

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


# ----------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass
class SampleStats:
    seconds: dict = field(default_factory=dict)  # stage -> wall-clock seconds
    ref_tokens: list = field(default_factory=list)  # (before, after) selection, per reference
    kept: list = field(default_factory=list)  # kept token indices per reference (None: all)


def resolve_source(source):
    """A local klein repository folder for a folder path or a hub id (downloads only what sampling needs)."""
    patterns = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]
    folder = resolve_component(source, None, patterns)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model source {source} is not a klein repository folder")
    return folder


def is_distilled(folder):
    """klein's model_index.json says whether a checkpoint is step-distilled (4 steps, no CFG)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return True
    with open(path) as f:
        return bool(json.load(f).get("is_distilled", False))


def free(*modules):
    for m in modules:
        m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def select_references(images, keep, selector, task, seed, uniform_mix, budget):
    """Kept token indices (row-major on each reference's 16-px grid) per reference; None keeps all."""
    keeps = keep if isinstance(keep, (list, tuple)) else [keep] * len(images)
    if len(keeps) != len(images):
        raise ValueError(f"--keep has {len(keeps)} values for {len(images)} reference images")
    if all(k == 1 for k in keeps) and budget == "uniform":
        return [None] * len(images)  # dense: bit-identical to klein
    if task not in ("edit", "subject"):
        raise ValueError(f"unknown task {task!r}; choose edit or subject")
    if selector == "auto":  # structure for editing, the salient subject for personalization
        selector = "canny" if task == "edit" else "saliency"
    return select_reference_tokens(images, keeps, selector=selector, seed=seed, uniform_mix=uniform_mix, budget=budget)


def encode_references(vae, images, kept, device, dtype):
    """VAE-encode references and drop tokens: the one place tokens are dropped.

    Returns ref (1, M, 128) and ref_ids (M, 4); a kept token keeps its original (t, h, w, l) id.
    """
    refs, ids = [], []
    for k, (image, idx) in enumerate(zip(images, kept)):
        z = vae.encode(to_tensor(image).to(device, vae_dtype(vae)))  # (1, 128, h, w)
        tokens, tids = pack(z), grid_ids(z.shape[2], z.shape[3], t=10 * (k + 1)).to(device)
        if idx is not None:
            idx = idx.to(device)
            tokens, tids = tokens[:, idx], tids[idx]
        refs.append(tokens.to(dtype))
        ids.append(tids)
    return torch.cat(refs, dim=1), torch.cat(ids)


def vae_dtype(module):
    return next(module.parameters()).dtype


def generate(model, prompt, refs=(), steps=None, guidance=None, seed=0, height=None, width=None, kv_cache=False,
             keep=1.0, selector="auto", task="edit", uniform_mix=0.25, budget="uniform", lora=None, lora_scale=1.0,
             device=None, dtype=None, save_selection=None, progress=True):  # fmt: skip
    """Sample one image; returns (PIL image, SampleStats). `model` is a klein repository folder or hub id."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    folder = resolve_source(model)
    distilled = is_distilled(folder)
    steps = steps or (4 if distilled else 50)
    guidance = (1.0 if distilled else 4.0) if guidance is None else guidance
    stats = SampleStats()
    clock = time.perf_counter()

    def lap(stage):
        nonlocal clock
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        stats.seconds[stage] = stats.seconds.get(stage, 0.0) + now - clock
        clock = now

    images = [prepare_reference(load_image(r) if isinstance(r, (str, os.PathLike)) else r) for r in refs]
    kept = stats.kept = select_references(images, keep, selector, task, seed, uniform_mix, budget) if images else []
    if height is None or width is None:
        w0, h0 = images[0].size if images else (1024, 1024)  # klein's default output size
        height, width = height or h0, width or w0
    if height < 16 or width < 16:
        raise ValueError(f"output size {width}x{height} is too small: at least 16x16")
    h, w = height // 16, width // 16  # output size floored to multiples of 16, as klein does

    with torch.no_grad():
        text = TextEncoder.from_pretrained(folder, dtype=dtype, device=device)
        txt = text.encode([prompt])
        neg = text.encode([""]) if guidance > 1 else None
        free(text)
        txt_ids = text_ids(txt.shape[1]).to(device)
        lap("text encoding")

        ref = ref_ids = None
        if images:
            vae = AutoEncoder.from_pretrained(folder, dtype=dtype, device=device)
            ref, ref_ids = encode_references(vae, images, kept, device, dtype)
            free(vae)
            for image, idx in zip(images, kept):
                n = (image.size[0] // 16) * (image.size[1] // 16)
                stats.ref_tokens.append((n, n if idx is None else len(idx)))
            if save_selection:
                save_selection_image(images, kept, save_selection)
        lap("reference encoding")

        transformer = Flux2.from_pretrained(folder, dtype=dtype, device=device)
        if lora:
            from lora import load_lora

            load_lora(transformer, lora, scale=lora_scale)
        noise = torch.randn(1, transformer.cfg.in_channels, h, w, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)
        x = pack(noise.to(device))
        x = denoise(transformer, x, grid_ids(h, w).to(device), txt, txt_ids, schedule(steps, h * w).to(device),
                    ref=ref, ref_ids=ref_ids, kv_cache=kv_cache, guidance=guidance, neg_txt=neg, neg_txt_ids=txt_ids,
                    progress=progress)  # fmt: skip
        free(transformer)
        lap("denoising")

        vae = AutoEncoder.from_pretrained(folder, dtype=dtype, device=device)
        image = to_image(vae.decode(unpack(x, h, w).to(vae_dtype(vae)))[0])
        free(vae)
        lap("decoding")
    return image, stats


def save_selection_image(images, kept, path):
    """Each reference with its kept tokens highlighted, side by side in one image."""
    tiles = [draw_selection(im, idx if idx is not None else torch.arange((im.size[0] // 16) * (im.size[1] // 16)))
             for im, idx in zip(images, kept)]  # fmt: skip
    canvas = Image.new("RGB", (sum(t.size[0] for t in tiles), max(t.size[1] for t in tiles)), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.size[0]
    save_image_atomic(canvas, path)


def parse_dtype(name):
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {sorted(table)}")
    return table[name]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="klein repository folder or hub id, e.g. black-forest-labs/FLUX.2-klein-4B")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--ref", nargs="*", default=[], help="reference image(s); reference k gets position t = 10 (k + 1)")
    p.add_argument("--out", required=True, help="output image path (.png, .jpg, .webp); written atomically")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4 distilled, 50 base)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 1 distilled, 4 base)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (CPU generator, as diffusers)")
    p.add_argument("--height", type=int, default=None, help="output height (default: first reference's, else 1024)")
    p.add_argument("--width", type=int, default=None, help="output width (default: first reference's, else 1024)")
    p.add_argument("--kv-cache", action="store_true", help="cache reference K/V at step 0 and reuse them (klein-9b-kv)")
    p.add_argument("--keep", type=float, nargs="+", default=[1.0], help="fraction of reference tokens kept, one value or one per reference")
    p.add_argument("--selector", default="auto", choices=["auto", "random", "canny", "saliency"], help="token selector; auto: canny for edit, saliency for subject")
    p.add_argument("--task", default="edit", choices=["edit", "subject"], help="task that picks the auto selector (default: edit)")
    p.add_argument("--budget", default="uniform", choices=["uniform", "adaptive"], help="how the token budget is split across references")
    p.add_argument("--uniform-mix", type=float, default=0.25, help="share of uniform probability mixed into the selector's")
    p.add_argument("--save-selection", default=None, help="save the references with their kept tokens highlighted")
    p.add_argument("--lora", default=None, help="LoRA file (diffusers, BFL/ai-toolkit or kohya format)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    args = p.parse_args(argv)
    try:
        if Image.registered_extensions().get(os.path.splitext(args.out)[1].lower()) is None:
            raise ValueError(f"unknown image format for {args.out}; use .png, .jpg or .webp")
        keep = args.keep[0] if len(args.keep) == 1 else args.keep
        image, stats = generate(args.model, args.prompt, args.ref, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                height=args.height, width=args.width, kv_cache=args.kv_cache, keep=keep,
                                selector=args.selector, task=args.task, uniform_mix=args.uniform_mix, budget=args.budget,
                                lora=args.lora, lora_scale=args.lora_scale, device=args.device, dtype=args.dtype,
                                save_selection=args.save_selection)  # fmt: skip
        save_image_atomic(image, args.out)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for k, (before, after) in enumerate(stats.ref_tokens):
        print(f"reference {k}: {after} of {before} tokens kept ({after / before:.1%})")
    print("  ".join(f"{stage}: {sec:.2f}s" for stage, sec in stats.seconds.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
