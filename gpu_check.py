"""Check your GPU: the paths only a GPU takes, checked on this card, and what Sparse Context gains on it.

    python gpu_check.py                  # on a GPU: writes GPU.md, about 7 minutes on one H100, no download
    python gpu_check.py --checks-only    # the correctness checks alone (about a minute on a GPU)
    python gpu_check.py --quick          # tiny shapes: a smoke run of every path in under a minute
                                         # (what a CPU always runs; writes bench-quick/GPU.md)

Exit status 1 when a check fails (GPU.md's verdict and the last line name it); a bad option is one
`error:` line (status 1) before anything is built. The weights are random at klein's real shapes:
speed and memory do not depend on their values, so nothing is downloaded.

What it runs, in order (GPU.md has a section each):
1. The card: name, memory, NVIDIA driver, torch, CUDA, cuDNN and Triton versions, TF32's state.
2. Checks, each at the tolerance of the CPU test that proves the same thing (test_sparse_model,
   test_sparse_sample): fp32 1e-5 and bf16 1e-2 of the largest reference value (a model's bf16 or TF32
   output: 1e-2 relative RMS, since its largest value's last bit alone is 0.4-0.8%); 8-bit bitwise.
   - model.sdpa_lse (output and log-sum-exp) and model.cached_attention (fresh and cached keys merged
     by their log-sum-exps; a cache per image and one shared by the batch) against one attention over
     the concatenated keys (float32 math), fp32 and bf16, naming the fused kernel that ran; odd lengths,
     so the efficient kernel's padded log-sum-exp rows are met;
   - quant.Linear8 (int8, fp8) against F.linear of its dequantized weight, forward and backward, and
     the dequantized weight against the CPU's;
   - the model (bench_config: klein's 128-wide heads, 3 blocks) in fp32 on the card against the CPU,
     with TF32 off (torch's default; nothing here turns it on) and on; a step reading the KV cache
     against the same step in the KV pattern without one (fp32, bf16);
   - torch.compile as `sample.py --compile` does it (cli.compiled) against eager: one sampling step's
     velocity (fp32, bf16).
3. Speed, klein-4B at 1024 px in bf16: 1, 6 and 16 references, keep 1 / 0.1 / 0.0625, without and
   with the KV cache, one forward and the 4-step loop (bench.bench_refs: best of interleaved rounds),
   each speedup over dense next to its FLOP ideal; each loop's measured peak memory
   (torch.cuda.max_memory_allocated above the weights and inputs) beside memory_plan's.
4. Memory, klein-9B with 8-bit weights (random int8 quant.Linear8 built on the card, no 16.9 GiB bf16
   copy anywhere): the weights, a sampling step with the KV cache and a rank-16 LoRA training step with
   gradient checkpointing (as train.py: bf16 autocast, AdamW), 1024 px, 6 references keep 0.1:
   measured beside the plan, and the smallest card the training total fits.
5. Compiled, klein-4B: the 1- and 6-reference keep-0.1 points compiled (cli.compiled: fullgraph,
   static shapes, three graphs a point) timed in one interleaved run with eager at the same point and
   eager dense, next to the FLOP ideal.

Time on one H100 (bf16, taking ~400 TFLOP/s): a klein-4B forward at 1024 px with 16 references
(70,144 tokens) is 1.94 PFLOP, 1.51 of it attention: about 5 s. bench.sweep_flops: the 16-reference
sweep (warm-up and 2 rounds) is 44 PFLOP, ~110 s; 6 references 12 PFLOP, ~30 s; 1 reference 4 PFLOP,
~10 s. Compiling klein-4B takes roughly 30-45 s a graph: the compiled section (6 graphs) ~3-4 min; the
checks' small compiles and klein-9B under a minute each. About 7 minutes in all. --budget (480 s)
bounds it: a part whose FLOPs, at the rate measured so far, would end past it is skipped, and GPU.md
says so; so is a part the memory plan says the card cannot hold.

May import: gpu_checks, bench, bench_measure, memory_plan, cli, files, klein, lora, model, pipeline, quant.
"""

import datetime
import gc
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

