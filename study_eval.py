"""How reproduce.py's study measures: selection, sampling, metrics, the competence gate, the timing.

evaluate() scores every model, task, selector, keep and seed against the true targets (PSNR, SSIM,
the coarse layout's PSNR), next to the no-model fill (nearest_fill); gate() is the dense base's
competence per prompt; time_sampling() the sampling loop's speed. Selection goes through
token_selectors.select_reference_tokens, or for the model-aware rules through
attention_selector.reference_attention; the coverage-first rule (select_covered) is this study's
own, beyond the paper, and lives here.

May import: study_world, attention_selector, bench_measure, calibrate, compare, klein, model,
pipeline, token_selectors, train (generator). Never reproduce or study_report.
"""

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attention_selector import reference_attention
from bench_measure import loop_flops
from compare import psnr, ssim
from klein import PATCH, grid_ids, n_keep, schedule, text_ids
from model import KVCache
from pipeline import denoise
from study_world import CHANNELS, MULTI, SIZE, TASKS, THUMB, TXT_LEN, as_item, decode
from token_selectors import select_reference_tokens, token_scores
from train import generator

AWARE = {"edit": "canny", "subject": "saliency", "multi": "saliency"}  # the paper's task-aware rule
GATE_DB = 10.0  # the dense base must beat a uniform grey image by this much on every validation prompt
# The attention selector (attention_selector.reference_attention): its queries, block and sigma, chosen on the validation
# photograph (ATTENTION_CHOICES); scored by each model it serves, the training-free base included (ToPi's setting).
ATTENTION = dict(queries="target", block=1, sigma=1.0)
# selector -> the models it is scored on; "topi": ToPi's calibration (calibrate.py) of the base, training-free
MODEL_AWARE = {"attention": ("base", "drop", "drop-mix"), "topi": ("base",)}
TOPI_EXAMPLES = 4  # validation examples per task that calibrate_topi measures the influence on
ATTENTION_CHOICES = """\
How the attention rule was set: on the validation photograph, the 200-step drop model at keep 0.1 (2 seeds), every
queries choice (target, text, both, references: the prompt-independent KV-pattern variant) with block 0, 1 or 3
(of 4) and the sampler's first sigma (1) or 0.5, the mean over tasks of PSNR: target queries of block 1 at sigma 1
scored 16.23 / 22.80 / 17.19 dB (edit / subject / multi; mean 18.74), the best of the 24; block 0 18.60, text
queries at most 18.57, the reference-only variant at most 18.58; random 16.27 / 22.24 / 16.93 (18.48) and the
paper's task-aware rule 16.19 / 23.25 / 17.14 (18.86) there. ToPi's calibration (below) chooses on its own,
from the measured influence of each token, not from PSNR."""


def select(examples, keep, selector, seed, budget="uniform", model=None, how=None):
    """Kept token indices per example and reference (selection from the reference pixels, or for the
    model-aware selectors "attention" and "topi" from `model`'s own attention read as `how` says:
    attention_scores). selector "canny-cover" / "saliency-cover": the coverage-first rule
    (select_covered, uniform budget)."""
    if selector.endswith("-cover"):
        return [select_covered(ex["pixels"], keep, selector.removesuffix("-cover"), seed * 100_003 + i)
                for i, ex in enumerate(examples)]  # fmt: skip
    by_model = selector in MODEL_AWARE
    scores = attention_scores(model, examples, seed, how) if by_model else [None] * len(examples)
    name = "attention" if by_model else selector
    return [select_reference_tokens(ex["pixels"], keep, selector=name, seed=seed * 100_003 + i, uniform_mix=0.25,
                                    budget=budget, scores=sc)
            for i, (ex, sc) in enumerate(zip(examples, scores))]  # fmt: skip


def select_covered(images, keep, selector="canny", seed=0, uniform_mix=0.25, scores=None):
    """The coverage-first rule, beyond the paper: kept token indices per reference image ((H, W, 3)
    uint8 arrays), a sorted LongTensor each. Counts (n_keep), probabilities, scores (token_scores,
    or `scores` given) and seeds (seed + i) are token_selectors.select_reference_tokens' with the
    uniform budget; only the draw differs: sample_covered."""
    scores = [token_scores(im, selector) for im in images] if scores is None else scores
    return [sample_covered(s, n_keep(keep, len(s)), seed + i, uniform_mix, im.shape[1] // PATCH)
            for i, (im, s) in enumerate(zip(images, scores))]  # fmt: skip


def sample_covered(scores, k, seed, uniform_mix, grid_w):
    """k of N token indices (a token grid grid_w wide), sorted: token_selectors' probabilities,
    p_i = (1 - a) s_i / sum(s) + a / N with a = uniform_mix, drawn coverage first (cover)."""
    s = torch.as_tensor(scores).detach().flatten().double().cpu()
    N = s.numel()
    p = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / N)  # no signal: uniform
    p = (1 - uniform_mix) * p + uniform_mix / N
    if int((p > 0).sum()) < k:
        raise ValueError(f"{k} tokens asked of a map with only {int((p > 0).sum())} above 0 (uniform_mix 0)")
    return cover(p, k, torch.Generator().manual_seed(seed), grid_w).sort().values


