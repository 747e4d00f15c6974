"""The klein sampling pipeline as small functions: what sample.py, compare.py and the extras build on.

    text encoder -> references (prepare, VAE-encode, select tokens, gather the kept ones)
    -> denoise with the transformer -> VAE decode

`generate()` runs it end to end. Each component is loaded once, used for every image and freed
(`loaded`), so peak memory is the largest component, not their sum. Each distinct prompt is encoded
once; the references are encoded and selected once, and with a KV cache their K/V are extracted once
and shared by every prompt, seed and step.

Extras plug in from outside, never as parameters threaded through here: a `Klein` names the
checkpoint and how its transformer loads (quant.from_pretrained for 8-bit weights, a transform for a
LoRA or torch.compile); a selector is a name or any callable returning kept indices
(token_selectors.Selector, attention_selector.AttentionSelector); ToPi's re-scoring drives
`denoise` in two segments (attention_selector.generate_rescored).

May import: files, klein, model, vae, text_encoder, token_selectors. No extra, no script.
"""

import gc
import math
import numbers
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm import tqdm

from files import load_image, read_json, resolve_component, resolve_device
from klein import (Compact, compact_reference, grid_ids, initial_noise, pack, prepare_reference, reference_ids, schedule, span,
                   text_ids, to_image, to_tensor, unpack)
from model import Flux2, KVCache
from text_encoder import TextEncoder
from token_selectors import Selector
from vae import AutoEncoder

# ----------------------------------------------------------------------------------------------
# The denoising loop (pure functions)


def velocity(model, x, img_ids, txt, txt_ids, t, ref, ref_ids, cache, pe):
    """Target velocity (B, N, C) of B images and their reference tokens ref (Bc, M, C), Bc 1 (shared by
    every image) or B (one set per image).

    No cache: every image runs the references (they attend to its text and target). Empty cache: the
    first Bc images run them in the KV pattern and fill the cache; the other images, like every later
    call, attend to the cached K/V (one copy for the whole batch) and run no reference token.
    pe: model.rope of [text | target | references], computed once per run; a cached call takes its
    [text | target] rows.
    """
    B = x.shape[0]
    fresh = pe[:, : txt.shape[1] + x.shape[1]]
    if cache is None:
        refs = {} if ref is None else dict(ref=ref.expand(B, -1, -1), ref_ids=ref_ids)
        return model(x, img_ids, txt, txt_ids, t, pe=pe, **refs)
    if len(cache) == 0:  # fill it
        n = ref.shape[0]
        v = model(x[:n], img_ids, txt[:n], txt_ids, t[:n], ref=ref, ref_ids=ref_ids, kv_cache=cache, pe=pe)
        if n == B:
            return v
        return torch.cat([v, model(x[n:], img_ids, txt[n:], txt_ids, t[n:], kv_cache=cache, pe=fresh)])
    return model(x, img_ids, txt, txt_ids, t, kv_cache=cache, pe=fresh)  # attend to it


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
# References: prepared, encoded once, then the kept tokens gathered


def load_references(refs):
    """Paths or PIL images (one path alone is one reference), or klein.Compact ones -> RGB PIL images
    prepared as klein does; a Compact one then downscaled (klein.compact_reference)."""
    refs = [refs] if isinstance(refs, (str, os.PathLike, Image.Image, Compact)) else list(refs)
    images = []
    for r in refs:
        image = r.image if isinstance(r, Compact) else r
        path = isinstance(image, (str, os.PathLike))
        try:
            image = prepare_reference(load_image(image) if path else image)
        except ValueError as e:
            raise ValueError(f"{image}: {e}" if path and str(image) not in str(e) else str(e)) from None
        images.append(compact_reference(image, r.factor) if isinstance(r, Compact) else image)
    return images


def encode_references(vae, images, device, dtype):
    """VAE-encode each reference once: a list of (tokens (1, n, 128) in dtype, ids (n, 4)), all tokens;
    a compact reference's ids span its full-size grid (klein.reference_ids)."""
    out = []
    for k, image in enumerate(images):
        z = vae.encode(to_tensor(image).to(device, vae_dtype(vae)))  # (1, 128, h, w)
        out.append((pack(z).to(dtype), reference_ids(k, z.shape[2], z.shape[3], span(image)).to(device)))
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


# ----------------------------------------------------------------------------------------------
# Loading: one component at a time


