"""Model-aware token selection, an extra that plugs into pipeline.generate as its selector: the
reference tokens ranked by the attention mass the transformer itself gives them, then drawn by the
same sampling rule and budgets as the pixel maps (token_selectors.Selector).

    scores = reference_attention(model, ...)        # one forward up to `block`, every reference token
    kept = Selector("attention", ...)(images, keeps, scores=scores)

`AttentionSelector` is the callable generate() takes; `generate_rescored` is ToPi's temporal update
(arXiv 2602.01609): a loop driven from outside the core, denoising in two segments with the kept set
chosen again from the latent at step K. calibrate.py chooses the block, queries and sigma.

May import: klein, model, pipeline, token_selectors. No script.
"""

import math
import numbers
from dataclasses import dataclass, replace

import torch

from klein import grid_ids, initial_noise, schedule, span, text_ids
from model import KVCache
from pipeline import (LATENT_CAUSES, Klein, SampleStats, Scene, Timer, check_finite, decode_latents, denoise, encode_inputs,
                      gather_references, load_references, loaded, output_size, resolve_source, sampling_defaults, sampling_device)  # fmt: skip
from token_selectors import Selector, is_sparse
from vae import AutoEncoder

QUERIES = ("target", "text", "both", "references")
CHUNK_BYTES = 64 * 2**20  # float32 scores per chunk of queries in reference_attention


class _Stop(Exception):
    """Ends a forward at the block whose inputs reference_attention needs."""


