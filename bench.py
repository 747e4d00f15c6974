"""Benchmark Sparse Context: wall-clock speedup of dropping reference tokens, against the FLOP ideal.

    python bench.py                                   # CPU default (below), writes BENCHMARKS.md
    python bench.py --config klein-4b --size 1024 --device cuda --dtype bf16
    python bench.py --per-image                       # many images per reference set, a section of BENCHMARKS.md

For 1, 2, 4 and 6 references and keep fractions 1, 0.25, 0.1, 0.05 it times the transformer forward
and a 4-step sampling loop, without and with the reference KV cache, on random weights (speed does
not depend on the weights). "Dense" is keep 1 without a cache. Each point reports its speedup over
dense, the FLOP-ideal speedup (matmul and attention FLOPs of exactly the tokens processed) and the
efficiency = measured / ideal.

The default config fits a 2-core CPU and keeps klein-4B's balance of attention to matmul work at
1024 px: per block attention / linear FLOPs = 4 L^2 D / (26 L D^2) = 2 L / (13 D), so 512 px images
(1024 tokens) with hidden 768 have the same image-tokens-to-width ratio as 1024 px (4096 tokens) with
hidden 3072 (6 refs: 1.54 vs 1.46). Heads stay 128 wide (6 of them); 1 double and 2 single blocks
(both kinds, few enough to be quick); context_dim 768 since the text projection is a small cost.
"""

import contextlib
import ctypes
import datetime
import functools
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from files import DTYPES, ArgumentParser, check_number, check_writable, resolve_device, write_atomic
from memory_plan import activation_peak, memory_section, plan_rows
from model import Flux2, Flux2Config, KVCache, reference_attention
from klein import grid_ids, initial_noise, n_keep, schedule, text_ids
from pipeline import denoise, gather_references, generate, sample_latents, synchronize
from token_selectors import select_tokens

REFS = (1, 2, 4, 6)
KEEPS = (1.0, 0.25, 0.1, 0.05)
STEPS = 4


def bench_config(quick=False):
    if quick:  # tiny: a smoke run of every code path in seconds
        return Flux2Config(hidden_size=64, num_heads=2, axes_dim=(8, 8, 8, 8), depth=1, depth_single=1, context_dim=32)
    return Flux2Config(hidden_size=768, num_heads=6, depth=1, depth_single=2, context_dim=768)


# ----------------------------------------------------------------------------------------------
# The FLOP ideal


def forward_flops(cfg, n_txt, n_img, n_ref, mode="full"):
    """Matmul and attention (QK^T, PV) FLOPs of one batch-1 forward; elementwise ops are ignored.

    mode "full": references run and attend to everything (standard klein);
    "extract": KV pattern, text and target queries attend to all keys, reference queries to
    reference keys only; "cached": references do not run, their n_ref cached keys are attended to.
    """
    D, M, C = cfg.hidden_size, cfg.mlp_hidden, cfg.in_channels
    run_ref = 0 if mode == "cached" else n_ref
    L = n_txt + n_img + n_ref  # keys every text and target query sees
    pairs = (n_txt + n_img) * L + {"full": n_ref * L, "extract": n_ref * n_ref, "cached": 0}[mode]
    # Every token costs the same in any block: qkv 3D^2 + out D^2 + MLP 3DM multiply-adds (double
    # block streams and the fused single block alike); a query-key pair costs D for QK^T and D for PV.
    per_block = 2 * (n_txt + n_img + run_ref) * (4 * D * D + 3 * D * M) + 4 * D * pairs
    embed = 2 * (C * D * (n_img + run_ref) + cfg.context_dim * D * n_txt + D * C * n_img)
    # Per-sample vectors: timestep MLP, the three modulations, the final adaLN (again for t = 0 refs).
    vectors = 2 * (cfg.time_dim * D + D * D + 15 * D * D + 2 * D * D)
    if mode == "extract":
        vectors += 2 * (cfg.time_dim * D + D * D + 9 * D * D)
    return (cfg.depth + cfg.depth_single) * per_block + embed + vectors


