"""How much GPU memory klein needs, computed from shapes alone: `python bench.py --memory`.

The transformer runs on the meta device (no weights, no compute) under a dispatch mode that counts the
bytes of every tensor an op creates until the last tensor on that storage is gone, as a caching
allocator holds them; autograd's saved tensors are kept as Python objects so that their lifetime is
seen too. Attention is replaced by a stand-in that holds what FlashAttention holds (the output, a
float32 log-sum-exp per query and, when training, its saved inputs), since the math path's L x L
scores never exist on a GPU. So the plan follows the code as it is (gradient checkpointing, the KV
cache, LoRA), not a hand-written formula; on a CPU it equals the peak the profiler measures for the same
run (bench.py checks this on a small config).

Not counted: kernel workspaces (cuBLAS, a few MiB), the CUDA context (~0.5 GiB), allocator fragmentation.

Every size is in GiB (2^30 bytes), the unit cards are sold in: a "24 GB" card holds about 24 GiB.

May import: model, lora, pipeline, quant, token_selectors.
"""

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lora
import model as flux2
from model import Flux2, KVCache
from quant import BLOCKS
from klein import grid_ids, n_keep, text_ids

GIB = 2**30  # every report's unit of bytes (MiB = 2**20 for small ones)


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages ops create (those in `ignore`, weights and inputs, aside)."""

    def __init__(self, ignore):
        super().__init__()
        self.ignore, self.live, self.peak, self.refs = ignore, 0, 0, {}  # refs: storage -> live tensors on it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t):
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()  # a view shares its base's storage: counted once
        if key in self.ignore:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.live += size
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self.release, key, size)

    def release(self, key, size):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= size


class FlashAttention(torch.autograd.Function):
    """What FlashAttention holds: out (B, H, L, D) and a float32 log-sum-exp (B, H, L); q, k, v, out
    and the log-sum-exp are saved for backward, which makes gradients the shape of q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def counted(ignore):
    """LiveBytes over the block, attention as FlashAttention holds memory, saved tensors as objects."""
    sdpa, sdpa_lse = F.scaled_dot_product_attention, flux2.sdpa_lse
    F.scaled_dot_product_attention = lambda q, k, v, attn_mask=None, **_: FlashAttention.apply(q, k, v)
    # a cached step's two attentions: the fused kernels' out and log-sum-exp (meta has no fused kernel)
    flux2.sdpa_lse = lambda q, k, v: (q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1], dtype=torch.float32))
    keep = lambda t: t  # noqa: E731  (the saved tensor itself: its lifetime is the graph's)
    mode = LiveBytes(ignore)
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(keep, keep):
            yield mode
    finally:
        F.scaled_dot_product_attention, flux2.sdpa_lse = sdpa, sdpa_lse


def storages(*tensors):
    return {t.untyped_storage()._cdata for t in tensors}


def inputs(cfg, n_txt, n_img, n_ref, device, dtype):
    """Batch-1 transformer inputs: a square target of n_img tokens, n_ref reference tokens."""
    side = int(n_img**0.5)
    img, txt = torch.zeros(1, n_img, cfg.in_channels, device=device, dtype=dtype), torch.zeros(1, n_txt, cfg.context_dim, device=device, dtype=dtype)
    ref = torch.zeros(1, n_ref, cfg.in_channels, device=device, dtype=dtype)
    ref_ids = grid_ids(side, side, t=10).repeat(n_ref // n_img + 1, 1)[:n_ref].to(device)
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    return img, grid_ids(side, side).to(device), txt, text_ids(n_txt).to(device), t, ref, ref_ids


def build(cfg, device, dtype, rank=None, checkpointing=False):
    """The transformer (random weights on a real device), frozen, with a rank-`rank` LoRA if given."""
    with torch.device(device):
        model = Flux2(cfg).to(dtype).requires_grad_(False)
    if rank:
        lora.inject(model, rank=rank)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)  # as train.py: gradients exist before the first backward
    model.gradient_checkpointing = checkpointing
    return model


def activation_peak(cfg, n_txt, n_img, n_ref, train=False, kv=False, checkpointing=False, rank=16,
                    device="meta", dtype=torch.bfloat16):  # fmt: skip
    """Peak bytes above weights and inputs of one sampling step (kv: the extracting step then a cached
    one, the cache alive throughout) or one LoRA training step (forward and backward).
    device "cpu" runs it for real, for the profiler to measure (peak_of)."""
    model = build(cfg, device, dtype, rank if train else None, checkpointing)
    x = inputs(cfg, n_txt, n_img, n_ref, device, dtype)
    img, img_ids, txt, txt_ids, t, ref, ref_ids = x
    ignore = storages(*model.parameters(), *model.buffers(), *x, *(p.grad for p in model.parameters() if p.grad is not None))

    def step():
        if train:
            model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_pattern=kv).float().square().mean().backward()
            return
        with torch.no_grad():
            cache = KVCache() if kv else None
            model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_cache=cache)
            if kv:
                model(img, img_ids, txt, txt_ids, t, kv_cache=cache)

    if device == "meta":
        with counted(ignore) as mode:
            step()
        return mode.peak
    return step


def weight_bytes(cfg, bits=16, rank=0):
    """Bytes of the transformer's weights: 16-bit, or quant.py's 8 bits (the blocks' Linear weights, one
    float32 scale per output row; the rest 16-bit); a LoRA's float32 factors, gradients and AdamW moments."""
    with torch.device("meta"):
        model = Flux2(cfg)
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS)]
    total = sum(p.numel() for p in model.parameters())
    n_linear = sum(w.numel() for w in linear)
    base = 2 * total if bits == 16 else n_linear + 4 * sum(w.shape[0] for w in linear) + 2 * (total - n_linear)
    if rank:
        lora.inject(model.requires_grad_(False), rank=rank)
        base += 4 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # weights, grads, 2 moments
    return base


