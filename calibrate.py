"""ToPi's recipe (arXiv 2602.01609) on top of the attention selector: how much each reference token
matters to the model's output (`token_influence`), and an offline calibration that finds the block,
queries and sigma whose attention scores (model.reference_attention) rank the tokens most like that
influence does (`calibrate_attention`), saved to and checked from a JSON file.

    influence_j = mean over the target of (v(all references) - v(all but token j))^2     exact=True
                ~ the same for the first-order change, from one forward and a few backwards

Tokens of this transformer interact only in attention (MLPs, norms and modulation act per token), so
dropping reference token j is the same as no query attending to its key, in any block: a per-key
gate g_j on the softmax weights (g_j e^{s_ij} / sum_k g_k e^{s_ik}) goes from the model (g = 1) to
the model without token j (g_j = 0). The proxy is the first-order Taylor term of that path.

`calibrate_selector` runs the calibration on a klein checkpoint (sample.py --calibrate).

May import: files, klein, model, pipeline, attention_selector. No script.
"""

import json
import math
import numbers
import sys
from contextlib import contextmanager

import torch

from files import field, read_json, write_atomic
from attention_selector import QUERIES, reference_attention
from klein import initial_noise, schedule, text_ids, grid_ids
from pipeline import Klein, encode_inputs, gather_references, load_references, loaded, output_size, resolve_source, sampling_defaults, sampling_device

# ----------------------------------------------------------------------------------------------
# Influence: what dropping one reference token does to the target's velocity


@contextmanager
def gated_reference_keys(model, log_gate):
    """Inside the `with`, every attention of `model` adds log_gate (B, M) to the logits of its last M
    keys, the reference tokens ([text | target | references]): log g_j, so 0 is the model itself and
    -inf the model without token j.

    How: one more channel on every query (1) and key (log g_j sqrt(D + 1); 0 for text and target),
    the queries scaled by sqrt((D + 1) / D) since attention now divides by sqrt(D + 1):
    q'.k' / sqrt(D + 1) = q.k / sqrt(D) + log g_j. SDPA takes values of another width, so no mask is
    passed and the gradient reaches log_gate through the keys. Wraps each block's qkv (after
    QK-norm and RoPE); the KV pattern's reference self-attention sees the same gated keys.
    """
    M = log_gate.shape[1]

    def gate(qkv):
        def gated(*args):
            q, k, *rest = qkv(*args)  # (B, L, H, D), the references last
            B, L, H, D = q.shape
            bias = (log_gate * math.sqrt(D + 1)).to(k.dtype)[:, :, None, None].expand(B, M, H, 1)
            bias = torch.cat([k.new_zeros(B, L - M, H, 1), bias], dim=1)  # (B, L, H, 1)
            q = torch.cat([q * math.sqrt((D + 1) / D), q.new_ones(B, L, H, 1)], dim=-1)
            return (q, torch.cat([k, bias], dim=-1), *rest)

        return gated

    blocks = [*model.double_blocks, *model.single_blocks]
    for block in blocks:
        block.qkv = gate(block.qkv)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for block in blocks:
            del block.qkv


def token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=False, exact=False, projections=32, seed=0):
    """(B, M) float32 >= 0: how much the target velocity v (B, N, C) changes when reference token j
    alone is dropped, as the mean over v's N x C entries of the squared change.

    exact=True: one forward per reference token, each without token j (ref and ref_ids minus row j):
    M + 1 forwards, for tiny models and validation only.
    exact=False (the proxy): the first-order change. With a = log g (gated_reference_keys), dropping
    token j moves g_j from 1 to 0, so to first order v changes by -dv/dg_j = -dv/da_j at a = 0. Its
    squared norm is estimated from `projections` random directions r ~ N(0, I): E[(r . dv/da_j)^2] =
    |dv/da_j|^2, and r . dv/da_j is the gradient of <r, v> with respect to a, every j at once. Cost:
    one forward with grad and `projections` backwards (their graph kept between them); seeded, so
    deterministic. kv_pattern: the references as in the KV cache (t = 0, attending only to references).
    """
    B, N, C = img.shape
    M = ref.shape[1]
    run = lambda r, ids: model(img, img_ids, txt, txt_ids, t, ref=r, ref_ids=ids, kv_pattern=kv_pattern)  # noqa: E731
    if exact:
        with torch.no_grad():
            base = run(ref, ref_ids).float()
            out = torch.empty(B, M, device=img.device)
            for j in range(M):
                keep = torch.arange(M, device=ref.device) != j
                v = run(ref[:, keep], ref_ids[..., keep, :]) if M > 1 else run(None, None)
                out[:, j] = (v.float() - base).pow(2).mean(dim=(1, 2))
        return out
    log_gate = torch.zeros(B, M, device=img.device, requires_grad=True)
    with torch.enable_grad(), gated_reference_keys(model, log_gate):
        v = run(ref, ref_ids)  # (B, N, C)
        g = torch.Generator().manual_seed(seed)
        out = torch.zeros(B, M, device=img.device)
        for i in range(projections):
            r = torch.randn(v.shape, generator=g).to(v)
            (grad,) = torch.autograd.grad(v, log_gate, r, retain_graph=i < projections - 1)  # (B, M): r . dv/da_j
            out += grad.float() ** 2
    return out / (projections * N * C)