def loop_flops(cfg, n_txt, n_img, n_ref, kv, steps=STEPS):
    """FLOPs of a steps-long sampling loop: every step full, or extract once then cached steps."""
    if not kv:
        return steps * forward_flops(cfg, n_txt, n_img, n_ref, "full")
    return forward_flops(cfg, n_txt, n_img, n_ref, "extract") + (steps - 1) * forward_flops(cfg, n_txt, n_img, n_ref, "cached")


# ----------------------------------------------------------------------------------------------
# Model, inputs and measurement


def build_model(cfg, device, dtype, seed=0):
    """Random weights without the slow default init: build on meta, allocate, fill once."""
    with torch.device("meta"):
        model = Flux2(cfg).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm scales
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)  # unit-variance activations
    return model.eval().requires_grad_(False)


def build_diffusers(model):
    """diffusers' Flux2Transformer2DModel sharing our weights, or None without diffusers (a dev dependency)."""
    try:
        from diffusers import Flux2Transformer2DModel
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    except ImportError:
        return None
    c = model.cfg
    with torch.device("meta"):
        twin = Flux2Transformer2DModel(
            in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single,
            attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_dim,
            axes_dims_rope=c.axes_dim, mlp_ratio=c.mlp_ratio, rope_theta=c.theta,
            timestep_guidance_channels=c.time_dim, eps=c.eps, guidance_embeds=False,
        )  # fmt: skip
    # The converter pops from the dict it gets and mostly returns views: the weights are shared.
    twin.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(model.state_dict())), assign=True)
    return twin.eval().requires_grad_(False)


