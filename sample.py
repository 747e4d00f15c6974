r"""Sample FLUX.2 [klein] with (sparse) reference images, one image or many: the command line.

    python sample.py --model black-forest-labs/FLUX.2-klein-4B --prompt "a cat in a hat" \
        --ref cat.png --keep 0.1 --task subject --out out.png
    python sample.py --model black-forest-labs/FLUX.2-klein-9b-kv --ref cat.png --keep 0.1 --kv-cache \
        --prompt "a cat in a hat" --prompt "a cat on a beach" --seeds 0 1 2 3 --batch-size 4 --out-dir cats/

Every option is checked before any model loads; then pipeline.generate() samples every (prompt, seed)
image, and each is written atomically once all of them exist.

    python sample.py --model ... --ref val.png --prompt "a validation prompt" --seeds 0 1 --calibrate cal.json
    python sample.py --model ... --ref cat.png --prompt "..." --keep 0.1 --selector attention \
        --attention-calibration cal.json --attention-rescore-step 2 --out out.png

--calibrate runs ToPi's calibration of the attention selector (calibrate.calibrate_selector) on the
command's own references, prompts and seeds, a few validation examples, writes the JSON file and
samples nothing; --attention-calibration reuses the file.

    python sample.py --model ... --ref cat.png --compact 4 --prompt "..." --out out.png

--compact S gives the references downscaled by S per side (klein.Compact): every position at 1/S^2 of
the tokens instead of a subset at full resolution, the alternative to dropping at the same budget
(the study's drop-vs-compact comparison); --keep then drops from the compact tokens.

May import: files, cli, pipeline, klein and the extras it plugs in (attention_selector, bench_measure's FLOP
count, calibrate, quant). No other script.
"""

import argparse
import os
import time

import torch

from PIL import Image

from attention_selector import generate_rescored
from bench_measure import loop_flops
from calibrate import calibrate_selector, load_calibration, save_calibration
from cli import (COMPILE_BUCKET, MAX_IMAGES, add_common_args, build_klein, build_selector, check_common, check_sampling,
                 flagged, warn_slow_dtype)  # fmt: skip
from files import ArgumentParser, check_file, check_number, check_writable, check_writable_folder, fail, image_format, write_atomic
from klein import Compact
from pipeline import generate, load_references
from quant import FORMATS
from token_selectors import draw_selection, is_sparse

# options of sampling alone: an error with --calibrate, which samples no image
NOT_WITH_CALIBRATE = ("--out", "--out-dir", "--keep", "--compact", "--selector", "--save-selection", "--budget", "--uniform-mix", "--task",
                      "--selection-seed", "--guidance", "--compile", "--attention-block", "--attention-queries",
                      "--attention-calibration", "--attention-rescore-step")  # fmt: skip


def read_prompts(path):
    """One prompt per non-empty line of a UTF-8 text file."""
    check_file(path, "--prompts file")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"--prompts file {path} is not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"--prompts file {path} holds no prompt")
    return prompts


def output_paths(out, out_dir, prompts, seeds):
    """One path per (prompt, seed): --out itself for a single image, else out_p{i}_s{seed}.ext next to
    it, or p{i}_s{seed}.png in --out-dir; i counts the prompts from 0."""
    if out is not None and len(prompts) * len(seeds) == 1:
        return [out]
    stem, ext = os.path.splitext(out) if out is not None else (os.path.join(out_dir, ""), ".png")
    sep = "_" if out is not None else ""
    return [f"{stem}{sep}p{i}_s{s}{ext}" for i in range(len(prompts)) for s in seeds]


MAX_COMPACT = 64  # a 1024 px reference downscaled 64x is one token


def references(args):
    """--ref, each a klein.Compact where --compact downscales it."""
    factors = args.compact or [1]
    factors = factors * len(args.ref) if len(factors) == 1 else factors
    return [r if f == 1 else Compact(r, f) for r, f in zip(args.ref, factors)]


def parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # defaults in each help
    add_common_args(p)
    p.add_argument("--prompt", action="append", default=[], help="text prompt, repeatable: one image per prompt and seed (default: none)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="more prompts, one per line of a UTF-8 text file (default: none)")
    p.add_argument("--out", default=None, help="output image (.png, .jpg, .webp); several images: OUT_p{i}_s{seed}.EXT (default: none)")
    p.add_argument("--out-dir", default=None, help="write p{i}_s{seed}.png into this folder instead of --out (default: none)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (CPU generator, as diffusers); with --num-images the first of N (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several noise seeds: one image per prompt and seed (default: --seed)")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt, seeds --seed, --seed + 1, ... (default: 1)")
    p.add_argument("--keep", type=float, action="extend", nargs="+", default=None,
                   help="fraction of reference tokens kept, in (0, 1]: one value or one per reference (default: 1, dense)")  # fmt: skip
    p.add_argument("--compact", type=int, action="extend", nargs="+", default=None, metavar="S",
                   help="downscale the references by S per side, every position at 1/S^2 of the tokens (OminiControl2's compact "
                        "tokens); --keep then drops from those: one value or one per reference, 1 for full size (default: 1)")  # fmt: skip
    p.add_argument("--selector", default=None, choices=["auto", "random", "canny", "saliency", "attention"],
                   help="token selector; auto: canny for edit, saliency for subject; attention: the transformer's own attention "
                        "to each reference token, one block of one step (default: auto)")  # fmt: skip
    p.add_argument("--save-selection", default=None, help="also save the references with their kept tokens highlighted (default: none)")
    p.add_argument("--batch-size", type=int, default=1, help="images per transformer and VAE call (default: 1)")
    p.add_argument("--weights", choices=sorted(FORMATS), default=None,
                   help="the transformer's block Linears in 8 bits, dequantized per matmul; fp8 loads BFL's fp8 files (default: --dtype)")  # fmt: skip
    p.add_argument("--transformer", default=None, metavar="CHECKPOINT",
                   help="the transformer from this checkpoint instead of --model's: a BFL single file (e.g. BFL's "
                        "flux-2-klein-9b-fp8.safetensors, with --weights fp8) or a transformer folder (default: --model's)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help=f"torch.compile the transformer (fullgraph); kept counts round up to a multiple of {COMPILE_BUCKET} tokens (default: off)")  # fmt: skip
    p.add_argument("--attention-calibration", default=None, metavar="FILE",
                   help="the attention selector's block, queries and sigma from a --calibrate file (default: none)")
    p.add_argument("--attention-rescore-step", type=int, default=None, metavar="K",
                   help="ToPi's temporal update: at step K (1 to steps - 1) score every reference token again from the "
                        "current latent and choose the kept set again (default: none)")  # fmt: skip
    p.add_argument("--calibrate", default=None, metavar="OUT.json",
                   help="calibrate the attention selector on this command's references, prompts and seeds (a few "
                        "validation examples), write OUT.json and sample nothing (default: none)")  # fmt: skip
    p.add_argument("--calibrate-exact", action="store_true",
                   help="--calibrate with the exact influence, one forward per reference token (tiny models only) (default: the proxy)")
    return p


def check_calibrate(args, prompts, seeds):
    """--calibrate's options, before any model loads; returns (device, dtype)."""
    given = [o for o in NOT_WITH_CALIBRATE if getattr(args, o[2:].replace("-", "_")) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} cannot apply with --calibrate (it calibrates the attention selector and samples no image)")
    if not args.ref:
        raise ValueError("--calibrate needs reference images (--ref): their tokens are what it ranks")
    check_writable(args.calibrate, "--calibrate")
    check_sampling(prompts, seeds, len(args.ref), args.steps, None, args.height, args.width, lora=args.lora,
                   lora_scale=1.0 if args.lora_scale is None else args.lora_scale)  # fmt: skip
    return check_common(args, sparse=True, attention=True)  # the selection options were refused above


def check_args(args):
    """Every option, before any model loads; returns (prompts, seeds, paths, device, dtype) (paths: [] with --calibrate)."""
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts is not None else [])
    if not prompts:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    if args.calibrate_exact and args.calibrate is None:
        raise ValueError("--calibrate-exact cannot apply without --calibrate")
    if args.seeds is not None and (args.seed is not None or args.num_images is not None):
        raise ValueError("--seeds cannot be combined with --seed or --num-images")
    if args.num_images is not None:
        check_number("--num-images", args.num_images, 1, MAX_IMAGES, integer=True)
    seed = 0 if args.seed is None else args.seed
    check_number("--seed", seed, 0, 2**63 - 1, integer=True)
    seeds = args.seeds or list(range(seed, seed + (args.num_images or 1)))
    if args.calibrate is not None:
        return (prompts, seeds, [], *check_calibrate(args, prompts, seeds))
    if args.attention_rescore_step is not None and args.compile:
        raise ValueError("--attention-rescore-step cannot be combined with --compile (the scoring pass stops the forward at a block)")
    if (args.out is None) == (args.out_dir is None):
        raise ValueError("give exactly one of --out and --out-dir (or --calibrate)")
    keep = args.keep or [1.0]
    if args.compact is not None:
        if not args.ref:
            raise ValueError("--compact cannot apply without a reference image (--ref)")
        if len(args.compact) not in (1, len(args.ref)):
            raise ValueError(f"--compact has {len(args.compact)} values for {len(args.ref)} reference images: give one, or one per reference")
        for f in args.compact:
            check_number("--compact", f, 1, MAX_COMPACT, integer=True)
    if not args.ref and args.selector is not None:
        raise ValueError("--selector cannot apply without a reference image (--ref)")
    if args.ref and all(k == 1 for k in keep) and args.selector is not None:
        raise ValueError("--selector cannot apply with --keep 1 (no token is dropped)")
    check_sampling(prompts, seeds, len(args.ref), args.steps, args.guidance, args.height, args.width, keep,
                   args.uniform_mix if args.uniform_mix is not None else 0.25, args.budget or "uniform",
                   args.kv_cache, args.save_selection, args.lora, 1.0 if args.lora_scale is None else args.lora_scale,
                   args.batch_size)  # fmt: skip
    if args.out is not None:
        image_format(args.out)
        check_writable(args.out, "--out")
    else:
        check_writable_folder(args.out_dir)
    paths = output_paths(args.out, args.out_dir, prompts, seeds)
    if args.save_selection is not None and os.path.abspath(args.save_selection) in map(os.path.abspath, paths):
        raise ValueError(f"--save-selection {args.save_selection} is also an output image")
    device, dtype = check_common(args, sparse=is_sparse(keep, args.budget or "uniform"), attention=args.selector == "attention")
    return prompts, seeds, paths, device, dtype


def main(argv=None):
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        prompts, seeds, paths, device, dtype = check_args(args)
    except (OSError, ValueError) as e:
        fail(e)
    warn_slow_dtype(device, dtype)
    if args.calibrate is not None:
        return calibrate(args, prompts, seeds, device, dtype, start)
    keep = args.keep or [1.0]
    calibration = load_calibration(args.attention_calibration) if args.attention_calibration is not None else None  # checked
    klein = build_klein(args, args.batch_size, args.compile, args.weights, args.transformer)
    selector = build_selector(args, args.selector or "auto", args.compile, calibration)
    sampling = dict(seed=seeds, size=(args.height, args.width), steps=args.steps, guidance=args.guidance,
                    keep=keep[0] if len(keep) == 1 else keep, selector=selector, kv_cache=args.kv_cache, device=device,
                    dtype=dtype)  # fmt: skip
    try:
        if args.attention_rescore_step is None:
            images, stats = generate(klein, prompts, references(args), **sampling)
        else:
            images, stats = generate_rescored(klein, prompts, references(args), args.attention_rescore_step, **sampling)
        if args.save_selection:  # only once every image exists: a failed run leaves nothing behind
            save_selection_image(references(args), stats.kept, args.save_selection)
        for image, path in zip(images, paths):
            write_atomic(path, image)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(flagged(e))
    for k, (before, after) in enumerate(stats.ref_tokens):
        print(f"reference {k}: {after} of {before} tokens kept ({after / before:.1%})")
    if stats.ref_tokens:
        cfg, n_txt, n_img, steps = stats.loop
        full, ran = (sum(t[i] for t in stats.ref_tokens) for i in (0, 1))
        ideal = loop_flops(cfg, n_txt, n_img, full, False, steps) / loop_flops(cfg, n_txt, n_img, ran, args.kv_cache, steps)
        print(f"FLOP-ideal speedup of the denoising loop over every full-size reference token without a cache: {ideal:.2f}x")
    if stats.rescored:
        changed = sum(len(set(b.tolist()) - set(a.tolist())) for a, b in zip(stats.kept, stats.rescored))
        print(f"re-scored at step {args.attention_rescore_step}: {changed} kept token(s) replaced")
    total = time.perf_counter() - start
    print("  ".join(f"{stage}: {sec:.2f}s" for stage, sec in stats.seconds.items())
          + f"  total: {total:.2f}s for {len(paths)} image(s), {total / len(paths):.2f}s per image")  # fmt: skip
    for path in paths + ([args.save_selection] if args.save_selection else []):
        print(f"wrote {path}")


def save_selection_image(refs, kept, path):
    """Each reference with its kept tokens highlighted, side by side in one image."""
    images = load_references(refs)
    tiles = [draw_selection(im, idx if idx is not None else torch.arange((im.size[0] // 16) * (im.size[1] // 16)))
             for im, idx in zip(images, kept)]  # fmt: skip
    canvas = Image.new("RGB", (sum(t.size[0] for t in tiles), max(t.size[1] for t in tiles)), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.size[0]
    write_atomic(path, canvas)


def calibrate(args, prompts, seeds, device, dtype, start):
    """--calibrate: the calibration, its file, a summary."""
    try:
        klein = build_klein(args, weights=args.weights, transformer=args.transformer)
        calibration = calibrate_selector(klein, prompts, args.ref, seeds, steps=args.steps, size=(args.height, args.width),
                                         kv_cache=args.kv_cache, exact=args.calibrate_exact, device=device, dtype=dtype)  # fmt: skip
        save_calibration(args.calibrate, calibration)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(e)
    c = calibration
    print(f"calibration over {len(prompts) * len(seeds)} example(s), {len(c['table'])} candidates ({c['influence']} influence): "
          f"block {c['block']}, queries {c['queries']}, sigma {c['sigma']:.4f}, Spearman {c['spearman']:.3f}")  # fmt: skip
    print(f"total: {time.perf_counter() - start:.2f}s")
    print(f"wrote {args.calibrate}")


if __name__ == "__main__":
    main()