import bench
import lora
from bench_measure import bench_config, build_model, forward_flops, machine, peak_bytes, seconds
from files import ArgumentParser, check_number, check_writable, check_writable_folder, fail, resolve_device, write_atomic
from gpu_checks import Check, compile_like_cli, first_line, rel_err, run_checks
from klein import n_keep
from memory_plan import GIB, activation_peak, dequantized_bytes, fits, kv_cache_bytes, weight_bytes
from model import Flux2Config, KVCache
from pipeline import synchronize

MIB = GIB // 1024
REFS, KEEPS = (1, 6, 16), (1.0, 0.1, 0.0625)  # 0.0625 = 1/16: RefRoute's 256 of 4096 tokens a reference
COMPILED_POINTS = ((1, 0.1), (6, 0.1))  # (references, keep) compiled: 3 graphs each
NINE_B_POINT, LORA_RANK = (6, 0.1), 16  # klein-9B's sampling and training steps
COMPILE_GUESS_S = 45  # seconds a klein-4B graph takes to compile, until one has been measured


def shapes(tiny):
    """The run's shapes: klein's real ones, or tiny ones (a CPU; --quick)."""
    if tiny:
        small = bench_config(quick=True)
        return SimpleNamespace(tiny=True, check=small, check_side=4, check_txt=8, attention=(2, 2, 37, 53), linear=(48, 64),
                               speed=small, speed_name="the tiny --quick config", size=64, text_tokens=8,
                               nine=Flux2Config(hidden_size=64, num_heads=2, axes_dim=(8, 8, 8, 8), depth=2, depth_single=2,
                                                context_dim=32), nine_name="a tiny stand-in (hidden 64, 2 + 2 blocks)")  # fmt: skip
    return SimpleNamespace(tiny=False, check=bench_config(), check_side=16, check_txt=64, attention=(2, 8, 509, 1531),
                           linear=(768, 1024), speed=Flux2Config.from_name("klein-4b"), speed_name="klein-4B", size=1024,
                           text_tokens=512, nine=Flux2Config.from_name("klein-9b"), nine_name="klein-9B")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Time and memory: budget, card


class Budget:
    """The seconds left of --budget and the FLOP rate measured so far: whether a part still fits."""

    def __init__(self, seconds):
        self.seconds, self.end, self.rate = seconds, time.perf_counter() + seconds, None

    def allows(self, flops, extra_s=0.0):
        """(fits, estimated seconds, seconds left) for work of `flops` plus extra_s seconds."""
        need, left = extra_s + (flops / self.rate if self.rate else 0.0), self.end - time.perf_counter()
        return need <= left, need, left

    def skip_note(self, need, left):
        if self.rate is None and need == 0:  # nothing timed yet: the checks spent it
            return f"skipped: {max(left, 0):.0f} s of --budget {self.seconds:g} s left"
        return f"skipped: it needs about {need:.0f} s (its FLOPs at the rate measured so far), {max(left, 0):.0f} s of --budget {self.seconds:g} s left"


def card_bytes(device):
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device, model=None):
    """Bytes allocated on the card (CUDA), or the model's tensors' bytes (CPU, which keeps no count)."""
    if device.type == "cuda":
        synchronize(device)
        return torch.cuda.memory_allocated(device)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) if model is not None else 0


# ----------------------------------------------------------------------------------------------
# Speed (eager) and the memory plan beside it


