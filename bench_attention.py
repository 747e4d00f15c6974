"""The attention selector's cost (`python bench.py --attention-cost`): its scoring pass
(attention_selector.reference_attention) against a dense sampling step, and the end-to-end speedup
with the pass and the selection included, at bench_per_image's operating point (PER_IMAGE_REFS
references, keep PER_IMAGE_KEEP); each next to its FLOP ideal.

May import: bench_measure, bench_per_image, attention_selector, klein, model, pipeline, token_selectors.
Not bench.py.
"""

import functools
from dataclasses import replace

import torch

from attention_selector import reference_attention
from bench_measure import STEPS, best_of_rounds, forward_flops, loop_flops, machine
from bench_per_image import PER_IMAGE_KEEP, PER_IMAGE_REFS, per_image_references
from klein import grid_ids, n_keep, schedule, text_ids
from model import KVCache
from pipeline import denoise, gather_references
from token_selectors import select_tokens

ATTENTION_HEADING = "## The attention selector: cost of its scoring pass"


def scoring_flops(cfg, n_txt, n_img, n_ref, block=0, n_queries=None):
    """FLOPs of attention_selector.reference_attention: the blocks before `block` with every reference
    token, then the block's projections (qkv; a single block's linear1) and the scores QK^T of n_queries
    (default: the target's) against every key. Embedding and per-sample vectors as one full forward."""
    D, L = cfg.hidden_size, n_txt + n_img + n_ref
    outside = forward_flops(replace(cfg, depth=0, depth_single=0), n_txt, n_img, n_ref, "full")
    per_block = (forward_flops(cfg, n_txt, n_img, n_ref, "full") - outside) / (cfg.depth + cfg.depth_single)
    projection = 3 * D if block < cfg.depth else 3 * D + 2 * cfg.mlp_hidden  # a single block's fused linear1
    return outside + block * per_block + 2 * L * projection * D + 2 * (n_queries or n_img) * L * D


def bench_attention(model, args, device, dtype, log):
    """At PER_IMAGE_REFS references and keep PER_IMAGE_KEEP: the scoring pass (block 0, target
    queries) alone, and the 4-step loop end to end with the pass and the selection included, without
    and with the KV cache, against the dense loop; each next to its FLOP ideal."""
    cfg, side, n_img, n_txt = model.cfg, args.size // 16, (args.size // 16) ** 2, args.text_tokens
    _, rand, refs = per_image_references(cfg, side, device, dtype)
    ref, ref_ids = gather_references(refs, [None] * PER_IMAGE_REFS)
    img, img_ids, txt, txt_ids = rand(1, n_img, cfg.in_channels), grid_ids(side, side).to(device), rand(1, n_txt, cfg.context_dim), text_ids(n_txt).to(device)
    sigmas = schedule(STEPS, n_img).to(device)
    score = functools.partial(reference_attention, model, img, img_ids, txt, txt_ids, sigmas[:1], ref, ref_ids)

    def sparse_loop(kv):
        scores = score(kv_pattern=kv)[0].split(n_img)
        kept = [select_tokens(s, PER_IMAGE_KEEP, seed=k) for k, s in enumerate(scores)]
        return denoise(model, img, img_ids, txt, txt_ids, sigmas, *gather_references(refs, kept), kv_cache=KVCache() if kv else None)

    jobs = {"score": score, "dense": functools.partial(denoise, model, img, img_ids, txt, txt_ids, sigmas, ref, ref_ids),
            "sparse": functools.partial(sparse_loop, False), "sparse_kv": functools.partial(sparse_loop, True)}  # fmt: skip
    for fn in jobs.values():  # warm-up, untimed
        fn()
    best = best_of_rounds(jobs, args.rounds, device, log, "attention selector")
    n_ref, dense_ref = PER_IMAGE_REFS * n_keep(PER_IMAGE_KEEP, n_img), PER_IMAGE_REFS * n_img
    f_score, f_dense = scoring_flops(cfg, n_txt, n_img, dense_ref), loop_flops(cfg, n_txt, n_img, dense_ref, kv=False)
    return dict(score_s=best["score"], dense_s=best["dense"], step_s=best["dense"] / STEPS,
                score_of_step=best["score"] / (best["dense"] / STEPS), score_of_step_ideal=f_score / (f_dense / STEPS),
                **{f"{k}_speedup": best["dense"] / best[k] for k in ("sparse", "sparse_kv")},
                **{f"{k}_ideal": f_dense / (f_score + loop_flops(cfg, n_txt, n_img, n_ref, kv)) for k, kv in (("sparse", False), ("sparse_kv", True))})  # fmt: skip


def attention_section(r, args, cfg, device, dtype, command):
    return "\n".join([
        ATTENTION_HEADING, "",
        f"- command: `{command}`; {machine(device)}, torch {torch.__version__}, {dtype}; {args.config} config (hidden {cfg.hidden_size}, "
        f"{cfg.depth} double + {cfg.depth_single} single blocks), {args.size} px, {PER_IMAGE_REFS} references, keep {PER_IMAGE_KEEP:g}, "
        f"{STEPS} steps, {args.rounds} round(s) after a warm-up, minimum of each.",
        "- the pass: attention_selector.reference_attention at block 0 with the target's queries, every reference token, the first "
        "step's sigma; end to end: the pass, the selection (select_tokens on its scores) and the sampling loop of the kept tokens, "
        "against the dense loop (every reference token, no cache). Ideal: FLOPs (bench_attention.scoring_flops, bench_measure.loop_flops).", "",
        "| what | measured | FLOP ideal |", "|---|---|---|",
        f"| scoring pass / one dense step | {r['score_of_step']:.3f} ({1e3 * r['score_s']:.0f} ms / {1e3 * r['step_s']:.0f} ms) | {r['score_of_step_ideal']:.3f} |",
        f"| scoring pass / dense {STEPS}-step run | {r['score_of_step'] / STEPS:.3f} | {r['score_of_step_ideal'] / STEPS:.3f} |",
        f"| speedup end to end, pass included, no cache | {r['sparse_speedup']:.2f}x | {r['sparse_ideal']:.2f}x |",
        f"| speedup end to end, pass included, KV cache | {r['sparse_kv_speedup']:.2f}x | {r['sparse_kv_ideal']:.2f}x |",
    ]) + "\n"  # fmt: skip
