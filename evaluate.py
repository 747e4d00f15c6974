r"""Evaluate Sparse Context like the field: one command from a benchmark manifest to a table.

    python evaluate.py bench/pie/manifest.jsonl --model black-forest-labs/FLUX.2-klein-4B --lora sc.safetensors \
        --selectors auto random --keeps 0.25 0.1 0.05 --kv-cache both --out-dir eval/pie
    torchrun --nproc-per-node 8 evaluate.py ...same options...

For every example of the manifest (benchmarks.py writes them) it samples the dense image and one image per
selector x keep (x with and without the KV cache with --kv-cache both), every --seeds seed, with any model,
LoRA and 8-bit weights the sampler takes; then scores each image (metrics.py) and writes into --out-dir:
results.md and results.json (per setting: seconds per image, speedup over dense, the mean and 95% interval of
every metric over the examples, and its paired change against dense) and quality_vs_speedup.png.

- Settings: "dense" (keep 1) and each selector x keep; `auto` is canny for edit examples and saliency for
  subject ones. The baseline of speed and of fidelity-to-dense is dense without the KV cache (with it when
  --kv-cache on). Seconds per image: token selection plus denoising on the device (the text encoder and the
  VAE do the same work for every setting), measured with the device synchronized; an untimed one-step
  warm-up follows each transformer load.
- Cache: images/KEY.png and images/KEY.json (its seconds, device, kept tokens), KEY a hash of everything that
  determines the image: the checkpoint (as named: a folder path or hub id), --transformer, --weights, the LoRA's
  bytes and scale, steps, guidance, size, dtype, the example's prompt and reference bytes, the setting and the
  seed. Scores: scores/MKEY/KEY.json (MKEY: the metric checkpoints). A killed run, or one with more keeps,
  seeds or examples, computes only what is missing; every file is written atomically.
- Intervals: a percentile bootstrap (2000 resamples, seed 0) of the per-example means (an example's value is
  the mean over its seeds); NaN scores (PIE-Bench: no background left) are left out.
- Many GPUs: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) rank r samples and scores examples r, r + W, ...
  on cuda:LOCAL_RANK and then writes done/PLAN.r-of-W; rank 0 waits for every rank's file (it polls; no
  process group is needed) and writes the table.

May import: files, klein, pipeline, cli, compare, quant, checkpoints, token_selectors, attention_selector, text_encoder,
vae, benchmarks, metrics; matplotlib lazily. The core never imports this file.
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from attention_selector import QUERIES, AttentionSelector
from benchmarks import read_manifest
from checkpoints import load_checkpoint
from compare import NOISE_SECONDS
from cli import MAX_IMAGES, build_klein, check_sampling, flagged
from files import ArgumentParser, check_number, check_writable_folder, fail, load_image, read_json, remove_stale_temps, write_atomic
from klein import prepare_reference, schedule
from metrics import CLIP_DEFAULT, DEFINITIONS, DINO_DEFAULT, DINOV2_DEFAULT, LOWER_IS_BETTER, LPIPS_NETS, Context, Metrics
from metrics import check_source, describe, lpips_available
from pipeline import (Scene, decode_latents, encode_prompts, encode_references, gather_references, is_distilled, load_references,
                      loaded, output_size, resolve_source, sample_latents, sampling_defaults, sampling_device, synchronize)  # fmt: skip
from quant import FORMATS
from text_encoder import TextEncoder
from token_selectors import Selector
from vae import AutoEncoder

SELECTORS = ("auto", "random", "canny", "saliency", "attention")
METRICS = ("clip", "dino", "dinov2", "lpips", "psnr", "ssim")
POLL_SECONDS = 5.0

# ----------------------------------------------------------------------------------------------
# Settings and cache keys


@dataclass(frozen=True)
class Setting:
    selector: str  # "dense", or one of SELECTORS
    keep: float
    kv: bool

    @property
    def label(self):
        name = "dense" if self.selector == "dense" else f"{self.selector} keep {self.keep:g}"
        return name + (" +kv" if self.kv else "")


def plan_settings(selectors, keeps, kv_modes):
    """Dense first (one per KV mode), then every selector x keep per KV mode."""
    dense = [Setting("dense", 1.0, kv) for kv in kv_modes]
    return dense + [Setting(s, k, kv) for kv in kv_modes for s in selectors for k in keeps]


def baseline(settings):
    return next(s for s in settings if s.selector == "dense" and not s.kv) if Setting("dense", 1.0, False) in settings else settings[0]


def resolved(name, task):
    """auto: Canny edges for instruction editing, spectral-residual saliency for subjects."""
    return ("canny" if task == "edit" else "saliency") if name == "auto" else name


def digest(path):
    """sha256 of a file's bytes, or of a folder's files (a LoRA folder)."""
    h = hashlib.sha256()
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def key(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Plan:
    """Every image of a run: its key, from the run's identity, the example's content, the setting, the seed."""

    def __init__(self, examples, settings, seeds, run, selection):
        self.examples, self.settings, self.seeds, self.run, self.selection = examples, settings, seeds, run, selection
        self.base = baseline(settings)
        files = {}
        self.content = {}
        for ex in examples:
            refs = [files.setdefault(p, digest(p)) for p in ex.references]
            self.content[ex.id] = key(ex.prompt, refs)

    def image_key(self, ex, setting, seed):
        name = resolved(setting.selector, ex.task)
        how = {} if name == "dense" else dict(self.selection, attention=self.selection["attention"] if name == "attention" else None)
        return key(self.run, self.content[ex.id], name, setting.keep, setting.kv, how, seed)

    def jobs(self, examples=None):
        return [(ex, s, seed) for ex in (examples or self.examples) for s in self.settings for seed in self.seeds]


def image_paths(out, k):
    return os.path.join(out, "images", f"{k}.png"), os.path.join(out, "images", f"{k}.json")


def is_cached(out, k):
    png, meta = image_paths(out, k)
    return os.path.isfile(png) and os.path.isfile(meta)


def save_image(out, k, image, meta):
    """The image, then its sidecar: an image counts as cached once both exist."""
    png, js = image_paths(out, k)
    write_atomic(png, image)
    write_atomic(js, json.dumps(meta, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# Sampling: each component loaded once per chunk of examples


def make_selector(name, args):
    rule = Selector(name, 0.25 if args.uniform_mix is None else args.uniform_mix, args.budget or "uniform", args.selection_seed or 0)
    if name != "attention":
        return rule
    return AttentionSelector(rule, args.attention_queries or "target", args.attention_block or 0)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine() or "cpu")


def sample_missing(plan, klein, args, examples, device, dtype, progress=True):
    """Sample every image of `examples` not in the cache; returns how many were sampled."""
    folder = resolve_source(klein.folder)
    steps, guidance = sampling_defaults(folder, args.steps, args.guidance)
    todo = {}
    for ex, s, seed in plan.jobs(examples):
        if not is_cached(args.out_dir, plan.image_key(ex, s, seed)):
            todo.setdefault(ex.id, {}).setdefault(s, []).append(seed)
    pending = [ex for ex in examples if ex.id in todo]
    bar = tqdm(total=sum(len(v) for t in todo.values() for v in t.values()), desc="sampling", disable=not progress)
    selectors = {}
    for c in range(0, len(pending), args.chunk):
        chunk = pending[c : c + args.chunk]
        with torch.no_grad():
            with loaded(TextEncoder.from_pretrained, folder, dtype=dtype, device=device) as text:
                txts = encode_prompts(text, [ex.prompt for ex in chunk], args.batch_size)
                neg = text.encode([""]) if guidance > 1 else None
            with loaded(AutoEncoder.from_pretrained, folder, dtype=dtype, device=device) as vae, \
                    loaded(klein.load_transformer, folder, dtype, device) as transformer:  # fmt: skip
                warm = True
                for ex in chunk:
                    images = load_references(ex.references)
                    h, w = output_size(images, args.height, args.width)
                    encoded = encode_references(vae, images, device, dtype)
                    if warm:  # untimed: first-call overheads (allocator, kernels) stay out of every setting's time
                        ref, ref_ids = gather_references(encoded, [None] * len(images))
                        sample_latents(transformer, [(ex.prompt, 0)], txts, h, w, 1, ref, ref_ids, False, guidance, neg)
                        warm = False
                    for s, seeds in todo[ex.id].items():
                        name = resolved(s.selector, ex.task)
                        synchronize(device)
                        start = time.perf_counter()
                        if name == "dense":
                            kept = [None] * len(images)
                        else:
                            select = selectors.setdefault(name, make_selector(name, args))
                            scene = Scene(transformer, encoded, txts[ex.prompt], seeds[0], (h, w), schedule(steps, h * w), s.kv)
                            kept = select(images, [s.keep] * len(images), scene)
                        ref, ref_ids = gather_references(encoded, kept)
                        latents = sample_latents(transformer, [(ex.prompt, seed) for seed in seeds], txts, h, w, steps, ref, ref_ids,
                                                 s.kv, guidance, neg, args.batch_size)  # fmt: skip
                        synchronize(device)
                        seconds = (time.perf_counter() - start) / len(seeds)
                        tokens = [sum(t.shape[1] for t, _ in encoded), ref.shape[1]]
                        for seed, image in zip(seeds, decode_latents(vae, latents, h, w, args.batch_size), strict=True):
                            meta = dict(example=ex.id, setting=s.label, selector=name, keep=s.keep, kv_cache=s.kv, seed=seed,
                                        seconds=seconds, ref_tokens=tokens, steps=steps, guidance=guidance, size=[16 * w, 16 * h],
                                        device=device_name(device), dtype=str(dtype).removeprefix("torch."))  # fmt: skip
                            save_image(args.out_dir, plan.image_key(ex, s, seed), image, meta)
                            bar.update()
    bar.close()
    return bar.n


# ----------------------------------------------------------------------------------------------
# Scoring


def context(ex):
    """What the example's images are compared with (metrics.Context)."""
    subject = ex.subject_images or (ex.references if ex.task == "subject" else [])
    ctx = Context(text=ex.clip_text or ex.prompt, subject=[load_image(p).convert("RGB") for p in subject] or None)
    if ex.task == "edit":
        ctx.source = load_references(ex.references[:1])[0]
    if ex.mask:
        edited = np.array(prepare_reference(load_image(ex.mask).convert("RGB")))[..., 0] > 127
        ctx.background = torch.from_numpy(~edited).float()
    if ex.target:
        ctx.target = load_image(ex.target).convert("RGB")
    return ctx


