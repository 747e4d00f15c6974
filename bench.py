"""Benchmark Sparse Context: wall-clock speedup of dropping reference tokens, against the FLOP ideal.

    python bench.py                  # CPU default (below), writes BENCHMARKS.md: more than 10 minutes on 2 CPU cores
    python bench.py --quick          # a smoke run of every code path in seconds (bench-quick/; timings mean nothing)
    python bench.py --config klein-4b --size 1024 --device cuda --dtype bf16
    python bench.py --per-image      # many images per reference set, a section of BENCHMARKS.md (bench_per_image.py)
    python bench.py --attention-cost # the attention selector's scoring pass, a section (bench_attention.py)
    python bench.py --memory         # the GPU memory plan from shapes, a section (memory_plan.py)
    python bench.py --many-refs      # 4 and 16 references at 384 px beside RefRoute's and klein-9b-kv's figures, a section
    python gpu_check.py              # on a GPU: checks, speed and memory at klein's real shapes (GPU.md)

For 1, 2, 4 and 6 references and keep fractions 1, 0.25, 0.1, 0.05 it times the transformer forward
and a 4-step sampling loop, without and with the reference KV cache, on random weights (speed does
not depend on the weights). "Dense" is keep 1 without a cache. Each point reports its speedup over
dense, the FLOP-ideal speedup (matmul and attention FLOPs of exactly the tokens processed) and the
efficiency = measured / ideal. Every timed forward calls the model as the sampling loop does (the
RoPE table computed once per run, t in the model's dtype; point_jobs), so a compiled model meets the
loop's three graphs and no other (gpu_check.py times klein-4B compiled through the same jobs).

The default config fits a 2-core CPU and keeps klein-4B's balance of attention to matmul work at
1024 px: per block attention / linear FLOPs = 4 L^2 D / (26 L D^2) = 2 L / (13 D), so 512 px images
(1024 tokens) with hidden 768 have the same image-tokens-to-width ratio as 1024 px (4096 tokens) with
hidden 3072 (6 refs: 1.54 vs 1.46). Heads stay 128 wide (6 of them); 1 double and 2 single blocks
(both kinds, few enough to be quick); context_dim 768 since the text projection is a small cost.

This file: the main speed table, its report and plot, the --many-refs section, the memory-plan check
and the command line; bench_measure.py holds the FLOP model and the measuring every section shares.
May import: bench_measure, bench_per_image, bench_attention, memory_plan, files, klein, model, pipeline.
"""

import datetime
import functools
import os
import shlex
import sys
import time

import torch

from bench_attention import attention_section, bench_attention
from bench_measure import (STEPS, bench_config, best_of_rounds, build_diffusers, build_model, describe, forward_flops,
                           loop_flops, machine, peak_bytes, reuse_freed_memory)  # fmt: skip
from bench_per_image import (PER_IMAGE_KEEP, PER_IMAGE_REFS, bench_per_image, end_to_end_per_image, per_image_section,
                             set_kv_processors)  # fmt: skip
from files import DTYPES, ArgumentParser, check_number, check_writable, check_writable_folder, fail, resolve_device, write_atomic
from klein import grid_ids, n_keep, schedule, text_ids
from memory_plan import GIB, activation_peak, memory_section, plan_rows
from model import Flux2Config, KVCache
from pipeline import denoise, gather_references

REFS = (1, 2, 4, 6)
KEEPS = (1.0, 0.25, 0.1, 0.05)
MIB = GIB // 1024  # small sizes: MiB (2^20 bytes)
FULL_RUN = "more than 10 minutes on 2 CPU cores"  # what a full CPU run of the table or of --per-image takes
SMOKE = "a smoke run (--quick): tiny model and images, one round, to run every code path; its timings mean nothing"


def random_inputs(cfg, side, n_txt, n_refs, device, dtype):
    """(generator, inputs, references) of one number of references, seeded by it: the target and text
    (inputs: img, img_ids, txt, txt_ids and the loop's sigmas) and n_refs references of side x side
    tokens, each (tokens, ids). The generator then draws the kept tokens (kept_references)."""
    n_img = side * side  # one token per 16x16 pixels
    g = torch.Generator().manual_seed(n_refs)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    img, img_ids = rand(1, n_img, cfg.in_channels), grid_ids(side, side).to(device)
    txt, txt_ids = rand(1, n_txt, cfg.context_dim), text_ids(n_txt).to(device)
    refs = [(rand(1, n_img, cfg.in_channels), grid_ids(side, side, t=10 * (k + 1)).to(device)) for k in range(n_refs)]
    return g, dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, sigmas=schedule(STEPS, n_img).to(device)), refs


