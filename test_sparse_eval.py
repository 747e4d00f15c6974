"""The evaluation extra (evaluate.py, metrics.py, benchmarks.py) on tiny random models: the metric models and
their preprocessing against transformers' and lpips' own computation, the converters on small fake copies of
each published layout, resume after a kill, the torchrun protocol, and every bad option as one error line
before any model loads. Machinery, not outcomes: no score here says anything about Sparse Context."""

import io
import json
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks
import evaluate
import metrics
from compare import psnr, ssim
from tiny import make_pipeline_folder, photo


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny klein folder, tiny CLIP/DINO/DINOv2 folders, and a two-example manifest (an edit with a mask,
    a subject with a target)."""
    root = tmp_path_factory.mktemp("eval")
    make_pipeline_folder(root / "klein", distilled=True)
    models = metrics.make_tiny_metric_models(root / "metric")
    data = root / "data"
    data.mkdir()
    photo(64, 64, seed=1).save(data / "a.png")
    photo(80, 64, seed=2).save(data / "b.png")
    photo(96, 96, seed=3).save(data / "t.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:50] = 255
    Image.fromarray(mask).save(data / "mask.png")
    lines = [dict(id="e1", prompt="make it red", references=["a.png"], task="edit", mask="mask.png", clip_text="a red thing"),
             dict(id="s1", prompt="a cube on a beach", references=["b.png"], task="subject", target="t.png")]  # fmt: skip
    (data / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root, models, data / "manifest.jsonl"


def argv(world, out, *extra):
    root, models, manifest = world
    return [str(manifest), "--model", str(root / "klein"), "--out-dir", str(out), "--steps", "2", "--keeps", "0.5",
            "--selectors", "random", "--metrics", "clip", "dino", "psnr", "ssim", "--clip", models["clip"], "--dino", models["dino"],
            *extra]  # fmt: skip


class Counter:
    """Wraps a function and counts its calls (and the images a sample_latents call samples)."""

    def __init__(self, fn, images=False):
        self.fn, self.images, self.calls, self.count = fn, images, 0, 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.images and a[5] > 1:  # a[5]: steps; the one-step warm-up is not an image
            self.count += len(a[1])
        return self.fn(*a, **k)


# ----------------------------------------------------------------------------------------------
# Metric models: preprocessing and scores equal transformers' and lpips' own computation


def legacy_configs(folder, models):
    """The real checkpoints' preprocessor_config.json forms (ints, *FeatureExtractor types) at tiny sizes."""
    forms = {"clip": dict(crop_size=32, do_center_crop=True, do_normalize=True, do_resize=True, resample=3, size=32,
                          feature_extractor_type="CLIPFeatureExtractor", image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711]),
             "dino": dict(do_normalize=True, do_resize=True, feature_extractor_type="ViTFeatureExtractor", image_mean=metrics.IMAGENET_MEAN,
                          image_std=metrics.IMAGENET_STD, resample=2, size=32)}  # fmt: skip
    out = {}
    for name, cfg in forms.items():
        (folder / name).mkdir()
        (folder / name / "preprocessor_config.json").write_text(json.dumps(cfg))
        out[name] = folder / name
    return out


PROCESSORS = {"clip": "CLIPImageProcessor", "dino": "ViTImageProcessor", "dinov2": "BitImageProcessor"}


@pytest.mark.parametrize("kind", ["clip", "dino", "dinov2", "clip-legacy", "dino-legacy"])
def test_preprocessing_equals_transformers(world, tmp_path, kind):
    _, models, _ = world
    name = kind.split("-")[0]
    folder = legacy_configs(tmp_path, models)[name] if kind.endswith("legacy") else Path(models[name])
    processor = metrics.pil_processor(PROCESSORS[name]).from_pretrained(folder)
    ours = metrics.Preprocess.from_config(folder / "preprocessor_config.json")
    for size, mode in [((70, 50), "RGB"), ((50, 91), "RGBA"), ((33, 33), "L"), ((200, 77), "RGB")]:
        image = photo(*size, seed=sum(size)).convert(mode)
        want = torch.from_numpy(np.array(processor(images=[image.convert("RGB")], return_tensors="np")["pixel_values"]))
        assert torch.equal(ours([image]), want), (kind, size)