def score_missing(plan, load_metrics, mkey, out, examples, progress=True):
    """Score every image of `examples` without a score file (the metric models loaded only if one is
    missing); returns how many were scored."""
    n = 0
    todo = [(ex, s, seed) for ex, s, seed in plan.jobs(examples)
            if not os.path.isfile(os.path.join(out, "scores", mkey, f"{plan.image_key(ex, s, seed)}.json"))]  # fmt: skip
    if not todo:
        return 0
    metrics = load_metrics()
    bar = tqdm(total=len(todo), desc="scoring", disable=not progress)
    for ex in examples:
        jobs = [(s, seed) for e, s, seed in todo if e is ex]
        if not jobs:
            continue
        ctx = context(ex)
        emb = metrics.prepare(ctx)
        for s, seed in jobs:
            k = plan.image_key(ex, s, seed)
            image = load_image(image_paths(out, k)[0]).convert("RGB")
            dense = None if s == plan.base else load_image(image_paths(out, plan.image_key(ex, plan.base, seed))[0]).convert("RGB")
            scores = {m: None if v != v else v for m, v in metrics.score(image, ctx, emb, dense).items()}  # NaN: null
            write_atomic(os.path.join(out, "scores", mkey, f"{k}.json"), json.dumps(scores) + "\n")
            n += 1
            bar.update()
    bar.close()
    return n


