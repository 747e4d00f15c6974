"""sample.py against diffusers' Flux2KleinPipeline / Flux2KleinKVPipeline on a tiny random pipeline folder."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image
from safetensors.torch import load_file, save_file

from klein import grid_ids, initial_noise, prepare_reference, schedule, to_tensor
import cli
import pipeline
import sample
from tiny import HIDDEN, make_pipeline_folder, photo

ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")

@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    return root, make_pipeline_folder(root, distilled=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein-base")
    return root, make_pipeline_folder(root, distilled=False)


REFS = [photo(80, 70, seed=1), photo(64, 100, "RGBA", seed=2)]


def diffusers_image(pipe, refs, seed, **kw):
    out = pipe(prompt="a red cube", image=list(refs) or None, generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw)  # fmt: skip
    return (out.images[0] * 255).round().astype(np.int32)


def ours_image(root, refs, seed, height=None, width=None, lora=None, **kw):
    import lora as lora_files

    model = pipeline.Klein(str(root), transforms=(lora_files.transform(lora),) if lora else ())
    image, _ = pipeline.generate(model, "a red cube", refs, seed=seed, size=(height, width), **kw)
    return np.array(image).astype(np.int32)


@pytest.mark.parametrize("n_refs", [0, 1, 2])
def test_distilled_equals_diffusers(distilled, n_refs):
    root, pipe = distilled
    size = {} if n_refs else dict(height=64, width=48)
    want = diffusers_image(pipe, REFS[:n_refs], seed=3, num_inference_steps=4, **size)
    got = ours_image(root, REFS[:n_refs], seed=3, **size)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1
    assert want.std() > 10  # a real image, not a constant


def test_cfg_equals_diffusers(base):
    root, pipe = base
    want = diffusers_image(pipe, REFS[:1], seed=5, num_inference_steps=3, guidance_scale=4.0)
    got = ours_image(root, REFS[:1], seed=5, steps=3)  # base: CFG 4 by default
    no_cfg = ours_image(root, REFS[:1], seed=5, steps=3, guidance=1.0)
    assert np.abs(got - want).max() <= 1
    assert np.abs(no_cfg - want).max() > 5  # guidance really ran


def test_kv_cache_equals_diffusers_kv_pipeline(distilled):
    root, pipe = distilled
    kv = Flux2KleinKVPipeline(**pipe.components)  # its own KV attention processors on a copy of the weights
    kv.transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer")
    kv._set_kv_attn_processors()
    want = diffusers_image(kv, REFS, seed=7, num_inference_steps=4)
    got = ours_image(root, REFS, seed=7, kv_cache=True)
    dense = ours_image(root, REFS, seed=7)
    assert np.abs(got - want).max() <= 1
    assert np.abs(dense - want).max() > 5  # the KV pattern differs from standard klein


@pytest.mark.parametrize("size,mode", [((70, 90), "RGB"), ((1100, 1000), "RGB"), ((300, 200), "RGBA"), ((200, 160), "L"),
                                       ((150, 130), "P"), ((120, 100), "I;16"), ((2000, 260), "RGB")])  # fmt: skip
def test_reference_preprocessing_equals_diffusers(size, mode):
    image = photo(*size, seed=4)
    image = Image.fromarray((np.array(image.convert("L")).astype(np.uint16) * 257)) if mode == "I;16" else image.convert(mode)
    proc = Flux2ImageProcessor(vae_scale_factor=16)
    # the klein pipeline's own steps (pipeline_flux2_klein.py, __call__)
    proc.check_image_input(image)
    ref = image
    if ref.size[0] * ref.size[1] > 1024 * 1024:
        ref = proc._resize_to_target_area(ref, 1024 * 1024)
    w, h = ref.size[0] // 16 * 16, ref.size[1] // 16 * 16
    want = proc.preprocess(ref, height=h, width=w, resize_mode="crop")
    ours = prepare_reference(image)
    assert ours.size == (w, h)
    assert torch.equal(to_tensor(ours), want)


@pytest.mark.parametrize("size", [(63, 200), (600, 70)])
def test_reference_size_errors(size):
    with pytest.raises(ValueError, match="too small|aspect ratio"):
        prepare_reference(photo(*size))
    with pytest.raises(ValueError):
        Flux2ImageProcessor.check_image_input(photo(*size))  # diffusers refuses the same images


def test_schedule_equals_diffusers_scheduler():
    for n, seq in [(4, 4096), (50, 4096), (4, 5000), (28, 256)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq, n))
        assert torch.equal(schedule(n, seq), sched.sigmas)
    assert schedule(4, 4096)[:4].tolist() == pytest.approx([1.0, 0.9674, 0.9081, 0.7672], abs=1e-4)


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], capture_output=True, text=True, env=ONE_THREAD)


def test_cli_writes_image_and_reports(distilled, tmp_path):
    root, _ = distilled
    REFS[0].save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    r = run_cli("--model", root, "--prompt", "a red cube", "--ref", tmp_path / "ref.png", "--out", out, "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "reference 0: 20 of 20 tokens kept" in r.stdout and "denoising" in r.stdout
    got = np.array(Image.open(out)).astype(np.int32)
    assert np.abs(got - ours_image(root, REFS[:1], seed=3)).max() == 0


def test_cli_weights_loads_an_8bit_transformer(distilled, tmp_path, monkeypatch):
    """sample.py --weights int8: generate() loads the transformer with 8-bit block Linears and writes
    the image (how close it is to the 16-bit one: test_sparse_model's 8-bit tests)."""
    import cli
    from quant import Linear8

    root, _ = distilled
    models = []
    load = cli.load_8bit
    monkeypatch.setattr(cli, "load_8bit", lambda *a, **k: models.append(load(*a, **k)) or models[-1])
    REFS[0].save(tmp_path / "ref.png")
    sample.main(["--model", str(root), "--prompt", "a red cube", "--ref", str(tmp_path / "ref.png"), "--out",
                 str(tmp_path / "out.png"), "--weights", "int8"])  # fmt: skip
    assert len(models) == 1 and any(isinstance(m, Linear8) for m in models[0].modules())
    assert Image.open(tmp_path / "out.png").size == (80, 64)  # the reference's 80 x 70, cropped to 16 px


def test_cli_transformer_from_a_bfl_file(distilled, tmp_path):
    """--transformer FILE: the transformer from a BFL single file instead of --model's. The same weights as
    a BFL file give the same image (to 1/255); BFL's fp8 layout with --weights fp8 gives the image of a plain file
    holding its dequantized weights (weight * weight_scale)."""
    from model import Flux2
    from tiny import bfl_fp8_file

    root, _ = distilled
    REFS[0].save(tmp_path / "ref.png")
    ours = Flux2.from_pretrained(str(root))
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "bfl.safetensors")
    sd = bfl_fp8_file(ours, tmp_path / "fp8.safetensors")
    deq = {k: v.float() * sd[k.removesuffix(".weight") + ".weight_scale"][:, None] if v.dtype == torch.float8_e4m3fn else v.float()
           for k, v in sd.items() if not k.endswith("_scale")}  # fmt: skip
    save_file({k: v.contiguous() for k, v in deq.items()}, tmp_path / "dequantized.safetensors")

    def image(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.png"
        sample.main(["--model", str(root), "--prompt", "a red cube", "--ref", str(tmp_path / "ref.png"), "--out", str(out), *extra])
        return np.array(Image.open(out)).astype(np.int32)

    # to 1/255, not bit for bit: memory-mapped weights sit at other alignments in the two files (16 vs 24
    # bytes mod 64), and the CPU's matmul kernels sum in another order there (with copied weights: equal)
    assert np.abs(image("--transformer", str(tmp_path / "bfl.safetensors")) - image()).max() <= 1
    fp8 = image("--transformer", str(tmp_path / "fp8.safetensors"), "--weights", "fp8")
    assert np.abs(fp8 - image("--transformer", str(tmp_path / "dequantized.safetensors"))).max() <= 1


@pytest.mark.parametrize("case", ["missing_ref", "bad_ref", "bad_model", "bad_size", "bad_out"])
def test_cli_bad_input(distilled, tmp_path, case):
    root, _ = distilled
    (tmp_path / "bad.png").write_bytes(b"not an image")
    REFS[0].save(tmp_path / "ref.png")
    args = {"model": root, "ref": tmp_path / "ref.png", "out": tmp_path / "out.png"}
    extra = []
    if case == "missing_ref":
        args["ref"] = tmp_path / "nope.png"
    elif case == "bad_ref":
        args["ref"] = tmp_path / "bad.png"
    elif case == "bad_model":
        args["model"] = tmp_path / "no-model"
    elif case == "bad_size":
        extra = ["--height", "8", "--width", "64"]
    else:
        args["out"] = tmp_path / "out.xyz"
    before = sorted(tmp_path.iterdir())
    r = run_cli("--model", args["model"], "--prompt", "x", "--ref", args["ref"], "--out", args["out"], *extra)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no temporary file left


def test_lora_equals_diffusers_load_lora_weights(distilled, tmp_path):
    """--lora: a LoRA saved here, loaded by diffusers' pipeline, gives the same image as sample.py."""
    import lora
    from model import Flux2

    root, pipe = distilled
    model = Flux2.from_pretrained(str(root))
    lora.inject(model, rank=2, alpha=3.0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    lora.save_lora(model, tmp_path / "lora.safetensors")
    pipe = Flux2KleinPipeline(**pipe.components, is_distilled=True)
    pipe.transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer")
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    want = diffusers_image(pipe, REFS[:1], seed=3, num_inference_steps=4)
    got = ours_image(root, REFS[:1], seed=3, lora=str(tmp_path / "lora.safetensors"))
    plain = ours_image(root, REFS[:1], seed=3)
    assert np.abs(got - want).max() <= 1
    assert np.abs(plain - want).max() > 5  # the LoRA really changes the image


def test_lora_unmerged_beside_16_bit_weights(distilled, tmp_path, monkeypatch):
    """A LoRA is merged into fp32 weights and kept unmerged beside bf16 ones (--lora-merge forces a merge).

    Why: a bf16 merge rounds every update below half a bf16 step of its weight away (a 1024x1024 bf16
    weight merged with a rank-4 update of 0.1% of the weights' spread keeps 58% of it), while unmerged
    the float32 LoRA factors stay the trained ones.
    """
    import lora
    from model import Flux2

    root, _ = distilled
    model = Flux2.from_pretrained(str(root))
    lora.inject(model, rank=2)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    lora.save_lora(model, tmp_path / "lora.safetensors")
    seen = []
    real = lora.load_lora
    monkeypatch.setattr(lora, "load_lora", lambda m, p, scale=1.0, merge=True: seen.append((next(m.parameters()).dtype, merge)) or real(m, p, scale, merge))
    for dtype, force in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, True)):
        klein = pipeline.Klein(str(root), transforms=(lora.transform(str(tmp_path / "lora.safetensors"), merge=force),))
        with pipeline.loaded(klein.load_transformer, root, dtype, torch.device("cpu")) as m:
            assert bool(lora.lora_modules(m)) == (seen[-1][1] is False)
            assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    assert seen == [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]


