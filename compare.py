r"""Dense against sparse on your own references: a contact sheet and a table in one command.

    python compare.py --model black-forest-labs/FLUX.2-klein-4B --prompt "make the jacket red" \
        --ref photo.png --keeps 0.25 0.1 0.05 --selectors random canny saliency --out-dir cmp/

With the same prompt and seed it samples the dense image (keep 1) and one image per selector x keep,
loading each component once, and writes into --out-dir: sheet.png (one row per selector, one column
per keep, the dense image first; each tile shows the references with its kept tokens drawn and is
labelled with its keep, seconds per image and speedup), compare.md and compare.json (seconds per
image, speedup, PSNR and SSIM against the dense image) and every image. --kv-cache applies to all
points, dense included, so the comparison isolates token dropping.

psnr(a, b) and ssim(a, b) are plain torch: float images (3, H, W) or batches (B, 3, H, W) in [0, 1]
-> a 0-d or (B,) float64 tensor.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from attention_selector import AttentionSelector
from cli import add_common_args, build_klein, build_selector, check_common, flagged, warn_slow_dtype
from files import ArgumentParser, check_number, check_writable_folder, fail, write_atomic
from klein import schedule
from pipeline import (Klein, Scene, decode_latents, encode_inputs, gather_references, load_references, loaded, output_size,
                      resolve_source, sample_latents, sampling_defaults, sampling_device, synchronize)  # fmt: skip
from token_selectors import Selector, draw_selection
from vae import AutoEncoder


def _batched(a, b):
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got {tuple(a.shape)}")
    single = a.ndim == 3
    a, b = (x.double()[None] if single else x.double() for x in (a, b))
    return a, b, single


def psnr(a, b):
    """Peak signal-to-noise ratio in dB for data range 1 (inf for equal images)."""
    a, b, single = _batched(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    out = 10 * torch.log10(1 / mse)
    return out[0] if single else out


def gaussian_window(sigma=1.5, radius=5):
    """(2 r + 1,) normalized gaussian taps; sigma 1.5, radius 5: the standard 11-tap SSIM window."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a, b, k1=0.01, k2=0.03):
    """Structural similarity (Wang et al. 2004), averaged over channels and valid pixels.

    An 11x11 gaussian window (sigma 1.5), population statistics, data range 1; only windows that lie
    inside the image are used, as skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0) crops them.
    """
    a, b, single = _batched(a, b)
    B, C, H, W = a.shape
    w = gaussian_window()
    if H < len(w) or W < len(w):
        raise ValueError(f"SSIM needs images of at least {len(w)}x{len(w)} px, got {W}x{H}")
    kernel = (w[:, None] * w[None, :]).expand(C, 1, -1, -1)  # separable 2-D gaussian, one per channel

    def blur(x):  # (B, C, H, W) -> local means (B, C, H - 10, W - 10)
        return F.conv2d(x, kernel, groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    out = s.flatten(1).mean(1)
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# The sweep: dense and sparse images with the same seed, each component loaded once


@dataclass
class Point:
    selector: str  # "dense" for the baseline
    keep: float
    ref_tokens: int = 0
    seconds: float = 0.0  # per image: token selection + denoising (text and VAE work are shared)
    kept: list = field(default_factory=list)
    image: Image.Image = None
    psnr: float = math.inf
    ssim: float = 1.0


def pixels(image):
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def sweep(model, prompt, refs, keeps, selectors, seed=0, size=None, steps=None, guidance=None, kv_cache=False, device=None,
          dtype=None, progress=False):  # fmt: skip
    """Dense (keep 1) and every selector x keep with the same prompt, seed and cache setting.

    model: a folder, hub id or pipeline.Klein; selectors: names or selector callables (one row each;
    an AttentionSelector scores once for all its keeps). Returns the references (prepared) and the
    points, dense first, each with its image, time per image (selection + denoising) and fidelity
    to the dense image. The transformer runs an untimed one-step warm-up first.
    """
    klein = model if isinstance(model, Klein) else Klein(model)
    images = load_references(refs)
    if not images:
        raise ValueError("compare needs at least one reference image")
    for k in keeps:
        if not 0 < k <= 1:
            raise ValueError(f"keeps must be in (0, 1], got {k!r}")
    rules = [Selector(s) if isinstance(s, str) else s for s in selectors]
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(klein.folder)
    steps, guidance = sampling_defaults(folder, steps, guidance)
    h, w = output_size(images, *(size or (None, None)))
    points = [Point("dense", 1.0, kept=[None] * len(images))]
    with torch.no_grad():
        txts, neg, encoded = encode_inputs(folder, [prompt], images, guidance > 1, dtype, device)  # once: every point drops from the same tokens
        with loaded(klein.load_transformer, folder, dtype, device) as transformer:
            job = [(prompt, seed)]
            ref, ref_ids = gather_references(encoded, points[0].kept)
            sample_latents(transformer, job, txts, h, w, 1, ref, ref_ids, kv_cache, guidance, neg)  # warm-up
            scene = Scene(transformer, encoded, txts[prompt], seed, (h, w), schedule(steps, h * w), kv_cache)
            for rule in rules:
                scores, scoring = None, 0.0
                if isinstance(rule, AttentionSelector):  # one scoring pass, counted in each of its points
                    synchronize(device)
                    start = time.perf_counter()
                    scores = rule.scores(scene)
                    synchronize(device)
                    scoring = time.perf_counter() - start
                for keep in keeps:
                    start = time.perf_counter()
                    n = [keep] * len(images)
                    kept = rule(images, n, scene) if scores is None else rule.rule(images, n, scores=scores)
                    points.append(Point(rule.name if isinstance(rule, Selector) else "attention", keep, kept=kept,
                                        seconds=scoring + time.perf_counter() - start))  # fmt: skip
            latents = []
            for pt in points:
                ref, ref_ids = gather_references(encoded, pt.kept)
                pt.ref_tokens = ref.shape[1]
                synchronize(device)
                start = time.perf_counter()
                latents += sample_latents(transformer, job, txts, h, w, steps, ref, ref_ids, kv_cache, guidance, neg,
                                          progress=progress and f"{pt.selector} keep {pt.keep:g}")  # fmt: skip
                synchronize(device)
                pt.seconds += time.perf_counter() - start
        with loaded(AutoEncoder.from_pretrained, folder, dtype=dtype, device=device) as vae:
            for pt, image in zip(points, decode_latents(vae, latents, h, w)):
                pt.image = image
    dense = pixels(points[0].image)
    for pt in points[1:]:
        pt.psnr, pt.ssim = psnr(pixels(pt.image), dense).item(), ssim(pixels(pt.image), dense).item()
    return images, points


# ----------------------------------------------------------------------------------------------
# The contact sheet and the tables


def label(pt, dense_seconds):
    name = "dense (keep 1)" if pt.selector == "dense" else f"{pt.selector}, keep {pt.keep:g}"
    lines = [name, f"{pt.seconds:.2f} s/image, {dense_seconds / pt.seconds:.2f}x"]
    if pt.selector != "dense":
        lines.append(f"PSNR {pt.psnr:.1f} dB, SSIM {pt.ssim:.3f}")
    return lines


def tile(pt, refs, dense_seconds, width):
    """The image, under it the references with this point's kept tokens drawn, under that the label."""
    image = pt.image.resize((width, round(pt.image.height * width / pt.image.width)), Image.Resampling.LANCZOS)
    drawn = [draw_selection(im, idx if idx is not None else torch.arange((im.size[0] // 16) * (im.size[1] // 16)))
             for im, idx in zip(refs, pt.kept)]  # fmt: skip
    side = width // len(drawn)
    strip = [d.resize((side, max(1, round(d.height * side / d.width))), Image.Resampling.BILINEAR) for d in drawn]
    lines = label(pt, dense_seconds)
    strip_h, text_h = max(s.height for s in strip), 14 * len(lines) + 6
    out = Image.new("RGB", (width, image.height + strip_h + text_h), "white")
    out.paste(image, (0, 0))
    for k, s in enumerate(strip):
        out.paste(s, (k * side, image.height))
    ImageDraw.Draw(out).multiline_text((4, image.height + strip_h + 3), "\n".join(lines), fill="black", spacing=3)
    return out


def contact_sheet(refs, points, keeps, selectors, width=256):
    """One row per selector, one column per keep, the dense image first in every row."""
    dense_seconds = points[0].seconds
    grid = {(p.selector, p.keep): tile(p, refs, dense_seconds, width) for p in points}
    rows = [[grid["dense", 1.0]] + [grid[s, k] for k in keeps] for s in selectors]
    tile_h = max(t.height for t in grid.values())
    gap = 8
    sheet = Image.new("RGB", ((width + gap) * (len(keeps) + 1) + gap, (tile_h + gap) * len(rows) + gap), "white")
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            sheet.paste(t, (gap + c * (width + gap), gap + r * (tile_h + gap)))
    return sheet


def table_rows(points):
    dense_seconds = points[0].seconds
    return [dict(selector=p.selector, keep=p.keep, ref_tokens=p.ref_tokens, seconds_per_image=p.seconds,
                 speedup=dense_seconds / p.seconds, psnr_db=None if math.isinf(p.psnr) else p.psnr, ssim=p.ssim)
            for p in points]  # fmt: skip


NOISE_SECONDS = 0.5  # a dense image faster than this: the speedups are overheads' noise, said so in the table


def markdown(rows, settings):
    out = ["# Sparse Context comparison", "", *(f"- {k}: {v}" for k, v in settings.items()), "",
           "Seconds per image: token selection plus the transformer's denoising (text encoding and VAE work are the "
           "same for every point); speedup over dense; PSNR and SSIM against the dense image (same seed).", "",
           "| selector | keep | ref tokens | s / image | speedup | PSNR dB | SSIM |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        db = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        out.append(f"| {r['selector']} | {r['keep']:g} | {r['ref_tokens']} | {r['seconds_per_image']:.3f} "
                   f"| {r['speedup']:.2f}x | {db} | {r['ssim']:.4f} |")  # fmt: skip
    dense = rows[0]["seconds_per_image"]
    if dense < NOISE_SECONDS:
        out += ["", f"The dense image took {dense * 1000:.0f} ms: below {NOISE_SECONDS:g} s per image the speedups are timing "
                    "noise (overheads, not attention, dominate a model this small); `python bench.py` measures speed."]  # fmt: skip
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------


def parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # defaults in each help
    add_common_args(p)
    p.add_argument("--prompt", required=True, help="text prompt (required)")
    p.add_argument("--out-dir", required=True, help="folder for sheet.png, compare.md, compare.json and every image (required)")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.1, 0.05], help="keep fractions, one column each (default: 0.25 0.1 0.05)")
    p.add_argument("--selectors", nargs="+", default=["random", "canny", "saliency"], choices=["random", "canny", "saliency", "attention"],
                   help="token selectors, one row each (default: random canny saliency)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed of every image (default: 0)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:  # every option before any model loads
        if not args.ref:
            raise ValueError("give at least one reference image (--ref)")
        if args.task is not None:
            raise ValueError("--task cannot apply: compare.py takes its selectors from --selectors")
        for k in args.keeps:
            check_number("--keeps", k, 0, 1, low_open=True)
        if len(set(args.keeps)) < len(args.keeps) or len(set(args.selectors)) < len(args.selectors):
            raise ValueError("--keeps and --selectors must not repeat a value")
        check_number("--seed", args.seed, 0, 2**63 - 1, integer=True)
        check_writable_folder(args.out_dir)
        check_number("--uniform-mix", 0.25 if args.uniform_mix is None else args.uniform_mix, 0, 1)
        device, dtype = check_common(args, sparse=True, attention="attention" in args.selectors)
    except (OSError, ValueError) as e:
        fail(e)
    warn_slow_dtype(device, dtype)
    start = time.perf_counter()
    sampling = dict(seed=args.seed, size=(args.height, args.width), steps=args.steps, guidance=args.guidance,
                    kv_cache=args.kv_cache)  # fmt: skip
    try:
        refs, points = sweep(build_klein(args), args.prompt, args.ref, args.keeps, [build_selector(args, s) for s in args.selectors],
                             device=device, dtype=dtype, progress=True, **sampling)  # fmt: skip
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(flagged(e))
    rows = table_rows(points)
    steps, guidance = sampling_defaults(resolve_source(args.model), args.steps, args.guidance)  # what ran, not what was given
    height, width = (16 * n for n in output_size(refs, args.height, args.width))
    settings = dict(model=args.model, prompt=args.prompt, references=", ".join(map(str, args.ref)),
                    device=f"{device.type}, {str(dtype).removeprefix('torch.')}", seed=args.seed, steps=steps, guidance=guidance,
                    height=height, width=width, kv_cache=args.kv_cache,
                    uniform_mix=0.25 if args.uniform_mix is None else args.uniform_mix, budget=args.budget or "uniform",
                    selection_seed=args.selection_seed or 0, lora=args.lora,
                    lora_scale=1.0 if args.lora_scale is None else args.lora_scale, lora_merge=bool(args.lora_merge),
                    attention_queries=args.attention_queries or "target", attention_block=args.attention_block or 0)  # fmt: skip
    files = {os.path.join(args.out_dir, f"{p.selector}_k{p.keep:g}.png"): p.image for p in points}
    files[os.path.join(args.out_dir, "sheet.png")] = contact_sheet(refs, points, args.keeps, args.selectors)
    try:
        for path, image in files.items():
            write_atomic(path, image)
        md, js = os.path.join(args.out_dir, "compare.md"), os.path.join(args.out_dir, "compare.json")
        write_atomic(md, markdown(rows, settings))
        write_atomic(js, json.dumps(dict(settings=settings, points=rows), indent=1) + "\n")
    except OSError as e:
        fail(e)
    print(markdown(rows, settings).split("\n\n", 2)[2].split("\n\n", 1)[1], end="")
    print(f"total {time.perf_counter() - start:.1f}s")
    for path in [*files, md, js]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