# ----------------------------------------------------------------------------------------------
# The table


def interval(values, resamples=2000, seed=0):
    """(mean, low, high, n): the mean and a 95% percentile-bootstrap interval; NaNs left out."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return None
    if len(v) == 1:
        return float(v[0]), None, None, 1
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(v.mean()), float(lo), float(hi), len(v)


def summary(v):
    v = interval(v)
    return None if v is None else dict(mean=v[0], ci95=None if v[1] is None else [v[1], v[2]], n=v[3])


def aggregate(plan, out, mkey):
    """One row per setting: time, speedup, kept tokens, every metric's mean and interval, and (paired, per
    example) its change against the dense baseline: ReCAST's "DINO drop" is -delta / the baseline's mean."""
    rows, missing, devices, values_by = [], 0, set(), {}
    for s in plan.settings:
        seconds, kept, per_example = [], [], {}
        for ex in plan.examples:
            values = {}
            for seed in plan.seeds:
                k = plan.image_key(ex, s, seed)
                score_file = os.path.join(out, "scores", mkey, f"{k}.json")
                if not (is_cached(out, k) and os.path.isfile(score_file)):
                    missing += 1
                    continue
                meta = read_json(image_paths(out, k)[1])
                seconds.append(meta["seconds"])
                devices.add(f"{meta['device']} ({meta['dtype']})")
                kept.append(meta["ref_tokens"][1] / meta["ref_tokens"][0])
                for name, value in read_json(score_file).items():
                    values.setdefault(name, []).append(np.nan if value is None else value)
            for name, v in values.items():
                per_example.setdefault(name, {})[ex.id] = np.nanmean(v) if not np.all(np.isnan(v)) else np.nan
        values_by[s] = per_example
        rows.append(dict(setting=s.label, selector=s.selector, keep=s.keep, kv_cache=s.kv, baseline=s == plan.base, images=len(seconds),
                         seconds_per_image=float(np.mean(seconds)) if seconds else None,
                         ref_tokens_kept=float(np.mean(kept)) if kept else None,
                         metrics={n: summary(list(v.values())) for n, v in per_example.items()}))  # fmt: skip
    if missing:
        raise ValueError(f"{missing} image(s) or score(s) of this run are missing from {out}: run the command again to add them")
    base = next(r for r in rows if r["baseline"])["seconds_per_image"]
    dense = values_by[plan.base]
    for r, s in zip(rows, plan.settings, strict=True):
        r["speedup"] = base / r["seconds_per_image"] if base and r["seconds_per_image"] else None
        r["delta"] = {} if s == plan.base else {n: summary([v[e] - dense[n][e] for e in v if e in dense[n]])
                                                for n, v in values_by[s].items() if n in dense}  # fmt: skip
    return rows, sorted(devices)


def metric_columns(rows):
    present = {n for r in rows for n in r["metrics"]}
    return [n for n in DEFINITIONS if n in present]


def cell(m):
    if m is None:
        return "-"
    if m["ci95"] is None:
        return f"{m['mean']:.4g}"
    return f"{m['mean']:.4g} [{m['ci95'][0]:.4g}, {m['ci95'][1]:.4g}]"


def delta_cell(m, base):
    """A change against the baseline, and relative to the baseline's mean."""
    if m is None:
        return "-"
    return cell(m) + (f" ({m['mean'] / abs(base['mean']):+.1%})" if base and base["mean"] else "")