@dataclass
class Klein:
    """Which klein checkpoint and how its transformer is loaded: what `generate` takes as `model`
    when a folder or hub id is not enough.

    folder: a klein repository folder or hub id (text encoder, VAE, model_index.json);
    transformer: another transformer checkpoint (a BFL single file, a transformer folder), else folder's;
    load(source, dtype, device) -> Flux2: Flux2.from_pretrained, or e.g. partial(quant.from_pretrained,
    weights="int8");
    transforms: callables model -> model applied after loading, in order (lora.transform, torch.compile);
    batch_size: images per transformer and VAE call.
    """

    folder: str
    transformer: str = None
    load: object = Flux2.from_pretrained
    transforms: tuple = ()
    batch_size: int = 1

    def load_transformer(self, folder, dtype, device):
        model = self.load(self.transformer or folder, dtype=dtype, device=device)
        for transform in self.transforms:
            model = transform(model)
        return model


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


def sampling_defaults(folder, steps, guidance):
    """(steps, guidance) where not given: distilled checkpoints 4 steps without CFG, base ones 50 with CFG 4."""
    distilled = is_distilled(folder)
    return steps or (4 if distilled else 50), ((1.0 if distilled else 4.0) if guidance is None else guidance)


def sampling_device(device=None, dtype=None):
    """(device, dtype) for sampling: resolve_device's, fp16 refused (klein's transformer activations
    overflow fp16's 65504), and TF32 matmuls for fp32 on CUDA (klein's own inference runs bf16)."""
    device, dtype = resolve_device(device, dtype)
    if dtype == torch.float16:
        raise ValueError("dtype fp16: klein's transformer overflows float16 (activations beyond 65504); use bf16 "
                         "(the GPU default) or fp32")  # fmt: skip
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, dtype


def free(*modules):
    for m in modules:
        m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def loaded(load, *args, **kwargs):
    """load(*args, **kwargs) (a from_pretrained) for one `with` block, then freed: one component in
    memory at a time."""
    module = load(*args, **kwargs)
    try:
        yield module
    finally:
        free(module)


# ----------------------------------------------------------------------------------------------
# The pipeline in stages (compare.py, bench.py and the attention selector reuse them)


@dataclass
class SampleStats:
    seconds: dict = field(default_factory=dict)  # stage -> wall-clock seconds
    ref_tokens: list = field(default_factory=list)  # (full size, kept) per reference: a compact one has fewer before selection
    loop: tuple = ()  # (transformer config, text tokens, target tokens, steps): what a FLOP count needs (bench_measure)
    kept: list = field(default_factory=list)  # kept token indices per reference (None: all)
    rescored: list = field(default_factory=list)  # kept from a re-score's step on (attention_selector), else empty


@dataclass
class Scene:
    """What a model-aware selector may read (attention_selector.AttentionSelector): the loaded
    transformer, every reference's (tokens (1, n, C), ids (n, 4)), the first image's prompt (1, L, J)
    and seed, the output grid (h, w) in tokens, the schedule and whether the KV cache runs."""

    transformer: Flux2
    encoded: list
    txt: torch.Tensor
    seed: int
    size: tuple
    sigmas: torch.Tensor
    kv_cache: bool


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


def encode_inputs(folder, prompts, images, negative, dtype, device, batch_size=1, timer=None):
    """The text encoder, then the VAE, each loaded once and freed: ({prompt: (1, L, J)}, the empty
    negative prompt's (1, L, J) if `negative` else None, each reference's (tokens, ids), all tokens)."""
    with loaded(TextEncoder.from_pretrained, folder, dtype=dtype, device=device) as text:
        txts = encode_prompts(text, prompts, batch_size)
        neg = text.encode([""]) if negative else None
    if timer:
        timer.lap("text encoding")
    encoded = []
    if images:
        with loaded(AutoEncoder.from_pretrained, folder, dtype=dtype, device=device) as vae:
            encoded = encode_references(vae, images, device, dtype)
    if timer:
        timer.lap("reference encoding")
    return txts, neg, encoded


def check_finite(x, what, cause):
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} is not finite (NaN or inf); likely cause: {cause}; nothing was written")


LATENT_CAUSES = "the LoRA, non-finite transformer weights, or the guidance"


def sample_latents(transformer, jobs, txts, h, w, steps, ref=None, ref_ids=None, kv_cache=False, guidance=1.0,
                   neg=None, batch_size=1, progress=False):  # fmt: skip
    """Final latents (1, h * w, C) for every (prompt, seed) job, batch_size images per transformer call.

    txts {prompt: (1, L, J)}. With kv_cache the references' K/V are extracted once, by the first
    image, and every other image of every batch attends to them (read in place, not recomputed). The
    RoPE table is computed once for all of them.
    """
    device = txts[jobs[0][0]].device
    dtype = next(transformer.parameters()).dtype
    sigmas, img_ids = schedule(steps, h * w).to(device), grid_ids(h, w).to(device)
    txt_ids = text_ids(txts[jobs[0][0]].shape[1]).to(device)
    cache = KVCache() if kv_cache and ref is not None else None
    pe = transformer.rope(txt_ids, img_ids, ref_ids)
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    out = []
    for b, batch in enumerate(batches):
        x = torch.cat([initial_noise(s, transformer.cfg.in_channels, h, w, dtype) for _, s in batch]).to(device)
        txt = torch.cat([txts[p] for p, _ in batch])
        label = progress and ("denoising" if len(batches) == 1 else f"denoising {b + 1}/{len(batches)}")
        x = denoise(transformer, x, img_ids, txt, txt_ids, sigmas, ref=ref, ref_ids=ref_ids, kv_cache=cache,
                    guidance=guidance, neg_txt=neg, progress=label, pe=pe)  # fmt: skip
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