def test_frozen_parameters_from_pretrained(distilled):
    """Every from_pretrained gives frozen parameters: a plain forward builds no autograd graph."""
    from model import Flux2
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    root, _ = distilled
    for cls in (Flux2, TextEncoder, AutoEncoder):
        assert not any(p.requires_grad for p in cls.from_pretrained(str(root)).parameters()), cls.__name__


def diffusers_loop(pipe, refs, kept, seed, steps=4, kv=False, size=None, scale=None, prepare=True):
    """klein sampling written with diffusers' own pipeline pieces, on a subset of reference tokens.
    size (H, W): the output's, else the first reference's; scale (sh, sw): the reference ids' rows and
    columns mapped to (i + 0.5) s - 0.5 (a compact reference spanning a larger grid)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    with torch.no_grad():
        txt, txt_ids = pipe.encode_prompt(prompt="a red cube", device="cpu", max_sequence_length=512)
        images = [to_tensor(prepare_reference(r) if prepare else r) for r in refs]
        ref, ref_ids = pipe.prepare_image_latents(images=images, batch_size=1, generator=None, device="cpu", dtype=torch.float32)
        offsets = np.cumsum([0] + [im.shape[2] * im.shape[3] // 256 for im in images])
        rows = torch.cat([torch.as_tensor(idx) + int(o) for idx, o in zip(kept, offsets)])
        ref, ref_ids = ref[:, rows], ref_ids[:, rows]
        if scale is not None:
            ref_ids = ref_ids.float()
            for axis, sc in zip((1, 2), scale):
                ref_ids[..., axis] = (ref_ids[..., axis] + 0.5) * sc - 0.5
        H, W = size or images[0].shape[2:]
        x, x_ids = pipe.prepare_latents(1, 4, H, W, torch.float32, "cpu", torch.Generator().manual_seed(seed))
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(x.shape[1], steps))
        cache = None
        for i, t in enumerate(pipe.scheduler.timesteps):
            common = dict(encoder_hidden_states=txt, txt_ids=txt_ids, timestep=t.expand(1) / 1000, return_dict=False)
            if kv and i == 0:
                v, cache = pipe.transformer(hidden_states=torch.cat([ref, x], 1), img_ids=torch.cat([ref_ids, x_ids], 1),
                                            kv_cache_mode="extract", num_ref_tokens=ref.shape[1], **common)  # fmt: skip
            elif kv:
                v = pipe.transformer(hidden_states=x, img_ids=x_ids, kv_cache_mode="cached", kv_cache=cache, **common)[0]
            else:
                v = pipe.transformer(hidden_states=torch.cat([x, ref], 1), img_ids=torch.cat([x_ids, ref_ids], 1), **common)[0]
                v = v[:, : x.shape[1]]
            x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
        z = pipe._unpack_latents_with_ids(x, x_ids)
        bn = pipe.vae.bn
        z = pipe._unpatchify_latents(z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4) + bn.running_mean.view(1, -1, 1, 1))
        out = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="np")
    return (out[0] * 255).round().astype(np.int32)


@pytest.mark.parametrize("kv,selector,keep", [(False, "canny", 0.3), (True, "saliency", [0.2, 0.5])])
def test_sparse_sampling_equals_diffusers_on_the_same_subset(distilled, kv, selector, keep):
    """Selection once per generation; kept tokens keep their ids; the KV cache holds only them."""
    root, pipe = distilled
    if kv:
        pipe = Flux2KleinKVPipeline(**pipe.components)
        pipe.transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer")
        pipe._set_kv_attn_processors()
    image, stats = pipeline.generate(str(root), "a red cube", REFS, seed=9, kv_cache=kv, keep=keep, selector=selector)  # fmt: skip
    counts = [after for _, after in stats.ref_tokens]
    keeps = keep if isinstance(keep, list) else [keep, keep]
    assert counts == [max(1, round(k * n)) for k, (n, _) in zip(keeps, stats.ref_tokens)]
    want = diffusers_loop(pipe, REFS, stats.kept, seed=9, kv=kv)
    assert np.abs(np.array(image).astype(np.int32) - want).max() <= 1
    dense = diffusers_loop(pipe, REFS, [torch.arange(n) for n, _ in stats.ref_tokens], seed=9, kv=kv)
    assert np.abs(dense - want).max() > 5  # dropping tokens really changed the image


@pytest.mark.parametrize("kv,budget,queries", [(False, "uniform", "target"), (True, "adaptive", "references"), (True, "uniform", "both")])
def test_attention_selector_equals_its_kept_indices_by_hand(distilled, kv, budget, queries):
    """--selector attention: the transformer scores every reference token once (its first image's noise
    at the first sigma), the usual sampling rule draws the kept set from those scores, and the image is
    diffusers' on exactly that subset, with and without the KV cache, with every budget."""
    from attention_selector import AttentionSelector, reference_attention
    from model import Flux2
    from token_selectors import Selector, select_reference_tokens

    root, pipe = distilled
    if kv:
        pipe = Flux2KleinKVPipeline(**pipe.components)
        pipe.transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer")
        pipe._set_kv_attn_processors()
    selector = AttentionSelector(Selector(budget=budget), queries=queries)
    image, stats = pipeline.generate(str(root), "a red cube", REFS, seed=9, kv_cache=kv, keep=0.3, selector=selector)  # fmt: skip
    assert "token scoring" in stats.seconds
    # the same scores and selection, by hand
    images = pipeline.load_references(REFS)
    transformer = Flux2.from_pretrained(str(root))
    with torch.no_grad():
        txt, txt_ids = pipe.encode_prompt(prompt="a red cube", device="cpu", max_sequence_length=512)
        latents = [to_tensor(im) for im in images]
        ref, ref_ids = pipe.prepare_image_latents(images=latents, batch_size=1, generator=None, device="cpu", dtype=torch.float32)
    h, w = images[0].size[1] // 16, images[0].size[0] // 16
    x = initial_noise(9, transformer.cfg.in_channels, h, w, torch.float32)
    sigma = schedule(4, h * w)[:1]
    scores = reference_attention(transformer, x, grid_ids(h, w), txt, txt_ids[0], sigma, ref, ref_ids[0],
                                 queries=queries, kv_pattern=kv)[0]  # fmt: skip
    sizes = [(im.size[0] // 16) * (im.size[1] // 16) for im in images]
    kept = select_reference_tokens(images, 0.3, "attention", budget=budget, scores=list(scores.split(sizes)))
    assert all(torch.equal(a, b) for a, b in zip(stats.kept, kept))
    want = diffusers_loop(pipe, REFS, kept, seed=9, kv=kv)
    assert np.abs(np.array(image).astype(np.int32) - want).max() <= 1


def test_keep_one_is_dense_and_bad_keeps(distilled, tmp_path):
    root, _ = distilled
    dense, _ = pipeline.generate(str(root), "a red cube", REFS, seed=2)
    kept, stats = pipeline.generate(str(root), "a red cube", REFS, seed=2, keep=[1.0, 1.0], selector="canny")
    sample.save_selection_image(REFS, stats.kept, tmp_path / "sel.png")
    assert np.array_equal(np.array(dense), np.array(kept))
    assert stats.ref_tokens == [(20, 20), (24, 24)]
    assert Image.open(tmp_path / "sel.png").size == (80 + 64, 96)
    for keep, match in [(0.0, "keep"), (1.5, "keep"), ([0.5], "2 reference"), ([0.1, 0.2, 0.3], "2 reference")]:
        with pytest.raises(ValueError, match=match):
            pipeline.generate(str(root), "x", REFS, keep=keep)
    with pytest.raises(ValueError, match="selector"):
        pipeline.generate(str(root), "x", REFS, keep=0.5, selector="sobel")


# ----------------------------------------------------------------------------------------------
# Compact references: every position at lower resolution, ids spanning the full-size grid


def test_compact_reference_equals_a_hand_built_downscale(distilled):
    """A 64x96 px reference (4x6 tokens) downscaled 2x: its pixels are the means of 2x2 pixel blocks,
    its tokens the VAE's encoding of that image, its ids (10, 2r + 0.5, 2c + 0.5, 0): the centres of
    the full-size tokens each one covers. Built here by hand, compared with load_references and
    encode_references."""
    from klein import Compact
    from vae import AutoEncoder

    root, _ = distilled
    image = photo(96, 64, seed=5)
    pixels = np.asarray(image, dtype=np.float64)
    by_hand = pixels.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))  # (32, 48, 3)
    (small,) = pipeline.load_references([Compact(image, 2)])
    assert small.size == (48, 32) and np.array_equal(np.asarray(small), np.floor(by_hand + 0.5))
    vae = AutoEncoder.from_pretrained(str(root))
    [(tokens, ids)] = pipeline.encode_references(vae, [small], "cpu", torch.float32)
    want = vae.encode(to_tensor(Image.fromarray(np.floor(by_hand + 0.5).astype(np.uint8))))
    assert torch.equal(tokens, want.flatten(2).transpose(1, 2))
    rows, cols = np.meshgrid(np.arange(2), np.arange(3), indexing="ij")
    hand_ids = [[10, 2 * r + 0.5, 2 * c + 0.5, 0] for r, c in zip(rows.ravel(), cols.ravel())]
    assert ids.tolist() == hand_ids
    # a grid the factor does not divide: 5 tokens -> round(5 / 3) = 2, centres (i + 0.5) * 5 / 2 - 0.5
    odd = pipeline.load_references([Compact(photo(80, 80, seed=6), 3)])[0]
    [(_, odd_ids)] = pipeline.encode_references(vae, [odd], "cpu", torch.float32)
    assert odd.size == (32, 32) and sorted({r for r in odd_ids[:, 1].tolist()}) == [0.75, 3.25]
    # area means by another construction: each pixel repeated 32 times per side, then 80x80 blocks averaged
    big = np.asarray(photo(80, 80, seed=6), dtype=np.float64).repeat(32, axis=0).repeat(32, axis=1)
    assert np.array_equal(np.asarray(odd), np.floor(big.reshape(32, 80, 32, 80, 3).mean(axis=(1, 3)) + 0.5))