def kept_references(refs, keep, n_img, g):
    """(ref, ref_ids): a random `keep` fraction of each reference's tokens; a kept token keeps its own id."""
    idx = [torch.randperm(n_img, generator=g)[: n_keep(keep, n_img)].sort().values for _ in refs]
    return gather_references(refs, idx)


def loop_t(sigmas, dtype):
    """The first step's t exactly as denoise hands it to the model (a compiled model meets one input)."""
    return (sigmas[0] * 1000).expand(1).to(dtype) / 1000


def point_jobs(model, x, ref, ref_ids, kv=True):
    """The timed calls of one point, {(what, cache): callable}, each calling the model as the sampling
    loop does (the RoPE table computed once per run, t in the model's dtype), so a compiled model meets
    three graphs: fwd (a step, references included), extract (the step that fills a KV cache), cached
    (a step reading a filled cache), and the 4-step loops without (loop, none) and with (loop, kv) it.
    kv=False: the first and the fourth only (no cache is filled)."""
    img, img_ids, txt, txt_ids, sigmas = (x[k] for k in ("img", "img_ids", "txt", "txt_ids", "sigmas"))
    pe, t = model.rope(txt_ids, img_ids, ref_ids), loop_t(sigmas, img.dtype)
    fwd = functools.partial(model, img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, pe=pe)
    loop = functools.partial(denoise, model, img, img_ids, txt, txt_ids, sigmas, ref=ref, ref_ids=ref_ids, pe=pe)
    if not kv:
        return {("fwd", "none"): fwd, ("loop", "none"): loop}
    cache = KVCache()
    fwd(kv_cache=cache)  # fills the cache for the cached-step timing (and warms the extract shapes)
    fresh = pe[:, : txt.shape[1] + img.shape[1]]  # a cached step's [text | target] rows, as denoise passes them
    return {
        ("fwd", "none"): fwd,
        ("extract", "kv"): lambda: fwd(kv_cache=KVCache()),
        ("cached", "kv"): functools.partial(model, img, img_ids, txt, txt_ids, t, kv_cache=cache, pe=fresh),
        ("loop", "none"): loop,
        ("loop", "kv"): lambda: loop(kv_cache=KVCache()),
    }


def sweep_flops(cfg, n_txt, n_img, n_refs, keeps, rounds):
    """FLOPs of one bench_refs call without diffusers: every point's fill, the warm-up loops, then `rounds`
    rounds of every job (what a caller with a time budget estimates a sweep's duration from)."""
    total = 0
    for keep in keeps:
        n_ref = n_refs * n_keep(keep, n_img)
        full, extract, cached = (forward_flops(cfg, n_txt, n_img, n_ref, m) for m in ("full", "extract", "cached"))
        loops = loop_flops(cfg, n_txt, n_img, n_ref, kv=False) + loop_flops(cfg, n_txt, n_img, n_ref, kv=True)
        total += extract + loops + rounds * (full + extract + cached + loops)
    return total


@torch.no_grad()
def bench_refs(model, twin, n_refs, args, device, dtype, log, keeps=KEEPS):
    """Every point for one number of references; returns (rows, diffusers row or None)."""
    cfg, side = model.cfg, args.size // 16
    n_img, n_txt = side * side, args.text_tokens
    g, x, refs = random_inputs(cfg, side, n_txt, n_refs, device, dtype)

    jobs = {}  # (what, keep, cache) -> callable; what: diffusers, fwd, extract, cached, loop
    if twin is not None:  # first, so that it runs right next to our dense forward in every round
        ref, ref_ids = torch.cat([r for r, _ in refs], 1), torch.cat([i for _, i in refs])
        jobs["diffusers", 1.0, "none"] = functools.partial(
            twin, hidden_states=torch.cat([x["img"], ref], 1), encoder_hidden_states=x["txt"], timestep=loop_t(x["sigmas"], dtype),
            img_ids=torch.cat([x["img_ids"], ref_ids]), txt_ids=x["txt_ids"], return_dict=False,
        )  # fmt: skip
    for keep in keeps:
        for (what, cache), fn in point_jobs(model, x, *kept_references(refs, keep, n_img, g)).items():
            jobs[what, keep, cache] = fn

    # Warm-up, untimed; the loops also give the peak memory (and warm every forward shape).
    memory = {k: peak_bytes(fn, device) for k, fn in jobs.items() if k[0] == "loop"}
    err = None
    if twin is not None:  # same weights, same inputs: the outputs must agree (a timing of the same work)
        ours, theirs = jobs["fwd", 1.0, "none"]().float(), jobs["diffusers", 1.0, "none"]()[0][:, :n_img].float()
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()

    best = best_of_rounds(jobs, args.rounds, device, log, f"{n_refs} refs")

    rows = []
    for keep in keeps:
        n_ref = n_refs * n_keep(keep, n_img)
        dense_n = n_refs * n_img
        for cache in ("none", "kv"):
            kv = cache == "kv"
            fwd_key = ("cached" if kv else "fwd", keep, cache)
            f_dense = forward_flops(cfg, n_txt, n_img, dense_n)
            f_point = forward_flops(cfg, n_txt, n_img, n_ref, "cached" if kv else "full")
            l_dense = loop_flops(cfg, n_txt, n_img, dense_n, kv=False)
            l_point = loop_flops(cfg, n_txt, n_img, n_ref, kv)
            row = dict(refs=n_refs, keep=keep, ref_tokens=n_ref, cache=cache)
            row["fwd_s"] = best[fwd_key]
            row["fwd_speedup"] = best["fwd", 1.0, "none"] / best[fwd_key]
            row["fwd_ideal"] = f_dense / f_point
            row["extract_s"] = best["extract", keep, cache] if kv else None
            row["loop_s"] = best["loop", keep, cache]
            row["loop_speedup"] = best["loop", 1.0, "none"] / best["loop", keep, cache]
            row["loop_ideal"] = l_dense / l_point
            row["mem"] = memory["loop", keep, cache]
            rows.append(row)
    dense = None
    if twin is not None:
        d = ("diffusers", 1.0, "none")
        ours = best["fwd", 1.0, "none"]
        dense = dict(refs=n_refs, ours_s=ours, diffusers_s=best[d], ratio=ours / best[d], err=err)
    return rows, dense