def speed_section(device, dtype, S, args, budget, log):
    """klein-4B (S.speed) at every (references, keep, cache) point: bench.bench_refs' rows, each with
    the plan's activation peak; {rows, notes}."""
    cfg, n_img, n_txt = S.speed, (S.size // 16) ** 2, S.text_tokens
    model = build_model(cfg, device, dtype)
    bargs = SimpleNamespace(size=S.size, text_tokens=n_txt, rounds=args.rounds)
    rows, notes = [], []
    try:
        for n_refs in REFS:
            plans = {(keep, kv): activation_peak(cfg, n_txt, n_img, n_refs * n_keep(keep, n_img), kv=kv, dtype=dtype)
                     for keep in KEEPS for kv in (False, True)}  # fmt: skip
            # what the sweep holds at once: the weights, a filled cache per keep (the cached-step timings), the largest step
            need = allocated(device, model) + sum(kv_cache_bytes(cfg, n_refs * n_keep(k, n_img)) for k in KEEPS) + max(plans.values())
            if card_bytes(device) and need > 0.95 * card_bytes(device):
                notes.append(f"{n_refs} references: skipped: the memory plan needs {need / GIB:.1f} GiB at once, "
                             f"the card has {card_bytes(device) / GIB:.1f} GiB")  # fmt: skip
                continue
            flops = bench.sweep_flops(cfg, n_txt, n_img, n_refs, KEEPS, args.rounds)
            ok, est, left = budget.allows(flops)
            if not ok:
                notes.append(f"{n_refs} references: {budget.skip_note(est, left)}")
                continue
            log(f"speed: {n_refs} references ({flops / 1e15:.1f} PFLOP)")
            start = time.perf_counter()
            try:
                sweep = bench.bench_refs(model, None, n_refs, bargs, device, dtype, log, keeps=KEEPS)[0]
            except torch.OutOfMemoryError as e:
                notes.append(f"{n_refs} references: out of memory ({first_line(e)}); the plan needed {need / GIB:.1f} GiB")
                continue  # the exception and its frames are gone here: their tensors can be freed
            finally:
                free_memory(device)
            budget.rate = flops / (time.perf_counter() - start)
            for r in sweep:
                r["plan"] = plans[r["keep"], r["cache"] == "kv"]
                log(speed_row(r))
            rows += sweep
    finally:
        del model
        free_memory(device)
    return dict(rows=rows, notes=notes)


SPEED_HEADER = bench.HEADER + " planned MiB | measured / planned |"


def speed_row(r):
    ratio = "n/a" if r["mem"] is None else f"{r['mem'] / r['plan']:.2f}"
    return f"{bench.fmt_row(r)} {r['plan'] / MIB:.1f} | {ratio} |"


# ----------------------------------------------------------------------------------------------
# klein-9B with 8-bit weights: memory of a sampling and a training step


def nine_b_section(device, dtype, S, args, budget, log):
    """klein-9B (S.nine) with random int8 Linear8 blocks: weights, a sampling step with the KV cache and
    a LoRA training step with checkpointing, measured beside the plan; {rows, notes}."""
    cfg, (n_refs, keep) = S.nine, NINE_B_POINT
    side = S.size // 16
    n_img, n_txt = side * side, S.text_tokens
    n_ref = n_refs * n_keep(keep, n_img)
    step_flops = forward_flops(cfg, n_txt, n_img, n_ref, "extract") + forward_flops(cfg, n_txt, n_img, n_ref, "cached")
    train_flops = 4 * forward_flops(cfg, n_txt, n_img, n_ref)  # forward, its recomputation, backward (2x)
    ok, est, left = budget.allows((2 + args.rounds) * (step_flops + train_flops))
    if not ok:
        return dict(rows=[], notes=[budget.skip_note(est, left)])
    log(f"memory: {S.nine_name}, 8-bit weights")
    free_memory(device)
    before = allocated(device)
    model = build_model(cfg, device, dtype, weights="int8")
    weights = allocated(device, model) - before
    deq = dequantized_bytes(cfg)
    g, x, refs = bench.random_inputs(cfg, side, n_txt, n_refs, device, dtype)
    ref, ref_ids = bench.kept_references(refs, keep, n_img, g)
    img, img_ids, txt, txt_ids = x["img"], x["img_ids"], x["txt"], x["txt_ids"]
    pe, t = model.rope(txt_ids, img_ids, ref_ids), bench.loop_t(x["sigmas"], dtype)

    @torch.no_grad()
    def sample_step():  # the step that extracts the cache, then one reading it (the plan's sample_kv)
        cache = KVCache()
        model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_cache=cache, pe=pe)
        model(img, img_ids, txt, txt_ids, t, kv_cache=cache, pe=pe[:, : n_txt + n_img])

    sample_peak = peak_bytes(sample_step, device)  # also the warm-up
    sample_s = min(seconds(sample_step, device) for _ in range(args.rounds))

    lora.inject(model, rank=LORA_RANK)  # train.py's default targets over the 8-bit base, float32 factors
    model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    noise = torch.randn(img.shape, generator=g).to(device, dtype)
    s = torch.full((1,), 0.5, device=device)

    def train_step():  # train.gradient's step: bf16 autocast on a GPU, flow-matching loss, clip, AdamW
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x_t = ((1 - s) * img.float() + s * noise.float()).to(dtype)
            v = model(x_t, img_ids, txt, txt_ids, s, ref=ref, ref_ids=ref_ids)
            loss = (v.float() - (noise.float() - img.float())).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    train_step()  # warm-up: allocates AdamW's moments, so the measured step holds what every later step holds
    held = [*params, *(p.grad for p in params), *(t for st in opt.state.values() for t in st.values() if torch.is_tensor(t))]
    lora_state = sum(t.numel() * t.element_size() for t in held)
    train_peak = peak_bytes(train_step, device)
    train_s = min(seconds(train_step, device) for _ in range(args.rounds))
    plan_lora = weight_bytes(cfg, 16, LORA_RANK) - weight_bytes(cfg, 16)
    plan_sample = activation_peak(cfg, n_txt, n_img, n_ref, kv=True, dtype=dtype) + deq
    plan_train = activation_peak(cfg, n_txt, n_img, n_ref, train=True, checkpointing=True, rank=LORA_RANK, dtype=dtype) + deq
    total = None if train_peak is None else weights + lora_state + train_peak
    plan_total = weight_bytes(cfg, 8) + plan_lora + plan_train
    rows = [
        ("weights: block Linears int8 + a float32 scale a row, the rest bf16", weights, weight_bytes(cfg, 8)),
        ("LoRA state: float32 factors, gradients, AdamW moments", lora_state, plan_lora),
        (f"sampling step with the KV cache (extract + a cached step), peak above weights; {1e3 * sample_s:.0f} ms", sample_peak, plan_sample),
        (f"LoRA training step (rank {LORA_RANK}, checkpointing), peak above weights and LoRA state; {1e3 * train_s:.0f} ms", train_peak, plan_train),
        ("training in all: weights + LoRA state + step peak", total, plan_total),
    ]
    notes = [f"{n_refs} references keep {keep:g} ({n_ref} reference tokens), {S.size} px target, {n_txt} text tokens, "
             f"{dtype_name(dtype)} activations; the plan adds the largest block Linear dequantized to bf16 "
             f"({deq / MIB:.0f} MiB) to each step's activations. Training in all fits a {fits(plan_total / GIB)} card by the plan"
             + ("" if total is None else f", a {fits(total / GIB)} card by the measurement") + " (CUDA context on top)."]  # fmt: skip
    return dict(rows=rows, notes=notes)


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Compiled: klein-4B at the compiled points, in one run with eager