def markdown(name, rows, settings, definitions):
    cols = metric_columns(rows)
    out = [f"# {name}: Sparse Context evaluation", "", *(f"- {k}: {v}" for k, v in settings.items()), "",
           "Each metric: the mean over examples [95% bootstrap interval]; an example's value is the mean over its seeds. "
           "s / image: token selection plus denoising; speedup over the dense baseline (same examples and seeds).", "",
           "| setting | ref tokens kept | images | s / image | speedup | " + " | ".join(cols) + " |",
           "|---" * (5 + len(cols)) + "|"]  # fmt: skip
    for r in rows:
        sec = "-" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        out.append(f"| {r['setting']} | {r['ref_tokens_kept']:.1%} | {r['images']} | {sec} | {speed} | "
                   + " | ".join(cell(r["metrics"].get(c)) for c in cols) + " |")  # fmt: skip
    paired = [c for c in cols if any(r["delta"].get(c) for r in rows)]
    if paired:
        base_row = next(r for r in rows if r["baseline"])
        out += ["", f"Change against {base_row['setting']} (paired: the same examples and seeds; mean [95% interval], then the change "
                    "relative to the baseline's mean):", "",
                "| setting | " + " | ".join(paired) + " |", "|---" * (1 + len(paired)) + "|"]  # fmt: skip
        for r in rows:
            if not r["baseline"]:
                cells = (delta_cell(r["delta"].get(c), base_row["metrics"][c]) for c in paired)
                out.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    base = next((r["seconds_per_image"] for r in rows if r["baseline"]), None)
    if base is not None and base < NOISE_SECONDS:
        out += ["", f"The dense images took {base * 1000:.0f} ms each: below {NOISE_SECONDS:g} s per image the speedups are timing noise "
                    "(overheads, not attention, dominate a model this small)."]  # fmt: skip
    lower = lambda c: " (lower is better)" if c in LOWER_IS_BETTER and "lower" not in definitions[c] else ""  # noqa: E731
    out += ["", "Metrics:", *(f"- `{c}`: {definitions[c]}{lower(c)}" for c in cols)]
    return "\n".join(out) + "\n"