# ----------------------------------------------------------------------------------------------
# Reporting


HEADER = (
    "| refs | keep | ref tokens | cache | fwd ms | fwd speedup | fwd ideal | fwd eff "
    "| extract ms | 4-step s | 4-step speedup | 4-step ideal | 4-step eff | peak mem MiB |"
)


def fmt_row(r):
    mb = "n/a" if r["mem"] is None else f"{r['mem'] / MIB:.1f}"
    ext = "-" if r["extract_s"] is None else f"{1e3 * r['extract_s']:.1f}"
    return (
        f"| {r['refs']} | {r['keep']:g} | {r['ref_tokens']} | {r['cache']} | {1e3 * r['fwd_s']:.1f} "
        f"| {r['fwd_speedup']:.2f}x | {r['fwd_ideal']:.2f}x | {r['fwd_speedup'] / r['fwd_ideal']:.2f} | {ext} "
        f"| {r['loop_s']:.3f} | {r['loop_speedup']:.2f}x | {r['loop_ideal']:.2f}x "
        f"| {r['loop_speedup'] / r['loop_ideal']:.2f} | {mb} |"
    )


def target_lines(rows, dense):
    """The targets (measured here, never asserted in tests)."""
    effs = sorted((min(r["fwd_speedup"] / r["fwd_ideal"], r["loop_speedup"] / r["loop_ideal"]), i) for i, r in enumerate(rows))
    low = [f"{rows[i]['refs']} refs keep {rows[i]['keep']:g} {rows[i]['cache']} ({e:.2f})" for e, i in effs if e < 0.9]
    verdict = "MET" if not low else f"missed at {len(low)} of {len(rows)} points, worst: " + "; ".join(low[:3])
    lines = [f"- efficiency >= 0.9 at every point (fwd and 4-step): min {effs[0][0]:.2f} -> {verdict}"]
    pick = {(r["refs"], r["keep"], r["cache"]): r for r in rows}
    if (6, 0.1, "none") in pick:
        a, b = pick[6, 0.1, "none"], pick[6, 0.1, "kv"]
        lines.append(f"- 6 refs keep 0.1, no cache >= 4x: forward {a['fwd_speedup']:.2f}x, 4-step {a['loop_speedup']:.2f}x "
                     f"-> {'MET' if a['fwd_speedup'] >= 4 else 'missed'}")  # fmt: skip
        lines.append(f"- 6 refs keep 0.1, KV cache >= 6.72x over dense 4-step: {b['loop_speedup']:.2f}x "
                     f"-> {'MET' if b['loop_speedup'] >= 6.72 else 'missed'}")  # fmt: skip
    if dense:
        worst = max(d["ratio"] for d in dense)
        lines.append(f"- dense forward ours / diffusers <= 1.05: max {worst:.3f} -> {'MET' if worst <= 1.05 else 'missed'}")
    return lines


