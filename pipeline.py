"""The klein sampling pipeline as small functions, imported by every script that samples.

    text encoder -> references (prepare, select tokens, VAE-encode, gather the kept ones)
    -> denoise with the transformer -> VAE decode

`generate()` runs it end to end. Each component is loaded once, used for every image and freed
(`loaded`), so peak memory is the largest component, not their sum. Each distinct prompt is encoded
once; the references are encoded and selected once, and with a KV cache their K/V are extracted once
and shared by every prompt, seed and step. The options sample.py and compare.py share are defined and
checked here too, before any model loads.

May import: files, quant, model, vae, text_encoder, token_selectors, lora, calibrate. No script (sample.py, compare.py, ...).
"""

import gc
import math
import numbers
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from calibrate import calibrate_attention, load_calibration
from files import DTYPES, check_number, check_writable, image_format, load_image, read_json, resolve_component, resolve_device, write_atomic
from model import QUERIES, Flux2, KVCache, load_checkpoint, reference_attention
from quant import check_weights
from text_encoder import TextEncoder
from token_selectors import draw_selection, select_reference_tokens
from klein import MAX_STEPS, grid_ids, initial_noise, pack, prepare_reference, reference_ids, schedule, text_ids, to_image, to_tensor, unpack
from vae import AutoEncoder

MAX_SIDE = 4096  # output pixels a side (klein generates up to 4 megapixels)
MAX_IMAGES = 10000  # images per run
COMPILE_BUCKET = 64  # with compile, kept reference-token counts round up to a multiple of this

# ----------------------------------------------------------------------------------------------
# The denoising loop (pure functions)


def velocity(model, x, img_ids, txt, txt_ids, t, ref, ref_ids, cache, pe):
    """Target velocity (B, N, C) of B images that share one set of reference tokens ref (1, M, C).

    No cache: every image runs the references (they attend to its text and target). Empty cache:
    the first image runs them in the KV pattern and fills the cache; the other images, like every
    later call, attend to the cached K/V (one copy for the whole batch) and run no reference token.
    pe: model.rope of [text | target | references], computed once per run; a cached call takes its
    [text | target] rows.
    """
    B = x.shape[0]
    fresh = pe[:, : txt.shape[1] + x.shape[1]]
    if cache is None:
        refs = {} if ref is None else dict(ref=ref.expand(B, -1, -1), ref_ids=ref_ids)
        return model(x, img_ids, txt, txt_ids, t, pe=pe, **refs)
    if len(cache) == 0:
        if ref.shape[0] == B:  # one set of references per image (e.g. an evaluation batch): fill from all
            return model(x, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_cache=cache, pe=pe)
        v = model(x[:1], img_ids, txt[:1], txt_ids, t[:1], ref=ref, ref_ids=ref_ids, kv_cache=cache, pe=pe)
        if B == 1:
            return v
        return torch.cat([v, model(x[1:], img_ids, txt[1:], txt_ids, t[1:], kv_cache=cache, pe=fresh)])
    return model(x, img_ids, txt, txt_ids, t, kv_cache=cache, pe=fresh)


def denoise(model, x, img_ids, txt, txt_ids, sigmas, ref=None, ref_ids=None, kv_cache=None,
            guidance=1.0, neg_txt=None, progress=False, pe=None):  # fmt: skip
    """Flow-matching Euler from noise x (B, N, C) at sigmas[0] to sigmas[-1]; returns x.

    txt (B, L, J): each image's prompt; ref (1, M, C), ref_ids (M, 4): references all images share.
    With guidance > 1 (base checkpoints) the velocity is v_u + g (v_c - v_u) from a second pass on
    neg_txt (1, L, J). kv_cache: None, or a KVCache: empty, it is filled at the first step from one
    image; filled, it is reused as it is. In the KV pattern references see neither text nor target,
    so one extraction is exact for both CFG passes, every prompt, every seed and every later call.
    progress: False or a progress-bar label. pe: model.rope(txt_ids, img_ids, ref_ids), computed here
    if not given.
    """
    cache = kv_cache if kv_cache is not None and (ref is not None or len(kv_cache)) else None
    pe = model.rope(txt_ids, img_ids, ref_ids) if pe is None else pe
    B = x.shape[0]
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc=progress or None):
        t = (sigmas[i] * 1000).expand(B).to(x.dtype) / 1000  # diffusers passes timesteps / 1000
        v = velocity(model, x, img_ids, txt, txt_ids, t, ref, ref_ids, cache, pe)
        if guidance > 1:
            v_u = velocity(model, x, img_ids, neg_txt.expand(B, -1, -1), txt_ids, t, ref, ref_ids, cache, pe)
            v = v_u + guidance * (v - v_u)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
    return x


