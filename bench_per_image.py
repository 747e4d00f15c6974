"""Many images per reference set (`python bench.py --per-image`): the reference work is paid once
per run, not per image. Seconds per image for N = 1, 4, 16 images at PER_IMAGE_REFS references: on
the bench model, ours dense and keep PER_IMAGE_KEEP + KV cache against diffusers' Flux2KleinKVPipeline
loop on the same weights and the floor (the cached steps alone); end to end on the tiny random
pipeline of the tests, one generate() call against diffusers' pipeline, both loading from disk.

May import: bench_measure, klein, model, pipeline; diffusers and tiny only when asked. Not bench.py.
"""

import datetime
import functools
import tempfile
from pathlib import Path

import torch

from bench_measure import STEPS, best_of_rounds, machine, silenced
from klein import grid_ids, initial_noise, n_keep, schedule, text_ids
from model import KVCache
from pipeline import Klein, gather_references, generate, sample_latents

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

        def ours(n, n_prompts, n_seeds, **sparse):  # one generate() call for all N images, in one batch
            with silenced():  # its progress bars (stderr)
                return generate(Klein(folder, batch_size=n), prompts[:n_prompts], refs, seed=list(range(n_seeds)), **sparse)

        jobs = {}
        for n, (n_prompts, n_seeds) in PER_IMAGE.items():
            run = functools.partial(ours, n, n_prompts, n_seeds)
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
        *(["- a smoke run (--quick): tiny model and images, to run every code path; its timings mean nothing"] if args.quick else []),
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
