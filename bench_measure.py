"""The measuring instruments every bench section shares (bench.py, bench_per_image.py,
bench_attention.py, memory plan check): the bench config and its random-weight model (and diffusers'
twin of it), the FLOP ideal of a forward and of a sampling loop, timing as the best of interleaved
rounds, the peak bytes a call allocates, the machine's name.

May import: model, pipeline, quant; diffusers only when asked (build_diffusers). No other bench file.
"""

import contextlib
import ctypes
import os
import sys
import time

import torch

from model import Flux2, Flux2Config
from pipeline import synchronize
from quant import BLOCKS, FORMATS, Linear8

STEPS = 4  # every sampling loop timed (klein's distilled default)


def bench_config(quick=False):
    """The bench config (bench.py's docstring says why these shapes), or the tiny one of a --quick run."""
    if quick:  # tiny: a smoke run of every code path in seconds
        return Flux2Config(hidden_size=64, num_heads=2, axes_dim=(8, 8, 8, 8), depth=1, depth_single=1, context_dim=32)
    return Flux2Config(hidden_size=768, num_heads=6, depth=1, depth_single=2, context_dim=768)


def describe(name, cfg):
    """What every report says of its model: the weights are always random, only the shapes matter."""
    what = {"quick": "the tiny --quick config", "bench": "the bench config"}.get(name, name)
    return (f"random weights at {what}'s shapes (hidden {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}, "
            f"{cfg.depth} double + {cfg.depth_single} single blocks, context_dim {cfg.context_dim})")  # fmt: skip


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
# Random-weight models, timing and memory


def build_model(cfg, device, dtype, seed=0, weights=None):
    """Random weights without the slow default init: build on meta, allocate on device, fill once (no
    copy passes through host memory: klein-9B's 16.9 GiB go straight to the GPU).

    weights "int8" or "fp8": the blocks' Linears are quant.Linear8, as quant.from_pretrained lays them
    out, holding random 8-bit values uniform over the format's range and one row scale that gives the
    weight the 16-bit layers' spread (in^-1/2).
    """
    with torch.device("meta"):
        model = Flux2(cfg).to(dtype)
        if weights:
            for name, m in list(model.named_modules()):
                if isinstance(m, torch.nn.Linear) and name.startswith(BLOCKS):
                    model.set_submodule(name, Linear8(m.in_features, m.out_features, weights))
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        eight_bit = [m for m in model.modules() if isinstance(m, Linear8)]
        for m in eight_bit:  # one layer at a time: at most one float32 temporary of its size (fp8)
            top = FORMATS[weights][1]
            if weights == "int8":
                m.weight.copy_(torch.randint(-127, 128, m.weight.shape, generator=g, device=device, dtype=torch.int8))
            else:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, device=device).mul_(2 * top).sub_(top))
            m.weight_scale.fill_((3 / m.in_features) ** 0.5 / top)  # uniform(-a, a) has std a / sqrt(3)
        skip = {id(m.weight) for m in eight_bit}
        for p in model.parameters():
            if id(p) in skip:
                continue
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

    By default glibc mmaps each allocation above its threshold (128 KiB, rising to at most 32 MiB) and
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


def machine(device):
    """The GPU's name, or the CPU's and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} threads"