def kv_cache_bytes(cfg, n_ref, dtype_bytes=2):
    """Every block's reference keys and values: 2 x blocks x n_ref x hidden."""
    return 2 * (cfg.depth + cfg.depth_single) * n_ref * cfg.hidden_size * dtype_bytes


def dequantized_bytes(cfg):
    """What an 8-bit model holds on top of its weights while a Linear runs: quant.dequantize casts one
    weight to bf16 and multiplies it by its row scales, so two bf16 copies of it live for a moment (the
    profiler measures 1.8-2x on a CPU); the largest block Linear's two."""
    with torch.device("meta"):
        return 2 * 2 * max(m.weight.numel() for n, m in Flux2(cfg).named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(BLOCKS))


PLAN_POINTS = {1: (1.0, 0.1), 6: (1.0, 0.1), 16: (1.0, 0.1, 0.0625)}  # references: keep fractions (1/16: RefRoute's 256 tokens)


def plan_rows(configs, sides=(512, 1024), points=PLAN_POINTS, n_txt=512, rank=16):
    """One row per (config, side, references, keep), points {references: keeps}: weights, KV cache and
    activation GiB for sampling and training, and which card sizes each fits."""
    rows = []
    for name, cfg in configs.items():
        w16, w8 = weight_bytes(cfg, 16) / GIB, weight_bytes(cfg, 8) / GIB
        lora16 = (weight_bytes(cfg, 16, rank) - weight_bytes(cfg, 16)) / GIB
        largest = dequantized_bytes(cfg) / GIB
        for side in sides:
            n_img = (side // 16) ** 2
            for n_refs, keeps in points.items():
                for keep in keeps:
                    n_ref = n_refs * n_keep(keep, n_img)
                    row = dict(config=name, side=side, refs=n_refs, keep=keep, ref_tokens=n_ref, weights16=w16, weights8=w8 + largest,
                               kv=kv_cache_bytes(cfg, n_ref) / GIB, lora=lora16)  # fmt: skip
                    row["sample"] = activation_peak(cfg, n_txt, n_img, n_ref) / GIB
                    row["sample_kv"] = activation_peak(cfg, n_txt, n_img, n_ref, kv=True) / GIB
                    row["train"] = activation_peak(cfg, n_txt, n_img, n_ref, train=True, rank=rank) / GIB
                    row["train_ckpt"] = activation_peak(cfg, n_txt, n_img, n_ref, train=True, checkpointing=True, rank=rank) / GIB
                    rows.append(row)
    return rows


def fits(total):
    """The smallest card (16/24/40/80 GiB) that holds `total` GiB with 5% kept free for the CUDA context
    and fragments."""
    return next((f"{c} GiB" for c in (16, 24, 40, 80) if total <= c * 0.95), "> 80 GiB")


MEMORY_HEADING = "## Memory plan: GPU memory from shapes"


def memory_section(rows, check, command, n_txt=512):
    """The BENCHMARKS.md section: one table, bf16 and 8-bit weights, the smallest card each fits."""
    out = [MEMORY_HEADING, "",
           f"- command: `{command}`; computed on the meta device (memory_plan.py): weights, the KV cache of the kept "
           f"reference tokens (bf16) and the activation peak of one step, batch 1, {n_txt} text tokens, bf16 activations, "
           "FlashAttention's memory (no L x L scores). Training: a rank-16 float32 LoRA (weights, gradients, AdamW "
           "moments) over frozen weights, one forward and backward. 8-bit (`--weights fp8|int8`): one byte per block "
           "Linear weight and a float32 scale per output row, the rest bf16, plus the largest Linear dequantized to bf16 "
           "during its matmul (twice: quant.dequantize's cast and its scaled product).",
           f"- checked against the profiler's measured peak of the same step run on this CPU ({check}).",
           "- every size in GiB (2^30 bytes; cards are sold in it: a \"24 GB\" card holds about 24 GiB). Fits: the "
           "smallest card (16/24/40/80 GiB, 5% kept free) that holds weights + cache + activations; the CUDA context and "
           "kernel workspaces (~0.5-1 GiB) come on top. keep 0.0625 = 1/16: 256 of a 1024 px reference's 4096 tokens, "
           "RefRoute's budget per reference.", "",
           "| config | px | refs | keep | ref tokens | weights GiB bf16 / 8-bit | KV cache GiB | sample GiB (act.) | sample, KV cache GiB (act. + cache) | "
           "train GiB (act. + LoRA state) | train, checkpointing GiB | sample fits (bf16 / 8-bit) | train+ckpt fits (bf16 / 8-bit) |",
           "|" + "---|" * 13]  # fmt: skip
    for r in rows:
        sample = max(r["sample"], r["sample_kv"])  # sample_kv's peak holds its cache
        train = r["lora"] + r["train_ckpt"]
        out.append(f"| {r['config']} | {r['side']} | {r['refs']} | {r['keep']:g} | {r['ref_tokens']} | "
                   f"{r['weights16']:.2f} / {r['weights8']:.2f} | {r['kv']:.2f} | {r['sample']:.2f} | {r['sample_kv']:.2f} | "
                   f"{r['lora'] + r['train']:.2f} | {train:.2f} | {fits(r['weights16'] + sample)} / {fits(r['weights8'] + sample)} | "
                   f"{fits(r['weights16'] + train)} / {fits(r['weights8'] + train)} |")  # fmt: skip
    return "\n".join(out) + "\n"