def reuse_freed_memory():
    """Have glibc malloc keep and reuse freed memory; True when it took effect.

    By default glibc mmaps each allocation above its threshold (128 KB, rising to at most 32 MB) and
    unmaps it on free, so every large tensor is page-faulted in afresh; on this VM that costs more than
    an elementwise op itself (70 ms vs 16 ms for 17.7M floats), a cost per token that is not the
    model's. Caching allocators (CUDA's, jemalloc, tcmalloc) avoid it the same way.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def seconds(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of_rounds(jobs, rounds, device, log, label):
    """Each job's minimum time over rounds. Every job runs once per round, dense and sparse interleaved,
    the order reversed on odd rounds so slow drift hits both; other work on a shared machine only ever
    adds time, hence the minimum."""
    times = {k: [] for k in jobs}
    order = list(jobs)
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            times[k].append(seconds(jobs[k], device))
        log(f"  {label}: round {r + 1}/{rounds} done")
    return {k: min(v) for k, v in times.items()}


@contextlib.contextmanager
def silenced():
    """Send stdout and stderr to /dev/null at the file-descriptor level, so that the profiler's own C++
    logging (`USDT: ... profiler_start`) is silenced too."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def peak_bytes(fn, device):
    """Peak bytes torch allocates during fn() above what was live before (weights and inputs excluded)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - base
    # The CPU allocator keeps no statistics: replay the profiler's allocation and free events in order.
    from torch.profiler import ProfilerActivity, profile

    try:
        with silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    except Exception as e:  # a private profiler interface: report nothing rather than fail
        print(f"CPU memory measurement unavailable ({e})")
        return None
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


@torch.no_grad()
def bench_refs(model, twin, n_refs, args, device, dtype, log):
    """Every point for one number of references; returns (rows, diffusers row or None)."""
    cfg, side = model.cfg, args.size // 16  # one token per 16x16 pixels
    n_img, n_txt = side * side, args.text_tokens
    g = torch.Generator().manual_seed(n_refs)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    img, img_ids = rand(1, n_img, cfg.in_channels), grid_ids(side, side).to(device)
    txt, txt_ids = rand(1, n_txt, cfg.context_dim), text_ids(n_txt).to(device)
    refs = [(rand(1, n_img, cfg.in_channels), grid_ids(side, side, t=10 * (k + 1)).to(device)) for k in range(n_refs)]
    sigmas = schedule(STEPS, n_img).to(device)
    t = sigmas[:1]

    jobs = {}  # (what, keep, cache) -> callable; what: diffusers, fwd, extract, cached, loop
    if twin is not None:  # first, so that it runs right next to our dense forward in every round
        ref, ref_ids = torch.cat([r for r, _ in refs], 1), torch.cat([i for _, i in refs])
        jobs["diffusers", 1.0, "none"] = functools.partial(
            twin, hidden_states=torch.cat([img, ref], 1), encoder_hidden_states=txt, timestep=t,
            img_ids=torch.cat([img_ids, ref_ids]), txt_ids=txt_ids, return_dict=False,
        )  # fmt: skip
    for keep in KEEPS:
        idx = [torch.randperm(n_img, generator=g)[: n_keep(keep, n_img)].sort().values for _ in refs]
        ref, ref_ids = gather_references(refs, idx)  # row selection: a kept token keeps its own id
        fwd = functools.partial(model, img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
        cache = KVCache()
        fwd(kv_cache=cache)  # fills the cache for the cached-step timing (and warms the extract shapes)
        jobs["fwd", keep, "none"] = fwd
        jobs["extract", keep, "kv"] = lambda fwd=fwd: fwd(kv_cache=KVCache())
        jobs["cached", keep, "kv"] = functools.partial(model, img, img_ids, txt, txt_ids, t, kv_cache=cache)
        loop = functools.partial(denoise, model, img, img_ids, txt, txt_ids, sigmas, ref=ref, ref_ids=ref_ids)
        jobs["loop", keep, "none"] = loop
        jobs["loop", keep, "kv"] = lambda loop=loop: loop(kv_cache=KVCache())

    # Warm-up, untimed; the loops also give the peak memory (and warm every forward shape).
    memory = {k: peak_bytes(fn, device) for k, fn in jobs.items() if k[0] == "loop"}
    err = None
    if twin is not None:  # same weights, same inputs: the outputs must agree (a timing of the same work)
        ours, theirs = jobs["fwd", 1.0, "none"]().float(), jobs["diffusers", 1.0, "none"]()[0][:, :n_img].float()
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()

    best = best_of_rounds(jobs, args.rounds, device, log, f"{n_refs} refs")

    rows = []
    for keep in KEEPS:
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
    "| extract ms | 4-step s | 4-step speedup | 4-step ideal | 4-step eff | peak mem MB |"
)


def fmt_row(r):
    mb = "n/a" if r["mem"] is None else f"{r['mem'] / 2**20:.1f}"
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


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} threads"


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
        f"- model: {args.config} (hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, {cfg.depth} "
        f"double + {cfg.depth_single} single blocks, context_dim {cfg.context_dim}), random weights",
        f"- inputs: {args.size}x{args.size} target and references ({side}x{side} = {side * side} tokens each), "
        f"{args.text_tokens} text tokens, batch 1, {STEPS}-step loop",
        f"- command: `{command}`",
        f"- load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f} (other work on the machine)",
        "",
        f"Every job runs once per round, dense and sparse interleaved (order reversed on odd rounds), "
        f"{args.rounds} rounds after a warm-up; each time is the minimum over rounds, since other work only "
        "adds time, and each speedup is the ratio of two such minima from this run to dense (keep 1, no cache, "
        "same number of references). fwd: one forward (KV rows: a cached step; extract ms: the step-0 forward "
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
    out += ["## Targets", "", *target_lines(rows, dense), ""]
    write_atomic(path, "\n".join(out))


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


# ----------------------------------------------------------------------------------------------
# Many images per reference set: the reference work is paid once per run, not per image

PER_IMAGE = {1: (1, 1), 4: (1, 4), 16: (4, 4)}  # images N: (prompts, seeds per prompt)
PER_IMAGE_REFS, PER_IMAGE_KEEP = 6, 0.1
PER_IMAGE_HEADING = "## Many images per reference set: seconds per image"


def set_kv_processors(twin):
    """The attention processors Flux2KleinKVPipeline installs (its _set_kv_attn_processors)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    for block in twin.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in twin.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return twin