def write_markdown(path, rows, dense, args, cfg, device, dtype, command, load, malloc_tuned):
    side = args.size // 16
    if device.type == "cuda":
        notes = "torch.cuda.max_memory_allocated during the 4-step loop, above the weights and inputs."
    else:
        notes = ("measured: the peak of the bytes torch allocates during the 4-step loop, above the weights "
                 "and inputs (torch.profiler allocation events; not RSS). glibc malloc "
                 + ("was set to reuse freed memory (see reuse_freed_memory), as jemalloc or tcmalloc would."
                    if malloc_tuned else "kept its defaults (large tensors page-faulted in afresh)."))  # fmt: skip
    out = [
        "# Sparse Context benchmark",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine(device)}; torch {torch.__version__}; {device.type}, {str(dtype).removeprefix('torch.')}",
        f"- model: {describe(args.config, cfg)}",
        f"- inputs: {args.size}x{args.size} target and references ({side}x{side} = {side * side} tokens each), "
        f"{args.text_tokens} text tokens, batch 1, {STEPS}-step loop",
        f"- command: `{command}`",
        f"- load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f} (other work on the machine)",
        *([f"- {SMOKE}"] if args.quick else []),
        "",
        f"Every job runs once per round, dense and sparse interleaved (order reversed on odd rounds), "
        f"{args.rounds} rounds after a warm-up; each time is the minimum over rounds, since other work only "
        "adds time, and each speedup is the ratio of two such minima from this run to dense (keep 1, no cache, "
        "same number of references). fwd: one step's forward (KV rows: a cached step; extract ms: the step-0 forward "
        "that fills the cache). 4-step: the sampling loop (KV: step 0 extracts the reference K/V, steps 1-3 "
        "reuse them). ideal = dense FLOPs / point FLOPs (matmuls plus QK^T and PV of exactly the tokens "
        f"processed; elementwise work ignored); eff = speedup / ideal. Peak memory: {notes}",
        "",
        HEADER,
        "|" + "---|" * (HEADER.count("|") - 1),
        *map(fmt_row, rows),
        "",
    ]
    if dense:
        out += [
            "## Dense forward: ours vs diffusers' Flux2Transformer2DModel (same weights)",
            "",
            "| refs | ours ms | diffusers ms | ours / diffusers | max rel. output difference |",
            "|---|---|---|---|---|",
            *(f"| {d['refs']} | {1e3 * d['ours_s']:.1f} | {1e3 * d['diffusers_s']:.1f} | {d['ratio']:.3f} | {d['err']:.1e} |" for d in dense),
            "",
        ]
    out += ["## Targets", "", *(["Not evaluated: " + SMOKE] if args.quick else target_lines(rows, dense)), ""]
    write_atomic(path, "\n".join(out))


# ----------------------------------------------------------------------------------------------
# Many references (--many-refs): 4 and 16, beside the published speedups

MANY_REFS, MANY_KEEPS = (4, 16), (1.0, 0.1, 0.0625)  # 0.0625 = 1/16: 256 of a 1024 px reference's 4096 tokens
MANY_HEADING = "## 16 references: measured, and beside RefRoute's and klein-9b-kv's published speedups"


