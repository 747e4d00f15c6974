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
from klein import PATCH, compact_grid, grid_ids, n_keep, reference_ids, schedule, text_ids
from model import KVCache
from pipeline import denoise
from study_world import CHANNELS, COMPACT, MULTI, SIZE, TASKS, TXT_LEN, as_item, compact_pixels, decode, to_uint8
from token_selectors import select_reference_tokens, token_scores
from train import compact_item, generator

AWARE = {"edit": "canny", "subject": "saliency", "multi": "saliency"}  # the paper's task-aware rule
GATE_DB = 10.0  # the dense base must beat a uniform grey image by this much on every validation prompt
# The attention selector (attention_selector.reference_attention): its queries, block and sigma, chosen on the validation
# photograph (ATTENTION_CHOICES); scored by each model it serves, the training-free base included (ToPi's setting).
ATTENTION = dict(queries="target", block=1, sigma=1.0)
# selector -> the models it is scored on; "topi": ToPi's calibration (calibrate.py) of the base, training-free
MODEL_AWARE = {"attention": ("base", "drop"), "topi": ("base",)}
TOPI_EXAMPLES = 4  # validation examples per task that calibrate_topi measures the influence on
ATTENTION_CHOICES = """\
How the attention rule was set: on the validation photograph, the 200-step drop model at keep 0.1 (2 seeds), every
queries choice (target, text, both, references: the prompt-independent KV-pattern variant) with block 0, 1 or 3
(of 4) and the sampler's first sigma (1) or 0.5, the mean over tasks of PSNR: target queries of block 1 at sigma 1
scored 16.23 / 22.80 / 17.19 dB (edit / subject / multi; mean 18.74), the best of the 24; block 0 18.60, text
queries at most 18.57, the reference-only variant at most 18.58; random 16.27 / 22.24 / 16.93 (18.48) and the
paper's task-aware rule 16.19 / 23.25 / 17.14 (18.86) there. ToPi's calibration (below) chooses on its own,
from the measured influence of each token, not from PSNR."""


def select(examples, keep, selector, seed, budget="uniform", model=None, how=None, items=None, latents=None):
    """Kept token indices per example and reference (selection from the reference pixels, or for the
    model-aware selectors "attention" and "topi" from `model`'s own attention read as `how` says:
    attention_scores, on items (as_item, maybe compact) and, for a re-score, the current latents).
    selector "canny-cover" / "saliency-cover": the coverage-first rule (select_covered, uniform budget)."""
    if selector.endswith("-cover"):
        return [select_covered(ex["pixels"], keep, selector.removesuffix("-cover"), seed * 100_003 + i)
                for i, ex in enumerate(examples)]  # fmt: skip
    by_model = selector in MODEL_AWARE
    if by_model:
        scores = attention_scores(model, items or [as_item(ex) for ex in examples], seed, how, latents)
    else:
        scores = [None] * len(examples)
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
def attention_scores(model, items, seed, how, latents=None):
    """Per item, per reference (N_k,) scores: reference_attention with every reference token, how's
    queries, block and sigma, on item i's own sampling noise (seed, i) standing in for the latent, as
    pipeline.attention_scores does; or, for ToPi's re-score, on latents (B, N, C) at how's sigma."""
    h, w = items[0]["target"].shape[1:]
    out = [None] * len(items)
    groups = {}
    for i, it in enumerate(items):
        groups.setdefault(len(it["refs"]), []).append(i)
    for members in groups.values():
        every = [[torch.arange(r.shape[1] * r.shape[2]) for r in items[i]["refs"]] for i in members]
        ref, ref_ids = gather_refs([items[i] for i in members], every)
        txt = torch.stack([items[i]["txt"] for i in members])
        if latents is None:
            x = torch.stack([torch.randn(h * w, CHANNELS, generator=generator("noise", seed, i)) for i in members])
        else:
            x = latents[members]
        t = torch.full((len(members),), float(how["sigma"]))
        sc = reference_attention(model, x, grid_ids(h, w), txt, text_ids(TXT_LEN), t, ref, ref_ids, block=how["block"],
                                 queries=how["queries"], kv_pattern=how.get("kv_cache", False))  # fmt: skip
        for i, row in zip(members, sc):
            out[i] = list(row.split([r.shape[1] * r.shape[2] for r in items[i]["refs"]]))
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
    """Kept reference tokens (B, M, C) and their original ids (B, M, 4): the one place tokens drop here.
    A compact item's (train.compact_item) ids span its full-size grid."""
    refs, ids = [], []
    for item, idx in zip(items, kept):
        spans = item.get("spans") or [None] * len(item["refs"])
        tokens = [r.flatten(1).T[i] for r, i in zip(item["refs"], idx)]  # (h * w, C) rows
        pos = [reference_ids(k, *r.shape[1:], span)[i] for k, (r, i, span) in enumerate(zip(item["refs"], idx, spans))]
        refs.append(torch.cat(tokens))
        ids.append(torch.cat(pos))
    return torch.stack(refs), torch.stack(ids)