def plot(rows, path):
    """Each metric against speedup: one line per selector and KV mode across keeps, dense as a point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (requirements-dev.txt): no plot written", file=sys.stderr)
        return None
    cols = metric_columns(rows)
    if not cols:
        return None
    n = len(cols)
    fig, axes = plt.subplots((n + 2) // 3, min(n, 3), figsize=(4.5 * min(n, 3), 3.4 * ((n + 2) // 3)), squeeze=False)
    lines = {}
    for r in rows:
        lines.setdefault((r["selector"], r["kv_cache"]), []).append(r)
    colors = {line: f"C{i}" for i, line in enumerate(lines)}  # the same colour for a line in every panel
    for ax, c in zip(axes.flat, cols, strict=False):  # more panels than metrics: the rest are hidden
        for (sel, kv), rs in lines.items():
            pts = sorted((r["keep"], r["speedup"], r["metrics"][c]) for r in rs if r["speedup"] and r["metrics"].get(c))
            if not pts:
                continue
            x, m = [p[1] for p in pts], [p[2] for p in pts]
            y = [v["mean"] for v in m]
            err = [[v["mean"] - v["ci95"][0] if v["ci95"] else 0 for v in m], [v["ci95"][1] - v["mean"] if v["ci95"] else 0 for v in m]]
            ax.errorbar(x, y, yerr=err, marker="o" if sel != "dense" else "*", markersize=5 if sel != "dense" else 11, capsize=3,
                        linestyle="-" if len(x) > 1 else "none", color=colors[sel, kv], label=sel + (" +kv" if kv else ""))  # fmt: skip
            for keep, xi, yi in zip((p[0] for p in pts), x, y, strict=True):
                if sel != "dense":
                    ax.annotate(f"{keep:g}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colors[sel, kv])
        ax.set_xlabel("speedup over dense")
        ax.set_title(c + (" (lower is better)" if c in LOWER_IS_BETTER else ""))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# The command


def parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="evaluation manifest (JSONL; benchmarks.py writes them)")
    p.add_argument("--model", required=True, help="klein repository folder or hub id (required)")
    p.add_argument("--out-dir", required=True, help="folder for the table, the plot and the image and score cache (required)")
    p.add_argument("--name", default=None, help="the benchmark's name in the table (default: the manifest's folder name)")
    p.add_argument("--transformer", default=None, metavar="CHECKPOINT",
                   help="the transformer from this checkpoint instead of --model's (default: --model's)")
    p.add_argument("--weights", choices=sorted(FORMATS), default=None, help="the transformer's block Linears in 8 bits (default: --dtype)")
    p.add_argument("--lora", default=None, help="LoRA file (diffusers, BFL/ai-toolkit or kohya format) (default: none)")
    p.add_argument("--lora-scale", type=float, default=None, help="LoRA strength, needs --lora (default: 1)")
    p.add_argument("--lora-merge", action="store_true", help="merge the LoRA into 16-bit weights too (default: off)")
    p.add_argument("--selectors", nargs="+", choices=SELECTORS, default=["auto", "random"],
                   help="token selectors; auto: canny for edit examples, saliency for subject ones (default: auto random)")  # fmt: skip
    p.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.1, 0.05], help="keep fractions in (0, 1) (default: 0.25 0.1 0.05)")
    p.add_argument("--kv-cache", choices=["off", "on", "both"], default="off", help="sample without, with, or both (default: off)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds of every example and setting (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 4 distilled, 50 base)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, >= 1 (default: 1 distilled, 4 base)")
    p.add_argument("--height", type=int, default=None, help="output height, 16 to 4096 (default: the first reference's)")
    p.add_argument("--width", type=int, default=None, help="output width, 16 to 4096 (default: the first reference's)")
    p.add_argument("--uniform-mix", type=float, default=None, help="uniform share of the selection probability, in [0, 1] (default: 0.25)")
    p.add_argument("--budget", default=None, choices=["uniform", "adaptive"], help="token budget across references (default: uniform)")
    p.add_argument("--selection-seed", type=int, default=None, help="seed of the token selection (default: 0)")
    p.add_argument("--attention-queries", default=None, choices=QUERIES, help="the attention selector's queries (default: target)")
    p.add_argument("--attention-block", type=int, default=None, help="the attention selector's block (default: 0)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=["clip", "dino", "lpips", "psnr", "ssim"],
                   help="metrics to compute (default: clip dino lpips psnr ssim)")  # fmt: skip
    p.add_argument("--clip", default=None, help=f"CLIP checkpoint, hub id or folder (default: {CLIP_DEFAULT})")
    p.add_argument("--dino", default=None, help=f"DINO checkpoint, hub id or folder (default: {DINO_DEFAULT})")
    p.add_argument("--dinov2", default=None, help=f"DINOv2 checkpoint, with --metrics dinov2 (default: {DINOV2_DEFAULT})")
    p.add_argument("--lpips-net", choices=LPIPS_NETS, default=None, help="LPIPS backbone; PIE-Bench used squeeze (default: alex)")
    p.add_argument("--lpips-random", action="store_true", help="LPIPS with a random backbone: a smoke run, no download (default: off)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of the manifest (default: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines instead of stopping (default: off)")
    p.add_argument("--batch-size", type=int, default=1, help="images per transformer and VAE call (default: 1)")
    p.add_argument("--chunk", type=int, default=32, help="examples per load of the text encoder, VAE and transformer (default: 32)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; under torchrun cuda:LOCAL_RANK (default: cuda if any, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "float32", "bfloat16"], default=None,
                   help="sampling dtype; the metrics run in fp32 (default: bf16 on GPU, fp32 on CPU)")
    return p


def distributed():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"RANK {rank} and WORLD_SIZE {world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def check_args(args):
    """Every option and the manifest, before any model loads; returns (examples, settings, device, dtype, dist)."""
    dist = distributed()
    check_writable_folder(args.out_dir)
    for k in args.keeps:
        check_number("--keeps", k, 0, 1, low_open=True)
        if k == 1:
            raise ValueError("--keeps: 1 is the dense setting, which always runs; give fractions below 1")
    for option, values in (("--keeps", args.keeps), ("--selectors", args.selectors), ("--metrics", args.metrics)):
        if len(set(values)) < len(values):
            raise ValueError(f"{option} must not repeat a value: {' '.join(map(str, values))}")
    check_sampling(["benchmark"], args.seeds, 1, args.steps, args.guidance, args.height, args.width, 1.0,
                   0.25 if args.uniform_mix is None else args.uniform_mix, args.budget or "uniform", False, None, args.lora,
                   1.0 if args.lora_scale is None else args.lora_scale, args.batch_size)  # fmt: skip
    if args.lora is None and (args.lora_scale is not None or args.lora_merge):
        raise ValueError(f"{'--lora-scale' if args.lora_scale is not None else '--lora-merge'} cannot apply without --lora")
    if args.selection_seed is not None:
        check_number("--selection-seed", args.selection_seed, 0, 2**63 - 1, integer=True)
    given = [o for o, v in (("--attention-queries", args.attention_queries), ("--attention-block", args.attention_block)) if v is not None]
    if given and "attention" not in args.selectors:
        raise ValueError(f"{', '.join(given)} cannot apply without --selectors attention")
    for option, v, low in (("--limit", args.limit, 1), ("--chunk", args.chunk, 1)):
        if v is not None:
            check_number(option, v, low, 10**9, integer=True)
    metric_options = (("--clip", args.clip, "clip"), ("--dino", args.dino, "dino"), ("--dinov2", args.dinov2, "dinov2"),
                      ("--lpips-net", args.lpips_net, "lpips"), ("--lpips-random", args.lpips_random or None, "lpips"))  # fmt: skip
    for option, v, metric in metric_options:
        if v is not None and metric not in args.metrics:
            raise ValueError(f"{option} cannot apply without --metrics {metric}")
    sources = (("--clip", args.clip, CLIP_DEFAULT), ("--dino", args.dino, DINO_DEFAULT), ("--dinov2", args.dinov2, DINOV2_DEFAULT))
    for option, v, default in sources:
        if option[2:] in args.metrics:
            check_source(v or default, option)
    if "lpips" in args.metrics and lpips_available():
        raise ValueError(f"--metrics lpips: {lpips_available()}; or leave lpips out of --metrics")
    device, dtype = sampling_device(args.device, args.dtype)
    if dist[1] > 1 and device.type == "cuda":
        device = torch.device("cuda", dist[2])
        if dist[2] >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {dist[2]}: only {torch.cuda.device_count()} CUDA device(s) here")
    folder = resolve_source(args.model)
    is_distilled(folder)
    cfg = load_checkpoint(args.transformer or folder)[0]
    if args.attention_block is not None:
        check_number("--attention-block", args.attention_block, 0, cfg.depth + cfg.depth_single - 1, integer=True)
    examples = read_manifest(args.manifest, args.skip_bad)[: args.limit]
    kv = {"off": [False], "on": [True], "both": [False, True]}[args.kv_cache]
    settings = plan_settings(args.selectors, args.keeps, kv)
    n = len(examples) * len(settings) * len(args.seeds)
    check_number("images (examples x settings x seeds)", n, 1, 1000 * MAX_IMAGES, integer=True)
    return examples, settings, device, dtype, dist


def run_identity(args, folder, dtype):
    """What determines every image of the run besides the example, the setting and the seed."""
    steps, guidance = sampling_defaults(folder, args.steps, args.guidance)
    where = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731  (a folder or file, else a hub id)
    return dict(model=where(args.model), transformer=where(args.transformer), weights=args.weights,
                lora=digest(args.lora) if args.lora else None, lora_scale=1.0 if args.lora_scale is None else args.lora_scale,
                lora_merge=bool(args.lora_merge), steps=steps, guidance=guidance, height=args.height, width=args.width,
                dtype=str(dtype).removeprefix("torch."))  # fmt: skip


def wait_for(paths, progress=True):
    """Poll until every path exists (the other ranks' done files)."""
    said = False
    while not all(os.path.isfile(p) for p in paths):
        if progress and not said:
            print(f"rank 0: waiting for {sum(not os.path.isfile(p) for p in paths)} other rank(s) to finish", file=sys.stderr)
            said = True
        time.sleep(POLL_SECONDS)


def main(argv=None):
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        examples, settings, device, dtype, (rank, world, _) = check_args(args)
    except (OSError, ValueError) as e:
        fail(e)
    folder = resolve_source(args.model)
    run = run_identity(args, folder, dtype)
    selection = dict(uniform_mix=0.25 if args.uniform_mix is None else args.uniform_mix, budget=args.budget or "uniform",
                     seed=args.selection_seed or 0,
                     attention=dict(queries=args.attention_queries or "target", block=args.attention_block or 0))  # fmt: skip
    plan = Plan(examples, settings, args.seeds, run, selection)
    shard = examples[rank::world]
    progress = rank == 0
    description = describe(args.metrics, args.clip or CLIP_DEFAULT, args.dino or DINO_DEFAULT, args.dinov2 or DINOV2_DEFAULT,
                           args.lpips_net or "alex", args.lpips_random)  # fmt: skip
    mkey = key(description)
    if world == 1:  # a killed run's temporaries (never while other ranks may be writing theirs)
        for sub in ("images", os.path.join("scores", mkey)):
            remove_stale_temps(os.path.join(args.out_dir, sub))
    try:
        sampled = sample_missing(plan, build_klein(args, args.batch_size, weights=args.weights, transformer=args.transformer), args, shard,
                                 device, dtype, progress)  # fmt: skip
        load = lambda: Metrics(args.metrics, args.clip or CLIP_DEFAULT, args.dino or DINO_DEFAULT, args.dinov2 or DINOV2_DEFAULT,  # noqa: E731
                               args.lpips_net or "alex", args.lpips_random, device)  # fmt: skip
        scored = score_missing(plan, load, mkey, args.out_dir, shard, progress)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        fail(flagged(e))
    plan_key = key(sorted(plan.image_key(ex, s, seed) for ex, s, seed in plan.jobs()), mkey)
    done = [os.path.join(args.out_dir, "done", f"{plan_key}.{r}-of-{world}") for r in range(world)]
    write_atomic(done[rank], json.dumps(dict(rank=rank, sampled=sampled, scored=scored)) + "\n")
    print(f"rank {rank}: {len(shard)} examples, {sampled} images sampled, {scored} scored "
          f"({len(plan.jobs(shard)) - sampled} images were cached)", file=sys.stderr)  # fmt: skip
    if rank != 0:
        return
    wait_for(done, progress)
    name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.manifest)))
    try:
        rows, devices = aggregate(plan, args.out_dir, mkey)
    except (OSError, ValueError) as e:
        fail(e)
    settings_shown = dict(manifest=args.manifest, examples=len(examples), seeds=" ".join(map(str, args.seeds)),
                          **{k: v for k, v in run.items() if v is not None and (run["lora"] or not k.startswith("lora"))},
                          selection=f"uniform mix {selection['uniform_mix']}, budget {selection['budget']}, seed {selection['seed']}",
                          metric_models="; ".join(f"{k}: {v}" for k, v in description.items()), devices=", ".join(devices))  # fmt: skip
    md, js, png = (os.path.join(args.out_dir, f) for f in ("results.md", "results.json", "quality_vs_speedup.png"))
    try:
        write_atomic(md, markdown(name, rows, settings_shown, DEFINITIONS))
        definitions = {c: DEFINITIONS[c] for c in metric_columns(rows)}
        write_atomic(js, json.dumps(dict(benchmark=name, settings=settings_shown, definitions=definitions, rows=rows), indent=1) + "\n")
        png = plot(rows, png)
    except OSError as e:
        fail(e)
    shown = (line for line in markdown(name, rows, settings_shown, DEFINITIONS).splitlines() if line.startswith(("|", "Change against")))
    print("\n".join(line if line.startswith("|") else "\n" + line.split(" (")[0] + ":" for line in shown))
    print(f"total {time.perf_counter() - start:.1f}s")
    for path in (md, js, png):
        if path:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