@torch.no_grad()
def compiled_point(model, n_refs, keep, S, args, device, dtype, backend, log):
    """One point compiled (three graphs: step, extract, cached), timed in one interleaved run with eager
    at the same point and eager dense; rows without and with the KV cache."""
    from torch._dynamo.utils import counters

    cfg, side, n_txt = model.cfg, S.size // 16, S.text_tokens
    n_img = side * side
    n_ref = n_refs * n_keep(keep, n_img)
    g, x, refs = bench.random_inputs(cfg, side, n_txt, n_refs, device, dtype)
    dense = bench.point_jobs(model, x, *bench.kept_references(refs, 1.0, n_img, g), kv=False)
    ref, ref_ids = bench.kept_references(refs, keep, n_img, g)
    eager = bench.point_jobs(model, x, ref, ref_ids)
    torch._dynamo.reset()
    counters.clear()
    twin = compile_like_cli(model, backend)
    start = time.perf_counter()
    comp = bench.point_jobs(twin, x, ref, ref_ids)  # compiles the extract graph (it fills the cache)
    memory = {c: peak_bytes(comp["loop", c], device) for c in ("none", "kv")}  # compiles the step and the cached graphs
    compile_s, graphs = time.perf_counter() - start, counters["stats"]["unique_graphs"]
    err = {c: rel_err(comp[w, c](), eager[w, c]()) for w, c in (("fwd", "none"), ("cached", "kv"))}
    jobs = {("dense", "fwd", "none"): dense["fwd", "none"], ("dense", "loop", "none"): dense["loop", "none"]}
    for variant, js in (("eager", eager), ("compiled", comp)):
        for key in (("fwd", "none"), ("cached", "kv"), ("loop", "none"), ("loop", "kv")):
            jobs[(variant, *key)] = js[key]
    for fn in jobs.values():  # warm-up, untimed
        fn()
    best = bench.best_of_rounds(jobs, args.rounds, device, log, f"compiled, {n_refs} refs keep {keep:g}")
    rows = []
    for cache in ("none", "kv"):
        kv = cache == "kv"
        step = "cached" if kv else "fwd"
        f_dense, f_point = forward_flops(cfg, n_txt, n_img, n_refs * n_img), forward_flops(cfg, n_txt, n_img, n_ref, step if kv else "full")
        l_dense = bench.loop_flops(cfg, n_txt, n_img, n_refs * n_img, kv=False)
        rows.append(dict(refs=n_refs, keep=keep, ref_tokens=n_ref, cache=cache, graphs=graphs, compile_s=compile_s, err=err["kv" if kv else "none"],
                         fwd=(best["eager", step, cache], best["compiled", step, cache]), fwd_dense=best["dense", "fwd", "none"], fwd_ideal=f_dense / f_point,
                         loop=(best["eager", "loop", cache], best["compiled", "loop", cache]), loop_dense=best["dense", "loop", "none"],
                         loop_ideal=l_dense / bench.loop_flops(cfg, n_txt, n_img, n_ref, kv), mem=memory[cache],
                         plan=activation_peak(cfg, n_txt, n_img, n_ref, kv=kv, dtype=dtype)))  # fmt: skip
    torch._dynamo.reset()
    return rows


