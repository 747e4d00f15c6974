"""Tests for token_selectors.py. OpenCV (cv2, with contrib's saliency) is the oracle."""
import ast
import functools
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import selection
import token_selectors as ts
from klein import n_keep

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins"]  # shipped with skimage


@functools.cache
def photo(name):
    """skimage photo as (H, W, 3) RGB uint8 (grey ones stacked)."""
    im = getattr(data, name)()
    return np.ascontiguousarray(np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3])


def gray(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def cropped(name, size=None):
    """Photo resized to size (W, H) if given, then cropped to multiples of 16."""
    im = photo(name)
    if size is not None:
        im = cv2.resize(im, size, interpolation=cv2.INTER_AREA)
    H, W = im.shape[0] // 16 * 16, im.shape[1] // 16 * 16
    return np.ascontiguousarray(im[:H, :W])


def canny_mismatches(g, low, high):
    ref = cv2.Canny(g, low, high) != 0
    ours = ts.canny(g, low, high)
    assert ours.dtype == torch.bool and ours.shape == g.shape
    return int((ours.numpy() != ref).sum()), int(ref.sum())


# -----------------------------------------------------------------------------
# Canny: identical to cv2.Canny, pixel for pixel


@pytest.mark.parametrize("name", PHOTOS)
def test_canny_matches_opencv_on_photos(name):
    g = gray(photo(name))
    for low, high in [(100, 200), (50, 150), (10, 30), (200, 100), (30.7, 90.9)]:
        bad, n_edges = canny_mismatches(g, low, high)
        assert n_edges > 1000, "a photo without edges would test nothing"
        assert bad == 0, f"{name} ({low}, {high}): {bad} of {n_edges} edge pixels differ"


def synthetic_images():
    rng = np.random.default_rng(0)
    z = np.zeros((40, 50), np.uint8)
    yy, xx = np.mgrid[:40, :50]
    hline, vline, diag, border = z.copy(), z.copy(), z.copy(), z.copy()
    hline[17] = 255
    vline[:, 23] = 255
    diag[yy == xx] = 255
    border[[0, -1]] = 255
    border[:, [0, -1]] = 255
    return {
        "flat": np.full((40, 50), 77, np.uint8),
        "hline": hline, "vline": vline, "diag": diag, "antidiag": diag[:, ::-1].copy(),
        "bright_border": border,
        "step": (xx > 20).astype(np.uint8) * 200,
        "noise": rng.integers(0, 256, (40, 50), dtype=np.uint8),
        "blurred_noise": cv2.GaussianBlur(rng.integers(0, 256, (40, 50), np.uint8), (0, 0), 2),
        "checker8": ((yy // 8 + xx // 8) % 2 * 255).astype(np.uint8),
        "checker1": ((yy + xx) % 2 * 255).astype(np.uint8),
        "disk": (((yy - 20) ** 2 + (xx - 25) ** 2 < 150) * 180 + 40).astype(np.uint8),
        "1x1": np.array([[200]], np.uint8),
        "3x3": rng.integers(0, 256, (3, 3), dtype=np.uint8),
        "1xN": rng.integers(0, 256, (1, 37), dtype=np.uint8),
        "Nx1": rng.integers(0, 256, (29, 1), dtype=np.uint8),
        "2xN_step": np.tile((np.arange(30) > 14).astype(np.uint8) * 255, (2, 1)),
    }


@pytest.mark.parametrize("name", list(synthetic_images()))
def test_canny_matches_opencv_on_synthetic_images(name):
    g = synthetic_images()[name]
    for low, high in [(100, 200), (10, 30), (0, 0), (500, 300)]:
        bad, _ = canny_mismatches(g, low, high)
        assert bad == 0, f"{name} ({low}, {high}): {bad} pixels differ"


def test_canny_synthetic_images_have_edges():
    # the structured cases above must exercise edges, not just compare two empty maps
    imgs = synthetic_images()
    for name in ["hline", "vline", "diag", "antidiag", "bright_border", "step", "checker8", "disk",
                 "1xN", "2xN_step"]:
        assert (cv2.Canny(imgs[name], 100, 200) != 0).any(), name
        assert ts.canny(imgs[name]).any(), name


def test_canny_matches_opencv_on_random_small_images():
    rng = np.random.default_rng(1)
    for i in range(150):
        H, W = rng.integers(1, 60, 2)
        g = rng.integers(0, 256, (H, W), dtype=np.uint8)
        if i % 3 == 1:
            g = cv2.GaussianBlur(g, (0, 0), 1.5)
        elif i % 3 == 2:
            g = (g // 64 * 80).astype(np.uint8)  # few levels: ties in the magnitude
        low, high = rng.uniform(0, 400, 2)
        bad, _ = canny_mismatches(g, low, high)
        assert bad == 0, f"case {i}: {H}x{W}, ({low:.1f}, {high:.1f}): {bad} pixels differ"


def test_canny_inputs():
    g = gray(photo("camera"))[:64, :64]
    assert torch.equal(ts.canny(g), ts.canny(torch.from_numpy(g)))
    with pytest.raises(ValueError, match="uint8"):
        ts.canny(g.astype(np.float32))
    with pytest.raises(ValueError, match="grey"):
        ts.canny(photo("camera")[:8, :8])


# -----------------------------------------------------------------------------
# grey conversion: identical to cv2.cvtColor(rgb, COLOR_RGB2GRAY)


def test_rgb_to_gray_matches_opencv_on_every_color():
    r, g, b = np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij")
    cube = np.stack([r, g, b], -1).reshape(4096, 4096, 3)  # all 2^24 colours
    for rows in np.array_split(np.arange(4096), 4):
        part = np.ascontiguousarray(cube[rows])
        assert np.array_equal(ts.rgb_to_gray(part).numpy(), gray(part))


def test_rgb_to_gray_input_types():
    rgb = photo("astronaut")
    expected = gray(rgb)
    assert np.array_equal(ts.rgb_to_gray(Image.fromarray(rgb)).numpy(), expected)
    assert np.array_equal(ts.rgb_to_gray(torch.from_numpy(rgb).permute(2, 0, 1)).numpy(), expected)


# -----------------------------------------------------------------------------
# spectral residual saliency vs cv2.saliency

SALIENCY = cv2.saliency.StaticSaliencySpectralResidual_create()


def cv2_saliency(img):
    ok, sal = SALIENCY.computeSaliency(img)
    assert ok
    return sal


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("size", [None, (200, 48), (97, 333), (1024, 1024)])
def test_saliency_matches_opencv(name, size):
    g = gray(photo(name))
    if size is not None:
        g = cv2.resize(g, size, interpolation=cv2.INTER_AREA)
    ref, ours = cv2_saliency(g), ts.spectral_residual_saliency(g)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    ours = ours.numpy()
    assert 0 <= ours.min() and ours.max() <= 1
    corr = np.corrcoef(ref.ravel(), ours.ravel())[0, 1]
    assert corr >= 0.99, corr
    assert np.abs(ours - ref).max() < 1e-3  # measured about 3e-5
    assert abs(ours.max() - ref.max()) < 1e-3


def test_saliency_max_is_one_at_map_resolution():
    # at 64x64 there is no final resize: both maps are divided by their maximum
    g = cv2.resize(gray(photo("coffee")), (64, 64), interpolation=cv2.INTER_AREA)
    assert cv2_saliency(g).max() == 1.0
    assert ts.spectral_residual_saliency(g).max().item() == 1.0


def test_saliency_rgb_input_is_opencv_on_bgr():
    rgb = photo("chelsea")
    ref = cv2_saliency(rgb[..., ::-1].copy())  # OpenCV reads 3 channels as BGR
    for x in [rgb, Image.fromarray(rgb), torch.from_numpy(rgb).permute(2, 0, 1)]:
        ours = ts.spectral_residual_saliency(x).numpy()
        assert np.corrcoef(ref.ravel(), ours.ravel())[0, 1] >= 0.99
        assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("value", [0, 128, 255])
def test_saliency_flat_image(value):
    g = np.full((50, 70), value, np.uint8)
    ours = ts.spectral_residual_saliency(g).numpy()
    assert np.isfinite(ours).all() and 0 <= ours.min() and ours.max() <= 1
    assert np.abs(ours - cv2_saliency(g)).max() < 1e-3


# -----------------------------------------------------------------------------
# per-token scores


def test_token_scores_canny_is_edge_density():
    im = cropped("astronaut")
    H, W = im.shape[:2]
    edges = (cv2.Canny(gray(im), 100, 200) != 0).astype(np.float64)
    expected = edges.reshape(H // 16, 16, W // 16, 16).mean(axis=(1, 3)).ravel()
    scores = ts.token_scores(torch.from_numpy(im).permute(2, 0, 1), "canny")
    assert scores.shape == (H // 16 * W // 16,)
    assert np.array_equal(scores.double().numpy(), expected)
    assert torch.equal(scores, ts.token_scores(Image.fromarray(im), "canny"))


def test_token_scores_saliency_is_patch_mean():
    im = cropped("coffee")
    H, W = im.shape[:2]
    sal = cv2_saliency(gray(im)).astype(np.float64)
    expected = sal.reshape(H // 16, 16, W // 16, 16).mean(axis=(1, 3)).ravel()
    scores = ts.token_scores(Image.fromarray(im), "saliency")
    assert scores.shape == (H // 16 * W // 16,)
    assert np.abs(scores.double().numpy() - expected).max() < 1e-4
    assert expected.max() > 3 * expected.mean()  # not a flat map


def test_token_scores_random_and_errors():
    im = cropped("chelsea")
    scores = ts.token_scores(im, "random")
    assert scores.shape == (im.shape[0] // 16 * im.shape[1] // 16,)
    assert (scores == scores[0]).all()
    with pytest.raises(ValueError, match="multiple of 16"):
        ts.token_scores(np.zeros((40, 48, 3), np.uint8), "canny")
    with pytest.raises(ValueError, match="unknown selector 'sobel'"):
        ts.token_scores(im, "sobel")


# -----------------------------------------------------------------------------
# sampling


def test_select_tokens_counts_sorted_unique_in_range():
    gen = torch.Generator().manual_seed(0)
    for N in [1, 2, 7, 100, 1024, 4096]:
        scores = torch.rand(N, generator=gen)
        for keep in [1e-6, 0.01, 0.05, 0.1, 0.25, 0.5, 0.999, 1.0]:
            kept = ts.select_tokens(scores, keep, seed=3)
            assert kept.dtype == torch.long
            assert len(kept) == max(1, round(keep * N)), (N, keep)
            assert (kept[1:] > kept[:-1]).all()  # sorted, no repeats
            assert 0 <= kept.min() and kept.max() < N


def test_select_tokens_keep_one_returns_everything():
    scores = torch.rand(333)
    assert torch.equal(ts.select_tokens(scores, 1.0), torch.arange(333))
    assert torch.equal(ts.select_tokens(torch.zeros(50), 1, uniform_mix=0), torch.arange(50))


def test_select_tokens_seeded():
    scores = torch.rand(1024, generator=torch.Generator().manual_seed(1))
    a = ts.select_tokens(scores, 0.1, seed=5)
    assert torch.equal(a, ts.select_tokens(scores, 0.1, seed=5))
    assert torch.equal(a, ts.select_tokens(scores.numpy(), 0.1, seed=5))
    assert not torch.equal(a, ts.select_tokens(scores, 0.1, seed=6))


def test_select_tokens_follows_the_mixed_distribution():
    # N = 2, k = 1, scores (1, 3): P(token 0) = (1 - a) / 4 + a / 2
    for a, p0 in [(0.0, 0.25), (0.8, 0.45), (1.0, 0.5)]:
        picks = [ts.select_tokens([1.0, 3.0], 0.5, s, a).item() for s in range(1500)]
        assert abs((1 - np.mean(picks)) - p0) < 0.05, (a, np.mean(picks))  # 4 standard deviations
    # a = 0: tokens with score 0 are never drawn while others remain
    scores = torch.zeros(100)
    scores[[3, 50, 97]] = torch.tensor([1.0, 2.0, 3.0])
    for s in range(20):
        assert set(ts.select_tokens(scores, 0.02, seed=s, uniform_mix=0).tolist()) <= {3, 50, 97}
        kept = ts.select_tokens(scores, 0.1, seed=s, uniform_mix=0)  # 10 > 3 scored: all 3 + 7
        assert len(kept) == 10 and {3, 50, 97} <= set(kept.tolist())
    # all-zero scores: uniform, any token can be drawn
    drawn = torch.cat([ts.select_tokens(torch.zeros(20), 0.1, seed=s) for s in range(100)])
    assert len(drawn.unique()) == 20


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan")])
def test_select_tokens_bad_keep(keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        ts.select_tokens(torch.rand(10), keep)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        ts.select_reference_tokens([cropped("chelsea")], keep)


def test_select_tokens_bad_scores_and_mix():
    for bad in [[1.0, float("nan")], [1.0, -1.0], [1.0, float("inf")]]:
        with pytest.raises(ValueError, match="scores"):
            ts.select_tokens(bad, 0.5)
    for a in [-0.1, 1.5, float("nan")]:
        with pytest.raises(ValueError, match="uniform_mix"):
            ts.select_tokens(torch.rand(10), 0.5, uniform_mix=a)


@pytest.mark.parametrize("selector", ["canny", "saliency"])
@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_selection_oversamples_high_scores(selector, name):
    scores = ts.token_scores(cropped(name), selector)
    ratios = []
    for seed in range(10):
        kept_mean = scores[ts.select_tokens(scores, 0.1, seed=seed)].mean()
        assert kept_mean > scores.mean(), seed
        ratios.append((kept_mean / scores.mean()).item())
    # measured 1.96 / 2.02 (canny) and 1.62 / 1.75 (saliency); uniform draws give 1
    assert np.mean(ratios) > (1.5 if selector == "canny" else 1.3), ratios


def test_random_selector_does_not_oversample_edges():
    edges = ts.token_scores(cropped("astronaut"), "canny")
    ones = ts.token_scores(cropped("astronaut"), "random")
    ratio = np.mean([(edges[ts.select_tokens(ones, 0.1, seed=s)].mean() / edges.mean()).item()
                     for s in range(20)])
    assert 0.8 < ratio < 1.2, ratio


# -----------------------------------------------------------------------------
# several references and budgets


def refs():
    return [cropped("astronaut", (256, 256)), np.full((128, 320, 3), 90, np.uint8),
            cropped("coffee", (300, 200))]


def test_select_reference_tokens_uniform_and_per_reference():
    images = refs()
    sizes = [im.shape[0] // 16 * im.shape[1] // 16 for im in images]
    kept = ts.select_reference_tokens(images, 0.1)
    assert [len(k) for k in kept] == [max(1, round(0.1 * n)) for n in sizes]
    kept = ts.select_reference_tokens(images, [0.05, 1.0, 0.3], selector="saliency", seed=4)
    assert [len(k) for k in kept] == [round(0.05 * sizes[0]), sizes[1], round(0.3 * sizes[2])]
    assert torch.equal(kept[1], torch.arange(sizes[1]))
    for k, n in zip(kept, sizes):
        assert (k[1:] > k[:-1]).all() and k.max() < n
    # reference i draws with seed + i: another keep for reference 0 leaves reference 2 alone
    again = ts.select_reference_tokens(images, [0.2, 1.0, 0.3], selector="saliency", seed=4)
    assert torch.equal(again[2], kept[2]) and not torch.equal(again[0], kept[0])
    assert torch.equal(ts.select_reference_tokens(images[2:], 0.3, "saliency", seed=6)[0], kept[2])


def test_select_reference_tokens_errors():
    images = refs()
    with pytest.raises(ValueError, match="keep has 2 fractions but there are 3 references"):
        ts.select_reference_tokens(images, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        ts.select_reference_tokens(images, [0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="unknown selector 'edges'"):
        ts.select_reference_tokens(images, 0.1, selector="edges")
    with pytest.raises(ValueError, match="unknown budget 'greedy'"):
        ts.select_reference_tokens(images, 0.1, budget="greedy")


def test_attention_scores_go_through_the_same_rule():
    """selector "attention" draws from given scores with the rule of every selector: tokens with more
    attention are kept more often; the counts and budgets are those of the pixel selectors."""
    images = refs()
    sizes = [im.shape[0] // 16 * im.shape[1] // 16 for im in images]
    scores = [torch.linspace(0, 1, n) ** 2 for n in sizes]  # attention grows along each grid
    hits = torch.zeros(sizes[0])
    for seed in range(200):
        kept = ts.select_reference_tokens(images, 0.2, "attention", seed=seed, scores=scores)
        assert [len(k) for k in kept] == [max(1, round(0.2 * n)) for n in sizes]
        hits[kept[0]] += 1
    quarter = sizes[0] // 4
    assert hits[-quarter:].sum() > 3 * hits[:quarter].sum()
    same = ts.select_reference_tokens(images, 0.2, "attention", seed=3, scores=scores, budget="adaptive")
    assert sum(map(len, same)) == round(sum(0.2 * n for n in sizes))
    with pytest.raises(ValueError, match="takes the model's scores"):
        ts.select_reference_tokens(images, 0.2, "attention")
    with pytest.raises(ValueError, match="takes the model's scores"):
        ts.select_reference_tokens(images, 0.2, "canny", scores=scores)
    with pytest.raises(ValueError, match="scores hold"):
        ts.select_reference_tokens(images, 0.2, "attention", scores=[s[:-1] for s in scores])


@pytest.mark.parametrize("selector", ["canny", "saliency", "random"])
def test_adaptive_budget(selector):
    images = refs()
    sizes = [im.shape[0] // 16 * im.shape[1] // 16 for im in images]
    for keep in [0.05, 0.1, 0.5, 0.95]:
        kept = ts.select_reference_tokens(images, keep, selector, budget="adaptive")
        counts = [len(k) for k in kept]
        assert sum(counts) == round(keep * sum(sizes)), (keep, counts)
        assert all(1 <= c <= n for c, n in zip(counts, sizes)), (keep, counts)
        for k in kept:
            assert (k[1:] > k[:-1]).all()
        if keep < 0.5:  # the flat reference gets less than its even share, the photos more
            assert counts[1] < keep * sizes[1] and counts[0] > keep * sizes[0], (keep, counts)
    # a budget below one token per reference still leaves each reference one token
    kept = ts.select_reference_tokens(images, 1e-4, budget="adaptive")
    assert [len(k) for k in kept] == [1, 1, 1]
    # per-reference fractions: the total is their sum, redistributed
    kept = ts.select_reference_tokens(images, [0.2, 0.2, 0.05], selector, budget="adaptive")
    assert sum(len(k) for k in kept) == round(0.2 * sizes[0] + 0.2 * sizes[1] + 0.05 * sizes[2])


def test_counts_round_up_to_a_multiple():
    """multiple (pipeline.COMPILE_BUCKET for a compiled transformer): each count, or the adaptive
    total, rounds up to a multiple of it or to every token; multiple 1 is the plain rule."""
    assert [n_keep(k, 100, 16) for k in (0.001, 0.1, 0.16, 0.17, 0.9, 0.97, 1.0)] == [16, 16, 16, 32, 96, 100, 100]
    assert [n_keep(k, 100) for k in (0.001, 0.1, 0.17)] == [1, 10, 17]
    images = refs()
    sizes = [im.shape[0] // 16 * im.shape[1] // 16 for im in images]
    for keep in (0.05, 0.3):
        counts = [len(k) for k in ts.select_reference_tokens(images, keep, "canny", multiple=64)]
        assert counts == [n_keep(keep, n, 64) for n in sizes] and all(c % 64 == 0 or c == n for c, n in zip(counts, sizes))
        total = sum(len(k) for k in ts.select_reference_tokens(images, keep, "canny", budget="adaptive", multiple=64))
        assert total % 64 == 0 and round(keep * sum(sizes)) <= total < round(keep * sum(sizes)) + 64


# -----------------------------------------------------------------------------
# visualization and CLI


def test_draw_selection():
    im = cropped("chelsea")
    grid_w = im.shape[1] // 16
    kept = torch.tensor([0, 5, grid_w + 1])
    out = ts.draw_selection(Image.fromarray(im), kept, grid_w)
    assert out.mode == "RGB" and out.size == (im.shape[1], im.shape[0])
    out = np.asarray(out)
    assert np.array_equal(out[:16, 80:96], im[:16, 80:96])  # token 5 kept
    assert np.array_equal(out[16:32, 16:32], im[16:32, 16:32])  # token grid_w + 1 kept
    dark = np.round(gray(im[:16, 16:32]).astype(np.float32) * 0.3).astype(np.uint8)
    assert np.array_equal(out[:16, 16:32], np.stack([dark] * 3, -1))  # token 1 dropped
    assert np.array_equal(np.asarray(ts.draw_selection(im, kept)), out)  # 16-px tokens by default
    half = np.asarray(ts.draw_selection(im, [0], grid_w // 2))  # 32-px patches: token 0 is 32x32
    assert np.array_equal(half[:32, :32], im[:32, :32]) and not np.array_equal(half[32:64], im[32:64])
    with pytest.raises(ValueError, match="grid"):
        ts.draw_selection(im, kept, grid_w + 1)


def test_runtime_code_does_not_import_opencv():
    tree = ast.parse(open(os.path.join(HERE, "token_selectors.py")).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" in names and not any(n.split(".")[0] == "cv2" for n in names)


def run_cli(*args):
    cmd = [sys.executable, os.path.join(HERE, "selection.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_writes_selection(tmp_path):
    src = tmp_path / "ref.png"
    Image.fromarray(photo("astronaut")[:70, :100]).save(src)  # crops to 96x64: 6x4 = 24 tokens
    out = tmp_path / "sel.png"
    res = run_cli(src, "--keep", "0.1", "--selector", "canny", "--out", out, "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "kept 2 of 24 tokens" in res.stdout
    assert Image.open(out).size == (96, 64)
    assert sorted(os.listdir(tmp_path)) == ["ref.png", "sel.png"]  # no temporary file left


def test_cli_errors(tmp_path):
    out = tmp_path / "sel.png"
    res = run_cli(tmp_path / "missing.png", "--keep", "0.1", "--out", out)
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1
    assert "missing.png" in res.stderr
    assert not out.exists()

    src = tmp_path / "ref.png"
    Image.fromarray(photo("coffee")[:64, :64]).save(src)
    res = run_cli(src, "--keep", "1.5", "--out", out)
    assert res.returncode == 1 and res.stderr.startswith("error: --keep must be in (0, 1]")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == ["ref.png"]


@pytest.mark.parametrize("case", ["not_an_image", "no_folder", "tiny", "bad_extension"])
def test_cli_errors_in_process(tmp_path, capsys, case):
    src, out = tmp_path / "ref.png", tmp_path / "sel.png"
    Image.fromarray(photo("coffee")[:64, :64]).save(src)
    if case == "not_an_image":
        src.write_text("not a picture")
    elif case == "no_folder":
        out = tmp_path / "nowhere" / "sel.png"
    elif case == "tiny":
        Image.fromarray(photo("coffee")[:10, :64]).save(src)
    else:
        out = tmp_path / "sel.unknownext"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        selection.main([str(src), "--keep", "0.2", "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary left
