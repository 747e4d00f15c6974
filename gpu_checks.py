"""gpu_check.py's correctness checks: the paths only a GPU takes, each against its reference at the
tolerance of the CPU test that proves the same thing (the list is in gpu_check.py's docstring).

`run_checks(device, S, log)` returns the Check rows GPU.md shows.

May import: cli, files, klein, model, pipeline, quant, bench_measure.
"""

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import model as flux2
from bench_measure import build_model
from cli import compiled
from klein import grid_ids, schedule, text_ids
from model import KVCache
from quant import FORMATS, Linear8, dequantize, quantize

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # the CPU tests' (test_sparse_model.assert_close)
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# Checks


@dataclass
class Check:
    """One comparison: its error by `measure` (rel_err's "max rel."; rms_err's "RMS rel."; abs_err's "max
    abs", bitwise at tol 0) within tol."""

    name: str
    err: float
    tol: float
    note: str = ""
    measure: str = "max rel."

    @property
    def ok(self):
        return math.isfinite(self.err) and self.err <= self.tol


def first_line(e):
    return str(e).splitlines()[0] if str(e) else ""


def rel_err(got, want):
    """max |got - want| / max |want| in float32 on the CPU (test_sparse_model.assert_close's measure)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return ((got - want).abs().max() / want.abs().max()).item()


def rms_err(got, want):
    """||got - want|| / ||want|| (test_8bit_model_is_the_model_of_its_dequantized_weights' measure): a bf16
    output's max relative error is quantized at its last bit (2^-8 to 2^-7 of the largest value), one
    rounding apart already reaches 1e-2; the RMS measures the whole output."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return ((got - want).norm() / want.norm()).item()


def abs_err(got, want):
    return (got.detach().float().cpu() - want.detach().float().cpu()).abs().max().item()


class Ops(TorchDispatchMode):
    """The aten ops that run under it: which fused attention kernel a call took."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def with_kernel(fn):
    """(fn(), the attention kernels it ran, by their aten names)."""
    with Ops() as ops:
        out = fn()
    names = [n.removeprefix("_scaled_dot_product_") for n in ops.names if "attention" in n]
    return out, " + ".join(dict.fromkeys(names)) or "math (no fused kernel)"


def attention_checks(device, S):
    """sdpa_lse and cached_attention against float32 math over the concatenated keys, computed on the
    CPU from the same (rounded) inputs (test_cached_attention_equals_one_attention)."""
    B, H, L, M = S.attention
    D = 128  # klein's head width, the one the fused kernels run
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))  # (B, L, H, D), as the model passes them
    k_ref, v_ref = (torch.randn(B, M, H, D, generator=g).transpose(1, 2) for _ in range(2))  # (B, H, M, D) views, as KVCache holds
    heads = lambda x: x.transpose(1, 2)
    checks = []
    for dtype, tol in TOLERANCE.items():
        name = DTYPE_NAMES[dtype]
        rounded = [x.to(dtype).float() for x in (q, k, v, k_ref, v_ref)]  # the reference sees the inputs the card sees
        rq, rk, rv, rkr, rvr = rounded
        dq, dk, dv, dkr, dvr = (x.to(device, dtype) for x in (q, k, v, k_ref, v_ref))
        want_out, want_lse = flux2.sdpa_lse_math(heads(rq), heads(rk), heads(rv))
        (out, lse), used = with_kernel(lambda: flux2.sdpa_lse(heads(dq), heads(dk), heads(dv)))
        checks += [Check(f"sdpa_lse output, {name}", rel_err(out, want_out), tol, used),
                   Check(f"sdpa_lse log-sum-exp, {name}", rel_err(lse, want_lse), tol, used)]  # fmt: skip
        for shared in (False, True):
            n = 1 if shared else B
            keys = torch.cat([heads(rk), rkr[:n].expand(B, -1, -1, -1)], dim=2)
            values = torch.cat([heads(rv), rvr[:n].expand(B, -1, -1, -1)], dim=2)
            want = flux2.sdpa_lse_math(heads(rq), keys, values)[0].transpose(1, 2)
            got, used = with_kernel(lambda: flux2.cached_attention(dq, dk, dv, dkr[:n], dvr[:n]))
            what = "one cache shared by the batch" if shared else "a cache per image"
            checks.append(Check(f"cached_attention ({what}) = one attention over the fresh and cached keys, {name}", rel_err(got, want), tol, used))
            if not shared:  # the plain attention itself, one fused call over the concatenated keys
                plain, used = with_kernel(lambda: flux2.sdpa(dq, torch.cat([dk, heads(dkr)], 1), torch.cat([dv, heads(dvr)], 1)))
                checks.append(Check(f"one attention over the fresh and cached keys (model.sdpa), {name}", rel_err(plain, want), tol, used))
    return checks


def linear8_checks(device, S):
    """quant.Linear8 (int8, fp8) against F.linear of its dequantized weight: forward bitwise and backward
    (test_linear8_is_the_linear_of_its_dequantized_weight); dequantized on the card = on the CPU."""
    out_f, in_f = S.linear
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(out_f, in_f, generator=g) * in_f**-0.5, torch.randn(2, 77, in_f, generator=g)
    checks = []
    for kind in FORMATS:
        q, scale = quantize(w, kind)
        layer = Linear8(in_f, out_f, kind).to(device)
        layer.weight.data, layer.weight_scale.data = q.to(device), scale.to(device)
        for dtype in TOLERANCE:
            name = DTYPE_NAMES[dtype]
            W = dequantize(layer.weight, layer.weight_scale, dtype)
            checks.append(Check(f"{kind} weight dequantized on {device.type} = on the CPU, {name}",
                                abs_err(W, dequantize(q, scale, dtype)), 0.0, "bitwise", "max abs"))  # fmt: skip
            xd = x.to(device, dtype)
            with torch.no_grad():
                y = layer(xd)
            checks.append(Check(f"Linear8 {kind} = F.linear of its dequantized weight, {name}", abs_err(y, F.linear(xd, W)), 0.0,
                                "bitwise", "max abs"))  # fmt: skip
        xg, xr = x.to(device).requires_grad_(), x.to(device).requires_grad_()
        (got,) = torch.autograd.grad(layer(xg).square().sum(), xg)
        (want,) = torch.autograd.grad(F.linear(xr, dequantize(layer.weight, layer.weight_scale, torch.float32)).square().sum(), xr)
        checks.append(Check(f"Linear8 {kind} backward (input gradient) = F.linear's, fp32", rel_err(got, want), 1e-6))
    return checks


def check_inputs(S, device=None, dtype=None):
    """Inputs of the checks' model: a side x side target, S.check_txt text tokens, two references of
    which half the tokens are kept; (img, img_ids, txt, txt_ids, ref, ref_ids) on device in dtype."""
    cfg, side = S.check, S.check_side
    n = side * side
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(1, n, cfg.in_channels, generator=g), torch.randn(1, S.check_txt, cfg.context_dim, generator=g)
    refs = [torch.randn(1, n, cfg.in_channels, generator=g) for _ in range(2)]
    kept = [torch.randperm(n, generator=g)[: n // 2].sort().values for _ in refs]
    ref = torch.cat([r[:, i] for r, i in zip(refs, kept)], 1)
    ref_ids = torch.cat([grid_ids(side, side, t=10 * (j + 1))[i] for j, i in enumerate(kept)])
    out = img, grid_ids(side, side), txt, text_ids(S.check_txt), ref, ref_ids
    return tuple(t.to(device, dtype if t.is_floating_point() else t.dtype) if device is not None else t for t in out)


def model_check(name, got, want, dtype, note=""):
    """A model output's check: fp32 by rel_err (the CPU tests'), bf16 by rms_err, each at its tolerance."""
    if dtype == torch.float32:
        return Check(name, rel_err(got, want), TOLERANCE[dtype], note)
    return Check(name, rms_err(got, want), TOLERANCE[dtype], note, "RMS rel.")


class TF32:
    """TF32 for float32 matmuls and convolutions on, within the block (CUDA only; restored after)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