def compiled_section(device, dtype, S, args, budget, log):
    """The compiled points, each if the budget still holds it; {rows, notes, backend}."""
    backend = "eager" if S.tiny else "inductor"
    cfg, n_img, n_txt = S.speed, (S.size // 16) ** 2, S.text_tokens
    rows, notes, per_graph = [], [], COMPILE_GUESS_S
    model = build_model(cfg, device, dtype)
    try:
        for n_refs, keep in COMPILED_POINTS:
            n_ref = n_refs * n_keep(keep, n_img)
            full, extract, cached = (forward_flops(cfg, n_txt, n_img, n_ref, m) for m in ("full", "extract", "cached"))
            # each round: dense step and loop (5 dense steps), then eager and compiled: step, cached step, both loops
            flops = (2 + args.rounds) * (5 * forward_flops(cfg, n_txt, n_img, n_refs * n_img) + 2 * (5 * full + extract + 4 * cached))
            ok, est, left = budget.allows(flops, 0 if S.tiny else 3 * per_graph)
            if not ok:
                notes.append(f"{n_refs} references keep {keep:g}: {budget.skip_note(est, left)}")
                continue
            log(f"compiled: {n_refs} references keep {keep:g} ({n_ref} reference tokens)")
            try:
                point = compiled_point(model, n_refs, keep, S, args, device, dtype, backend, log)
            except torch.OutOfMemoryError as e:
                notes.append(f"{n_refs} references keep {keep:g}: out of memory ({first_line(e)})")
                continue
            finally:
                free_memory(device)
            per_graph = point[0]["compile_s"] / max(point[0]["graphs"], 1)
            for r in point:
                log(compiled_row(r))
            rows += point
    finally:
        del model
        free_memory(device)
    return dict(rows=rows, notes=notes, backend=backend)


COMPILED_HEADER = ("| refs | keep | cache | graphs, compile s | compiled vs eager output | fwd ms eager / compiled | compiled fwd "
                   "speedup over eager dense | fwd ideal | fwd gain of compiling | 4-step s eager / compiled | compiled 4-step "
                   "speedup over eager dense | 4-step ideal | 4-step gain of compiling | peak MiB measured / planned |")  # fmt: skip


def compiled_row(r):
    (fe, fc), (le, lc) = r["fwd"], r["loop"]
    mem = "n/a" if r["mem"] is None else f"{r['mem'] / MIB:.1f}"
    return (f"| {r['refs']} | {r['keep']:g} | {r['cache']} | {r['graphs']}, {r['compile_s']:.0f} | {r['err']:.1e} | "
            f"{1e3 * fe:.1f} / {1e3 * fc:.1f} | {r['fwd_dense'] / fc:.2f}x | {r['fwd_ideal']:.2f}x | {fe / fc:.2f}x | "
            f"{le:.3f} / {lc:.3f} | {r['loop_dense'] / lc:.2f}x | {r['loop_ideal']:.2f}x | {le / lc:.2f}x | "
            f"{mem} / {r['plan'] / MIB:.1f} |")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The card and the report


def versions(device):
    """GPU.md's first lines: the card, its driver, torch, CUDA, cuDNN, Triton, TF32."""
    triton = "not installed"
    try:
        import triton

        triton = triton.__version__
    except ImportError:
        pass
    if device.type != "cuda":
        lines = [f"- device: {machine(device)}; no GPU: tiny shapes (the smoke run); timings and sizes mean nothing"]
    else:
        p = torch.cuda.get_device_properties(device)
        driver = "unknown (no nvidia-smi)"
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"],
                                  capture_output=True, text=True, timeout=20)  # fmt: skip
            driver = done.stdout.strip() or driver
        except (OSError, subprocess.SubprocessError):
            pass
        api = getattr(torch._C, "_cuda_getDriverVersion", lambda: 0)()
        lines = [f"- card: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / GIB:.1f} GiB, {p.multi_processor_count} SMs",
                 f"- NVIDIA driver {driver} (CUDA {api // 1000}.{api % 1000 // 10}); CUDA runtime {torch.version.cuda}; "
                 f"cuDNN {torch.backends.cudnn.version()}"]  # fmt: skip
    lines.append(f"- torch {torch.__version__}; Triton {triton}; Python {platform.python_version()}")
    lines.append(f"- TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}, float32 matmul "
                 f"precision '{torch.get_float32_matmul_precision()}' (as torch leaves them: nothing in this project changes them)")  # fmt: skip
    return lines