@torch.no_grad()
def sample_batch(model, items, kept, steps, seed, kv, rescore=None):
    """Images (B, 3, H, W) in [0, 1] from the sampler's denoise. Example i's noise is drawn from
    (seed, i), so an image does not depend on the batch; examples that kept the same number of
    reference tokens share a batch. rescore (K, choose): ToPi's temporal update, as
    attention_selector.generate_rescored drives it: after K steps choose(members, x, sigma_K) gives
    the members' kept tokens again and the last steps run with those."""
    h, w = items[0]["target"].shape[1:]
    out, groups = [None] * len(items), {}
    for i, idx in enumerate(kept):
        groups.setdefault(sum(len(k) for k in idx), []).append(i)
    sigmas = schedule(steps, h * w)
    for members in groups.values():
        ref, ref_ids = gather_refs([items[i] for i in members], [kept[i] for i in members])
        txt = torch.stack([items[i]["txt"] for i in members])
        x = torch.stack([torch.randn(h * w, CHANNELS, generator=generator("noise", seed, i)) for i in members])
        args = (grid_ids(h, w), txt, text_ids(TXT_LEN))
        if rescore is None:
            x = denoise(model, x, *args, sigmas, ref=ref, ref_ids=ref_ids, kv_cache=KVCache() if kv else None)
        else:
            K, choose = rescore
            x = denoise(model, x, *args, sigmas[: K + 1], ref=ref, ref_ids=ref_ids)
            ref, ref_ids = gather_refs([items[i] for i in members], choose(members, x, sigmas[K]))
            x = denoise(model, x, *args, sigmas[K:], ref=ref, ref_ids=ref_ids)
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
    """The coarse layout of thumbnail images: the means of a 4 x 4 grid of blocks (4x4 tokens, 64x64 px
    of a 256 px image), whatever the image size."""
    return F.avg_pool2d(x, x.shape[-1] // 4)


def metrics(pred, truth):
    return dict(psnr=psnr(pred, truth).mean().item(), ssim=ssim(pred, truth).mean().item(),
                coarse_psnr=psnr(coarse(pred), coarse(truth)).mean().item())  # fmt: skip


def compact_budget(factor):
    """The keep fraction a compact reference's tokens make of the full-size grid's (25/256 at factor 3)."""
    n = SIZE // 16
    return math.prod(compact_grid(n, n, factor)) / n**2


def plan(task, keeps, topi=False, rescore_steps=()):
    """[(selector, keep, models)]: what evaluate() samples for one task. Selectors beyond the paper's:
    compactS (every reference downscaled by S, its whole budget), compactS+RULE (downscaled, then RULE
    keeps `keep` of the full-size count), topi-rescoreK (ToPi's calibrated selection re-scored at step
    K). Every model runs the paper's two rules; the scaled LoRA (drop@0.5) and the compact LoRA only
    what their comparisons need."""
    aware, other = AWARE[task], ("saliency" if AWARE[task] == "canny" else "canny")
    out = [("random", 1.0, ("base", "control", "drop", "drop@0.5", "compact", "base-kv", "drop-kv"))]
    for keep in keeps:
        out += [("random", keep, ("base", "control", "drop", "base-kv", "drop-kv")),
                (aware, keep, ("base", "control", "drop", "drop@0.5", "base-kv", "drop-kv")),
                (other, keep, ("drop",)), (aware + "-cover", keep, ("drop",)), ("attention", keep, MODEL_AWARE["attention"])]
        out += [("topi", keep, ("base",))] if topi else []
        out += [("adaptive", keep, ("drop",))] if task == "multi" else []
    out += [(f"topi-rescore{k}", 0.1, ("base",)) for k in (rescore_steps if topi else ())]
    for f in COMPACT:  # at equal budget: compact references, and dropping to the same count
        b = compact_budget(f)
        out += [(f"compact{f}", b, ("base", "compact", "drop"))]
        out += [] if b in keeps else [(aware, b, ("base", "drop"))]
        if f != COMPACT[0]:  # both: downscaled by the smallest factor, then dropped to the same total
            out += [(f"compact{COMPACT[0]}+{aware}", b, ("base", "compact", "drop"))]
    return out  # fmt: skip


def evaluate(models, examples, settings, topi=None, rescore_steps=()):
    """{(model, task, selector, keep, seed): metrics} on the examples (plan() says which), next to the
    fill of every token-dropping selection; plus, for the figures, the images of the first seed at every
    keep with random and the task-aware rule, and of compact references. models: name -> Flux2; a
    name ending in -kv samples with the KV cache; plan()'s names missing from models are skipped. topi:
    the base's calibration (calibrate_topi)."""
    how = dict(attention=ATTENTION, topi=topi)
    items = [as_item(ex, COMPACT) for ex in examples]
    truth = decode(torch.stack([it["target"] for it in items]))
    results, images = {}, {}
    jobs = [(task, *p) for task in TASKS for p in plan(task, settings["keeps"], topi is not None, rescore_steps)]
    bar = tqdm(total=len(jobs) * settings["seeds"], desc="evaluating")
    for task, selector, keep, names in jobs:
        idx = [i for i, ex in enumerate(examples) if ex["task"] == task]
        names = [n for n in names if n in models]
        if not idx or not names:
            continue
        exs = [examples[i] for i in idx]
        factor = int(selector.split("+")[0][len("compact"):]) if selector.startswith("compact") else None
        its = [compact_item(items[i], [factor] * len(items[i]["refs"])) if factor else items[i] for i in idx]
        for seed in range(settings["seeds"]):
            by_model = selector in MODEL_AWARE or selector.startswith("topi-rescore")
            kept = None if by_model else choose(exs, its, keep, selector, factor, seed)
            if keep < 1 and not by_model and not factor:  # the no-model information limit (exact at keep 1)
                fill = torch.stack([nearest_fill(items[i]["target"], examples[i]["src"], k) for i, k in zip(idx, kept)])
                results[("fill", task, selector, keep, seed)] = metrics(decode(fill), truth[idx])
            for name in names:
                model, rescore = models[name], None
                if by_model:
                    rule = "topi" if selector.startswith("topi") else selector
                    kept = select(exs, keep, rule, seed, model=model, how=how[rule], items=its)
                    if selector.startswith("topi-rescore"):
                        rescore = (int(selector[len("topi-rescore"):]), rescorer(model, exs, its, keep, seed, how["topi"]))
                pred = sample_batch(model, its, kept, settings["sample_steps"], seed, name.endswith("-kv"), rescore)
                results[(name, task, selector, keep, seed)] = metrics(pred, truth[idx])
                if seed == 0 and not by_model:  # what the grids show
                    images[(name, task, selector, keep)] = pred
                    images[("kept", task, selector, keep)] = kept
            bar.update()
    bar.close()
    return results, images, truth


def choose(examples, items, keep, selector, factor, seed):
    """Kept tokens of a pixel rule: every token of a compact reference (compactS), or the rule on the
    compact pixels keeping keep of the full-size count (compactS+RULE), or the rule itself."""
    if factor is None:
        return select(examples, keep, AWARE["multi"], seed, "adaptive") if selector == "adaptive" else select(examples, keep, selector, seed)
    every = [[torch.arange(r.shape[1] * r.shape[2]) for r in it["refs"]] for it in items]
    if "+" not in selector:
        return every
    rule = selector.split("+")[1]
    small = [dict(pixels=[to_uint8(compact_pixels(px, factor)) for px in ex["pixels"]]) for ex in examples]
    fraction = lambda ev: min(1.0, keep * (SIZE // 16) ** 2 / len(ev[0]))  # of the compact grid (one size per example)
    return [select([s], fraction(ev), rule, seed * 7919 + i)[0] for i, (s, ev) in enumerate(zip(small, every))]


def rescorer(model, examples, items, keep, seed, how):
    """ToPi's temporal update for sample_batch: the calibrated rule's selection again, from the model's
    attention on the current latent at the current sigma."""

    def again(members, x, sigma):
        now = dict(how, sigma=float(sigma))
        return select([examples[i] for i in members], keep, "topi", seed, model=model, how=now,
                      items=[items[i] for i in members], latents=x)  # fmt: skip

    return again


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


def dense_scores(model, examples, settings):
    """Per example (model PSNR, grey PSNR, model coarse PSNR) at keep 1 (seed 0): what the gate and the
    redundancy check read."""
    items = [as_item(ex) for ex in examples]
    truth = decode(torch.stack([it["target"] for it in items]))
    every = [[torch.arange(r.shape[1] * r.shape[2]) for r in it["refs"]] for it in items]
    pred = sample_batch(model, items, every, settings["sample_steps"], 0, False)
    return list(zip(psnr(pred, truth).tolist(), psnr(torch.full_like(truth, 0.5), truth).tolist(),
                    psnr(coarse(pred), coarse(truth)).tolist()))  # fmt: skip


def gate(examples, scores):
    """{prompt: (model PSNR, grey PSNR)} of the dense model (dense_scores), mean over each prompt's
    examples: is it competent at every prompt before any claim about dropping is made?"""
    out = {}
    for ex, (a, b, _) in zip(examples, scores):
        out.setdefault(prompt_of(ex), []).append((a, b))
    return {k: tuple(float(np.mean(c)) for c in zip(*v)) for k, v in out.items()}


REDUNDANCY_DB = (1.0, 3.0)  # fixed before the base was trained: the fill's margin over grey, its coarse shortfall


def redundancy(examples, scores, seeds):
    """{task: {grey, fill, grey_coarse, fill_coarse, dense_coarse, passed}} (dB): can this world show claim 1?
    The fill (no model) of a random keep-0.1 selection, mean over seeds, must beat a grey image by
    REDUNDANCY_DB[0] and keep the coarse layout: its coarse PSNR within REDUNDANCY_DB[1] of the dense
    model's own (keep 1, dense_scores) or above it."""
    items = [as_item(ex) for ex in examples]
    truth = decode(torch.stack([it["target"] for it in items]))
    out = {}
    for task in TASKS:
        idx = [i for i, ex in enumerate(examples) if ex["task"] == task]
        t, fills = truth[idx], []
        for seed in range(seeds):
            kept = select([examples[i] for i in idx], 0.1, "random", seed)
            fills.append(decode(torch.stack([nearest_fill(items[i]["target"], examples[i]["src"], k) for i, k in zip(idx, kept)])))
        grey = torch.full_like(t, 0.5)
        r = dict(grey=psnr(grey, t).mean().item(), grey_coarse=psnr(coarse(grey), coarse(t)).mean().item(),
                 fill=float(np.mean([psnr(f, t).mean().item() for f in fills])),
                 fill_coarse=float(np.mean([psnr(coarse(f), coarse(t)).mean().item() for f in fills])),
                 dense_coarse=float(np.mean([scores[i][2] for i in idx])))  # fmt: skip
        r["passed"] = r["fill"] - r["grey"] >= REDUNDANCY_DB[0] and r["fill_coarse"] >= r["dense_coarse"] - REDUNDANCY_DB[1]
        out[task] = r
    return out


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
    items = [as_item(ex) for ex in examples if ex["task"] == "multi"][: settings["timing_examples"]]
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