@torch.no_grad()
def model_checks(device, S):
    """The checks' model in fp32 on the card = on the CPU (TF32 off, then on); a step reading the KV
    cache = the same step in the KV pattern without one (test_kv_cache_equals_diffusers), fp32 and bf16."""
    cpu = build_model(S.check, torch.device("cpu"), torch.float32, seed=3)
    img, img_ids, txt, txt_ids, ref, ref_ids = check_inputs(S)
    t, t1 = torch.tensor([0.7]), torch.tensor([0.4])
    want = cpu(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)
    dev = copy.deepcopy(cpu).to(device)
    x = check_inputs(S, device, torch.float32)
    run = lambda: dev(*x[:4], t.to(device), ref=x[4], ref_ids=x[5])  # noqa: E731
    checks = [Check(f"the model on {device.type} = on the CPU, fp32, TF32 off", rel_err(run(), want), TOLERANCE[torch.float32])]
    if device.type == "cuda":
        with TF32():
            checks.append(Check("the model on cuda = on the CPU, fp32, TF32 on", rms_err(run(), want), TOLERANCE[torch.bfloat16],
                                "TF32 rounds matmul inputs to 10 mantissa bits: bf16's tolerance", "RMS rel."))  # fmt: skip
    for dtype, tol in TOLERANCE.items():
        m = copy.deepcopy(cpu).to(device, dtype)
        img, img_ids, txt, txt_ids, ref, ref_ids = check_inputs(S, device, dtype)
        cache = KVCache()
        m(img, img_ids, txt, txt_ids, t.to(device, dtype), ref=ref, ref_ids=ref_ids, kv_cache=cache)
        got = m(img, img_ids, txt, txt_ids, t1.to(device, dtype), kv_cache=cache)
        pattern = m(img, img_ids, txt, txt_ids, t1.to(device, dtype), ref=ref, ref_ids=ref_ids, kv_pattern=True)
        checks.append(model_check(f"a step reading the KV cache = the KV pattern without one, {DTYPE_NAMES[dtype]}", got, pattern, dtype))
    return checks