def report(head, checks, speed, nine, comp, S, args, dtype):
    """GPU.md's text."""
    failed = [c.name for c in checks if not c.ok]
    verdict = f"FAILED: {len(failed)} of {len(checks)} checks: " + "; ".join(failed) if failed else f"all {len(checks)} checks passed"
    out = ["# GPU check", "", *head, f"- verdict: {verdict}", "",
           "## Checks", "",
           "Each at the tolerance of the CPU test proving the same (test_sparse_model, test_sparse_sample): max rel. = max "
           "|got - want| / max |want| (fp32 1e-5, bf16 attention 1e-2); a model's bf16 or TF32 output: RMS rel. = ||got - "
           "want|| / ||want|| (1e-2; a bf16 output's max rel. is quantized at its last bit); 8-bit: bitwise (max abs = 0). "
           "Attention references: float32 math on the CPU from the same rounded inputs; kernel: the fused attention op(s) "
           "that ran.", "",
           "| check | error | measure | tolerance | result | kernel, note |", "|---|---|---|---|---|---|",
           *(f"| {c.name} | {c.err:.2g} | {c.measure} | {c.tol:g} | {'ok' if c.ok else '**FAILED**'} | {c.note} |" for c in checks),
           ""]  # fmt: skip
    side = S.size // 16
    if speed is None:
        out += ["## Speed, memory, compiled", "", "Not run (--checks-only).", ""]
        return "\n".join(out)
    out += [f"## Speed: {S.speed_name}, {S.size} px, {dtype_name(dtype)}", "",
            f"{S.size}x{S.size} target and references ({side * side} tokens each), {S.text_tokens} text tokens, batch 1, random "
            f"weights. bench.bench_refs: every job once a round, interleaved, {args.rounds} round(s) after a warm-up, the minimum "
            "of each; speedups over dense (keep 1, no cache, the same references) from this run; ideal = dense FLOPs / point "
            "FLOPs (matmuls and attention of exactly the tokens processed); eff = speedup / ideal. fwd: one step as the loop "
            "calls it (KV rows: a step reading the cache; extract: the step filling it). Peak: the 4-step loop's, above the "
            "weights and inputs (CUDA: torch.cuda.max_memory_allocated; CPU: the profiler's allocations), beside "
            "memory_plan.activation_peak of one step (KV: extract + a cached step) from shapes.", "",
            SPEED_HEADER, "|" + "---|" * (SPEED_HEADER.count("|") - 1), *map(speed_row, speed["rows"]), "",
            *(f"- {n}" for n in speed["notes"]), ""]  # fmt: skip
    out += [f"## Memory: {S.nine_name}, 8-bit weights", "", *(f"- {n}" for n in nine["notes"]), ""]
    if nine["rows"]:
        unit, name = (MIB, "MiB") if S.tiny else (GIB, "GiB")
        out += [f"| what | measured {name} | planned {name} | measured / planned |", "|---|---|---|---|",
                *(f"| {w} | {'n/a' if m is None else f'{m / unit:.2f}'} | {p / unit:.2f} | {'n/a' if m is None else f'{m / p:.2f}'} |"
                  for w, m, p in nine["rows"]), ""]  # fmt: skip
    how = ("cli.compiled (torch.compile fullgraph, static shapes, Inductor), as sample.py --compile" if comp["backend"] == "inductor"
           else "Dynamo with the eager backend (no code generation: Inductor's C++ compile takes ~20 s a graph on a CPU; "
                "the checks compile with Inductor)")  # fmt: skip
    out += [f"## Compiled: {S.speed_name}, {S.size} px, {dtype_name(dtype)}", "",
            f"Compiled by {how}, on a copy sharing the weights; timed in one interleaved run with eager at the same point and "
            "eager dense (ideal: FLOP ratio to dense). compiled vs eager output: max rel. difference of one step (KV: a cached "
            "step); graphs, compile s: what the point compiled and the seconds its warm-up took.", "",
            COMPILED_HEADER, "|" + "---|" * (COMPILED_HEADER.count("|") - 1), *map(compiled_row, comp["rows"]), "",
            *(f"- {n}" for n in comp["notes"]), ""]  # fmt: skip
    return "\n".join(out)