def diffusers_kv_loop(twin, x, x_ids, txt, txt_ids, ref, ref_ids, sigmas):
    """Flux2KleinKVPipeline's denoising loop (diffusers 0.42.1, __call__ step 7) on the twin transformer.

    With num_images_per_prompt the pipeline repeats the reference latents for every image
    (prepare_image_latents), so step 0 runs (and caches) all of them once per image; later steps
    attend to the cache. x (B, N, C); ref (1, M, C), ids 2-D.
    """
    B = x.shape[0]
    ref = ref.expand(B, -1, -1)
    common = dict(encoder_hidden_states=txt, txt_ids=txt_ids, return_dict=False)
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(B)
        if i == 0:
            v, cache = twin(hidden_states=torch.cat([ref, x], 1), img_ids=torch.cat([ref_ids, x_ids]), timestep=t,
                            kv_cache_mode="extract", num_ref_tokens=ref.shape[1], **common)  # fmt: skip
        else:
            v = twin(hidden_states=x, img_ids=x_ids, timestep=t, kv_cache=cache, kv_cache_mode="cached", **common)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def per_image_references(cfg, side, device, dtype):
    """(generator, rand, references): PER_IMAGE_REFS random references of side x side tokens, reference
    k at t = 10 (k + 1), drawn from a seeded generator that rand(*shape) goes on drawing from."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    return g, rand, [(rand(1, side * side, cfg.in_channels), grid_ids(side, side, t=10 * (k + 1)).to(device)) for k in range(PER_IMAGE_REFS)]


@torch.no_grad()
def bench_per_image(model, twin, args, device, dtype, log):
    """Seconds per image for N = 1, 4, 16 on the bench model: ours dense and keep 0.1 + KV (one batch of
    N, the references' K/V extracted once) against diffusers' KV pipeline loop (references repeated per
    image), and the floor: the cached steps alone."""
    cfg, side, n_img, n_txt = model.cfg, args.size // 16, (args.size // 16) ** 2, args.text_tokens
    g, rand, refs = per_image_references(cfg, side, device, dtype)
    ref, ref_ids = gather_references(refs, [None] * PER_IMAGE_REFS)
    kept = [torch.randperm(n_img, generator=g)[: n_keep(PER_IMAGE_KEEP, n_img)].sort().values for _ in refs]
    sparse, sparse_ids = gather_references(refs, kept)
    prompts = [f"prompt {i}" for i in range(4)]
    txts = {p: rand(1, n_txt, cfg.context_dim) for p in prompts}
    img_ids, txt_ids, sigmas = grid_ids(side, side).to(device), text_ids(n_txt).to(device), schedule(STEPS, n_img).to(device)

    jobs, todos = {}, {}  # (N, what) -> callable; N -> its (prompt, seed) pairs
    for n, (n_prompts, n_seeds) in PER_IMAGE.items():
        todo = todos[n] = [(p, s) for p in prompts[:n_prompts] for s in range(n_seeds)]
        run = functools.partial(sample_latents, model, todo, txts, side, side, STEPS, batch_size=n)
        jobs[n, "dense"] = functools.partial(run, ref=ref, ref_ids=ref_ids)
        jobs[n, "sparse_kv"] = functools.partial(run, ref=sparse, ref_ids=sparse_ids, kv_cache=True)
        x = torch.cat([initial_noise(s, cfg.in_channels, side, side, dtype) for _, s in todo]).to(device)
        txt = torch.cat([txts[p] for p, _ in todo])
        cache = KVCache()
        model(x[:1], img_ids, txt[:1], txt_ids, sigmas[:1], ref=sparse, ref_ids=sparse_ids, kv_cache=cache)
        step = functools.partial(model, x, img_ids, txt, txt_ids, sigmas[:1].expand(n), kv_cache=cache)
        jobs[n, "cached"] = lambda step=step: [step() for _ in range(STEPS)]
        if twin is not None:
            jobs[n, "diffusers_kv"] = functools.partial(diffusers_kv_loop, twin, x, img_ids, txt, txt_ids, ref, ref_ids, sigmas)
    err = None
    if twin is not None:  # timings of the same work: ours with all reference tokens + KV equals diffusers' loop
        ours = torch.cat(sample_latents(model, todos[16], txts, side, side, STEPS, ref, ref_ids, kv_cache=True, batch_size=16))
        theirs = jobs[16, "diffusers_kv"]()
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    for fn in jobs.values():  # warm-up, untimed
        fn()
    per = {k: t / k[0] for k, t in best_of_rounds(jobs, args.rounds, device, log, "per image").items()}
    rows = [dict(n=n, prompts=p, seeds=s, **{what: per.get((n, what)) for what in ("dense", "sparse_kv", "cached", "diffusers_kv")})
            for n, (p, s) in PER_IMAGE.items()]  # fmt: skip
    return rows, err


def end_to_end_per_image(rounds, log):
    """Seconds per image end to end (loading, text, references, denoising, decoding) on the tiny random
    pipeline of the tests: ours (generate) dense and keep 0.1 + KV, and diffusers' Flux2KleinKVPipeline
    with num_images_per_prompt, both loading the pipeline from disk. None without diffusers."""
    try:
        from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

        from tiny import make_pipeline_folder, photo
    except ImportError:
        return None
    prompts = [f"a photo of thing {i}" for i in range(4)]
    refs = [photo(128, 128, seed=k) for k in range(PER_IMAGE_REFS)]
    with tempfile.TemporaryDirectory() as folder:
        with silenced():  # diffusers' save progress bars
            make_pipeline_folder(Path(folder), distilled=True)

        def diffusers_run(n_prompts, n_seeds):  # loading included, as in ours
            with silenced():  # its loading progress bars
                pipe = Flux2KleinKVPipeline(**Flux2KleinPipeline.from_pretrained(folder).components)
            pipe.set_progress_bar_config(disable=True)
            gens = [torch.Generator().manual_seed(s) for _ in range(n_prompts) for s in range(n_seeds)]
            return pipe(prompt=prompts[:n_prompts], image=refs, num_images_per_prompt=n_seeds, generator=gens,
                        num_inference_steps=STEPS, output_type="np")  # fmt: skip

        jobs = {}
        for n, (n_prompts, n_seeds) in PER_IMAGE.items():
            run = functools.partial(generate, folder, prompts[:n_prompts], refs, seed=list(range(n_seeds)), batch_size=n,
                                    progress=False)  # fmt: skip
            jobs[n, "dense"] = run
            jobs[n, "sparse_kv"] = functools.partial(run, keep=PER_IMAGE_KEEP, selector="canny", kv_cache=True)
            jobs[n, "diffusers_kv"] = functools.partial(diffusers_run, n_prompts, n_seeds)
        for fn in jobs.values():
            fn()
        best = best_of_rounds(jobs, rounds, torch.device("cpu"), log, "end to end")
    per = {k: t / k[0] for k, t in best.items()}
    return [dict(n=n, prompts=p, seeds=s, **{w: per[n, w] for w in ("dense", "sparse_kv", "diffusers_kv")})
            for n, (p, s) in PER_IMAGE.items()]  # fmt: skip


def per_image_section(rows, err, e2e, args, cfg, device, dtype, command, seconds_taken):
    side = args.size // 16
    ms = lambda v: "-" if v is None else f"{v:.3f}"
    out = [
        PER_IMAGE_HEADING,
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine(device)}; torch {torch.__version__}; "
        f"{device.type}, {str(dtype).removeprefix('torch.')}",
        f"- command: `{command}` ({seconds_taken / 60:.1f} min)",
        f"- N images = prompts x seeds (1 x 1, 1 x 4, 4 x 4), all N in one batch, {PER_IMAGE_REFS} references, {STEPS} steps; "
        f"keep {PER_IMAGE_KEEP:g} + KV: {PER_IMAGE_REFS} x {n_keep(PER_IMAGE_KEEP, side * side)} reference tokens, their K/V "
        "extracted once per run by one image and shared by all (expanded, not recomputed). Each time is the minimum of "
        f"{args.rounds} round(s) after a warm-up, divided by N.",
        "",
        f"Bench model ({args.config}: hidden {cfg.hidden_size}, {cfg.depth} double + {cfg.depth_single} single blocks, random "
        f"weights), {args.size}x{args.size} target and references ({side * side} tokens each), {args.text_tokens} text tokens; "
        "the denoising loop only. diffusers: Flux2Transformer2DModel on the same weights, driven as Flux2KleinKVPipeline "
        "drives it with num_images_per_prompt (references repeated per image, so step 0 runs them N times; no token "
        "dropping)" + ("" if err is None else f"; with all reference tokens and the KV cache ours gives the same latents "
        f"(N = 16, max rel. difference {err:.1e})") + ". Floor: the cached steps alone.",
        "",
        "| N | prompts x seeds | ours dense s/image | ours keep 0.1 + KV s/image | floor: 4 cached steps s/image | diffusers KV pipeline loop s/image | dense / (keep 0.1 + KV) | (keep 0.1 + KV) / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['n']} | {r['prompts']} x {r['seeds']} | {ms(r['dense'])} | {ms(r['sparse_kv'])} | {ms(r['cached'])} "
                   f"| {ms(r['diffusers_kv'])} | {r['dense'] / r['sparse_kv']:.2f}x | {r['sparse_kv'] / r['cached']:.2f} |")  # fmt: skip
    if e2e:
        out += [
            "",
            f"End to end on the tiny random pipeline of the tests ({PER_IMAGE_REFS} references of 128x128 px, 128x128 output, "
            "fp32), everything from loading the pipeline from disk to the decoded images: ours is one `generate()` call "
            "(text encoding, reference encoding and Canny selection, denoising, decoding, each component loaded and "
            "freed in turn); diffusers is `from_pretrained` and one Flux2KleinKVPipeline call with num_images_per_prompt. "
            "At this size loading, the text encoder and the VAE dominate, not the transformer.",
            "",
            "| N | prompts x seeds | ours dense s/image | ours keep 0.1 + KV s/image | diffusers Flux2KleinKVPipeline s/image |",
            "|---|---|---|---|---|",
            *(f"| {r['n']} | {r['prompts']} x {r['seeds']} | {ms(r['dense'])} | {ms(r['sparse_kv'])} | {ms(r['diffusers_kv'])} |" for r in e2e),
        ]
    return "\n".join(out) + "\n"


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


# ----------------------------------------------------------------------------------------------
# The attention selector: what its scoring pass costs


ATTENTION_HEADING = "## The attention selector: cost of its scoring pass"


def scoring_flops(cfg, n_txt, n_img, n_ref, block=0, n_queries=None):
    """FLOPs of model.reference_attention: the blocks before `block` with every reference token, then
    the block's projections (qkv; a single block's linear1) and the scores QK^T of n_queries (default:
    the target's) against every key. Embedding and per-sample vectors as one full forward."""
    D, L = cfg.hidden_size, n_txt + n_img + n_ref
    outside = forward_flops(replace(cfg, depth=0, depth_single=0), n_txt, n_img, n_ref, "full")
    per_block = (forward_flops(cfg, n_txt, n_img, n_ref, "full") - outside) / (cfg.depth + cfg.depth_single)
    projection = 3 * D if block < cfg.depth else 3 * D + 2 * cfg.mlp_hidden  # a single block's fused linear1
    return outside + block * per_block + 2 * L * projection * D + 2 * (n_queries or n_img) * L * D


def bench_attention(model, args, device, dtype, log):
    """At PER_IMAGE_REFS references and keep PER_IMAGE_KEEP: the scoring pass (block 0, target
    queries) alone, and the 4-step loop end to end with the pass and the selection included, without
    and with the KV cache, against the dense loop; each next to its FLOP ideal."""
    cfg, side, n_img, n_txt = model.cfg, args.size // 16, (args.size // 16) ** 2, args.text_tokens
    g, rand, refs = per_image_references(cfg, side, device, dtype)
    ref, ref_ids = gather_references(refs, [None] * PER_IMAGE_REFS)
    img, img_ids, txt, txt_ids = rand(1, n_img, cfg.in_channels), grid_ids(side, side).to(device), rand(1, n_txt, cfg.context_dim), text_ids(n_txt).to(device)
    sigmas = schedule(STEPS, n_img).to(device)
    score = functools.partial(reference_attention, model, img, img_ids, txt, txt_ids, sigmas[:1], ref, ref_ids)

    def sparse_loop(kv):
        scores = score(kv_pattern=kv)[0].split(n_img)
        kept = [select_tokens(s, PER_IMAGE_KEEP, seed=k) for k, s in enumerate(scores)]
        return denoise(model, img, img_ids, txt, txt_ids, sigmas, *gather_references(refs, kept), kv_cache=KVCache() if kv else None)

    jobs = {"score": score, "dense": functools.partial(denoise, model, img, img_ids, txt, txt_ids, sigmas, ref, ref_ids),
            "sparse": functools.partial(sparse_loop, False), "sparse_kv": functools.partial(sparse_loop, True)}  # fmt: skip
    for fn in jobs.values():  # warm-up, untimed
        fn()
    best = best_of_rounds(jobs, args.rounds, device, log, "attention selector")
    n_ref, dense_ref = PER_IMAGE_REFS * n_keep(PER_IMAGE_KEEP, n_img), PER_IMAGE_REFS * n_img
    f_score, f_dense = scoring_flops(cfg, n_txt, n_img, dense_ref), loop_flops(cfg, n_txt, n_img, dense_ref, kv=False)
    return dict(score_s=best["score"], dense_s=best["dense"], step_s=best["dense"] / STEPS,
                score_of_step=best["score"] / (best["dense"] / STEPS), score_of_step_ideal=f_score / (f_dense / STEPS),
                **{f"{k}_speedup": best["dense"] / best[k] for k in ("sparse", "sparse_kv")},
                **{f"{k}_ideal": f_dense / (f_score + loop_flops(cfg, n_txt, n_img, n_ref, kv)) for k, kv in (("sparse", False), ("sparse_kv", True))})  # fmt: skip


def attention_section(r, args, cfg, device, dtype, command):
    return "\n".join([
        ATTENTION_HEADING, "",
        f"- command: `{command}`; {machine(device)}, torch {torch.__version__}, {dtype}; bench config (hidden {cfg.hidden_size}, "
        f"{cfg.depth} double + {cfg.depth_single} single blocks), {args.size} px, {PER_IMAGE_REFS} references, keep {PER_IMAGE_KEEP:g}, "
        f"{STEPS} steps, {args.rounds} round(s) after a warm-up, minimum of each.",
        "- the pass: model.reference_attention at block 0 with the target's queries, every reference token, the first "
        "step's sigma; end to end: the pass, the selection (select_tokens on its scores) and the sampling loop of the kept tokens, "
        "against the dense loop (every reference token, no cache). Ideal: FLOPs (bench.scoring_flops, loop_flops).", "",
        "| what | measured | FLOP ideal |", "|---|---|---|",
        f"| scoring pass / one dense step | {r['score_of_step']:.3f} ({1e3 * r['score_s']:.0f} ms / {1e3 * r['step_s']:.0f} ms) | {r['score_of_step_ideal']:.3f} |",
        f"| scoring pass / dense {STEPS}-step run | {r['score_of_step'] / STEPS:.3f} | {r['score_of_step_ideal'] / STEPS:.3f} |",
        f"| speedup end to end, pass included, no cache | {r['sparse_speedup']:.2f}x | {r['sparse_ideal']:.2f}x |",
        f"| speedup end to end, pass included, KV cache | {r['sparse_kv_speedup']:.2f}x | {r['sparse_kv_ideal']:.2f}x |",
    ]) + "\n"  # fmt: skip


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
    check_text = "; ".join(f"{k} {p / 2**20:.1f} MB planned vs {m / 2**20:.1f} MB measured" for k, (p, m) in check.items())
    log(f"memory plan vs measured on the CPU: {check_text}")
    configs = {"tiny": small} if quick else {n: Flux2Config.from_name(n) for n in ("klein-4b", "klein-9b")}
    n_txt = 16 if quick else 512
    rows = plan_rows(configs, sides=(64,) if quick else (512, 1024), n_txt=n_txt)
    return memory_section(rows, check_text, command, n_txt)


# ----------------------------------------------------------------------------------------------


def check_args(args):
    """Every option before anything runs; a ValueError names it."""
    if args.per_image and args.refs is not None:
        raise ValueError(f"--refs cannot apply with --per-image (always {PER_IMAGE_REFS} references)")
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
    if sum(map(bool, (args.per_image, args.memory, args.attention_cost))) > 1:
        raise ValueError("--per-image, --memory and --attention-cost are separate runs: give one")
    if args.attention_cost and args.refs is not None:
        raise ValueError(f"--refs cannot apply with --attention-cost (always {PER_IMAGE_REFS} references)")
    outputs = [args.out_md] + ([] if args.per_image or args.memory or args.attention_cost else [args.out_png])
    for path, ext in zip(outputs, (".md", ".png")):
        if not path.endswith(ext):
            raise ValueError(f"{path}: expected a {ext} file")
        check_writable(path)
    return device, dtype


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, choices=["bench", "klein-4b", "klein-9b"],
                   help="model shape: bench = the small CPU config described above; klein-4b/9b = the real shapes (None: bench)")
    p.add_argument("--size", type=int, default=None, help="target and reference side in pixels, a multiple of 16 (None: 512; 256 with --per-image; 64 with --quick)")
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
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: the GPU memory plan for klein-4B/9B from shapes (memory_plan.py), checked "
                        "against a measured CPU peak, written into its section of --out-md")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model and images, 1 round, 1 thread: a smoke test")
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
    quick = dict(size=64, text_tokens=8, rounds=1, threads=1)  # tiny ops gain nothing from threads
    given = [f"--{k.replace('_', '-')}" for k in quick if getattr(args, k) is not None]
    if args.quick and given:
        p.error(f"{', '.join(given)} cannot apply with --quick (it sets its own)")
    defaults = quick if args.quick else dict(size=256 if args.per_image else 512, text_tokens=512, rounds=3,
                                             threads=len(os.sched_getaffinity(0)))  # fmt: skip
    for k, v in defaults.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    folder = "bench-quick" if args.quick else ""  # a smoke run never overwrites the committed report
    args.out_md = args.out_md or os.path.join(folder, "BENCHMARKS.md")
    args.out_png = args.out_png or os.path.join(folder, "benchmarks.png")
    try:
        device, dtype = check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    args.refs = args.refs or list(REFS)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)])
    log = lambda msg: print(msg, flush=True)
    if args.attention_cost:
        cfg = bench_config(args.quick) if args.config in (None, "bench") else Flux2Config.from_name(args.config)
        model = build_model(cfg, device, dtype)
        section = attention_section(bench_attention(model, args, device, dtype, log), args, cfg, device, dtype, command)
        write_atomic(args.out_md, replace_section(args.out_md, section))
        log(section)
        log(f"wrote {args.out_md}")
        return
    if args.memory:
        section = memory_report(args.quick, command, log)
        write_atomic(args.out_md, replace_section(args.out_md, section))
        log(section)
        log(f"wrote {args.out_md}")
        return
    malloc_tuned = device.type == "cpu" and reuse_freed_memory()
    if device.type == "cpu" and not malloc_tuned:
        log("could not tune glibc malloc: large tensors will be page-faulted in afresh")

    cfg = bench_config(args.quick) if args.config in (None, "bench") else Flux2Config.from_name(args.config)
    start, load = time.perf_counter(), [os.getloadavg()[0]]
    model = build_model(cfg, device, dtype)
    twin = None if args.no_diffusers else build_diffusers(model)
    if twin is None and not args.no_diffusers:
        log("diffusers not importable: no comparison")
    log(f"{machine(device)}, torch {torch.__version__}, {args.config} {args.size}px, {dtype}")
    if args.per_image:
        rows, err = bench_per_image(model, twin and set_kv_processors(twin), args, device, dtype, log)
        e2e = None if args.no_diffusers or args.quick else end_to_end_per_image(args.rounds, log)
        section = per_image_section(rows, err, e2e, args, cfg, device, dtype, command, time.perf_counter() - start)
        write_atomic(args.out_md, replace_section(args.out_md, section))
        log(section)
        log(f"wrote {args.out_md}")
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
    log("targets (measured, not asserted):")
    for line in target_lines(rows, dense):
        log(line)
    log(f"wrote {args.out_md} and {args.out_png}")


if __name__ == "__main__":
    main()