def compile_like_cli(model, backend):
    """cli.compiled (what sample.py --compile does) on a shallow copy sharing the weights, so `model`
    stays eager. backend "eager": Dynamo alone, no code generation (the tiny run's speed points)."""
    twin = copy.copy(model)
    if backend == "inductor":
        return compiled(twin)
    twin.compile(fullgraph=True, dynamic=False, backend=backend)
    return twin


@torch.no_grad()
def compile_checks(device, S, log):
    """torch.compile with Inductor against eager: the velocity of one sampling step, with references,
    called as the loop calls it (test_compiled_sampling_equals_eager_once_per_bucket)."""
    checks = []
    for dtype in TOLERANCE if device.type == "cuda" else (torch.float32,):  # a CPU: one Inductor compile (~20 s)
        eager = build_model(S.check, device, dtype, seed=4)
        img, img_ids, txt, txt_ids, ref, ref_ids = check_inputs(S, device, dtype)
        pe, t = eager.rope(txt_ids, img_ids, ref_ids), bench.loop_t(schedule(4, img.shape[1]).to(device), dtype)
        torch._dynamo.reset()
        twin = compile_like_cli(eager, "inductor")
        start = time.perf_counter()
        got = twin(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, pe=pe)
        seconds = time.perf_counter() - start
        want = eager(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, pe=pe)
        log(f"  compiled the checks' model in {DTYPE_NAMES[dtype]} in {seconds:.0f} s")
        checks.append(model_check(f"torch.compile (cli.compiled, Inductor) = eager, one sampling step, {DTYPE_NAMES[dtype]}",
                                  got, want, dtype, f"compiled in {seconds:.0f} s"))  # fmt: skip
    torch._dynamo.reset()
    return checks


def run_checks(device, S, log):
    """Every check; one that raises is a failing check naming the exception."""
    checks = []
    for name, fn in (("attention", attention_checks), ("8-bit Linear", linear8_checks), ("model", model_checks),
                     ("torch.compile", lambda d, s: compile_checks(d, s, log))):  # fmt: skip
        log(f"checks: {name}")
        try:
            new = fn(device, S)
        except Exception as e:  # a path that breaks on this card is what the check is for: report it, go on
            new = [Check(f"{name}: raised {type(e).__name__}: {first_line(e)}", math.nan, 0.0)]
        for c in new:
            log(f"  {'ok' if c.ok else 'FAILED'}: {c.name} (error {c.err:.2g}, tolerance {c.tol:g})")
        checks += new
    return checks