def test_ssim_equals_scikit_image():
    """metrics.ssim (separable, on any device) against scikit-image's structural_similarity and compare.ssim."""
    from skimage.metrics import structural_similarity

    import compare

    g = torch.Generator().manual_seed(0)
    for h, w in [(11, 11), (37, 52), (130, 97)]:
        a = torch.rand(3, h, w, generator=g)
        b = (a + 0.4 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
        want = structural_similarity(a.double().numpy(), b.double().numpy(), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, channel_axis=0)  # fmt: skip
        assert metrics.ssim(a, b).item() == pytest.approx(want, abs=1e-12) == compare.ssim(a, b).item()
    assert metrics.ssim(a, a).item() == pytest.approx(1.0)


def library_clip(folder, images, text):
    """CLIPModel's own forward on its processor's inputs: (image-text cosines, image-image cosines)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    processor = metrics.pil_processor("CLIPImageProcessor").from_pretrained(folder)
    pixels = torch.from_numpy(np.array(processor(images=images, return_tensors="np")["pixel_values"]))
    tokens = AutoTokenizer.from_pretrained(folder)([text], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return (out.logits_per_image / model.logit_scale.exp())[:, 0], out.image_embeds @ out.image_embeds.T


def library_dino(folder, cls, images, processor):
    model = cls.from_pretrained(folder).eval()
    processor = metrics.pil_processor(processor).from_pretrained(folder)
    pixels = torch.from_numpy(np.array(processor(images=images, return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state[:, 0]
    return torch.nn.functional.cosine_similarity(tokens[:, None], tokens[None], dim=-1)


def test_scores_equal_the_libraries(world):
    from transformers import Dinov2Model, ViTModel

    _, models, _ = world
    image, subject, source = photo(64, 48, seed=5), photo(90, 70, seed=6), photo(64, 48, seed=7)
    m = metrics.Metrics(["clip", "dino", "dinov2", "psnr", "ssim"], models["clip"], models["dino"], models["dinov2"])
    keep = torch.ones(48, 64)
    keep[10:30, 5:40] = 0
    ctx = metrics.Context(text="a red cube", subject=[subject], source=source, background=keep, target=subject)
    got = m.score(image, ctx, m.prepare(ctx), dense=source)
    clip_t, clip_ii = library_clip(models["clip"], [image, subject], "a red cube")
    dino = library_dino(models["dino"], ViTModel, [image, subject], "ViTImageProcessor")
    dinov2 = library_dino(models["dinov2"], Dinov2Model, [image, subject], "BitImageProcessor")
    for name, want in [("clip_t", clip_t[0]), ("clip_i", clip_ii[0, 1]), ("clip_i_target", clip_ii[0, 1]), ("dino", dino[0, 1]),
                       ("dinov2", dinov2[0, 1]), ("dino_target", dino[0, 1])]:  # fmt: skip
        assert got[name] == pytest.approx(want.item(), abs=1e-5), name
    assert abs(got["dino"]) < 0.999  # not trivially 1
    x, s = metrics.pixels(image), metrics.pixels(source)
    assert got["psnr_dense"] == pytest.approx(psnr(x, s).item()) and got["ssim_dense"] == pytest.approx(ssim(x, s).item(), abs=1e-12)
    assert got["psnr_bg"] == pytest.approx(psnr(x * keep, s * keep).item())  # PnPInversion: both images times the background
    same = m.score(subject, ctx, m.prepare(ctx))
    for name in ("clip_i", "dino", "dinov2", "clip_i_target", "dino_target"):
        assert same[name] == pytest.approx(1.0, abs=1e-5), name  # identical images: cosine 1


def torchvision_stand_in():
    """torchvision.models.alexnet's feature layers (its architecture, random weights), for lpips where the
    real torchvision cannot be installed beside this torch."""
    nn = torch.nn
    features = nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                             nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(256, 256, 3, padding=1),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))  # fmt: skip
    models = types.SimpleNamespace(alexnet=lambda pretrained=False, **_: types.SimpleNamespace(features=features))
    return types.SimpleNamespace(models=models, __name__="torchvision")


def test_lpips_equals_the_lpips_package(monkeypatch):
    """The lpips package's LPIPS with a random AlexNet (pnet_rand: no download) and its shipped linear heads:
    what metrics.py scores (fidelity and background) equals the package's own forward on the same inputs.
    Where torchvision cannot be imported (this CPU's torch has no matching wheel) its AlexNet layers are
    stood in; on a machine with torchvision the real one runs."""
    pytest.importorskip("scipy")
    try:
        import torchvision  # noqa: F401
    except Exception:
        stand_in = torchvision_stand_in()
        monkeypatch.setitem(sys.modules, "torchvision", stand_in)
        monkeypatch.setitem(sys.modules, "torchvision.models", stand_in.models)
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    m = metrics.Metrics(["lpips"], lpips_random=True)
    assert isinstance(m.lpips.model, lpips.LPIPS) and m.lpips.model.lin0.model[1].weight.abs().sum() > 0  # heads loaded
    image, source = photo(96, 64, seed=1), photo(96, 64, seed=2)
    keep = torch.ones(64, 96)
    keep[:, :40] = 0
    ctx = metrics.Context(source=source, background=keep, target=source)
    got = m.score(image, ctx, m.prepare(ctx), dense=source)
    x, s = metrics.pixels(image)[None], metrics.pixels(source)[None]
    with torch.no_grad():
        want = m.lpips.model(2 * x - 1, 2 * s - 1).item()
        want_bg = m.lpips.model(2 * x * keep - 1, 2 * s * keep - 1).item()
    assert got["lpips_dense"] == pytest.approx(want, rel=1e-6) and got["lpips_target"] == pytest.approx(want, rel=1e-6)
    assert got["lpips_bg"] == pytest.approx(want_bg, rel=1e-6) and want != pytest.approx(want_bg)
    assert m.score(source, ctx, {}, dense=source)["lpips_dense"] == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------
# Converters, on small fake copies of each published layout


DREAMBENCH_PROMPTS = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]
"""


def fail_line(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_dreambench(tmp_path, capsys):
    d = tmp_path / "dataset"
    for subject, n in (("backpack", 3), ("dog", 2)):
        (d / subject).mkdir(parents=True)
        for i in range(n):
            photo(80, 72, seed=i).save(d / subject / f"{i:02d}.jpg")
    (d / "prompts_and_classes.txt").write_text(DREAMBENCH_PROMPTS)
    benchmarks.main(["dreambench", str(d), "--out", str(tmp_path / "out"), "--refs", "2", "--token", "sks"])
    examples = benchmarks.read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [(e.id, e.prompt, e.group) for e in examples] == [
        ("backpack/00", "a sks backpack in the jungle", "object"), ("backpack/01", "a red sks backpack", "object"),
        ("dog/00", "a sks dog in the jungle", "live"), ("dog/01", "a sks dog wearing a red hat", "live"),
        ("dog/02", "a cube shaped sks dog", "live")]  # fmt: skip
    assert [os.path.basename(p) for p in examples[0].references] == ["00.jpg", "01.jpg"] and len(examples[0].subject_images) == 3
    benchmarks.main(["dreambench", str(d), "--out", str(tmp_path / "plain")])
    assert benchmarks.read_manifest(tmp_path / "plain" / "manifest.jsonl")[0].prompt == "a backpack in the jungle"
    (d / "dog" / "01.jpg").write_bytes(b"not a jpeg")  # one bad file, named with the count
    err = fail_line(capsys, benchmarks.main, ["dreambench", str(d), "--out", str(tmp_path / "bad"), "--refs", "2"])
    assert "bad files or entries" in err and "01.jpg" in err and not (tmp_path / "bad").exists()
    benchmarks.main(["dreambench", str(d), "--out", str(tmp_path / "skip"), "--refs", "2", "--skip-bad"])
    assert {e.id.split("/")[0] for e in benchmarks.read_manifest(tmp_path / "skip" / "manifest.jsonl")} == {"backpack"}


def pnp_mask_decode(encoded_mask, image_shape=(512, 512)):
    """PnPInversion's evaluation/evaluate.py mask_decode, as published (the oracle)."""
    length = image_shape[0] * image_shape[1]
    mask_array = np.zeros((length,))
    for i in range(0, len(encoded_mask), 2):
        splice_len = min(encoded_mask[i + 1], length - encoded_mask[i])
        for j in range(splice_len):
            mask_array[encoded_mask[i] + j] = 1
    mask_array = mask_array.reshape(image_shape[0], image_shape[1])
    mask_array[0, :] = 1
    mask_array[-1, :] = 1
    mask_array[:, 0] = 1
    mask_array[:, -1] = 1
    return mask_array


def test_pie_bench(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "annotation_images" / "0_random_140").mkdir(parents=True)
    mapping = {}
    for i, rle in enumerate([[70, 20, 300, 45, 4000, 500], [0, 10, 4090, 100]]):
        key = f"00000000000{i}"
        photo(64, 64, seed=i).save(data / "annotation_images" / "0_random_140" / f"{key}.jpg")
        mapping[key] = dict(image_path=f"0_random_140/{key}.jpg", original_prompt="a [cat] on a bench", editing_prompt="a [dog] on a bench",
                            editing_instruction="change the cat to a dog", editing_type_id=str(i), blended_word="cat dog",
                            mask=rle)  # fmt: skip
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    benchmarks.main(["pie-bench", str(data), "--out", str(tmp_path / "out")])
    examples = benchmarks.read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [(e.id, e.prompt, e.clip_text, e.group, e.task) for e in examples] == [
        ("000000000000", "change the cat to a dog", "a dog on a bench", "0", "edit"),
        ("000000000001", "change the cat to a dog", "a dog on a bench", "1", "edit")]  # fmt: skip
    for e, rle in zip(examples, [v["mask"] for v in mapping.values()], strict=True):
        assert np.array_equal(np.array(Image.open(e.mask)) > 127, pnp_mask_decode(rle, (64, 64)) == 1)
    benchmarks.main(["pie-bench", str(data), "--out", str(tmp_path / "target"), "--prompt", "target", "--types", "1"])
    kept = benchmarks.read_manifest(tmp_path / "target" / "manifest.jsonl")
    assert [(e.id, e.prompt) for e in kept] == [("000000000001", "a dog on a bench")]
    mapping["000000000002"] = dict(mapping["000000000000"], image_path="0_random_140/missing.jpg")
    mapping["000000000003"] = dict(mapping["000000000000"], mask=[1, 2, 3])
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    err = fail_line(capsys, benchmarks.main, ["pie-bench", str(data), "--out", str(tmp_path / "bad")])
    assert "2 bad files or entries" in err and "missing.jpg" in err and "even length" in err
    benchmarks.main(["pie-bench", str(data), "--out", str(tmp_path / "skip"), "--skip-bad"])
    assert len(benchmarks.read_manifest(tmp_path / "skip" / "manifest.jsonl")) == 2


def pair_image(seed):
    """A 1056x528 Subjects200K pair: two 512 px panels, 8 px of padding around each, white padding."""
    canvas = Image.new("RGB", (1056, 528), "white")
    canvas.paste(photo(512, 512, seed=seed), (8, 8))
    canvas.paste(photo(512, 512, seed=seed + 100), (528 + 8, 8))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return canvas, buf.getvalue()


def test_subjects200k(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good, good_bytes = pair_image(1)
    _, other_bytes = pair_image(2)
    def row(n, data, collection, quality):
        scores = None if quality is None else dict(zip(("compositeStructure", "objectConsistency", "imageQuality"), quality, strict=True))
        description = dict(item="a mug", description_0=f"a mug on a desk {n}", description_1=f"a mug in a garden {n}", category="cup",
                           description_valid=True)  # fmt: skip
        return dict(image=dict(bytes=data, path=None), collection=collection, quality_assessment=scores, description=description)

    rows = [row(0, good_bytes, "collection_2", (5, 5, 5)), row(1, other_bytes, "collection_2", (5, 4, 5)),
            row(2, other_bytes, "collection_1", None), row(3, b"broken", "collection_2", (5, 5, 5)),
            row(4, other_bytes, "collection_1", (5, 5, 5))]  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    err = fail_line(capsys, benchmarks.main, ["subjects200k", str(tmp_path / "data"), "--out", str(tmp_path / "bad")])
    assert "1 bad files or entries" in err and "train-00000-of-00001.parquet row 3" in err
    benchmarks.main(["subjects200k", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--skip-bad"])
    examples = benchmarks.read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [(e.prompt, e.group, e.task) for e in examples] == [("a mug in a garden 0", "collection_2", "subject"),
                                                               ("a mug in a garden 4", "collection_1", "subject")]  # fmt: skip
    ref, target = (np.array(Image.open(p)) for p in (examples[0].references[0], examples[0].target))
    assert np.array_equal(ref, np.array(good.crop((8, 8, 520, 520)))) and np.array_equal(target, np.array(good.crop((536, 8, 1048, 520))))
    benchmarks.main(["subjects200k", str(tmp_path / "data"), "--out", str(tmp_path / "c1"), "--skip-bad", "--collection", "collection_1",
                     "--limit", "1"])  # fmt: skip
    assert [e.prompt for e in benchmarks.read_manifest(tmp_path / "c1" / "manifest.jsonl")] == ["a mug in a garden 4"]


# ----------------------------------------------------------------------------------------------
# The command: a table, resume after a kill, the torchrun protocol


def test_table_from_a_manifest(world, tmp_path):
    out = tmp_path / "out"
    evaluate.main(argv(world, out, "--kv-cache", "both", "--metrics", "clip", "dino", "dinov2", "psnr", "ssim",
                       "--dinov2", world[1]["dinov2"]))  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "dense +kv", "random keep 0.5", "random keep 0.5 +kv"]
    assert rows["dense"]["baseline"] and rows["dense"]["speedup"] == 1 and "psnr_dense" not in rows["dense"]["metrics"]
    assert rows["random keep 0.5"]["ref_tokens_kept"] == pytest.approx(0.5, abs=0.05)
    for r in rows.values():
        assert r["images"] == 2 and r["seconds_per_image"] > 0
        assert {"clip_t", "clip_i", "dino", "dinov2", "clip_i_target", "dino_target", "psnr_bg", "ssim_bg"} <= set(r["metrics"])
        assert r["metrics"]["clip_t"]["n"] == 2 and r["metrics"]["psnr_bg"]["n"] == 1  # the mask belongs to the edit example
    sparse_row = rows["random keep 0.5"]
    for name in ("clip_t", "dino", "psnr_bg"):  # paired change against dense: every example has both, so the difference of the means
        want = sparse_row["metrics"][name]["mean"] - rows["dense"]["metrics"][name]["mean"]
        assert sparse_row["delta"][name]["mean"] == pytest.approx(want, abs=1e-9)
    assert (out / "results.md").read_text().count("\n| ") == 5 + 4  # the table (header, 4 settings), the changes (header, 3)
    assert (out / "quality_vs_speedup.png").stat().st_size > 1000
    # a cached score is what metrics.py computes from the cached images: PSNR of an image against the dense one
    plan_images = sorted((out / "images").glob("*.json"))
    metas = {(m["example"], m["setting"]): p for p in plan_images for m in [json.loads(p.read_text())]}
    sparse, dense = (metas["e1", s].with_suffix(".png") for s in ("random keep 0.5", "dense"))
    scores = json.loads(next((out / "scores").glob(f"*/{sparse.stem}.json")).read_text())
    a, b = (metrics.pixels(Image.open(p)) for p in (sparse, dense))
    assert scores["psnr_dense"] == pytest.approx(psnr(a, b).item())


def test_resume_after_kill_adds_only_what_is_missing(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    save, saved = evaluate.save_image, []

    def killed_after_three(*a):
        if len(saved) == 3:
            raise KeyboardInterrupt  # a kill: nothing of the run's own error handling runs
        saved.append(a[1])
        save(*a)

    monkeypatch.setattr(evaluate, "save_image", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(argv(world, out))
    assert len(list((out / "images").glob("*.png"))) == 3 and not list((out / "images").glob(".*"))
    monkeypatch.setattr(evaluate, "save_image", save)
    sampler = Counter(evaluate.sample_latents, images=True)
    scorer = Counter(metrics.Metrics.score)
    monkeypatch.setattr(evaluate, "sample_latents", sampler)
    monkeypatch.setattr(metrics.Metrics, "score", lambda self, *a, **k: scorer(self, *a, **k))
    evaluate.main(argv(world, out))
    assert sampler.count == 4 - 3 and scorer.calls == 4  # 2 examples x (dense, random 0.5): only the missing image
    assert len(list((out / "images").glob("*.png"))) == 4
    first = (out / "results.json").read_text()
    sampler.count = scorer.calls = 0
    evaluate.main(argv(world, out))  # nothing missing: nothing sampled or scored, the same table
    assert sampler.count == 0 and scorer.calls == 0 and json.loads((out / "results.json").read_text())["rows"] == json.loads(first)["rows"]
    evaluate.main(argv(world, out, "--seeds", "0", "1", "--keeps", "0.5", "0.25"))  # extended: 2 x 3 settings x 2 seeds = 12
    assert sampler.count == 12 - 4 and scorer.calls == 12 - 4
    assert len(list((out / "images").glob("*.png"))) == 12


def test_torchrun_shards_and_rank_zero_writes_the_table(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    sampler = Counter(evaluate.sample_latents, images=True)
    monkeypatch.setattr(evaluate, "sample_latents", sampler)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    evaluate.main(argv(world, out))  # rank 1: example 1 only, no table
    assert sampler.count == 2 and not (out / "results.md").exists() and len(list((out / "done").glob("*.1-of-2"))) == 1
    assert {json.loads(p.read_text())["example"] for p in (out / "images").glob("*.json")} == {"s1"}
    monkeypatch.setenv("RANK", "0")
    evaluate.main(argv(world, out))  # rank 0: example 0, then the table of both
    assert sampler.count == 4 and all(r["images"] == 2 for r in json.loads((out / "results.json").read_text())["rows"])


def test_rank_zero_waits_for_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "POLL_SECONDS", 0.01)
    paths = [str(tmp_path / "done.0"), str(tmp_path / "done.1")]
    Path(paths[0]).write_text("{}")
    later = threading.Timer(0.2, lambda: Path(paths[1]).write_text("{}"))
    later.start()
    evaluate.wait_for(paths, progress=False)
    assert all(os.path.isfile(p) for p in paths)


# ----------------------------------------------------------------------------------------------
# Every bad option: one error line, exit status 1, nothing written, before any model loads


def bad_manifest(world, tmp_path, line):
    path = tmp_path / "m" / "manifest.jsonl"
    path.parent.mkdir(exist_ok=True)
    rel = os.path.relpath(world[2].parent, path.parent)
    path.write_text(json.dumps({k: (f"{rel}/{v}" if k in ("mask",) else [f"{rel}/{r}" for r in v] if k == "references" else v)
                                for k, v in line.items()}) + "\n")  # fmt: skip
    return str(path)


BAD = {
    "keep 0": (["--keeps", "0"], "--keeps must be"),
    "keep 1": (["--keeps", "1"], "dense setting"),
    "keep nan": (["--keeps", "nan"], "--keeps must be"),
    "repeated keeps": (["--keeps", "0.5", "0.5"], "must not repeat"),
    "seed": (["--seeds", "-1"], "--seed must be"),
    "steps": (["--steps", "0"], "--steps must be"),
    "lora scale": (["--lora-scale", "2"], "--lora-scale cannot apply without --lora"),
    "attention block without it": (["--attention-block", "0"], "cannot apply without --selectors attention"),
    "attention block range": (["--selectors", "attention", "--attention-block", "99"], "--attention-block must be"),
    "clip folder": (["--clip", "/nonexistent/clip"], "--clip /nonexistent/clip is neither"),
    "dinov2 without metric": (["--dinov2", "x/y"], "--dinov2 cannot apply without --metrics dinov2"),
    "lpips net without metric": (["--lpips-net", "alex"], "--lpips-net cannot apply without --metrics lpips"),
    "device": (["--device", "cuda:7"], "--device"),
    "dtype": (["--dtype", "fp16"], "invalid choice"),
    "limit": (["--limit", "0"], "--limit must be"),
    "model": (["--model", "/nonexistent/klein"], "/nonexistent/klein"),
    "out dir": (["--out-dir", "/nonexistent/out"], "does not exist"),
    "manifest missing": ([], "manifest not found"),
    "unknown field": ([], "unknown field(s) 'maks'"),
    "mask size": ([], "mask"),
    "unknown task": ([], "unknown task"),
    "rank": ([], "RANK 2 and WORLD_SIZE 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_option_is_one_error_line(world, tmp_path, monkeypatch, capsys, case):
    def no_load(*a, **k):
        raise AssertionError("a model loaded before the options were checked")

    loaders = ((evaluate.TextEncoder, "from_pretrained"), (evaluate.AutoEncoder, "from_pretrained"), (metrics, "CLIP"), (metrics, "DINO"))
    for target, name in loaders:
        monkeypatch.setattr(target, name, no_load)
    monkeypatch.setattr("model.Flux2.from_pretrained", no_load)
    extra, message = BAD[case]
    args = argv(world, tmp_path / "out", *extra)
    if case == "manifest missing":
        args[0] = str(tmp_path / "none.jsonl")
    line = dict(id="x", prompt="p", references=["a.png"], task="edit")
    if case in ("unknown field", "mask size", "unknown task"):
        line = {"unknown field": dict(line, maks="mask.png"), "mask size": dict(line, references=["b.png"], mask="mask.png"),
                "unknown task": dict(line, task="inpaint")}[case]  # fmt: skip
        args[0] = bad_manifest(world, tmp_path, line)
    if case == "rank":
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
    err = fail_line(capsys, evaluate.main, args)
    assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["dreambench", "{d}", "--refs", "0"], "--refs must be"),
    (["dreambench", "{d}/none"], "DreamBench prompts file not found"),
    (["pie-bench", "{d}", "--types", "11"], "--types must be"),
    (["pie-bench", "{d}"], "JSON file not found"),
    (["subjects200k", "{d}", "--limit", "0"], "--limit must be"),
    (["subjects200k", "{d}", "--min-quality", "7"], "--min-quality must be"),
    (["subjects200k", "{d}/none.parquet"], "not found"),
    (["tiny", "{d}"], "invalid choice"),
])  # fmt: skip
def test_converter_bad_option_is_one_error_line(tmp_path, capsys, args, message):
    err = fail_line(capsys, benchmarks.main, [a.format(d=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    assert message in err and not (tmp_path / "out").exists(), err