def check_args(args):
    """Every option before anything is built; a ValueError names it. Returns (device, tiny run, out path)."""
    if args.rounds is not None:
        check_number("--rounds", args.rounds, 1, 100, integer=True)
    check_number("--budget", args.budget, 1, 86400)
    device, _ = resolve_device(args.device)
    tiny = args.quick or device.type != "cuda"
    args.rounds = args.rounds or (1 if tiny else 2)
    out = args.out or ("bench-quick/GPU.md" if tiny else "GPU.md")  # a smoke run never overwrites the committed report
    if not out.endswith(".md"):
        raise ValueError(f"--out {out}: expected a .md file")
    if args.out is None and tiny:
        check_writable_folder("bench-quick", "--out")
    else:
        check_writable(out, "--out")
    return device, tiny, out


def main(argv=None):
    p = ArgumentParser(description=__doc__.partition("\n\nWhat it runs")[0] + "\n\nWhat it runs and how long: the module docstring.")
    p.add_argument("--out", default=None, help="the report (default: GPU.md; bench-quick/GPU.md for a tiny run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on a GPU too: a smoke run of every path (a CPU always runs them)")
    p.add_argument("--checks-only", action="store_true", help="the correctness checks alone, no speed or memory (default: off)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds a point, after a warm-up (default: 2; 1 for a tiny run)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds: a part that would end past it is skipped (default: 480)")
    args = p.parse_args(argv)
    try:
        device, tiny, out = check_args(args)
    except ValueError as e:
        fail(e)
    if tiny and args.out is None:
        os.makedirs("bench-quick", exist_ok=True)
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from threads
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what torch.cuda's counters (memory_allocated, max_memory_allocated) read
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    command = shlex.join(["python", "gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    S, dtype, start = shapes(tiny), torch.bfloat16, time.perf_counter()
    budget = Budget(args.budget)
    head = versions(device)
    for line in head:
        log(line)
    checks = run_checks(device, S, log)
    speed = nine = comp = None
    if not args.checks_only:
        parts = {}
        for name, fn in (("speed", speed_section), ("memory", nine_b_section), ("compiled", compiled_section)):
            try:
                parts[name] = fn(device, dtype, S, args, budget, log)
            except Exception as e:  # report it as a failing check, keep what the other parts measured
                checks.append(Check(f"{name} section: raised {type(e).__name__}: {first_line(e)}", math.nan, 0.0))
                parts[name] = dict(rows=[], notes=[f"raised {type(e).__name__} (see the checks)"], backend="inductor")
            free_memory(device)  # the part's tensors died with its frame
        speed, nine, comp = parts["speed"], parts["memory"], parts["compiled"]
    seconds = time.perf_counter() - start
    head = head + [f"- command: `{command}`; {datetime.datetime.now().isoformat(timespec='seconds')}; {seconds / 60:.1f} min"]
    write_atomic(out, report(head, checks, speed, nine, comp, S, args, dtype))
    failed = [c.name for c in checks if not c.ok]
    log(f"wrote {out} ({seconds / 60:.1f} min)")
    if failed:
        print(f"error: {len(failed)} of {len(checks)} checks failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)
    log(f"all {len(checks)} checks passed")


if __name__ == "__main__":
    main()
