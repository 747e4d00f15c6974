"""LoRA for the FLUX.2 transformer, by hand: inject, merge, save, load (diffusers, BFL/ai-toolkit, kohya).

A LoRA adds a low-rank update to a frozen Linear: y = W x + scaling * B (A x), with A (r, in),
B (out, r) and scaling = alpha / r. B starts at zero, so a freshly injected model computes exactly
what the base model does.

Our double blocks fuse q, k, v into one Linear (BFL's `img_attn.qkv`, (3D, D)) where diffusers has
three (`attn.to_q`, `to_k`, `to_v`). A LoRALinear with chunks=3 keeps one independent (A, B) pair per
output third, so each diffusers LoRA pair maps to exactly one of ours and back. BFL and kohya files
store one pair for the fused layer: that is the special case of three equal A's.

Files we write are diffusers/PEFT files (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`)
with alpha / r folded into B: diffusers without an adapter config, ComfyUI and ai-toolkit all read
such a file as alpha == r, so every loader gets the right scale.

May import: files, checkpoints (the checkpoint names). An 8-bit base (quant.Linear8) is met through its
`matmul`, never imported.
"""

import json
import os
from fnmatch import fnmatchcase

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from files import check_file, field, write_atomic
from checkpoints import FINAL_MODULATION, diffusers_names, swap_halves

# diffusers' klein trainer targets to_q/to_k/to_v, to_out.0, to_qkv_mlp_proj and the single blocks'
# attn.to_out; these are the same layers under our (BFL) names.
DEFAULT_TARGETS = (
    "double_blocks.*.img_attn.qkv",
    "double_blocks.*.img_attn.proj",
    "single_blocks.*.linear1",
    "single_blocks.*.linear2",
)


def num_chunks(name):
    """Independent LoRA pairs of a layer: 3 for the fused q, k, v projections, else 1."""
    return 3 if name.endswith("_attn.qkv") else 1


class LoRALinear(nn.Module):
    """A Linear plus `chunks` low-rank updates, one per equal slice of its output rows.

    The base weight is the wrapped Linear's own Parameter (shared, not copied), so the model's state
    dict keeps its names (`...qkv.weight`) and gains `...qkv.lora_A` (chunks, r, in) and
    `...qkv.lora_B` (chunks, out / chunks, r). LoRA parameters stay float32 (the master copy when
    training under bf16 autocast). Over an 8-bit base (quant.Linear8) the LoRA also shares its
    `weight_scale` and stays unmerged: an update cannot be added into 8-bit weights.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, chunks: int = 1):
        super().__init__()
        out_features, in_features = base.weight.shape
        if out_features % chunks:
            raise ValueError(f"{out_features} output features do not split into {chunks} chunks")
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("weight_scale", getattr(base, "weight_scale", None))  # (out,) of an 8-bit base, else None
        self.matmul = getattr(base, "matmul", None)  # an 8-bit base's x @ (weight * scale)^T
        self.rank, self.chunks = rank, chunks
        self.scaling = (rank if alpha is None else alpha) / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(chunks, rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(chunks, out_features // chunks, rank, device=device))
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if self.weight_scale is None else self.matmul(x, self.weight, self.weight_scale)
        if self.merged:
            return y
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A.flatten(0, 1))  # (..., chunks * r)
        h = h.unflatten(-1, (self.chunks, self.rank))  # (..., chunks, r)
        d = torch.einsum("...cr,cor->...co", h, self.lora_B).flatten(-2)  # (..., out)
        return y + (self.scaling * d).to(y.dtype)

    def delta_weight(self):
        """The update scaling * B A as one (out, in) float32 matrix, chunks stacked along the rows."""
        return self.scaling * torch.bmm(self.lora_B.float(), self.lora_A.float()).flatten(0, 1)

    @torch.no_grad()
    def merge(self):
        """Add the update into the base weight (in float32, then cast: lossy for bf16 weights)."""
        if self.weight_scale is not None:
            raise ValueError("a LoRA over 8-bit weights cannot be merged into them; it runs unmerged")
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def extra_repr(self):
        out, inp = self.weight.shape
        return f"in={inp}, out={out}, rank={self.rank}, chunks={self.chunks}, scaling={self.scaling:g}"


def lora_modules(model):
    """{module name: LoRALinear} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model, targets=DEFAULT_TARGETS, rank=4, alpha=None, seed=0):
    """Wrap every nn.Linear whose name matches one of the glob patterns in a LoRALinear.

    A ~ N(0, 1 / rank) as PEFT's "gaussian" init (what diffusers' klein trainer uses), B = 0; drawn
    from a generator seeded with `seed`, in module order. Returns the wrapped names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(fnmatchcase(n, p) for p in targets)]
    unused = [p for p in targets if not any(fnmatchcase(n, p) for n in names)]
    if unused:
        raise ValueError(f"LoRA target patterns match no Linear layer: {unused}")
    g = torch.Generator().manual_seed(seed)
    for n in names:
        lora = LoRALinear(model.get_submodule(n), rank, alpha, num_chunks(n))
        with torch.no_grad():
            lora.lora_A.copy_(torch.randn(lora.lora_A.shape, generator=g) / rank)
        model.set_submodule(n, lora)
    return names


# ----------------------------------------------------------------------------------------------
# Names in other formats


def to_diffusers(model):
    """The model's LoRA as a diffusers/PEFT state dict, alpha / r folded into lora_B."""
    ours_to_diffusers = {v: k for k, v in diffusers_names(model.cfg).items()}
    sd = {}
    for name, m in lora_modules(model).items():
        for c in range(m.chunks):
            key = "transformer." + ours_to_diffusers[(name, c)]
            b = m.scaling * m.lora_B[c].detach().float()
            sd[f"{key}.lora_A.weight"] = m.lora_A[c].detach().float().contiguous()
            sd[f"{key}.lora_B.weight"] = (swap_halves(b) if name == FINAL_MODULATION else b).contiguous()
    return sd