def published_lines(rows, cfg, n_txt, n_img):
    """RefRoute's and BFL klein-9b-kv's published speedups beside the FLOP ideal of the same work in our
    FLOP model at their setting (klein-9B, 1024 px references and output, 512 text tokens) and beside
    the ratios measured in this run at the bench shapes (rows: --many-refs' rows of cfg, n_txt text and
    n_img tokens an image)."""
    k9, per_ref = Flux2Config.from_name("klein-9b"), 4096

    def ideal(n_refs, keep, kv, steps, n_img=4096):  # dense (keep 1, no cache) over the point, klein-9B
        dense = loop_flops(k9, 512, n_img, n_refs * per_ref, kv=False, steps=steps)
        return dense / loop_flops(k9, 512, n_img, n_refs * n_keep(keep, per_ref), kv, steps=steps)

    pick = {(r["refs"], r["keep"], r["cache"]): r for r in rows}
    fmt = lambda speedup, ideal_: f"{speedup:.2f}x (ideal {ideal_:.2f}x)"
    cells = {}
    if (16, 0.0625, "kv") in pick:
        a, b, dense = pick[16, 0.0625, "none"], pick[16, 0.0625, "kv"], pick[16, 1.0, "none"]
        cells["rr4"] = f"keep 1/16: {fmt(a['loop_speedup'], a['loop_ideal'])}; + KV: {fmt(b['loop_speedup'], b['loop_ideal'])}"
        # 50 steps from this run's step times (a 50-step loop is not timed): dense 50 F, keep 1/16 50 F', + KV E + 49 C
        kv50 = 50 * dense["fwd_s"] / (b["extract_s"] + 49 * b["fwd_s"])
        ideal50 = loop_flops(cfg, n_txt, n_img, 16 * n_img, kv=False, steps=50) / loop_flops(cfg, n_txt, n_img, b["ref_tokens"], True, steps=50)
        cells["rr50"] = f"keep 1/16: {fmt(a['fwd_speedup'], a['fwd_ideal'])}; + KV: {fmt(kv50, ideal50)} (from the step times)"
    if (4, 1.0, "kv") in pick:
        c = pick[4, 1.0, "kv"]
        cells["bfl"] = f"keep 1 + KV, 4 refs: {fmt(c['loop_speedup'], c['loop_ideal'])}"
    missing = "not in this run"
    return [
        "| published | steps | its speedup | what it compares | FLOP ideal of the same tokens, klein-9B, 1024 px (ours) "
        "| measured here, bench model (its own FLOP ideal) |",
        "|---|---|---|---|---|---|",
        f"| RefRoute (arXiv 2610.07720), 16 refs | 4 | 14.2x | its klein-9B LoRA (rank 128), each reference at 256 tokens "
        f"(4x downsampled) plus a pixel-residual path, against klein-9B with all 16 x 4096 reference tokens "
        f"| keep 1/16 (the same 256 tokens a reference): {ideal(16, 0.0625, False, 4):.1f}x; + KV cache: "
        f"{ideal(16, 0.0625, True, 4):.1f}x | {cells.get('rr4', missing)} |",
        f"| RefRoute, 16 refs | 50 | 18.3x | the same | keep 1/16: {ideal(16, 0.0625, False, 50):.1f}x; + KV cache: "
        f"{ideal(16, 0.0625, True, 50):.1f}x | {cells.get('rr50', missing)} |",
        f"| BFL FLUX.2-klein-9b-kv, 4 refs | 4 | 1.85-2.66x | klein-9b-kv (a separately trained checkpoint) computing "
        f"the references' K/V at step 0 and reusing them at steps 1-3, against klein-9B running every reference "
        f"token at every step; all tokens kept | keep 1 + KV cache: {ideal(4, 1.0, True, 4):.2f}x (512 px output: "
        f"{ideal(4, 1.0, True, 4, n_img=1024):.2f}x) | {cells.get('bfl', missing)} |",
        "",
        "- FLOP ideal: dense FLOPs / point FLOPs of the transformer's sampling loop (bench_measure.loop_flops: "
        "matmuls and attention of exactly the tokens processed), at klein-9B's shapes with 1024 px references "
        "(4096 tokens each), a 1024 px output and 512 text tokens; with the KV cache step 0 extracts and later "
        "steps attend to the cache. It counts neither the text encoder nor the VAE.",
        "- RefRoute: keep 1/16 holds the same number of reference tokens as RefRoute's 256 a reference (ours at "
        "full resolution at a subset of positions, RefRoute's every position at 1/4 resolution), so the ideal "
        "without a cache is the most its transformer could gain without its residual path, whose cost is not "
        "counted. Its 50- and 4-step figures differ while a step's token ratio does not depend on the step "
        "count, so its figures must include work that does not scale with the steps (encoding references, "
        "decoding; only the paper's summary was read here, not its setup). It uses no KV cache; our keep 1/16 + "
        f"KV composes both. At 50 steps CFG's two passes a step (base checkpoints; one extraction serves both) "
        f"change the KV ideal by {100 * abs(ideal(16, 0.0625, True, 100) / ideal(16, 0.0625, True, 50) - 1):.1f}%.",
        "- klein-9b-kv: our keep 1 + KV cache is the same computation (references at t = 0 attending only to "
        "references, K/V after QK-norm and RoPE reused); its published range spans output sizes and reference "
        "counts, the ideal is given at 1024 and 512 px output.",
        "- measured here: the bench model's ratios in the table above (4-step loop, best of rounds, interleaved) "
        "next to their own FLOP ideal at the bench shapes; at 50 steps, from the table's step times (dense "
        "forward F, extract E, cached C: 50 F / (E + 49 C)).",
    ]


