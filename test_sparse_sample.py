"""sample.py against diffusers' Flux2KleinPipeline / Flux2KleinKVPipeline on a tiny random pipeline folder."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

import sample
from test_sparse_model import randomize_
from test_sparse_text import make_tiny_text_encoder_repo
from test_sparse_vae import tiny_diffusers_vae

HIDDEN = 32  # tiny Qwen3: prompt embeddings are 3 x 32 = 96 wide


def make_pipeline_folder(root, distilled):
    """A klein repository folder written by diffusers' own save_pretrained."""
    tokenizer, text_encoder = make_tiny_text_encoder_repo(root, hidden_size=HIDDEN)
    vae = tiny_diffusers_vae(0, block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    torch.manual_seed(0)
    transformer = randomize_(Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * HIDDEN, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ), seed=1).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)  # fmt: skip
    pipe.save_pretrained(root)
    return pipe


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein")
    return root, make_pipeline_folder(root, distilled=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("klein-base")
    return root, make_pipeline_folder(root, distilled=False)


def photo(w, h, mode="RGB", seed=0):
    """A smooth random image (structure for the selectors) in any PIL mode."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).convert(mode)


REFS = [photo(80, 70, seed=1), photo(64, 100, "RGBA", seed=2)]


def diffusers_image(pipe, refs, seed, **kw):
    out = pipe(prompt="a red cube", image=list(refs) or None, generator=torch.Generator().manual_seed(seed),
               output_type="np", **kw)  # fmt: skip
    return (out.images[0] * 255).round().astype(np.int32)


def ours_image(root, refs, seed, **kw):
    image, _ = sample.generate(str(root), "a red cube", refs, seed=seed, progress=False, **kw)
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
    ours = sample.prepare_reference(image)
    assert ours.size == (w, h)
    assert torch.equal(sample.to_tensor(ours), want)


@pytest.mark.parametrize("size", [(63, 200), (600, 70)])
def test_reference_size_errors(size):
    with pytest.raises(ValueError, match="too small|aspect ratio"):
        sample.prepare_reference(photo(*size))
    with pytest.raises(ValueError):
        Flux2ImageProcessor.check_image_input(photo(*size))  # diffusers refuses the same images


def test_schedule_equals_diffusers_scheduler():
    for n, seq in [(4, 4096), (50, 4096), (4, 5000), (28, 256)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq, n))
        assert torch.equal(sample.schedule(n, seq), sched.sigmas)
    assert sample.schedule(4, 4096)[:4].tolist() == pytest.approx([1.0, 0.9674, 0.9081, 0.7672], abs=1e-4)


def run_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], capture_output=True, text=True)


def test_cli_writes_image_and_reports(distilled, tmp_path):
    root, _ = distilled
    REFS[0].save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    r = run_cli("--model", root, "--prompt", "a red cube", "--ref", tmp_path / "ref.png", "--out", out, "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "reference 0: 20 of 20 tokens kept" in r.stdout and "denoising" in r.stdout
    got = np.array(Image.open(out)).astype(np.int32)
    assert np.abs(got - ours_image(root, REFS[:1], seed=3)).max() == 0


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
    r = run_cli("--model", args["model"], "--prompt", "x", "--ref", args["ref"], "--out", args["out"], *extra)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not args["out"].exists() and not list(tmp_path.glob("*.tmp"))


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


def diffusers_loop(pipe, refs, kept, seed, steps=4, kv=False):
    """klein sampling written with diffusers' own pipeline pieces, on a subset of reference tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    with torch.no_grad():
        txt, txt_ids = pipe.encode_prompt(prompt="a red cube", device="cpu", max_sequence_length=512)
        images = [sample.to_tensor(sample.prepare_reference(r)) for r in refs]
        ref, ref_ids = pipe.prepare_image_latents(images=images, batch_size=1, generator=None, device="cpu", dtype=torch.float32)
        offsets = np.cumsum([0] + [im.shape[2] * im.shape[3] // 256 for im in images])
        rows = torch.cat([torch.as_tensor(idx) + int(o) for idx, o in zip(kept, offsets)])
        ref, ref_ids = ref[:, rows], ref_ids[:, rows]
        H, W = images[0].shape[2:]
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
    image, stats = sample.generate(str(root), "a red cube", REFS, seed=9, kv_cache=kv, keep=keep, selector=selector,
                                   progress=False)  # fmt: skip
    counts = [after for _, after in stats.ref_tokens]
    keeps = keep if isinstance(keep, list) else [keep, keep]
    assert counts == [max(1, round(k * n)) for k, (n, _) in zip(keeps, stats.ref_tokens)]
    want = diffusers_loop(pipe, REFS, stats.kept, seed=9, kv=kv)
    assert np.abs(np.array(image).astype(np.int32) - want).max() <= 1
    dense = diffusers_loop(pipe, REFS, [torch.arange(n) for n, _ in stats.ref_tokens], seed=9, kv=kv)
    assert np.abs(dense - want).max() > 5  # dropping tokens really changed the image


def test_keep_one_is_dense_and_bad_keeps(distilled, tmp_path):
    root, _ = distilled
    dense, _ = sample.generate(str(root), "a red cube", REFS, seed=2, progress=False)
    kept, stats = sample.generate(str(root), "a red cube", REFS, seed=2, keep=[1.0, 1.0], selector="canny",
                                  save_selection=tmp_path / "sel.png", progress=False)  # fmt: skip
    assert np.array_equal(np.array(dense), np.array(kept))
    assert stats.ref_tokens == [(20, 20), (24, 24)]
    assert Image.open(tmp_path / "sel.png").size == (80 + 64, 96)
    for keep, match in [(0.0, "keep"), (1.5, "keep"), ([0.5], "2 reference"), ([0.1, 0.2, 0.3], "2 reference")]:
        with pytest.raises(ValueError, match=match):
            sample.generate(str(root), "x", REFS, keep=keep, progress=False)
    with pytest.raises(ValueError, match="selector"):
        sample.generate(str(root), "x", REFS, keep=0.5, selector="sobel", progress=False)