def test_compact_sampling_equals_diffusers_at_scaled_ids(distilled):
    """generate() with a compact reference equals diffusers' own klein loop fed the downscaled image's
    tokens with their ids scaled to span the full-size grid; it reports the full-size token count and
    samples at the full-size reference's size by default."""
    from klein import Compact

    root, pipe = distilled
    ref = photo(128, 112, seed=7)  # 8x7 tokens -> 3x2 at factor 3 (rounded half up)
    image, stats = pipeline.generate(str(root), "a red cube", [Compact(ref, 3)], seed=4)
    assert stats.ref_tokens == [(56, 6)] and image.size == (128, 112)
    small = pipeline.load_references([Compact(ref, 3)])[0]
    want = diffusers_loop(pipe, [small], [torch.arange(6)], seed=4, size=(112, 128), scale=(7 / 2, 8 / 3), prepare=False)
    assert np.abs(np.array(image).astype(np.int32) - want).max() <= 1
    # The tiny model's images barely see positions; its velocity does: ours equals diffusers' transformer
    # at the scaled (fractional) ids, far closer than to the same tokens at unscaled ids.
    from model import Flux2
    from vae import AutoEncoder

    [(tokens, ids)] = pipeline.encode_references(AutoEncoder.from_pretrained(str(root)), [small], "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 56, tokens.shape[2], generator=g), torch.randn(1, 8, pipe.transformer.config.joint_attention_dim, generator=g)
    x_ids, txt_ids, t = grid_ids(7, 8), torch.zeros(8, 4), torch.tensor([0.7])
    txt_ids[:, 3] = torch.arange(8)
    with torch.no_grad():
        ours = Flux2.from_pretrained(str(root))(x, x_ids, txt, txt_ids, t, ref=tokens, ref_ids=ids)
        theirs = lambda ref_ids: pipe.transformer(hidden_states=torch.cat([x, tokens], 1), img_ids=torch.cat([x_ids, ref_ids])[None].float(),
                                                  encoder_hidden_states=txt, txt_ids=txt_ids[None], timestep=t, return_dict=False)[0][:, :56]  # fmt: skip
        err, unscaled = (ours - theirs(ids)).abs().max(), (ours - theirs(grid_ids(2, 3, t=10))).abs().max()
    assert err < 1e-5 * ours.abs().max() and unscaled > 100 * err


# ----------------------------------------------------------------------------------------------
# Many images per process: every image equals its own single-image run; the shared work runs once

PROMPTS = ["a red cube", "a blue ball"]
SPARSE = dict(keep=0.3, selector="canny")


@pytest.fixture(scope="module")
def many(distilled):
    """2 prompts x 2 seeds in batches of 3 and 1, sparse references with the KV cache; counts the work done."""
    from model import Flux2
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    root, _ = distilled
    counts = collections.Counter()
    encode, vae_encode, forward = TextEncoder.encode, AutoEncoder.encode, Flux2.forward

    def counting_forward(self, img, *args, ref=None, **kw):
        counts["reference forwards"] += ref is not None
        counts["reference rows"] += 0 if ref is None else img.shape[0]
        return forward(self, img, *args, ref=ref, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextEncoder, "encode", lambda self, prompts, *a: counts.update(prompts) or encode(self, prompts, *a))
        mp.setattr(AutoEncoder, "encode", lambda self, x: counts.update(["vae encodes"] * len(x)) or vae_encode(self, x))
        mp.setattr(Flux2, "forward", counting_forward)
        images, stats = pipeline.generate(pipeline.Klein(str(root), batch_size=3), PROMPTS, REFS, seed=[3, 4], kv_cache=True,
                                          **SPARSE)  # fmt: skip
    return images, stats, counts


def test_many_images_equal_single_runs(distilled, many):
    root, _ = distilled
    images, stats, counts = many
    assert len(images) == 4 and [after for _, after in stats.ref_tokens] == [6, 7]
    # one encoding per distinct prompt and reference, one reference forward (the K/V extraction) in all
    assert counts == {PROMPTS[0]: 1, PROMPTS[1]: 1, "vae encodes": 2, "reference forwards": 1, "reference rows": 1}
    jobs = [(p, s) for p in PROMPTS for s in (3, 4)]
    for (prompt, seed), image in zip(jobs, images):
        single, _ = pipeline.generate(str(root), prompt, REFS, seed=seed, kv_cache=True, **SPARSE)
        assert np.abs(np.array(image).astype(np.int32) - np.array(single).astype(np.int32)).max() <= 1, (prompt, seed)
    pairs = [np.array(im).astype(np.int32) for im in images]
    assert min(np.abs(a - b).max() for i, a in enumerate(pairs) for b in pairs[i + 1 :]) > 5  # all different


@pytest.mark.parametrize("kv,keep,guidance", [(False, None, 1.0), (False, 0.3, 1.0), (True, 0.3, 1.0), (True, None, 3.0)])
def test_batched_sampling_equals_one_at_a_time(distilled, kv, keep, guidance):
    """Batches (3 + 1 images) against one image per call, on the same loaded transformer; the references
    run once per step and batch without the cache, once in all with it (CFG included)."""
    from model import Flux2

    root, _ = distilled
    model = Flux2.from_pretrained(str(root))
    g = torch.Generator().manual_seed(0)
    txts = {p: torch.randn(1, 8, 3 * HIDDEN, generator=g) for p in PROMPTS}
    neg = torch.randn(1, 8, 3 * HIDDEN, generator=g)
    encoded = [(torch.randn(1, 20, 16, generator=g), grid_ids(4, 5, t=10)),
               (torch.randn(1, 24, 16, generator=g), grid_ids(6, 4, t=20))]  # fmt: skip
    kept = [None, None] if keep is None else [torch.tensor([0, 3, 7, 19]), torch.tensor([2, 5, 23])]
    ref, ref_ids = pipeline.gather_references(encoded, kept)
    jobs = [(p, s) for p in PROMPTS for s in (3, 4)]
    calls = []
    forward = model.forward
    model.forward = lambda img, *a, ref=None, **kw: calls.append(ref is not None) or forward(img, *a, ref=ref, **kw)
    with torch.no_grad():
        batched = pipeline.sample_latents(model, jobs, txts, 4, 4, 3, ref, ref_ids, kv, guidance, neg, batch_size=3)
        n_ref_calls = sum(calls)
        singles = [pipeline.sample_latents(model, [job], txts, 4, 4, 3, ref, ref_ids, kv, guidance, neg)[0] for job in jobs]
    assert n_ref_calls == (1 if kv else 3 * 2 * (2 if guidance > 1 else 1))  # steps x batches x CFG passes
    for b, s in zip(batched, singles):
        torch.testing.assert_close(b, s, rtol=1e-5, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 0.1 and (batched[0] - batched[2]).abs().max() > 0.1


@pytest.mark.compile
def test_compiled_sampling_equals_eager_once_per_bucket():
    """torch.compile (Inductor, the system C++ compiler) of a 1 + 1-block klein: a sweep of keeps whose
    counts round up to buckets equals eager within 1e-5 and compiles one graph per bucket, plus the two
    graphs (extraction, cached step) of a KV-cache run. Slow on a CPU: the smallest model, 4 graphs."""
    from torch._dynamo.utils import counters

    from model import Flux2, Flux2Config
    from klein import n_keep

    cfg = Flux2Config(in_channels=16, hidden_size=48, num_heads=3, depth=1, depth_single=1, context_dim=24, axes_dim=(4, 4, 4, 4))
    torch.manual_seed(0)
    eager = Flux2(cfg).eval()
    compiled = Flux2(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    txts = {"p": torch.randn(1, 8, 24, generator=g)}
    encoded = [(torch.randn(1, 40, 16, generator=g), grid_ids(5, 8, t=10))]
    keeps, bucket = [0.1, 0.3, 0.6], 16  # 4, 12, 24 tokens -> 16, 16, 32
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        for keep, kv in [(k, False) for k in keeps] + [(0.3, True)]:
            kept = [torch.randperm(40, generator=g)[: n_keep(keep, 40, bucket)].sort().values]
            ref, ref_ids = pipeline.gather_references(encoded, kept)
            want, got = (pipeline.sample_latents(m, [("p", 0)], txts, 3, 4, 2, ref, ref_ids, kv)[0] for m in (eager, compiled))
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (keep, kv)
    buckets = {n_keep(k, 40, bucket) for k in keeps}
    assert len(buckets) == 2 and counters["stats"]["unique_graphs"] == len(buckets) + 2


def test_compile_option_buckets_and_compiles(distilled, tmp_path, monkeypatch, capsys):
    """sample.py --compile: the transformer is compiled fullgraph with static shapes, the kept counts
    rounded up to COMPILE_BUCKET (here 8: 6 of 20 and 7 of 24 tokens become 8 and 8)."""
    from model import Flux2

    root, _ = distilled
    calls = []
    monkeypatch.setattr(Flux2, "compile", lambda self, **kw: calls.append(kw))  # compiled for real above
    monkeypatch.setattr(cli, "COMPILE_BUCKET", 8)
    for i, image in enumerate(REFS):
        image.save(tmp_path / f"r{i}.png")
    sample.main(["--model", str(root), "--prompt", "a red cube", "--ref", str(tmp_path / "r0.png"), str(tmp_path / "r1.png"),
                 "--keep", "0.3", "--kv-cache", "--compile", "--out", str(tmp_path / "o.png")])  # fmt: skip
    out = capsys.readouterr().out
    assert calls == [dict(fullgraph=True, dynamic=False)] and (tmp_path / "o.png").exists()
    assert "reference 0: 8 of 20 tokens kept" in out and "reference 1: 8 of 24 tokens kept" in out


def test_cli_many_images(distilled, many, tmp_path):
    """Repeated --ref and --prompt accumulate; outputs named out_p{i}_s{seed}; the same images as generate()."""
    root, _ = distilled
    REFS[0].save(tmp_path / "a.png")
    REFS[1].save(tmp_path / "b.png")
    r = run_cli("--model", root, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--ref", tmp_path / "a.png",
                "--ref", tmp_path / "b.png", "--seeds", 3, 4, "--keep", 0.3, "--selector", "canny", "--kv-cache",
                "--batch-size", 3, "--out", tmp_path / "o.png", "--save-selection", tmp_path / "sel.png")  # fmt: skip
    assert r.returncode == 0, r.stderr
    paths = [tmp_path / f"o_p{i}_s{s}.png" for i in range(2) for s in (3, 4)]
    for path, image in zip(paths, many[0]):
        assert np.abs(np.array(Image.open(path)).astype(np.int32) - np.array(image).astype(np.int32)).max() <= 1
        assert f"wrote {path}" in r.stdout
        assert path.stat().st_mode & 0o777 == 0o666 & ~sample_umask()  # the umask, not mkstemp's 0600
    assert Image.open(tmp_path / "sel.png").size == (80 + 64, 96)  # both references
    assert "reference 1: 7 of 24 tokens kept" in r.stdout and "per image" in r.stdout and f"wrote {tmp_path / 'sel.png'}" in r.stdout


def sample_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_names():
    assert sample.output_paths("out.png", None, ["a"], [7]) == ["out.png"]
    assert sample.output_paths("d/out.jpg", None, ["a", "b"], [0, 5]) == ["d/out_p0_s0.jpg", "d/out_p0_s5.jpg",
                                                                          "d/out_p1_s0.jpg", "d/out_p1_s5.jpg"]  # fmt: skip
    assert sample.output_paths(None, "outs", ["a"], [1, 2]) == [os.path.join("outs", "p0_s1.png"), os.path.join("outs", "p0_s2.png")]
    assert len(pipeline.load_references(str(Path(__file__).parent / "benchmarks.png"))) == 1  # one path: one reference


@pytest.fixture(scope="module")
def bad_files(distilled, tmp_path_factory):
    """Inputs for the bad-input table: a good reference, a LoRA and a NaN LoRA, broken files, a FIFO."""
    import lora
    from model import Flux2

    root, _ = distilled
    d = tmp_path_factory.mktemp("bad-inputs")
    REFS[0].save(d / "ref.png")
    REFS[1].save(d / "ref2.png")
    photo(40, 40).save(d / "small.png")
    (d / "bad.png").write_bytes(b"not an image")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "empty.txt").write_text("\n \n")
    (d / "file").write_text("x")
    (d / "dir.png").mkdir()
    os.mkfifo(d / "fifo.png")
    model = Flux2.from_pretrained(str(root))
    lora.inject(model, rank=2)
    lora.save_lora(model, d / "lora.safetensors")
    sd = load_file(d / "lora.safetensors")
    sd[next(iter(sd))][0, 0] = float("nan")
    save_file(sd, d / "nan_lora.safetensors")  # save_lora itself refuses to write one
    save_file({f"w{i}": torch.zeros(2) for i in range(183)}, d / "not_lora.safetensors")  # e.g. a transformer file
    return d


BAD = {  # case: (arguments after --model, substring of the one error line)
    "steps 0": (["--steps", "0"], "--steps"),
    "steps huge": (["--steps", "1000000000000"], "--steps"),
    "steps not int": (["--steps", "x"], "--steps"),
    "height 0": (["--height", "0"], "--height"),
    "width 8": (["--width", "8"], "--width"),
    "guidance nan": (["--guidance", "nan"], "--guidance"),
    "guidance inf": (["--guidance", "inf"], "--guidance"),
    "guidance below 1": (["--guidance", "0.5"], "--guidance"),
    "lora scale nan": (["--lora", "{d}/lora.safetensors", "--lora-scale", "nan"], "--lora-scale"),
    "lora scale alone": (["--lora-scale", "2"], "--lora-scale cannot apply without --lora"),
    "lora missing": (["--lora", "{d}/missing.safetensors"], "missing.safetensors"),
    "lora nan": (["--lora", "{d}/nan_lora.safetensors"], "NaN"),
    "lora not safetensors": (["--lora", "{d}/file"], "LoRA"),
    "lora not a lora": (["--lora", "{d}/not_lora.safetensors"], "not_lora.safetensors is not a LoRA file (no known LoRA keys"),
    "no ref: keep kv selection": (["--no-ref", "--keep", "0.1", "0.2", "--kv-cache", "--save-selection", "{d}/sel.png"],
                                  "--keep, --kv-cache, --save-selection cannot apply without a reference"),  # fmt: skip
    "no ref: selector": (["--no-ref", "--selector", "canny"], "--selector cannot apply without"),
    "no ref: task": (["--no-ref", "--task", "subject"], "--task cannot apply without"),
    "keep 1: selector": (["--selector", "canny"], "--selector cannot apply with --keep 1"),
    "keep 1: uniform mix": (["--uniform-mix", "0.5"], "--uniform-mix cannot apply with --keep 1"),
    "selection .txt": (["--keep", "0.5", "--save-selection", "{d}/sel.txt"], "unknown image format"),
    "adaptive with per-reference keeps": (["--ref", "{d}/ref2.png", "--keep", "0.1", "0.2", "--budget", "adaptive"], "--budget adaptive"),
    "compact 0": (["--compact", "0"], "--compact"),
    "compact not int (argparse)": (["--compact", "2.5"], "--compact"),
    "compact huge": (["--compact", "65"], "--compact"),
    "three compacts for two refs": (["--ref", "{d}/ref2.png", "--compact", "2", "2", "2"], "--compact has 3 values for 2"),
    "no ref: compact": (["--no-ref", "--compact", "2"], "--compact cannot apply without"),
    "keep 0": (["--keep", "0"], "--keep"),
    "keep nan": (["--keep", "nan"], "--keep"),
    "three keeps for two refs": (["--ref", "{d}/ref2.png", "--keep", "0.5", "0.5", "0.5"], "3 values for 2 reference"),
    "uniform mix 2": (["--keep", "0.5", "--uniform-mix", "2"], "--uniform-mix"),
    "device bogus": (["--device", "bogus"], "--device"),
    "device mps": (["--device", "mps"], "--device mps"),
    "dtype fp16": (["--dtype", "fp16"], "--dtype fp16"),
    "dtype float16": (["--dtype", "float16"], "--dtype fp16"),
    "lora merge alone": (["--lora-merge"], "--lora-merge cannot apply without --lora"),
    "transformer missing": (["--transformer", "{d}/none.safetensors"], "none.safetensors"),
    "transformer not safetensors": (["--transformer", "{d}/file"], "file"),
    "attention block without the selector": (["--keep", "0.5", "--attention-block", "1"], "--attention-block cannot apply"),
    "attention queries without a keep": (["--selector", "attention", "--attention-queries", "text"], "--selector cannot apply with --keep 1"),
    "attention block too deep": (["--keep", "0.5", "--selector", "attention", "--attention-block", "3"], "--attention-block"),
    "attention queries unknown": (["--keep", "0.5", "--selector", "attention", "--attention-queries", "keys"], "--attention-queries"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "seeds repeated": (["--seeds", "1", "1"], "repeats"),
    "seeds and seed": (["--seeds", "1", "2", "--seed", "3"], "--seeds cannot be combined"),
    "num images 0": (["--num-images", "0"], "--num-images"),
    "too many images": (["--num-images", "100000"], "--num-images"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "weights fp4": (["--weights", "fp4"], "--weights"),
    "selection seed negative": (["--keep", "0.5", "--selection-seed", "-1"], "--selection-seed"),
    "out unknown format": (["--out", "{d}/o.xyz"], "unknown image format"),
    "out gif": (["--out", "{d}/o.gif"], "use .png, .jpg or .webp"),
    "out in a missing folder": (["--out", "{d}/nonexistent/sub/o.png"], "folder " + "{d}/nonexistent/sub does not exist"),
    "selection in a missing folder": (["--keep", "0.5", "--save-selection", "{d}/nope/s.png"], "does not exist"),
    "out dir under a missing folder": (["--no-out", "--out-dir", "{d}/nope/outs"], "does not exist"),
    "selector unknown (argparse)": (["--keep", "0.5", "--selector", "sobel"], "--selector"),
    "keep not a number (argparse)": (["--keep", "abc"], "--keep"),
    "out is a folder": (["--out", "{d}/dir.png"], "is a folder"),
    "out and out dir": (["--out-dir", "{d}/outs"], "exactly one of --out and --out-dir"),
    "out dir is a file": (["--no-out", "--out-dir", "{d}/file"], "not a folder"),
    "no prompt": (["--no-prompt"], "no prompt"),
    "prompts missing": (["--prompts", "{d}/nope.txt"], "nope.txt"),
    "prompts not utf-8": (["--prompts", "{d}/latin1.txt"], "UTF-8"),
    "prompts empty": (["--prompts", "{d}/empty.txt"], "no prompt"),
    "ref missing": (["--ref", "{d}/nope.png"], "--ref: image not found: {d}/nope.png"),
    "ref not an image": (["--ref", "{d}/bad.png"], "bad.png"),
    "ref too small": (["--ref", "{d}/small.png"], "too small"),
    "ref fifo": (["--ref", "{d}/fifo.png"], "fifo.png"),
    "model missing": (["--model", "{d}/no-model"], "no-model"),
    "unknown option": (["--stepz", "3"], "--stepz"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_table(distilled, bad_files, tmp_path, monkeypatch, capsys, case):
    """One `error:` line naming the option or file, a non-zero exit, nothing written, no model loaded."""
    from model import Flux2
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    for cls in (Flux2, TextEncoder, AutoEncoder):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    extra, message = BAD[case]
    extra = [a.format(d=bad_files) for a in extra]
    args = {"--model": str(distilled[0]), "--prompt": "x", "--ref": str(bad_files / "ref.png"), "--out": str(tmp_path / "o.png")}
    for flag in ("--ref", "--out", "--prompt"):
        if f"--no-{flag[2:]}" in extra:
            extra.remove(f"--no-{flag[2:]}")
            del args[flag]
    if "--model" in extra:
        i = extra.index("--model")
        args["--model"] = extra[i + 1]
        del extra[i : i + 2]
    before = sorted(bad_files.iterdir()), sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit:
        sample.main([a for kv in args.items() for a in kv] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1  # argparse's own errors too: one status for every bad value
    assert len(err) == 1 and err[0].startswith("error: ") and message.format(d=bad_files) in err[0], err
    assert (sorted(bad_files.iterdir()), sorted(tmp_path.iterdir())) == before


def test_cli_fifo_reference_does_not_hang(bad_files, distilled, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--model", str(distilled[0]), "--prompt", "x", "--ref",
                        str(bad_files / "fifo.png"), "--out", str(tmp_path / "o.png")], capture_output=True, text=True,
                       timeout=60, env=ONE_THREAD)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_non_finite_latent_writes_nothing(distilled, bad_files, tmp_path, capsys):
    """A finite but absurd guidance overflows: an error naming the likely causes, and no file at all."""
    with pytest.raises(SystemExit):
        sample.main(["--model", str(distilled[0]), "--prompt", "x", "--ref", str(bad_files / "ref.png"), "--keep", "0.5",
                     "--guidance", "1e38", "--out", str(tmp_path / "o.png"), "--save-selection", str(tmp_path / "s.png")])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("denoising")]
    assert len(err) == 1 and "not finite" in err[0] and "--guidance" in err[0] and "--lora" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_help_shows_every_default_and_cpu_bf16_warns(capsys):
    import compare

    for parser in (sample.parser(), compare.parser()):
        for action in parser._actions:
            if action.dest != "help":
                assert "default" in action.help or "required" in action.help, action.option_strings
    cli.warn_slow_dtype(torch.device("cpu"), torch.bfloat16)
    cli.warn_slow_dtype(torch.device("cpu"), torch.float32)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: bfloat16 on a CPU")
    with pytest.raises(ValueError, match="steps must be an integer from 1 to 1000"):  # the library names its argument
        schedule(100000, 4096)  # would be NaN


# ----------------------------------------------------------------------------------------------
# compare.py: PSNR and SSIM against scikit-image; the sheet's images are generate()'s


@pytest.mark.parametrize("shape", [(3, 11, 11), (3, 40, 33), (2, 3, 64, 48)])
def test_psnr_ssim_equal_skimage(shape):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    import compare

    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g)
    b = (a + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    got_psnr, got_ssim = compare.psnr(a, b), compare.ssim(a, b)
    assert got_psnr.shape == got_ssim.shape == shape[:-3]
    for i, (x, y) in enumerate(zip(a.reshape(-1, *shape[-3:]).double().numpy(), b.reshape(-1, *shape[-3:]).double().numpy())):
        want = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1,
                                     channel_axis=0)  # fmt: skip
        assert abs(got_ssim.reshape(-1)[i].item() - want) < 1e-10
        assert abs(got_psnr.reshape(-1)[i].item() - peak_signal_noise_ratio(x, y, data_range=1)) < 1e-10
    assert (compare.ssim(a, a) - 1).abs().max() < 1e-12 and compare.psnr(a, a).isinf().all()
    with pytest.raises(ValueError, match="shape"):
        compare.ssim(a, b[..., :-1])


def test_compare_sheet_and_table(distilled, many, tmp_path, capsys):
    import compare

    root, _ = distilled
    REFS[0].save(tmp_path / "a.png")
    REFS[1].save(tmp_path / "b.png")
    out = tmp_path / "cmp"
    compare.main(["--model", str(root), "--prompt", PROMPTS[0], "--seed", "3", "--ref", str(tmp_path / "a.png"),
                  str(tmp_path / "b.png"), "--keeps", "0.6", "0.3", "--selectors", "random", "canny", "--kv-cache",
                  "--out-dir", str(out)])  # fmt: skip
    table = json.loads((out / "compare.json").read_text())["points"]
    assert [(p["selector"], p["keep"]) for p in table] == [("dense", 1.0)] + [(s, k) for s in ("random", "canny") for k in (0.6, 0.3)]
    assert table[0]["psnr_db"] is None and table[0]["ssim"] == 1 and table[0]["speedup"] == 1
    assert all(5 < p["psnr_db"] < 100 and 0 < p["ssim"] < 1 and p["seconds_per_image"] > 0 for p in table[1:])
    assert [p["ref_tokens"] for p in table] == [44, 12 + 14, 6 + 7, 12 + 14, 6 + 7]
    # the canny 0.3 tile is the image generate() makes with the same settings
    got = np.array(Image.open(out / "canny_k0.3.png")).astype(np.int32)
    assert np.abs(got - np.array(many[0][0]).astype(np.int32)).max() <= 1
    dense = compare.pixels(Image.open(out / "dense_k1.png"))
    assert table[4]["psnr_db"] == pytest.approx(compare.psnr(compare.pixels(Image.open(out / "canny_k0.3.png")), dense).item())
    assert "| canny | 0.3 | 13 |" in (out / "compare.md").read_text()
    sheet = Image.open(out / "sheet.png")
    assert sheet.width == 8 + 3 * (256 + 8) and sheet.height > 2 * 256
    assert f"wrote {out / 'sheet.png'}" in capsys.readouterr().out


def test_compare_one_reference_default_keeps(distilled, tmp_path):
    """The sweep's keeps are columns, not per-reference keeps: one reference with the default --keeps
    (three values) runs every column (it once failed: '--keep has 3 values for 1 reference images')."""
    import compare

    REFS[0].save(tmp_path / "a.png")
    out = tmp_path / "cmp"
    compare.main(["--model", str(distilled[0]), "--prompt", PROMPTS[0], "--ref", str(tmp_path / "a.png"),
                  "--selectors", "random", "--steps", "1", "--out-dir", str(out)])  # fmt: skip
    table = json.loads((out / "compare.json").read_text())["points"]
    assert [(p["selector"], p["keep"]) for p in table] == [("dense", 1.0), ("random", 0.25), ("random", 0.1), ("random", 0.05)]
    assert [p["ref_tokens"] for p in table] == [20, 5, 2, 1]  # 80x70 px -> 80x64 -> 5 x 4 tokens