# ----------------------------------------------------------------------------------------------
# Reference images


def load_references(refs):
    """Paths or PIL images (one path alone is one reference) -> RGB PIL images prepared as klein does."""
    refs = [refs] if isinstance(refs, (str, os.PathLike, Image.Image)) else list(refs)
    images = []
    for r in refs:
        path = isinstance(r, (str, os.PathLike))
        try:
            images.append(prepare_reference(load_image(r) if path else r))
        except ValueError as e:
            raise ValueError(f"{r}: {e}" if path and str(r) not in str(e) else str(e)) from None
    return images


def save_selection_image(images, kept, path):
    """Each reference with its kept tokens highlighted, side by side in one image."""
    tiles = [draw_selection(im, idx if idx is not None else torch.arange((im.size[0] // 16) * (im.size[1] // 16)))
             for im, idx in zip(images, kept)]  # fmt: skip
    canvas = Image.new("RGB", (sum(t.size[0] for t in tiles), max(t.size[1] for t in tiles)), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.size[0]
    write_atomic(path, canvas)


# ----------------------------------------------------------------------------------------------
# Checks: every value before anything loads


def check_sampling(prompts, seeds, n_refs, steps=None, guidance=None, height=None, width=None, keep=1.0,
                   uniform_mix=0.25, budget="uniform", kv_cache=False, save_selection=None, lora=None,
                   lora_scale=1.0, batch_size=1):  # fmt: skip
    """Every value and combination generate() takes; a ValueError names the (command-line) option."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("give at least one prompt (--prompt or --prompts FILE), each a string")
    if not seeds:
        raise ValueError("give at least one seed")
    for s in seeds:
        check_number("--seed", s, 0, 2**63 - 1, integer=True)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"--seeds repeats a seed: {list(seeds)}")
    check_number("number of images (prompts x seeds)", len(prompts) * len(seeds), 1, MAX_IMAGES, integer=True)
    if steps is not None:
        check_number("--steps", steps, 1, MAX_STEPS, integer=True)
    if guidance is not None:
        check_number("--guidance", guidance, 1)
    for option, v in (("--height", height), ("--width", width)):
        if v is not None:
            check_number(option, v, 16, MAX_SIDE, integer=True)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    for k in keeps:
        check_number("--keep", k, 0, 1, low_open=True)
    check_number("--uniform-mix", uniform_mix, 0, 1)
    check_number("--lora-scale", lora_scale)
    check_number("--batch-size", batch_size, 1, MAX_IMAGES, integer=True)
    if budget not in ("uniform", "adaptive"):
        raise ValueError(f"unknown --budget {budget!r}; choose uniform or adaptive")
    if n_refs == 0:
        given = [o for o, v in (("--keep", keeps != [1.0]), ("--kv-cache", kv_cache), ("--save-selection", save_selection)) if v]
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply without a reference image (--ref)")
    elif len(keeps) not in (1, n_refs):
        raise ValueError(f"--keep has {len(keeps)} values for {n_refs} reference images: give one, or one per reference")
    if budget == "adaptive" and len(keeps) > 1:
        raise ValueError("--budget adaptive splits one total fraction across references by structure: give one "
                         "--keep value (or use --budget uniform for per-reference values)")  # fmt: skip
    if save_selection is not None:
        image_format(save_selection)
        check_writable(save_selection, "--save-selection")
    if lora is not None:
        check_lora_file(lora)


def check_lora_file(path):
    """The LoRA (a file, or a folder holding pytorch_lora_weights.safetensors) parses and holds only
    finite values: a NaN LoRA would give a black image."""
    from lora import read_lora

    sd, _ = read_lora(path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"LoRA file {path}: {len(bad)} tensors hold NaN or inf values, e.g. {bad[0]}")


def check_finite(x, what, cause):
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} is not finite (NaN or inf); likely cause: {cause}; nothing was written")


# ----------------------------------------------------------------------------------------------
# The pipeline in stages (compare.py and bench.py reuse them)


@dataclass
class SampleStats:
    seconds: dict = field(default_factory=dict)  # stage -> wall-clock seconds
    ref_tokens: list = field(default_factory=list)  # (before, after) selection, per reference
    kept: list = field(default_factory=list)  # kept token indices per reference (None: all)
    rescored: list = field(default_factory=list)  # kept from the re-score's step on (attention_rescore_step), else empty


def synchronize(device):
    """Wait for the work queued on `device` (the model's, not the current CUDA device)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Adds the wall-clock time since the last lap to stats.seconds[stage] (GPU work included)."""

    def __init__(self, stats, device):
        self.stats, self.device, self.clock = stats, device, time.perf_counter()

    def lap(self, stage):
        synchronize(self.device)
        now = time.perf_counter()
        self.stats.seconds[stage] = self.stats.seconds.get(stage, 0.0) + now - self.clock
        self.clock = now


def resolve_source(source):
    """A local klein repository folder for a folder path or a hub id (downloads only what sampling needs)."""
    patterns = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]
    folder = resolve_component(source, None, patterns)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model source {source} is not a klein repository folder")
    return folder


def is_distilled(folder):
    """klein's model_index.json says whether a checkpoint is step-distilled (4 steps, no CFG)."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        return True
    distilled = read_json(path).get("is_distilled", False)
    if not isinstance(distilled, bool):
        raise ValueError(f"{path}: field 'is_distilled' must be true or false, got {distilled!r}")
    return distilled


def sampling_device(device=None, dtype=None):
    """(device, dtype) for sampling: resolve_device's, fp16 refused (klein's transformer activations
    overflow fp16's 65504), and TF32 matmuls for fp32 on CUDA (klein's own inference runs bf16)."""
    device, dtype = resolve_device(device, dtype)
    if dtype == torch.float16:
        raise ValueError("--dtype fp16: klein's transformer overflows float16 (activations beyond 65504); use bf16 "
                         "(the GPU default) or fp32")  # fmt: skip
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, dtype


def sampling_defaults(folder, steps, guidance):
    """(steps, guidance) where not given: distilled checkpoints 4 steps without CFG, base ones 50 with CFG 4."""
    distilled = is_distilled(folder)
    return steps or (4 if distilled else 50), ((1.0 if distilled else 4.0) if guidance is None else guidance)


def free(*modules):
    for m in modules:
        m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded(component, folder, dtype, device, lora=None, lora_scale=1.0, lora_merge=None, **options):
    """component.from_pretrained(folder, **options) for one `with` block, then freed: one component in
    memory at a time. A LoRA (transformer only) is applied on load: merged into fp32 weights; kept
    unmerged beside 16-bit ones (a float32 LoRA path, as training ran it and as diffusers'
    load_lora_weights keeps it), since a merge rounds every update below half a bf16 step of its weight
    away; lora_merge forces either. 8-bit layers always keep it unmerged."""
    module = component.from_pretrained(folder, dtype=dtype, device=device, **options)
    try:
        if lora:
            from lora import load_lora

            merge = next(module.parameters()).dtype == torch.float32 if lora_merge is None else lora_merge
            load_lora(module, lora, scale=lora_scale, merge=merge)
        yield module
    finally:
        free(module)


def is_sparse(keep, budget):
    """Tokens are dropped: some keep below 1, or the adaptive budget."""
    return any(k < 1 for k in (keep if isinstance(keep, (list, tuple)) else [keep])) or budget == "adaptive"


def select_references(images, keep, selector, task, seed, uniform_mix, budget, scores=None, multiple=1):
    """Kept token indices (row-major on each reference's 16-px grid) per reference; None keeps all.
    selector "attention" takes the model's per-reference scores (attention_scores); counts rounded up to a
    multiple of `multiple` (token_selectors.n_keep)."""
    keeps = keep if isinstance(keep, (list, tuple)) else [keep] * len(images)
    if len(keeps) != len(images):
        raise ValueError(f"--keep has {len(keeps)} values for {len(images)} reference images")
    if not is_sparse(keeps, budget):
        return [None] * len(images)  # dense: bit-identical to klein
    if task not in ("edit", "subject"):
        raise ValueError(f"unknown task {task!r}; choose edit or subject")
    if selector == "auto":  # structure for editing, the salient subject for personalization
        selector = "canny" if task == "edit" else "saliency"
    return select_reference_tokens(images, keeps, selector=selector, seed=seed, uniform_mix=uniform_mix, budget=budget,
                                   scores=scores, multiple=multiple)  # fmt: skip


def attention_scores(transformer, encoded, txt, h, w, sigma, seed, kv_pattern, queries="target", block=0, x=None):
    """Per-reference (N_i,) scores from the transformer itself (model.reference_attention): every
    reference token, the first image's noise (seed) at sigma (the first step's, or a calibration's),
    its prompt txt (1, L, J); x (1, N, C): score from this latent instead of the noise (a re-score).
    In the KV pattern with queries "references" the scores depend on the references alone."""
    ref, ref_ids = gather_references(encoded, [None] * len(encoded))
    x = initial_noise(seed, transformer.cfg.in_channels, h, w, ref.dtype).to(ref.device) if x is None else x
    t = torch.as_tensor(sigma).reshape(1).to(ref.device, ref.dtype)
    scores = reference_attention(transformer, x, grid_ids(h, w).to(ref.device), txt, text_ids(txt.shape[1]).to(ref.device), t,
                                 ref, ref_ids, block=block, queries=queries, kv_pattern=kv_pattern)[0]  # fmt: skip
    return list(scores.split([tokens.shape[1] for tokens, _ in encoded]))


def rescore_references(transformer, encoded, kept, x, txt, h, w, sigma, select, kv_pattern, queries="target", block=0):
    """ToPi's temporal update at one step: the kept set chosen again from the current latent.

    Every reference token (not only the kept ones) enters one scoring pass (attention_scores) from x
    (1, N, C), the first image's latent at the step's sigma, with its prompt txt; select (the run's
    budget and sampling rule, seeded as the first selection was) draws the new kept indices. Returns
    (kept, ref, ref_ids) of the new set, or None when it equals `kept`: the sampler then goes on as it
    was, bit-identical to a run without the re-score (its KV cache included).

    A KV cache is not patched for what changed: the sampler fills a new one for the new set (one
    forward of its references in the KV pattern, at this step, by the first image). Keeping the
    entries of tokens kept in both sets would not be exact: in the KV pattern references attend to
    each other, so from the second block on a token's K/V depend on which other tokens are present.
    """
    new = select(attention_scores(transformer, encoded, txt, h, w, sigma, None, kv_pattern, queries, block, x=x))
    if all(torch.equal(a, b) if a is not None and b is not None else a is b for a, b in zip(new, kept)):
        return None
    return (new, *gather_references(encoded, new))


def vae_dtype(module):
    return next(module.parameters()).dtype


def encode_prompts(text, prompts, batch_size):
    """{prompt: (1, L, J)} with every distinct prompt encoded once, batch_size at a time."""
    unique = list(dict.fromkeys(prompts))
    out = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        out.update(zip(chunk, text.encode(chunk).split(1)))
    return out


def encode_references(vae, images, device, dtype):
    """VAE-encode each reference once: a list of (tokens (1, n, 128) in dtype, ids (n, 4)), all tokens."""
    out = []
    for k, image in enumerate(images):
        z = vae.encode(to_tensor(image).to(device, vae_dtype(vae)))  # (1, 128, h, w)
        out.append((pack(z).to(dtype), reference_ids(k, z.shape[2], z.shape[3]).to(device)))
    return out


def gather_references(encoded, kept):
    """The kept tokens of all references: ref (1, M, 128), ref_ids (M, 4); None keeps all.

    The one place tokens are dropped; a kept token keeps its original (t, h, w, l) id.
    """
    refs, ids = [], []
    for (tokens, tids), idx in zip(encoded, kept):
        if idx is not None:
            idx = idx.to(tokens.device)
            tokens, tids = tokens[:, idx], tids[idx]
        refs.append(tokens)
        ids.append(tids)
    return torch.cat(refs, dim=1), torch.cat(ids)


LATENT_CAUSES = "the LoRA (--lora, --lora-scale), non-finite transformer weights, or --guidance"


def sample_latents(transformer, jobs, txts, h, w, steps, ref=None, ref_ids=None, kv_cache=False, guidance=1.0,
                   neg=None, batch_size=1, progress=False, rescore=None):  # fmt: skip
    """Final latents (1, h * w, C) for every (prompt, seed) job, batch_size images per transformer call.

    txts {prompt: (1, L, J)}. With kv_cache the references' K/V are extracted once, by the first
    image, and every other image of every batch attends to them (read in place, not recomputed). The
    RoPE table is computed once for all of them. rescore: None, or (K, function(x (1, N, C), sigma) ->
    None or (kept, ref, ref_ids)), the temporal update (rescore_references): the first batch stops at
    step K, its first image's latent re-selects the reference tokens, and every image runs steps K...
    on the new set; with kv_cache a second cache holds the new set's K/V, filled once at step K.
    """
    device = txts[jobs[0][0]].device
    dtype = next(transformer.parameters()).dtype
    sigmas, img_ids = schedule(steps, h * w).to(device), grid_ids(h, w).to(device)
    txt_ids = text_ids(txts[jobs[0][0]].shape[1]).to(device)
    cache = KVCache() if kv_cache and ref is not None else None
    pe = transformer.rope(txt_ids, img_ids, ref_ids)
    K = rescore[0] if rescore else steps  # the steps before K run on (ref, ref_ids), the rest on `after`
    after = None  # (ref, ref_ids, cache, pe) from step K on, once the first batch has re-scored
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    out = []
    for b, batch in enumerate(batches):
        x = torch.cat([initial_noise(s, transformer.cfg.in_channels, h, w, dtype) for _, s in batch]).to(device)
        txt = torch.cat([txts[p] for p, _ in batch])
        label = progress and ("denoising" if len(batches) == 1 else f"denoising {b + 1}/{len(batches)}")
        x = denoise(transformer, x, img_ids, txt, txt_ids, sigmas[: K + 1], ref=ref, ref_ids=ref_ids, kv_cache=cache,
                    guidance=guidance, neg_txt=neg, progress=label, pe=pe)  # fmt: skip
        if rescore:  # ToPi's temporal update: step K on with the kept set the first image's latent chose
            if after is None:
                new = rescore[1](x[:1], sigmas[K])
                after = (ref, ref_ids, cache, pe) if new is None else \
                    (new[1], new[2], KVCache() if cache is not None else None, transformer.rope(txt_ids, img_ids, new[2]))  # fmt: skip
            ref_K, ref_ids_K, cache_K, pe_K = after
            x = denoise(transformer, x, img_ids, txt, txt_ids, sigmas[K:], ref=ref_K, ref_ids=ref_ids_K, kv_cache=cache_K,
                        guidance=guidance, neg_txt=neg, progress=label, pe=pe_K)  # fmt: skip
        for (p, s), xi in zip(batch, x.split(1)):
            check_finite(xi, f"the sampled latent for prompt {p!r} seed {s}", LATENT_CAUSES)
        out += x.split(1)
    return out


def decode_latents(vae, latents, h, w, batch_size=1):
    """Latents (1, h * w, C) -> PIL images, batch_size at a time; a non-finite image is an error."""
    images = []
    for i in range(0, len(latents), batch_size):
        x = torch.cat(latents[i : i + batch_size])
        pixels = vae.decode(unpack(x, h, w).to(vae_dtype(vae)))
        check_finite(pixels, "a decoded image", "non-finite VAE weights")
        images += [to_image(p) for p in pixels]
    return images


def encode_inputs(folder, prompts, images, negative, dtype, device, batch_size=1, timer=None):
    """The text encoder, then the VAE, each loaded once and freed: ({prompt: (1, L, J)}, the empty
    negative prompt's (1, L, J) if `negative` else None, each reference's (tokens, ids), all tokens)."""
    with loaded(TextEncoder, folder, dtype, device) as text:
        txts = encode_prompts(text, prompts, batch_size)
        neg = text.encode([""]) if negative else None
    if timer:
        timer.lap("text encoding")
    encoded = []
    if images:
        with loaded(AutoEncoder, folder, dtype, device) as vae:
            encoded = encode_references(vae, images, device, dtype)
    if timer:
        timer.lap("reference encoding")
    return txts, neg, encoded


def check_rescore_step(step, steps):
    if steps < 2:
        raise ValueError(f"--attention-rescore-step needs at least 2 denoising steps (--steps), not {steps}")
    check_number("--attention-rescore-step", step, 1, steps - 1, integer=True)


def output_size(images, height, width):
    """Output (h, w) in tokens: the first reference's size (else 1024 px) where not given, floored to 16 px."""
    w0, h0 = images[0].size if images else (1024, 1024)  # klein's default output size
    height, width = height or h0, width or w0
    if height < 16 or width < 16:
        raise ValueError(f"output size {width}x{height} is too small: at least 16x16")
    return height // 16, width // 16


def generate(model, prompt, refs=(), steps=None, guidance=None, seed=0, height=None, width=None, kv_cache=False,
             keep=1.0, selector="auto", task="edit", uniform_mix=0.25, budget="uniform", lora=None, lora_scale=1.0,
             lora_merge=None, device=None, dtype=None, save_selection=None, selection_seed=0, batch_size=1, progress=True,
             attention_queries="target", attention_block=0, weights=None, compile=False, transformer_source=None,
             attention_sigma=None, attention_rescore_step=None):  # fmt: skip
    """Sample images; `model` is a klein repository folder or hub id.

    prompt: a prompt or a list of them; seed: a seed or a list; refs: paths or PIL images (a single
    path is one reference). Every (prompt, seed) pair gives one image, prompt-major: (p0, s0),
    (p0, s1), ..., (p1, s0), ... Each distinct prompt is encoded once; the references are prepared,
    VAE-encoded and selected (seeded by selection_seed, the same for every image) once, and with
    kv_cache their K/V are extracted once for all images. selector "attention" ranks the reference
    tokens by the transformer's own attention (attention_scores, once, from the first image; the
    pass is timed as "token scoring"), at the first step's sigma or attention_sigma (a calibration's,
    in (0, 1]). attention_rescore_step K in [1, steps - 1]: ToPi's temporal update, every reference
    token scored again at step K from the first image's latent and the kept set drawn again with
    the same rule (rescore_references; stats.rescored; timed as "token scoring" too).
    transformer_source: a transformer checkpoint instead of model's
    (a BFL single file such as BFL's fp8 flux-2-klein-9b-fp8.safetensors, or a transformer folder);
    its config is checked before anything loads. weights "fp8" or "int8": the transformer's block Linears in
    8 bits (Flux2.from_pretrained), the rest in dtype. Returns (image, SampleStats) for one prompt
    and one seed, else ([images], SampleStats).

    compile: torch.compile the transformer forward (fullgraph, static shapes). A run's shapes are
    fixed, so it compiles once (twice with kv_cache: extraction and cached steps); each reference's
    kept count is rounded up to a multiple of COMPILE_BUCKET (or all its tokens), so runs over many
    keeps in one process share compilations: no padding, the selection keeps up to 63 tokens more
    (of 4096 in a 1024 px reference, 1.5%), and the output is the model's for that selection.
    """
    single = isinstance(prompt, str) and isinstance(seed, numbers.Integral)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] if isinstance(seed, numbers.Integral) else list(seed)
    jobs = [(p, s) for p in prompts for s in seeds]
    images = load_references(refs)
    check_sampling(prompts, seeds, len(images), steps, guidance, height, width, keep, uniform_mix, budget, kv_cache,
                   save_selection, lora, lora_scale, batch_size)  # fmt: skip
    if selector == "attention" and attention_queries not in QUERIES:
        raise ValueError(f"--attention-queries {attention_queries!r}: choose one of {', '.join(QUERIES)}")
    check_number("--attention-block", attention_block, 0, integer=True)
    if attention_sigma is not None:
        check_number("attention sigma", attention_sigma, 0, 1, low_open=True)
    by_model = selector == "attention" and is_sparse(keep, budget) and bool(images)
    if attention_rescore_step is not None and not by_model:
        raise ValueError("--attention-rescore-step cannot apply without the attention selector and a keep below 1")
    if attention_rescore_step is not None and compile:
        raise ValueError("--attention-rescore-step cannot be combined with --compile (the scoring pass stops the forward at a block)")
    if weights is not None:
        check_weights(weights)
    if transformer_source is not None:
        load_checkpoint(transformer_source)  # the config and tensor names, checked; the weights memory-mapped, unread
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(model)
    steps, guidance = sampling_defaults(folder, steps, guidance)
    if attention_rescore_step is not None:
        check_rescore_step(attention_rescore_step, steps)
    stats = SampleStats()
    timer = Timer(stats, device)
    multiple = COMPILE_BUCKET if compile else 1
    select = lambda scores=None: select_references(images, keep, selector, task, selection_seed, uniform_mix, budget, scores, multiple)  # noqa: E731
    kept = [] if not images else None if by_model else select()  # the attention selector needs the transformer
    h, w = output_size(images, height, width)

    with torch.no_grad():
        txts, neg, encoded = encode_inputs(folder, prompts, images, guidance > 1, dtype, device, batch_size, timer)
        with loaded(Flux2, transformer_source or folder, dtype, device, lora, lora_scale, lora_merge, weights=weights) as transformer:
            rescore = None
            if by_model:
                timer.lap("denoising")  # loading the transformer counts there, as in a run without scoring
                sigma = schedule(steps, h * w)[0] if attention_sigma is None else torch.tensor(attention_sigma)
                kept = select(attention_scores(transformer, encoded, txts[prompts[0]], h, w, sigma, seeds[0], kv_cache,
                                               attention_queries, attention_block))  # fmt: skip
                timer.lap("token scoring")
            if attention_rescore_step is not None:

                def rescore_at_step(x, sigma):  # x (1, N, C): the first image's latent at step K
                    timer.lap("denoising")
                    new = rescore_references(transformer, encoded, kept, x, txts[prompts[0]], h, w, sigma, select, kv_cache,
                                             attention_queries, attention_block)  # fmt: skip
                    stats.rescored = kept if new is None else new[0]
                    timer.lap("token scoring")
                    return new

                rescore = (attention_rescore_step, rescore_at_step)
            ref, ref_ids = gather_references(encoded, kept) if images else (None, None)
            stats.kept = kept
            stats.ref_tokens = [(tokens.shape[1], tokens.shape[1] if idx is None else len(idx)) for (tokens, _), idx in zip(encoded, kept)]
            if compile:
                transformer.compile(fullgraph=True, dynamic=False)
            latents = sample_latents(transformer, jobs, txts, h, w, steps, ref, ref_ids, kv_cache, guidance, neg,
                                     batch_size, progress, rescore)  # fmt: skip
        timer.lap("denoising")

        with loaded(AutoEncoder, folder, dtype, device) as vae:
            outputs = decode_latents(vae, latents, h, w, batch_size)
        timer.lap("decoding")
    if save_selection:  # only once every image exists: a failed run leaves nothing behind
        save_selection_image(images, kept, save_selection)
    return (outputs[0] if single else outputs), stats


CALIBRATION_SIGMAS = 4  # at most this many candidate sigmas, evenly spread over the schedule's steps


def calibrate_selector(model, prompt, refs, seed=0, steps=None, height=None, width=None, kv_cache=False, exact=False,
                       lora=None, lora_scale=1.0, lora_merge=None, device=None, dtype=None, weights=None,
                       transformer_source=None, progress=True):  # fmt: skip
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
        raise ValueError("the calibration needs reference images (--ref): their tokens are what it ranks")
    check_sampling(prompts, seeds, len(images), steps, None, height, width, lora=lora, lora_scale=lora_scale)
    if weights is not None:
        check_weights(weights)
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(model)
    steps, _ = sampling_defaults(folder, steps, 1.0)
    h, w = output_size(images, height, width)
    sigmas = schedule(steps, h * w)[:-1]
    sigmas = sigmas[torch.linspace(0, steps - 1, min(steps, CALIBRATION_SIGMAS)).round().long()].tolist()
    say = (lambda message: print(message, file=sys.stderr)) if progress else None  # noqa: E731
    with torch.no_grad():
        txts, _, encoded = encode_inputs(folder, prompts, images, False, dtype, device)
        ref, ref_ids = gather_references(encoded, [None] * len(encoded))
        img_ids = grid_ids(h, w).to(device)
        with loaded(Flux2, transformer_source or folder, dtype, device, lora, lora_scale, lora_merge, weights=weights) as transformer:
            examples = [(initial_noise(s, transformer.cfg.in_channels, h, w, dtype).to(device), img_ids, txts[p],
                         text_ids(txts[p].shape[1]).to(device), ref, ref_ids) for p in prompts for s in seeds]  # fmt: skip
            return calibrate_attention(transformer, examples, sigmas, kv_pattern=kv_cache, exact=exact, progress=say)


# ----------------------------------------------------------------------------------------------
# Options that sample.py and compare.py share


def add_common_args(p):
    """Options sample.py and compare.py share. None defaults let the checks tell given from default."""
    p.add_argument("--model", required=True, help="klein repository folder or hub id, e.g. black-forest-labs/FLUX.2-klein-4B (required)")
    p.add_argument("--ref", action="extend", nargs="+", default=[], metavar="IMAGE",
                   help="reference image(s), repeatable (--ref a.png b.png and --ref a.png --ref b.png both give two); "
                        "reference k gets position t = 10 (k + 1) (default: none)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps, 1 to {MAX_STEPS} (default: 4 distilled, 50 base)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale, >= 1; 1 turns CFG off (default: 1 distilled, 4 base)")
    p.add_argument("--height", type=int, default=None, help=f"output height, 16 to {MAX_SIDE}, floored to a multiple of 16 (default: first reference's, else 1024)")
    p.add_argument("--width", type=int, default=None, help=f"output width, 16 to {MAX_SIDE}, floored to a multiple of 16 (default: first reference's, else 1024)")
    p.add_argument("--kv-cache", action="store_true", help="extract the reference K/V once and reuse them for every step and image (klein-9b-kv) (default: off)")
    p.add_argument("--task", default=None, choices=["edit", "subject"], help="task that picks the auto selector (default: edit)")
    p.add_argument("--uniform-mix", type=float, default=None, help="share of uniform probability mixed into the selector's, in [0, 1] (default: 0.25)")
    p.add_argument("--budget", default=None, choices=["uniform", "adaptive"], help="token budget across references: uniform (each its own --keep) or adaptive (one total split by structure) (default: uniform)")
    p.add_argument("--selection-seed", type=int, default=None, help="seed of the token selection, shared by every image (default: 0)")
    p.add_argument("--lora", default=None, help="LoRA file (diffusers, BFL/ai-toolkit or kohya format) (default: none)")
    p.add_argument("--lora-scale", type=float, default=None, help="LoRA strength, needs --lora (default: 1)")
    p.add_argument("--lora-merge", action="store_true",
                   help="merge the LoRA into 16-bit weights too (default: merged only into fp32 weights; bf16/fp16 ones keep "
                        "it unmerged, since a merge rounds updates below half a bf16 step away)")  # fmt: skip
    p.add_argument("--attention-queries", default=None, choices=QUERIES,
                   help="the attention selector's queries: target, text, both, or references (with --kv-cache: their mutual "
                        "attention, the same for every prompt) (default: target)")  # fmt: skip
    p.add_argument("--attention-block", type=int, default=None,
                   help="the block whose attention the attention selector reads, 0-based over double then single blocks (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights and activations; fp16 is refused (klein overflows it) (default: bf16 on GPU, fp32 on CPU)")


def check_common(args, sparse, attention=False):
    """Checks of the shared options that need no model weights; returns (device, dtype). sparse: tokens
    are dropped; attention: the attention selector runs."""
    if not args.ref:
        given = [o for o, v in (("--task", args.task), ("--uniform-mix", args.uniform_mix), ("--budget", args.budget),
                                ("--selection-seed", args.selection_seed), ("--kv-cache", args.kv_cache)) if v is not None and v is not False]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply without a reference image (--ref)")
    elif not sparse:
        given = [o for o, v in (("--task", args.task), ("--uniform-mix", args.uniform_mix), ("--budget", args.budget),
                                ("--selection-seed", args.selection_seed)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)} cannot apply with --keep 1 (no token is dropped)")
    if args.lora is None and (args.lora_scale is not None or args.lora_merge):
        raise ValueError(f"{'--lora-scale' if args.lora_scale is not None else '--lora-merge'} cannot apply without --lora")
    if args.selection_seed is not None:
        check_number("--selection-seed", args.selection_seed, 0, 2**63 - 1, integer=True)
    calibration, rescore = getattr(args, "attention_calibration", None), getattr(args, "attention_rescore_step", None)  # sample.py's
    given = [o for o, v in (("--attention-queries", args.attention_queries), ("--attention-block", args.attention_block),
                            ("--attention-calibration", calibration), ("--attention-rescore-step", rescore)) if v is not None]  # fmt: skip
    if given and not (attention and sparse):
        raise ValueError(f"{', '.join(given)} cannot apply without the attention selector and a keep below 1")
    if calibration is not None and (args.attention_queries is not None or args.attention_block is not None):
        raise ValueError("--attention-calibration sets the block and queries: give it or --attention-block/--attention-queries, not both")
    device, dtype = sampling_device(args.device, args.dtype)
    load_references(args.ref)  # every reference exists, is an image and has a usable size
    folder = resolve_source(args.model)
    is_distilled(folder)
    cfg, _ = load_checkpoint(getattr(args, "transformer", None) or folder)  # the config, checked; the weights memory-mapped, unread
    if args.attention_block is not None:
        check_number("--attention-block", args.attention_block, 0, cfg.depth + cfg.depth_single - 1, integer=True)
    if calibration is not None:
        kv = load_calibration(calibration, cfg.depth + cfg.depth_single)["kv_cache"]
        if kv is not None and kv != bool(args.kv_cache):
            raise ValueError(f"attention calibration file {calibration} was calibrated {'with' if kv else 'without'} --kv-cache "
                             f"(the references' attention pattern): sample {'with' if kv else 'without'} it, or calibrate again")  # fmt: skip
    if rescore is not None:
        check_rescore_step(rescore, sampling_defaults(folder, args.steps, args.guidance)[0])
    return device, dtype


def warn_slow_dtype(device, dtype):
    if device.type == "cpu" and dtype != torch.float32:
        print(f"warning: {str(dtype).removeprefix('torch.')} on a CPU is many times slower than fp32 (the VAE about "
              "20x); use --dtype fp32 unless memory is short", file=sys.stderr)  # fmt: skip