def many_refs_section(rows, args, cfg, device, dtype, command, seconds, load):
    """The --many-refs section of BENCHMARKS.md: its table and the published speedups beside it."""
    side = args.size // 16
    return "\n".join([
        MANY_HEADING, "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine(device)}; torch {torch.__version__}; "
        f"{device.type}, {str(dtype).removeprefix('torch.')}",
        f"- command: `{command}` ({seconds / 60:.1f} min)",
        f"- model: {describe(args.config, cfg)}",
        f"- inputs: {args.size}x{args.size} target and references ({side}x{side} = {side * side} tokens each; a smaller size "
        f"than the first table's keeps 16 references affordable on a CPU), {args.text_tokens} text tokens, batch 1, "
        f"{STEPS}-step loop; keep 0.0625 = 1/16 (RefRoute's 256 of 4096 tokens a reference)",
        f"- load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f}",
        *([f"- {SMOKE}"] if args.quick else []),
        f"- columns as in the first table: {args.rounds} rounds after a warm-up, interleaved, minimum of each; speedups "
        "over dense (keep 1, no cache, same references) from this run; ideal = FLOP ratio; eff = speedup / ideal.",
        "", HEADER, "|" + "---|" * (HEADER.count("|") - 1), *map(fmt_row, rows), "",
        "### Beside the published speedups (FLOP ideal at the same step counts)", "",
        *published_lines(rows, cfg, args.text_tokens, side * side), "",
    ])  # fmt: skip


def plot(path, rows, refs):
    """Speedup of the 4-step loop vs references: solid no cache, dashed KV cache, faint the ideal."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, keep in enumerate(KEEPS):
        for cache, style in (("none", "-"), ("kv", "--")):
            pts = [r for r in rows if r["keep"] == keep and r["cache"] == cache]
            x = [r["refs"] for r in pts]
            label = f"keep {keep:g}" + (" + KV cache" if cache == "kv" else "")
            ax.plot(x, [r["loop_speedup"] for r in pts], style, marker="o", color=f"C{i}", label=label)
            ax.plot(x, [r["loop_ideal"] for r in pts], style, color=f"C{i}", alpha=0.2, linewidth=4)
    values = [v for r in rows for v in (r["loop_speedup"], r["loop_ideal"])]
    ticks = [2**i for i in range(-4, 8) if min(values) / 1.2 <= 2**i <= 1.2 * max(values)]
    ax.set(xlabel="references", ylabel=f"speedup over dense ({STEPS}-step loop)", yscale="log", xticks=refs)
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_yticks([], minor=True)
    ax.set_title("Sparse Context speedup (faint, wide: the FLOP ideal)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def replace_section(path, section):
    """path's text with the section of the same heading (its first line) replaced, or appended; the rest
    is kept as it is."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Sparse Context benchmark\n"
    start = text.find(section.split("\n", 1)[0])
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    return text.rstrip("\n") + "\n\n" + section