def lora_file(model):
    """The bytes of the model's LoRA as a diffusers-format safetensors file (the same bytes for the same LoRA).
    A non-finite value is an error: such a file would draw black images."""
    sd = {k: v.cpu() for k, v in to_diffusers(model).items()}
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the LoRA has non-finite values ({len(bad)} tensors, e.g. {bad[0]})")
    return save(sd, metadata={"format": "pt"})


def save_lora(model, path):
    """Write the model's LoRA to a diffusers-format safetensors file, atomically."""
    write_atomic(path, lora_file(model))


# ----------------------------------------------------------------------------------------------
# Loading


def read_lora(path):
    """(state dict, safetensors metadata) of a LoRA file, or of DIR/pytorch_lora_weights.safetensors."""
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such LoRA file: {path}")
    check_file(path, "LoRA file")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read LoRA file {path}: {e}") from None


def peft_alpha(metadata):
    """(lora_alpha, use_rslora) from a diffusers trainer's `lora_adapter_metadata`, or (None, False)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    where = "LoRA metadata 'lora_adapter_metadata'"
    try:
        cfg = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(cfg).__name__}")
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError("LoRA adapter configs with rank_pattern or alpha_pattern are not supported")
    return field(cfg, "lora_alpha", where, float, default=None), field(cfg, "use_rslora", where, bool, default=False)


# key suffix -> part of a pair; down/up is the kohya (and some ai-toolkit) spelling of A/B
SUFFIXES = {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B", ".alpha": "alpha"}
PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")


def lora_deltas(model, sd, metadata=None):
    """Every LoRA pair of a state dict as (our module, chunk or None for all rows, A, B), scale folded in B.

    Accepted names, with optional prefix transformer., diffusion_model. or base_model.model.:
      - diffusers/PEFT: transformer_blocks.N.attn.to_q.lora_A.weight ... (alpha from the adapter
        metadata diffusers' trainers write, else alpha = r);
      - BFL/ai-toolkit: double_blocks.N.img_attn.qkv.lora_A.weight (one pair for the fused layer),
        img_in, txt_in, time_in.*, final_layer.*, *_modulation.lin; lora_down/lora_up spellings too;
      - kohya: lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha.
    Any `.alpha` key gives its pair the scale alpha / r. Unknown or incomplete keys: ValueError.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    lookup = {n: (n, None) for n in linears}  # BFL names: a pair covers all rows
    lookup.update({"lora_unet_" + n.replace(".", "_"): (n, None) for n in linears})  # kohya
    lookup.update(diffusers_names(model.cfg))  # diffusers: one pair per chunk

    pairs, unknown = {}, []
    for key, value in sd.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        module = key.removesuffix(suffix) if suffix else None
        if module is not None and module not in lookup:
            module = next((module.removeprefix(p) for p in PREFIXES if module.startswith(p)), module)
        if module not in lookup:
            unknown.append(key)
            continue
        entry = pairs.setdefault(module, {})
        if SUFFIXES[suffix] in entry:
            raise ValueError(f"LoRA state dict has two {SUFFIXES[suffix]} tensors for {module} (e.g. {key})")
        entry[SUFFIXES[suffix]] = value
    if unknown:
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise ValueError(f"unknown LoRA keys for FLUX.2 ({len(unknown)}): {', '.join(sorted(unknown)[:4])}{more}")

    file_alpha, rslora = peft_alpha(metadata or {})
    deltas, taken, problems = [], {}, []
    for module, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            problems.append(f"{module}: lora_A/lora_down and lora_B/lora_up must both be present")
            continue
        name, chunk = lookup[module]
        n = num_chunks(name)
        chunk = None if n == 1 else chunk  # a diffusers pair on an unchunked layer covers all its rows
        a, b = entry["A"].float(), entry["B"].float()
        weight = model.get_submodule(name).weight
        rows = weight.shape[0] // n if chunk is not None else weight.shape[0]
        if a.ndim != 2 or b.ndim != 2 or not a.shape[0] or a.shape[1] != weight.shape[1] or b.shape != (rows, a.shape[0]):
            fit = f"({rows}, {weight.shape[1]})"
            problems.append(f"{module}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit a {fit} weight")
            continue
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            problems.append(f"{module}: non-finite values")
            continue
        chunks = set(range(n)) if chunk is None else {chunk}
        if taken.get(name, set()) & chunks:
            problems.append(f"{module}: a second LoRA for the same rows of {name}")
            continue
        taken[name] = taken.get(name, set()) | chunks
        r = a.shape[0]
        if "alpha" in entry:
            if entry["alpha"].numel() != 1 or not torch.isfinite(entry["alpha"].float()).all():
                problems.append(f"{module}: alpha must be one finite number")
                continue
            alpha = entry["alpha"].float().item()
        else:
            alpha = file_alpha if file_alpha is not None else r
        b = b * alpha / (r**0.5 if rslora else r)
        if module == "norm_out.linear":
            b = swap_halves(b)
        deltas.append((name, chunk, a, b))
    if problems:
        raise ValueError("bad LoRA state dict: " + "; ".join(problems))
    return deltas


def load_lora(model, path_or_sd, scale=1.0, merge=True):
    """Apply a LoRA file (or state dict) of any supported format to the model; returns the module names.

    merge=True adds scale * B A into the base weights (stackable, no runtime cost); 8-bit layers
    (quant.Linear8) cannot take it and are wrapped as with merge=False. merge=False wraps
    the layers in LoRALinear (rank = the largest of the file's chunks, smaller ones zero-padded, which
    is exact) with scaling = scale, so the LoRA can be unmerged, rescaled or trained further.
    """
    sd, metadata = read_lora(path_or_sd) if isinstance(path_or_sd, (str, os.PathLike)) else (path_or_sd, {})
    deltas = lora_deltas(model, sd, metadata)
    by_module = {}
    for name, chunk, a, b in deltas:
        by_module.setdefault(name, []).append((chunk, a, b))
    for name, parts in by_module.items():
        layer = model.get_submodule(name)
        if merge and getattr(layer, "weight_scale", None) is None:
            with torch.no_grad():
                w = layer.weight
                for chunk, a, b in parts:
                    rows = slice(None) if chunk is None else slice(chunk * b.shape[0], (chunk + 1) * b.shape[0])
                    w[rows] = (w[rows].float() + scale * (b.to(w.device) @ a.to(w.device))).to(w.dtype)
            continue
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} already has a LoRA; load with merge=True to stack another one")
        n = num_chunks(name)
        per_chunk = {}  # chunk -> (A, B); a pair over all rows gives every chunk the same A
        for chunk, a, b in parts:
            for c in range(n) if chunk is None else [chunk]:
                per_chunk[c] = (a, b.chunk(n, dim=0)[c] if chunk is None else b)
        rank = max(a.shape[0] for a, _ in per_chunk.values())
        lora = LoRALinear(layer, rank, chunks=n)
        lora.scaling = scale
        with torch.no_grad():
            for c, (a, b) in per_chunk.items():
                lora.lora_A[c, : a.shape[0]] = a
                lora.lora_B[c, :, : a.shape[0]] = b
        model.set_submodule(name, lora)
    return list(by_module)


def transform(path, scale=1.0, merge=None):
    """The LoRA at path as a transform of a loaded transformer (pipeline.Klein(transforms=...)).

    merge None: merged into fp32 weights; kept unmerged beside 16-bit ones (a float32 LoRA path, as
    training ran it and as diffusers' load_lora_weights keeps it), since a merge rounds every update
    below half a bf16 step of its weight away. True or False forces either; 8-bit layers always keep
    it unmerged."""

    def apply(model):
        merged = next(model.parameters()).dtype == torch.float32 if merge is None else merge
        load_lora(model, path, scale=scale, merge=merged)
        return model

    return apply


def check_lora_file(path):
    """The LoRA (a file, or a folder holding pytorch_lora_weights.safetensors) parses and holds only
    finite values: a NaN LoRA would give a black image."""
    sd, _ = read_lora(path)
    if not any(k.endswith(s) for k in sd for s in SUFFIXES):
        raise ValueError(f"{path} is not a LoRA file (no known LoRA keys such as *.lora_A.weight): {len(sd)} keys, "
                         f"e.g. {', '.join(sorted(sd)[:3])}")  # fmt: skip
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"LoRA file {path}: {len(bad)} tensors hold NaN or inf values, e.g. {bad[0]}")