def output_size(images, height, width):
    """Output (h, w) in tokens: the first reference's full size (else 1024 px) where not given, floored to 16 px."""
    h0, w0 = (16 * n for n in span(images[0])) if images else (1024, 1024)  # klein's default output size
    height, width = height or h0, width or w0
    if height < 16 or width < 16:
        raise ValueError(f"output size {width}x{height} is too small: at least 16x16")
    return height // 16, width // 16


# ----------------------------------------------------------------------------------------------
# End to end


def generate(model, prompt, refs=(), seed=0, size=None, steps=None, guidance=None, keep=1.0, selector="canny",
             kv_cache=False, device=None, dtype=None):  # fmt: skip
    """Sample images. Returns (image, SampleStats) for one prompt and one seed, else ([images], stats).

    model: a klein repository folder or hub id, or a Klein (another transformer, 8-bit weights, a LoRA,
    compile, the batch size). prompt, seed: one or a list each; every (prompt, seed) pair gives one
    image, prompt-major: (p0, s0), (p0, s1), ..., (p1, s0), ... refs: paths or PIL images (a single path
    is one reference). size: (height, width) in pixels, floored to 16 (default: the first reference's,
    else 1024 x 1024). steps, guidance: the checkpoint's (distilled: 4, no CFG; base: 50, CFG 4).
    keep: a fraction in (0, 1], or one per reference. selector: "random", "canny", "saliency", or a
    callable (images, keeps, scene) -> kept indices per reference (None keeps all). kv_cache: extract
    the references' K/V once, by the first image, and let every step and image attend to them.

    Each distinct prompt is encoded once; the references are prepared, VAE-encoded and selected once
    (the selection the same for every image).
    """
    klein = model if isinstance(model, Klein) else Klein(model)
    single = isinstance(prompt, str) and isinstance(seed, numbers.Integral)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seeds = [seed] if isinstance(seed, numbers.Integral) else list(seed)
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    images = load_references(refs)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(images)
    if len(keeps) != len(images):
        raise ValueError(f"keep has {len(keeps)} values for {len(images)} reference images: give one, or one per reference")
    if not all(isinstance(k, numbers.Real) and 0 < k <= 1 for k in keeps):
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    select = Selector(selector) if isinstance(selector, str) else selector
    device, dtype = sampling_device(device, dtype)
    folder = resolve_source(klein.folder)
    steps, guidance = sampling_defaults(folder, steps, guidance)
    h, w = output_size(images, *(size or (None, None)))
    stats = SampleStats()
    timer = Timer(stats, device)

    with torch.no_grad():
        txts, neg, encoded = encode_inputs(folder, prompts, images, guidance > 1, dtype, device, klein.batch_size, timer)
        with loaded(klein.load_transformer, folder, dtype, device) as transformer:
            timer.lap("denoising")  # loading the transformer counts there
            stats.kept = select(images, keeps, Scene(transformer, encoded, txts[prompts[0]], seeds[0], (h, w),
                                                     schedule(steps, h * w), kv_cache)) if images else []  # fmt: skip
            timer.lap("token scoring")
            ref, ref_ids = gather_references(encoded, stats.kept) if images else (None, None)
            stats.ref_tokens = [(math.prod(span(im)), t.shape[1] if i is None else len(i)) for im, (t, _), i in zip(images, encoded, stats.kept)]
            stats.loop = (transformer.cfg, txts[prompts[0]].shape[1], h * w, steps)
            jobs = [(p, s) for p in prompts for s in seeds]
            latents = sample_latents(transformer, jobs, txts, h, w, steps, ref, ref_ids, kv_cache, guidance, neg,
                                     klein.batch_size, progress=True)  # fmt: skip
        timer.lap("denoising")
        with loaded(AutoEncoder.from_pretrained, folder, dtype=dtype, device=device) as vae:
            outputs = decode_latents(vae, latents, h, w, klein.batch_size)
        timer.lap("decoding")
    return (outputs[0] if single else outputs), stats