# ----------------------------------------------------------------------------------------------
# Calibration: which attention scores rank the tokens as their influence does


def ranks(x):
    """Ranks 0..n-1 of a 1-D tensor, ties sharing their average rank (float64)."""
    x = x.double()
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    _, group = torch.unique(x, return_inverse=True)
    mean = torch.zeros(int(group.max()) + 1, dtype=x.dtype, device=x.device).index_add_(0, group, r) / torch.bincount(group)
    return mean[group]


def spearman(a, b):
    """Spearman rank correlation of two 1-D tensors (Pearson of their average ranks); 0 if either is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / norm if norm > 0 else 0.0


def calibrate_attention(model, examples, sigmas, blocks=None, queries=QUERIES, kv_pattern=False, exact=False, progress=None):
    """ToPi's offline calibration: the (block, queries, sigma) whose attention scores best rank the
    reference tokens by their influence.

    examples: (img, img_ids, txt, txt_ids, ref, ref_ids) tuples, a few validation examples (img the
    latent the scoring pass sees: for the selector, an image's noise). For every candidate sigma and
    example, the influence (token_influence, at t = sigma, the proxy unless exact) is measured where
    the scores are read, then for every block and queries the Spearman correlation of
    reference_attention's scores with it, per batch row, averaged over rows and examples. At sigma 1
    with noise, this is the influence on the first denoising step's velocity. Every queries choice is
    valid in both patterns: without kv_pattern, "references" are reference queries over all keys;
    with it, over reference keys only (reference_attention). progress: None or a callable given a
    message. Returns {"block", "queries", "sigma", "spearman", "kv_cache", "influence", "table": [{"sigma",
    "block", "queries", "spearman"}, ...]}, the best entry first in table order on ties.
    """
    n_blocks = len(model.double_blocks) + len(model.single_blocks)
    blocks = list(range(n_blocks)) if blocks is None else list(blocks)
    sums = {}
    for s in sigmas:
        for e, (img, img_ids, txt, txt_ids, ref, ref_ids) in enumerate(examples):
            if progress:
                progress(f"calibration: sigma {float(s):.4f}, example {e + 1}/{len(examples)}")
            t = torch.full((img.shape[0],), float(s), dtype=img.dtype, device=img.device)
            influence = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=kv_pattern, exact=exact)
            for b in blocks:
                for q in queries:
                    scores = reference_attention(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=b, queries=q, kv_pattern=kv_pattern)
                    rho = [spearman(a, i) for a, i in zip(scores, influence)]
                    key = (float(s), b, q)
                    sums[key] = sums.get(key, 0.0) + sum(rho) / len(rho)
    table = [dict(sigma=s, block=b, queries=q, spearman=total / len(examples)) for (s, b, q), total in sums.items()]
    best = max(table, key=lambda row: row["spearman"])  # max keeps the first of equal values
    return dict(block=best["block"], queries=best["queries"], sigma=best["sigma"], spearman=best["spearman"],
                kv_cache=bool(kv_pattern), influence="exact" if exact else "proxy", table=table)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The calibration file


def save_calibration(path, calibration):
    """The calibration dict as a JSON file, written atomically: the choice first, then the table, one
    candidate per line."""
    head = json.dumps({k: v for k, v in calibration.items() if k != "table"}, indent=1)[:-2]  # without the closing "\n}"
    rows = ",\n".join("  " + json.dumps(row) for row in calibration.get("table", []))
    write_atomic(path, f'{head},\n "table": [\n{rows}\n ]\n}}\n')


def load_calibration(path, n_blocks=None):
    """{"block", "queries", "sigma", "kv_cache"} of a calibration file, checked: block an integer in
    [0, n_blocks) (when given), queries one of QUERIES, sigma in (0, 1], kv_cache (optional) true or
    false. Anything else is one ValueError naming the file; other fields (the table) are not read."""
    raw = read_json(path)
    where = f"attention calibration file {path}"
    block = field(raw, "block", where, int, positive=False)
    if block < 0 or (n_blocks is not None and block >= n_blocks):
        raise ValueError(f"{where}: field 'block' is {block}, not one of the model's {n_blocks} blocks (0 to {n_blocks - 1})"
                         if n_blocks is not None else f"{where}: field 'block' must be >= 0, got {block}")  # fmt: skip
    queries = field(raw, "queries", where, str)
    if queries not in QUERIES:
        raise ValueError(f"{where}: field 'queries' must be one of {', '.join(QUERIES)}, got {queries!r}")
    sigma = field(raw, "sigma", where, float)
    if not 0 < sigma <= 1:
        raise ValueError(f"{where}: field 'sigma' must be in (0, 1], got {sigma!r}")
    return dict(block=block, queries=queries, sigma=float(sigma), kv_cache=field(raw, "kv_cache", where, bool, default=None))


# ----------------------------------------------------------------------------------------------
# On a klein checkpoint


CALIBRATION_SIGMAS = 4  # at most this many candidate sigmas, evenly spread over the schedule's steps


def calibrate_selector(model, prompt, refs, seed=0, steps=None, size=None, kv_cache=False, exact=False, device=None,
                       dtype=None, progress=True):  # fmt: skip
    """ToPi's offline calibration of the attention selector (calibrate.calibrate_attention) on
    validation examples: every (prompt, seed) pair is one example, the seed's noise with every token
    of refs, encoded and loaded as generate() does (one component at a time). The candidates: every
    block, every queries choice and the sigmas of up to CALIBRATION_SIGMAS of the schedule's steps
    (steps and the output size as generate's). kv_cache: calibrate for the KV pattern (references at
    t = 0, attending only to references), the one --kv-cache samples with. exact: the exact influence
    (one forward per reference token) instead of the proxy. Returns calibrate_attention's dict."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] if isinstance(seed, numbers.Integral) else list(seed)
    images = load_references(refs)
    if not images:
        raise ValueError("the calibration needs reference images: their tokens are what it ranks")
    klein = model if isinstance(model, Klein) else Klein(model)
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(klein.folder)
    steps, _ = sampling_defaults(folder, steps, 1.0)
    h, w = output_size(images, *(size or (None, None)))
    sigmas = schedule(steps, h * w)[:-1]
    sigmas = sigmas[torch.linspace(0, steps - 1, min(steps, CALIBRATION_SIGMAS)).round().long()].tolist()
    say = (lambda message: print(message, file=sys.stderr)) if progress else None  # noqa: E731
    with torch.no_grad():
        txts, _, encoded = encode_inputs(folder, prompts, images, False, dtype, device)
        ref, ref_ids = gather_references(encoded, [None] * len(encoded))
        img_ids = grid_ids(h, w).to(device)
        with loaded(klein.load_transformer, folder, dtype, device) as transformer:
            examples = [(initial_noise(s, transformer.cfg.in_channels, h, w, dtype).to(device), img_ids, txts[p],
                         text_ids(txts[p].shape[1]).to(device), ref, ref_ids) for p in prompts for s in seeds]  # fmt: skip
            return calibrate_attention(transformer, examples, sigmas, kv_pattern=kv_cache, exact=exact, progress=say)


if __name__ == "__main__":  # a module, not a command: its command is sample.py --calibrate
    print(__doc__.strip() + "\n\nIts command: python sample.py --model M --ref IMAGE ... --prompt TEXT --seeds 0 1 --calibrate OUT.json")
    sys.exit(0 if set(sys.argv[1:]) <= {"-h", "--help"} else 1)