def write_section(path, section, log):
    """Write one section into the report at path (the rest kept), and show it."""
    write_atomic(path, replace_section(path, section))
    log(section)
    log(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Memory plan


def memory_check(cfg, n_txt, n_img, n_ref, rank=4):
    """(planned, measured) peak bytes of a sampling step with the KV cache and a training step with and
    without checkpointing, planned on the meta device and measured by the profiler on this CPU (fp32)."""
    cases = dict(sample_kv=dict(kv=True), train=dict(train=True), train_ckpt=dict(train=True, checkpointing=True))
    out = {}
    for name, kw in cases.items():
        planned = activation_peak(cfg, n_txt, n_img, n_ref, rank=rank, dtype=torch.float32, **kw)
        measured = peak_bytes(activation_peak(cfg, n_txt, n_img, n_ref, rank=rank, device="cpu", dtype=torch.float32, **kw),
                              torch.device("cpu"))  # fmt: skip
        out[name] = planned, measured
    return out


def memory_report(quick, command, log):
    """The memory plan section: klein-4B and klein-9B (a tiny config with --quick), and its CPU check."""
    small = bench_config(quick=True)
    check = memory_check(small, 16, 64, 96) if quick else memory_check(bench_config(), 64, 256, 6 * 26)
    check_text = "; ".join(f"{k} {p / MIB:.1f} MiB planned vs {m / MIB:.1f} MiB measured" for k, (p, m) in check.items())
    log(f"memory plan vs measured on the CPU: {check_text}")
    configs = {"tiny": small} if quick else {n: Flux2Config.from_name(n) for n in ("klein-4b", "klein-9b")}
    n_txt = 16 if quick else 512
    rows = plan_rows(configs, sides=(64,) if quick else (512, 1024), n_txt=n_txt)
    return memory_section(rows, check_text, command, n_txt)


# ----------------------------------------------------------------------------------------------


def check_args(args, own=None):
    """Every option before anything runs; a ValueError names it. own: the folder of a default output
    (a smoke run's bench-quick), created once every option passed."""
    if args.per_image and args.refs is not None:
        raise ValueError(f"--refs cannot apply with --per-image (always {PER_IMAGE_REFS} references)")
    if args.many_refs and args.refs is not None:
        raise ValueError(f"--refs cannot apply with --many-refs (always {' and '.join(map(str, MANY_REFS))} references)")
    for r in args.refs or []:
        check_number("--refs", r, 1, 64, integer=True)
    check_number("--rounds", args.rounds, 1, 100, integer=True)
    check_number("--threads", args.threads, 1, 1024, integer=True)
    check_number("--size", args.size, 16, 4096, integer=True)
    if args.size % 16:
        raise ValueError(f"--size must be a multiple of 16, got {args.size}")
    check_number("--text-tokens", args.text_tokens, 1, 4096, integer=True)
    if args.quick and args.config not in (None, "bench"):
        raise ValueError("--quick uses its own tiny config: --config cannot apply")
    device, dtype = resolve_device(args.device, DTYPES[args.dtype] if args.dtype else None)
    if sum(map(bool, (args.per_image, args.memory, args.attention_cost, args.many_refs))) > 1:
        raise ValueError("--per-image, --memory, --attention-cost and --many-refs are separate runs: give one")
    if args.attention_cost and args.refs is not None:
        raise ValueError(f"--refs cannot apply with --attention-cost (always {PER_IMAGE_REFS} references)")
    outputs = [args.out_md] + ([] if args.per_image or args.memory or args.attention_cost or args.many_refs else [args.out_png])
    create = own and any(os.path.dirname(path) == own for path in outputs)
    for path, ext in zip(outputs, (".md", ".png")):
        if not path.endswith(ext):
            raise ValueError(f"{path}: expected a {ext} file")
        if create and os.path.dirname(path) == own:
            check_writable_folder(own)
        else:
            check_writable(path)
    if create:
        os.makedirs(own, exist_ok=True)
    return device, dtype


def main(argv=None):
    title = __doc__.partition("\n")[0]
    p = ArgumentParser(description=f"{title} A full CPU run (the table, or --per-image) takes {FULL_RUN}; --quick is a smoke run of seconds.")
    p.add_argument("--config", default=None, choices=["bench", "klein-4b", "klein-9b"],
                   help="model shape: bench = the small CPU config described above; klein-4b/9b = the real shapes (None: bench)")
    p.add_argument("--size", type=int, default=None, help="target and reference side in pixels, a multiple of 16 (None: 512; 256 with --per-image; "
                                                          "384 with --many-refs; 64 with --quick)")  # fmt: skip
    p.add_argument("--text-tokens", type=int, default=None, help="text sequence length (None: 512, as klein pads; 8 with --quick)")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="None: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--refs", type=int, nargs="+", default=None, help=f"numbers of references to time (None: {' '.join(map(str, REFS))})")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per point, after one warm-up round (None: 3; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (None: every core; 1 with --quick)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the comparison with diffusers")
    p.add_argument("--per-image", action="store_true",
                   help="time many images per reference set instead (N = 1, 4, 16; dense vs keep 0.1 + KV vs diffusers' KV "
                        "pipeline, bench model and end to end) and write that section into --out-md")  # fmt: skip
    p.add_argument("--attention-cost", action="store_true",
                   help=f"instead: the attention selector's scoring pass against a dense step, and the end-to-end speedup with it, "
                        f"{PER_IMAGE_REFS} references, keep {PER_IMAGE_KEEP:g} (its section of --out-md)")  # fmt: skip
    p.add_argument("--many-refs", action="store_true",
                   help=f"instead: {' and '.join(map(str, MANY_REFS))} references at --size (None: 384), keep "
                        f"{' / '.join(f'{k:g}' for k in MANY_KEEPS)}, with and without the KV cache, next to the FLOP ideal, and "
                        "RefRoute's and klein-9b-kv's published speedups beside the FLOP ideal at their settings (its section of --out-md; "
                        "about 6 minutes on 2 CPU cores; never diffusers)")  # fmt: skip
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: the GPU memory plan for klein-4B/9B from shapes (memory_plan.py), checked "
                        "against a measured CPU peak, written into its section of --out-md")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model and images, 1 round, 1 thread: a smoke test of every code path in seconds; its timings mean nothing")
    p.add_argument("--out-md", default=None, help="markdown report (None: BENCHMARKS.md; bench-quick/BENCHMARKS.md with --quick)")
    p.add_argument("--out-png", default=None, help="speedup plot (None: benchmarks.png; bench-quick/benchmarks.png with --quick)")
    args = p.parse_args(argv)
    if args.memory:
        given = [o for o, v in (("--per-image", args.per_image), ("--refs", args.refs), ("--rounds", args.rounds),
                                ("--size", args.size), ("--text-tokens", args.text_tokens), ("--config", args.config),
                                ("--device", args.device), ("--dtype", args.dtype), ("--no-diffusers", args.no_diffusers),
                                ("--out-png", args.out_png)) if v]  # fmt: skip
        if given:
            p.error(f"{', '.join(given)} cannot apply with --memory (a plan from shapes for klein-4B and klein-9B)")
    if args.many_refs and args.out_png:
        p.error("--out-png cannot apply with --many-refs (it draws no plot)")
    quick = dict(size=64, text_tokens=8, rounds=1, threads=1)  # tiny ops gain nothing from threads
    given = [f"--{k.replace('_', '-')}" for k in quick if getattr(args, k) is not None]
    if args.quick and given:
        p.error(f"{', '.join(given)} cannot apply with --quick (it sets its own)")
    defaults = quick if args.quick else dict(size=256 if args.per_image else 384 if args.many_refs else 512, text_tokens=512, rounds=3,
                                             threads=len(os.sched_getaffinity(0)))  # fmt: skip
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    folder = "bench-quick" if args.quick else ""  # a smoke run never overwrites the committed report
    args.out_md = args.out_md or os.path.join(folder, "BENCHMARKS.md")
    args.out_png = args.out_png or os.path.join(folder, "benchmarks.png")
    try:
        device, dtype = check_args(args, own=folder or None)
    except ValueError as e:
        fail(e)
    args.refs = args.refs or list(REFS)
    args.config = "quick" if args.quick else args.config or "bench"
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)])
    log = lambda msg: print(msg, flush=True)
    if args.memory:
        write_section(args.out_md, memory_report(args.quick, command, log), log)
        return
    if args.quick:
        log(SMOKE)
    elif device.type == "cpu" and not args.attention_cost:
        took = "about 6 minutes on 2 idle CPU cores" if args.many_refs else FULL_RUN
        log(f"a full run with the default options takes {took} (--quick: a smoke run of seconds)")
    cfg = bench_config(args.quick) if args.config in ("quick", "bench") else Flux2Config.from_name(args.config)
    if args.attention_cost:
        model = build_model(cfg, device, dtype)
        write_section(args.out_md, attention_section(bench_attention(model, args, device, dtype, log), args, cfg, device,
                                                     dtype, command), log)  # fmt: skip
        return
    malloc_tuned = device.type == "cpu" and reuse_freed_memory()
    if device.type == "cpu" and not malloc_tuned:
        log("could not tune glibc malloc: large tensors will be page-faulted in afresh")

    start, load = time.perf_counter(), [os.getloadavg()[0]]
    model = build_model(cfg, device, dtype)
    if args.many_refs:
        log(f"{machine(device)}, torch {torch.__version__}, {dtype}, {args.size} px; model: {describe(args.config, cfg)}")
        log(HEADER)
        rows = []
        for n_refs in MANY_REFS:
            rows += bench_refs(model, None, n_refs, args, device, dtype, log, keeps=MANY_KEEPS)[0]
            for row in rows[-2 * len(MANY_KEEPS) :]:
                log(fmt_row(row))
        load.append(os.getloadavg()[0])
        write_section(args.out_md, many_refs_section(rows, args, cfg, device, dtype, command, time.perf_counter() - start, load), log)
        return
    twin = None if args.no_diffusers else build_diffusers(model)
    if twin is None and not args.no_diffusers:
        log("diffusers not importable: no comparison")
    log(f"{machine(device)}, torch {torch.__version__}, {dtype}, {args.size} px; model: {describe(args.config, cfg)}")
    if args.per_image:
        rows, err = bench_per_image(model, twin and set_kv_processors(twin), args, device, dtype, log)
        e2e = None if args.no_diffusers or args.quick else end_to_end_per_image(args.rounds, log)
        write_section(args.out_md, per_image_section(rows, err, e2e, args, cfg, device, dtype, command,
                                                     time.perf_counter() - start), log)  # fmt: skip
        return
    log(HEADER)
    rows, dense = [], []
    for n_refs in args.refs:
        r, d = bench_refs(model, twin, n_refs, args, device, dtype, log)
        rows += r
        dense += [d] if d else []
        for row in r:
            log(fmt_row(row))
        if d:
            log(f"  dense forward ours {1e3 * d['ours_s']:.1f} ms, diffusers {1e3 * d['diffusers_s']:.1f} ms, "
                f"ratio {d['ratio']:.3f}, max rel. output difference {d['err']:.1e}")  # fmt: skip
    load.append(os.getloadavg()[0])
    write_markdown(args.out_md, rows, dense, args, cfg, device, dtype, command, load, malloc_tuned)
    plot(args.out_png, rows, args.refs)
    if args.quick:
        log(f"no targets evaluated: {SMOKE}")
    else:
        log("targets (measured, not asserted):")
        for line in target_lines(rows, dense):
            log(line)
    log(f"wrote {args.out_md} and {args.out_png}")


if __name__ == "__main__":
    main()