@torch.no_grad()
def reference_attention(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=0, queries="target", kv_pattern=False):
    """(B, M) non-negative scores, one per reference token: the attention mass its key receives in
    `block` (0-based over double then single blocks) of one forward with every reference token, the
    softmax over all keys each query attends to, averaged over heads and over the chosen queries.

    queries: "target", "text", "both" (text and target) or "references". With kv_pattern the
    references run as in the KV cache (t = 0, attending only to references): "references" then ranks
    them by their mutual attention, which depends on neither the prompt nor the target, so one pass
    serves every prompt and seed of a reference set. The forward stops at `block`: the pass costs the
    blocks before it plus this block's projections and scores. The scores are accumulated over
    chunks of queries, so no (H, queries, keys) matrix exists: at most ~3 x CHUNK_BYTES beyond the
    block's own q and k (a forward holds those anyway).
    """
    if queries not in QUERIES:
        raise ValueError(f"unknown queries {queries!r}; choose one of {', '.join(QUERIES)}")
    blocks = [*model.double_blocks, *model.single_blocks]
    if not 0 <= block < len(blocks):
        raise ValueError(f"block {block} is not one of the model's {len(blocks)} blocks (0 to {len(blocks) - 1})")
    seen = []

    def grab(module, args):
        seen.append(args)
        raise _Stop

    hook = blocks[block].register_forward_pre_hook(grab)
    try:
        model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_pattern=kv_pattern)
    except _Stop:
        pass
    finally:
        hook.remove()
    args = seen[0]
    q, k = blocks[block].qkv(*(args[:5] if block < len(model.double_blocks) else args[:3]))[:2]  # (B, L + N + M, H, D)
    L, N, M = txt.shape[1], img.shape[1], ref.shape[1]
    rows = {"target": slice(L, L + N), "text": slice(0, L), "both": slice(0, L + N), "references": slice(L + N, None)}[queries]
    keys = slice(L + N, None) if kv_pattern and queries == "references" else slice(None)  # who each query sees
    qs, ks = q[:, rows].transpose(1, 2), k[:, keys].transpose(1, 2)  # (B, H, Q, D), (B, H, K, D)
    B, H, Q, D = qs.shape
    mass = torch.zeros(B, ks.shape[2], dtype=torch.float32, device=q.device)
    step = max(1, CHUNK_BYTES // (B * H * ks.shape[2] * 4))  # query rows per chunk of float32 scores
    for i in range(0, Q, step):
        scores = (qs[:, :, i : i + step] @ ks.transpose(-1, -2)).float() * D**-0.5  # (B, H, chunk, K)
        mass += scores.softmax(dim=-1).sum(dim=(1, 2))
    return mass[:, -M:] / (H * Q)


# ----------------------------------------------------------------------------------------------
# The selector generate() calls


def attention_scores(transformer, encoded, txt, h, w, sigma, seed, kv_pattern, queries="target", block=0, x=None):
    """Per-reference (N_i,) scores from the transformer itself (reference_attention): every
    reference token, the first image's noise (seed) at sigma (the first step's, or a calibration's),
    its prompt txt (1, L, J); x (1, N, C): score from this latent instead of the noise (a re-score).
    In the KV pattern with queries "references" the scores depend on the references alone."""
    ref, ref_ids = gather_references(encoded, [None] * len(encoded))
    x = initial_noise(seed, transformer.cfg.in_channels, h, w, ref.dtype).to(ref.device) if x is None else x
    t = torch.as_tensor(sigma).reshape(1).to(ref.device, ref.dtype)
    scores = reference_attention(transformer, x, grid_ids(h, w).to(ref.device), txt, text_ids(txt.shape[1]).to(ref.device), t,
                                 ref, ref_ids, block=block, queries=queries, kv_pattern=kv_pattern)[0]  # fmt: skip
    return list(scores.split([tokens.shape[1] for tokens, _ in encoded]))


@dataclass
class AttentionSelector:
    """The attention selector as pipeline.generate takes it: every reference token scored once by
    reference_attention (block, queries) from the first image's noise and prompt at `sigma` (None: the
    first step's; a calibration's otherwise), then drawn by `rule` (a Selector: uniform mix, budget,
    seed, multiple). Dense keeps (and no budget) run no scoring pass."""

    rule: Selector = None
    queries: str = "target"
    block: int = 0
    sigma: float = None

    def __post_init__(self):
        self.rule = replace(self.rule or Selector(), name="attention")  # the rule's draw, from the model's scores
        if self.queries not in QUERIES:
            raise ValueError(f"attention queries {self.queries!r}: choose one of {', '.join(QUERIES)}")

    def scores(self, scene, x=None, sigma=None):
        h, w = scene.size
        sigma = (scene.sigmas[0] if self.sigma is None else torch.tensor(self.sigma)) if sigma is None else sigma
        return attention_scores(scene.transformer, scene.encoded, scene.txt, h, w, sigma, scene.seed, scene.kv_cache,
                                self.queries, self.block, x=x)  # fmt: skip

    def __call__(self, images, keeps, scene):
        if not is_sparse(keeps, self.rule.budget):
            return [None] * len(images)
        return self.rule(images, keeps, scores=self.scores(scene))


# ----------------------------------------------------------------------------------------------
# ToPi's temporal update: a two-segment denoise driven from here


def rescore_references(select, images, keeps, scene, kept, x, sigma):
    """ToPi's temporal update at one step: the kept set chosen again from the current latent.

    Every reference token (not only the kept ones) enters one scoring pass of `select` (an
    AttentionSelector) from x (1, N, C), the first image's latent at the step's sigma, with its
    prompt; the run's budget and sampling rule, seeded as the first selection was, draw the new kept
    indices. Returns (kept, ref, ref_ids) of the new set, or None when it equals `kept`: the sampler
    then goes on as it was, bit-identical to a run without the re-score (its KV cache included).

    A KV cache is not patched for what changed: the sampler fills a new one for the new set (one
    forward of its references in the KV pattern, at this step, by the first image). Keeping the
    entries of tokens kept in both sets would not be exact: in the KV pattern references attend to
    each other, so from the second block on a token's K/V depend on which other tokens are present.
    """
    new = select.rule(images, keeps, scores=select.scores(scene, x=x, sigma=sigma))
    if all(torch.equal(a, b) if a is not None and b is not None else a is b for a, b in zip(new, kept)):
        return None
    return (new, *gather_references(scene.encoded, new))


def generate_rescored(model, prompt, refs, rescore_step, seed=0, size=None, steps=None, guidance=None, keep=1.0,
                      selector=None, kv_cache=False, device=None, dtype=None):  # fmt: skip
    """pipeline.generate with ToPi's temporal update at step K = rescore_step (1 to steps - 1): the
    first batch denoises steps 0..K-1 on the first selection, its first image's latent re-selects the
    reference tokens (rescore_references), and every image runs steps K.. on the new set; with
    kv_cache a second cache holds the new set's K/V, filled once at step K. stats.rescored holds the
    new kept set (the old one when nothing changed); both scoring passes are timed as token scoring.
    selector: an AttentionSelector (default: AttentionSelector())."""
    klein = model if isinstance(model, Klein) else Klein(model)
    select = AttentionSelector() if selector is None else selector
    single = isinstance(prompt, str) and isinstance(seed, numbers.Integral)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] if isinstance(seed, numbers.Integral) else list(seed)
    images = load_references(refs)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(images)
    if not images or not is_sparse(keeps, select.rule.budget):
        raise ValueError("the re-score needs reference images and a keep below 1 (or the adaptive budget)")
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(klein.folder)
    steps, guidance = sampling_defaults(folder, steps, guidance)
    if not (isinstance(rescore_step, numbers.Integral) and 1 <= rescore_step <= steps - 1):
        raise ValueError(f"the re-score step must be an integer from 1 to steps - 1 = {steps - 1}, got {rescore_step!r}")
    h, w = output_size(images, *(size or (None, None)))
    stats = SampleStats()
    timer = Timer(stats, device)
    K = rescore_step
    with torch.no_grad():
        txts, neg, encoded = encode_inputs(folder, prompts, images, guidance > 1, dtype, device, klein.batch_size, timer)
        with loaded(klein.load_transformer, folder, dtype, device) as transformer:
            timer.lap("denoising")
            sigmas = schedule(steps, h * w).to(device)
            scene = Scene(transformer, encoded, txts[prompts[0]], seeds[0], (h, w), sigmas, kv_cache)
            stats.kept = select(images, keeps, scene)
            timer.lap("token scoring")
            stats.ref_tokens = [(math.prod(span(im)), len(i)) for im, (t, _), i in zip(images, encoded, stats.kept)]
            stats.loop = (transformer.cfg, scene.txt.shape[1], h * w, steps)
            segments = [(*gather_references(encoded, stats.kept), sigmas[: K + 1])]  # (ref, ref_ids, sigmas) per segment
            caches = [KVCache() if kv_cache else None]
            img_ids, txt_ids = grid_ids(h, w).to(device), text_ids(scene.txt.shape[1]).to(device)
            jobs = [(p, s) for p in prompts for s in seeds]
            latents = []
            for i in range(0, len(jobs), klein.batch_size):
                batch = jobs[i : i + klein.batch_size]
                x = torch.cat([initial_noise(s, transformer.cfg.in_channels, h, w, dtype) for _, s in batch]).to(device)
                txt = torch.cat([txts[p] for p, _ in batch])
                for n, ((ref, ref_ids, part), cache) in enumerate(zip(segments, caches)):
                    x = denoise(transformer, x, img_ids, txt, txt_ids, part, ref=ref, ref_ids=ref_ids, kv_cache=cache,
                                guidance=guidance, neg_txt=neg, progress="denoising")  # fmt: skip
                    if n == 0 and len(segments) == 1:  # the first batch at step K: choose again
                        timer.lap("denoising")
                        new = rescore_references(select, images, keeps, scene, stats.kept, x[:1], sigmas[K])
                        stats.rescored = stats.kept if new is None else new[0]
                        timer.lap("token scoring")
                        segments.append((*segments[0][:2], sigmas[K:]) if new is None else (new[1], new[2], sigmas[K:]))
                        caches.append(caches[0] if new is None else KVCache() if kv_cache else None)
                for (p, s), xi in zip(batch, x.split(1)):
                    check_finite(xi, f"the sampled latent for prompt {p!r} seed {s}", LATENT_CAUSES)
                latents += x.split(1)
        timer.lap("denoising")
        with loaded(AutoEncoder.from_pretrained, folder, dtype=dtype, device=device) as vae:
            outputs = decode_latents(vae, latents, h, w, klein.batch_size)
        timer.lap("decoding")
    return (outputs[0] if single else outputs), stats