def cover(p, k, g, grid_w):
    """k tokens, coverage first: the token grid is cut into square cells of side s = floor(sqrt(N / k))
    (so there are at least k cells), k cells are drawn without replacement by their mass sum(p_i),
    then one token inside each drawn cell by p_i. No large region goes empty (plain sampling leaves
    flat areas bare once the map concentrates the budget); the map still decides where inside a cell,
    and which cells win when there are more cells than tokens."""
    N = p.numel()
    side = max(1, math.isqrt(N // k))
    pos = torch.arange(N)
    cell = (pos // grid_w // side) * -(-grid_w // side) + pos % grid_w // side  # (N,) cell of each token
    mass = torch.zeros(int(cell.max()) + 1, dtype=p.dtype).index_add_(0, cell, p)
    if int((mass > 0).sum()) < k:  # too few cells with any probability: plain sampling
        return torch.multinomial(p, k, replacement=False, generator=g)
    picks = []
    for c in torch.multinomial(mass, k, replacement=False, generator=g):
        members = (cell == c).nonzero()[:, 0]
        picks.append(members[torch.multinomial(p[members], 1, generator=g)])
    return torch.cat(picks)


@torch.no_grad()
def attention_scores(model, examples, seed, how):
    """Per example, per reference (N_k,) scores: reference_attention with every reference token,
    how's queries, block and sigma, on example i's own sampling noise (seed, i) standing in for the
    latent, as pipeline.attention_scores does."""
    items = [as_item(ex) for ex in examples]
    h, w = items[0]["target"].shape[1:]
    out = [None] * len(items)
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(len(it["refs"]), []).append(i)
    for members in groups.values():
        every = [[torch.arange(h * w)] * len(items[i]["refs"]) for i in members]
        ref, ref_ids = gather_refs([items[i] for i in members], every)
        txt = torch.stack([items[i]["txt"] for i in members])
        noise = torch.stack([torch.randn(h * w, CHANNELS, generator=generator("noise", seed, i)) for i in members])
        t = torch.full((len(members),), how["sigma"])
        sc = reference_attention(model, noise, grid_ids(h, w), txt, text_ids(TXT_LEN), t, ref, ref_ids, block=how["block"],
                                 queries=how["queries"], kv_pattern=how.get("kv_cache", False))  # fmt: skip
        for i, row in zip(members, sc):
            out[i] = list(row.split(h * w))
    return out


def calibrate_topi(model, examples, path, steps):
    """ToPi's offline calibration (calibrate.calibrate_attention, the first-order influence) of `model`
    on the first TOPI_EXAMPLES validation examples of every task, each on its own noise, at the
    sampler's first sigma and every second one after it: the block, queries and sigma whose attention scores
    rank the reference tokens most like their influence. Saved to path, reused while it exists."""
    from calibrate import calibrate_attention, load_calibration, save_calibration

    if not os.path.isfile(path):
        h = w = SIZE // 16
        inputs = []
        for task in TASKS:
            for i, ex in enumerate([ex for ex in examples if ex["task"] == task][:TOPI_EXAMPLES]):
                it = as_item(ex)
                ref, ref_ids = gather_refs([it], [[torch.arange(h * w)] * len(it["refs"])])
                noise = torch.randn(1, h * w, CHANNELS, generator=generator("noise", "topi", task, i))
                inputs.append((noise, grid_ids(h, w), it["txt"][None], text_ids(TXT_LEN), ref, ref_ids))
        sigmas = schedule(steps, h * w)[:-1:2].tolist()
        save_calibration(path, calibrate_attention(model, inputs, sigmas))
    return load_calibration(path, len(model.double_blocks) + len(model.single_blocks))


def gather_refs(items, kept):
    """Kept reference tokens (B, M, C) and their original ids (B, M, 4): the one place tokens drop here."""
    refs, ids = [], []
    for item, idx in zip(items, kept):
        tokens = [r.flatten(1).T[i] for r, i in zip(item["refs"], idx)]  # (h * w, C) rows
        pos = [grid_ids(r.shape[1], r.shape[2], t=10 * (k + 1))[i] for k, (r, i) in enumerate(zip(item["refs"], idx))]
        refs.append(torch.cat(tokens))
        ids.append(torch.cat(pos))
    return torch.stack(refs), torch.stack(ids)


@torch.no_grad()
def sample_batch(model, items, kept, steps, seed, kv):
    """Images (B, 3, H, W) in [0, 1] from the sampler's denoise. Example i's noise is drawn from
    (seed, i), so an image does not depend on the batch; examples that kept the same number of
    reference tokens share a batch."""
    h, w = items[0]["target"].shape[1:]
    out, groups = [None] * len(items), {}
    for i, idx in enumerate(kept):
        groups.setdefault(sum(len(k) for k in idx), []).append(i)
    for members in groups.values():
        ref, ref_ids = gather_refs([items[i] for i in members], [kept[i] for i in members])
        txt = torch.stack([items[i]["txt"] for i in members])
        noise = torch.stack([torch.randn(h * w, CHANNELS, generator=generator("noise", seed, i)) for i in members])
        x = denoise(model, noise, grid_ids(h, w), txt, text_ids(TXT_LEN), schedule(steps, h * w), ref=ref, ref_ids=ref_ids,
                    kv_cache=KVCache() if kv else None)  # fmt: skip
        if not torch.isfinite(x).all():
            raise FloatingPointError("the sampler produced non-finite latents")
        for i, image in zip(members, decode(x.transpose(1, 2).reshape(len(members), CHANNELS, h, w))):
            out[i] = image
    return torch.stack(out)


def nearest_fill(target, src, kept):
    """The information limit of the kept tokens, no model: each target token made from reference k
    takes the ideal output (the true target token) of the nearest kept token of its own source in k,
    i.e. the ideal edit of the kept tokens, copied to where they are missing. target (C, h, w) true
    latents; src (h * w, 2) from make_example; kept [token indices per reference] on an (h, w) grid.
    Target tokens no reference feeds stay exact; a source with no kept token leaves its tokens grey (0)."""
    C, h, w = target.shape
    flat = target.flatten(1).T  # (h * w, C)
    out = flat.clone()
    xy = lambda t: torch.stack([t // w, t % w], -1).float()  # token index -> (row, col)
    for k, idx in enumerate(kept):
        mine = (src[:, 0] == k).nonzero()[:, 0]  # target tokens made from reference k
        known = torch.isin(src[mine, 1], idx)  # ... whose own source token was kept
        if not known.any():
            out[mine] = 0
            continue
        nearest = torch.cdist(xy(src[mine, 1]), xy(src[mine[known], 1])).argmin(1)  # first of equals
        out[mine] = flat[mine[known][nearest]]
    return out.T.reshape(C, h, w)


def coarse(x):
    """The coarse layout of thumbnail images: means of 2x2-token blocks (32x32 px of the image)."""
    return F.avg_pool2d(x, 2 * THUMB)


def metrics(pred, truth):
    return dict(psnr=psnr(pred, truth).mean().item(), ssim=ssim(pred, truth).mean().item(),
                coarse_psnr=psnr(coarse(pred), coarse(truth)).mean().item())  # fmt: skip


def evaluate(models, examples, settings, kv_models=(), configs=None, topi=None):
    """{(model, task, selector, keep, seed): metrics} on the examples, plus the images at keep 0.1 and 1
    of the first seed for the figures. configs: (task, selector, keep, budget) tuples (default: all).
    topi: the base's calibration (calibrate_topi), for selector "topi" on the base."""
    how = dict(attention=ATTENTION, topi=topi)
    items = [as_item(ex) for ex in examples]
    truth = decode(torch.stack([it["target"] for it in items]))
    results, images = {}, {}
    if configs is None:
        configs = []
        for task in TASKS:
            sel = ["random", "canny", "saliency", "canny-cover", "saliency-cover", "attention"] + (["topi"] if topi else [])
            for keep in settings["keeps"]:
                for selector in (["random"] if keep == 1 else sel):
                    configs.append((task, selector, keep, "uniform"))
                if task == "multi" and keep < 1:
                    configs.append((task, "adaptive", keep, "adaptive"))
    bar = tqdm(total=len(configs) * settings["seeds"], desc="evaluating")
    for task, selector, keep, budget in configs:
        idx = [i for i, ex in enumerate(examples) if ex["task"] == task]
        if not idx:
            continue
        for seed in range(settings["seeds"]):
            by_model = selector in MODEL_AWARE  # each model ranks the tokens by its own attention
            kept = None if by_model else select([examples[i] for i in idx], keep, AWARE[task] if budget == "adaptive" else selector, seed, budget)
            if keep < 1 and not by_model:  # the no-model information limit (exact at keep 1)
                fill = torch.stack([nearest_fill(items[i]["target"], examples[i]["src"], k) for i, k in zip(idx, kept)])
                results[("fill", task, selector, keep, seed)] = metrics(decode(fill), truth[idx])
            for name, model in models.items():
                if name in kv_models and selector not in ("random", AWARE[task]):
                    continue  # the cache is compared on the paper's two rules only
                if selector.endswith("-cover") and not name.startswith("drop"):
                    continue  # the coverage rule is this project's, tried on the drop-trained models
                if by_model and name not in MODEL_AWARE[selector]:
                    continue
                if by_model:
                    kept = select([examples[i] for i in idx], keep, selector, seed, budget, model=model, how=how[selector])
                pred = sample_batch(model, [items[i] for i in idx], kept, settings["sample_steps"], seed, name in kv_models)
                results[(name, task, selector, keep, seed)] = metrics(pred, truth[idx])
                if seed == 0 and keep in (1.0, 0.1) and not by_model:  # what the grids show
                    images[(name, task, selector, keep)] = pred
                    images[("kept", task, selector, keep)] = kept
            bar.update()
    bar.close()
    return results, images, truth


def grey_floor(examples, truth):
    """{task: PSNR and SSIM of a uniform mid-grey image against the true targets (evaluate's truth)}:
    what a model that ignores its inputs starts from."""
    out = {}
    for task in TASKS:
        t = truth[[i for i, ex in enumerate(examples) if ex["task"] == task]]
        grey = torch.full_like(t, 0.5)
        out[task] = dict(psnr=psnr(grey, t).mean().item(), ssim=ssim(grey, t).mean().item())
    return out


def prompt_of(ex):
    """What the gate scores separately: each edit, each subject variant, each multi layout."""
    return f"{MULTI} ({len(ex['refs'])} refs)" if ex["task"] == "multi" else ex["prompt"]


def gate(model, examples, settings):
    """{prompt: (model PSNR, grey PSNR)} at keep 1 (seed 0), mean over each prompt's examples: is the
    dense model competent at every prompt before any claim about dropping is made?"""
    items = [as_item(ex) for ex in examples]
    truth = decode(torch.stack([it["target"] for it in items]))
    every = [[torch.arange(r.shape[1] * r.shape[2]) for r in it["refs"]] for it in items]
    got = psnr(sample_batch(model, items, every, settings["sample_steps"], 0, False), truth)
    floor = psnr(torch.full_like(truth, 0.5), truth)
    out = {}
    for ex, a, b in zip(examples, got.tolist(), floor.tolist()):
        out.setdefault(prompt_of(ex), []).append((a, b))
    return {k: tuple(float(np.mean(c)) for c in zip(*v)) for k, v in out.items()}


def summarize(results):
    """{(model, task, selector, keep): {metric: (mean over seeds, std over seeds)}}."""
    groups = {}
    for (name, task, selector, keep, _), m in results.items():
        groups.setdefault((name, task, selector, keep), []).append(m)
    out = {}
    for key, ms in groups.items():
        out[key] = {k: (float(np.mean([m[k] for m in ms])), float(np.std([m[k] for m in ms]))) for k in ms[0]}
    return out


@torch.no_grad()
def time_sampling(model, examples, settings, n_refs):
    """Seconds per image of the sampling loop at every keep, with and without the KV cache, for
    n_refs references per example (the multi task's references, repeated to reach n_refs), next to
    the FLOP-ideal speedup. Each time is the minimum over rounds, dense and sparse interleaved."""
    items = [as_item(ex) for ex in examples if ex["task"] == "multi"]
    for it in items:
        it["refs"] = [it["refs"][k % len(it["refs"])] for k in range(n_refs)]
    steps, n_tok = settings["sample_steps"], (SIZE // 16) ** 2
    best = {}
    for r in range(settings["timing_rounds"]):
        for keep in settings["keeps"][:: 1 if r % 2 == 0 else -1]:
            kept = [[torch.randperm(n_tok, generator=generator("time", i, k))[: max(1, round(keep * n_tok))].sort().values
                     for k in range(n_refs)] for i in range(len(items))]  # fmt: skip
            for kv in (False, True):
                t0 = time.perf_counter()
                sample_batch(model, items, kept, steps, 0, kv)
                best[(keep, kv)] = min(best.get((keep, kv), math.inf), (time.perf_counter() - t0) / len(items))
    rows, cfg = [], model.cfg
    for (keep, kv), sec in sorted(best.items(), key=lambda kv_: (kv_[0][1], -kv_[0][0])):
        n_ref = n_refs * max(1, round(keep * n_tok))
        ideal = loop_flops(cfg, TXT_LEN, n_tok, n_refs * n_tok, False, steps) / loop_flops(cfg, TXT_LEN, n_tok, n_ref, kv, steps)
        rows.append(dict(refs=n_refs, keep=keep, kv=kv, ref_tokens=n_ref, seconds=sec, speedup=best[(1.0, False)] / sec, ideal=ideal))
    return rows


