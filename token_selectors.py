"""
Which reference tokens to keep: Sparse Context's selection heuristics, in plain torch.

A reference image becomes one token per 16x16 pixel patch. At inference only a subset of those
tokens enters the transformer (each keeps its original position id). This file scores every patch
with a map of the image and samples the kept subset:
  - "canny":    edge density of the patch (structure; for instruction-driven editing),
  - "saliency": mean spectral-residual saliency of the patch (identity; for personalization),
  - "random":   uniform (the training-time rule).
Sampling is without replacement with p_i = (1 - a) s_i / sum(s) + a / N: the map decides where
the budget goes, a (uniform_mix) keeps some coverage everywhere. The paper does not give this rule;
it is this project's decision (see the spec, "What the paper does not say").

canny() and spectral_residual_saliency() reimplement OpenCV's cv2.Canny (aperture 3, L1 gradient)
and cv2.saliency's StaticSaliencySpectralResidual; OpenCV is the test oracle, never imported here.

Its command line: python selection.py IMAGE --keep 0.1 --selector canny --out sel.png

May import: files, klein.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from klein import PATCH, n_keep, round_up

SELECTORS = ("canny", "saliency", "random")

# -----------------------------------------------------------------------------
# image plumbing


def _rgb_tensor(image):
    """PIL image, (H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # copy: arrays may be read-only
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected a (3, H, W) uint8 RGB image, "
                         f"got {tuple(image.shape)} {image.dtype}")
    return image.cpu()  # maps are made once per reference, on the CPU


def _gray_tensor(gray):
    """(H, W) uint8 numpy array or tensor -> (H, W) uint8 tensor."""
    gray = torch.from_numpy(np.array(gray)) if isinstance(gray, np.ndarray) else gray
    if gray.ndim != 2 or gray.dtype != torch.uint8:
        raise ValueError(f"expected an (H, W) uint8 grey image, "
                         f"got {tuple(gray.shape)} {gray.dtype}")
    return gray.cpu()


def rgb_to_gray(image):
    """RGB image -> (H, W) uint8 tensor, bit-exact with cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).

    Weights 0.299 R + 0.587 G + 0.114 B in OpenCV's 15-bit fixed point, rounded half up; these
    match cv2 on all 2^24 colours (the 14-bit 4899/9617/1868 of older OpenCV code miss 0.26%).
    """
    r, g, b = _rgb_tensor(image).int()
    return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).to(torch.uint8)


def _to_gray(image):
    """A grey (H, W) uint8 image as is, anything RGB through rgb_to_gray."""
    if isinstance(image, Image.Image) or image.ndim == 3:
        return rgb_to_gray(image)
    return _gray_tensor(image)


def _shifted(x, pad_value=None):
    """(H, W) -> (H+2, W+2) padded with the edge values (pad_value None) or a constant."""
    H, W = x.shape
    if pad_value is None:  # replicate: clamp the indices (works for any dtype and for H or W == 1)
        rows = torch.arange(-1, H + 1).clamp(0, H - 1)
        cols = torch.arange(-1, W + 1).clamp(0, W - 1)
        return x[rows][:, cols]
    return F.pad(x, (1, 1, 1, 1), value=pad_value)


# -----------------------------------------------------------------------------
# Canny, as cv2.Canny(gray, low, high) computes it (aperture 3, L1 gradient, no blur)


def canny(gray, low=100, high=200):
    """(H, W) uint8 grey image -> (H, W) bool edge map, equal to cv2.Canny(gray, low, high) != 0."""
    g = _gray_tensor(gray).int()
    H, W = g.shape
    low, high = sorted((low, high))  # OpenCV swaps them if low > high, then floors
    low, high = math.floor(low), math.floor(high)

    # Sobel 3x3 with replicated border: dx = [1 2 1]^T [-1 0 1], dy its transpose
    p = _shifted(g)  # (H+2, W+2)
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    m = dx.abs() + dy.abs()

    # non-maximum suppression along the gradient direction, in OpenCV's fixed point:
    # tan(22.5 deg) = TG22 / 2^15, tan(67.5 deg) = (TG22 + 2^16) / 2^15; outside the image m = 0
    TG22 = 13573  # round(0.41421356 * 2^15)
    mp = _shifted(m, pad_value=0)  # (H+2, W+2)
    x, y = dx.abs(), dy.abs() << 15
    horizontal = y < x * TG22  # gradient near horizontal: compare with left and right
    vertical = y > x * TG22 + (x << 16)  # near vertical: compare with up and down
    same_sign = (dx ^ dy) >= 0  # diagonal '\' if dx, dy share a sign, else '/'
    c = mp[1:-1, 1:-1]
    keep_h = (c > mp[1:-1, :-2]) & (c >= mp[1:-1, 2:])
    keep_v = (c > mp[:-2, 1:-1]) & (c >= mp[2:, 1:-1])
    keep_d = torch.where(same_sign, (c > mp[:-2, :-2]) & (c > mp[2:, 2:]),
                         (c > mp[:-2, 2:]) & (c > mp[2:, :-2]))
    peak = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    weak = peak & (m > low)
    strong = weak & (m > high)
    return _hysteresis(weak, strong)


def _hysteresis(weak, strong):
    """Keep the 8-connected components of `weak` that contain a `strong` pixel. (H, W) bools.

    Connected components on the graph of weak pixels by parallel union-find (Shiloach-Vishkin
    style): every node points at a root; each round every root hooks onto the smallest root
    across its edges, then pointers jump to their roots. A component is done when no edge joins
    two roots; it takes a few dozen rounds on photographs, not one per pixel of edge length.
    """
    H, W = weak.shape
    node = torch.full((H, W), -1)  # pixel -> node id of a weak pixel, -1 elsewhere
    n = int(weak.sum())
    node[weak] = torch.arange(n)
    # edges to the E, S, SE and SW neighbours (each undirected edge once)
    pairs = [(node[:, :-1], node[:, 1:]), (node[:-1, :], node[1:, :]),
             (node[:-1, :-1], node[1:, 1:]), (node[:-1, 1:], node[1:, :-1])]
    both = [(a >= 0) & (b >= 0) for a, b in pairs]
    u = torch.cat([a[k] for (a, _), k in zip(pairs, both)])
    v = torch.cat([b[k] for (_, b), k in zip(pairs, both)])

    root = torch.arange(n)  # root[i] <= i always, so the pointers form a forest
    while True:
        ru, rv = root[u], root[v]
        new = root.scatter_reduce(0, ru, rv, "amin").scatter_reduce(0, rv, ru, "amin")  # hook
        while not torch.equal(new, new[new]):  # pointer jumping until everyone points at a root
            new = new[new]
        if torch.equal(new, root):
            break
        root = new
    root_has_strong = torch.zeros(n, dtype=torch.bool)
    root_has_strong[root[node[strong]]] = True
    edges = torch.zeros(H, W, dtype=torch.bool)
    edges[weak] = root_has_strong[root]
    return edges


# -----------------------------------------------------------------------------
# spectral residual saliency (Hou and Zhang, CVPR 2007), as cv2.saliency computes it


def _blur(x, k):
    """(h, w) float64 -> same, separable filter with 1-D kernel k, reflect-101 border."""
    r = len(k) // 2
    x = F.pad(x[None, None], (r, r, r, r), mode="reflect")  # torch's "reflect" is reflect-101
    k = torch.as_tensor(k, dtype=x.dtype)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return F.conv2d(x, k.view(1, 1, 1, -1))[0, 0]


def spectral_residual_saliency(image):
    """Grey (H, W) uint8 image, or RGB (PIL, (H, W, 3) array, (3, H, W) tensor) -> (H, W) float32.

    Follows cv2.saliency.StaticSaliencySpectralResidual_create().computeSaliency(img) as OpenCV
    builds it today (opencv_contrib: log(|X| + 1), INTER_LINEAR_EXACT resizes); agrees with it to
    about 3e-5 (OpenCV's approximate atan is the rest). Values in [0, 1]: the 64x64 map is divided
    by its maximum, the final bilinear upsampling can leave the image's maximum a little below 1.
    RGB goes through rgb_to_gray: what OpenCV computes for the same picture stored as BGR (cv2
    applies BGR weights to whatever 3-channel array it is given).
    """
    g = _to_gray(image)
    H, W = g.shape
    # the spectrum is taken at 64x64 whatever the aspect; OpenCV resizes the uint8 image
    x = F.interpolate(g[None, None].double(), size=(64, 64), mode="bilinear", align_corners=False)
    x = (x[0, 0] + 0.5).floor()  # round half up, as OpenCV does
    X = torch.fft.fft2(x)
    log_amp = X.abs().log1p()  # log(|X| + 1) as OpenCV: finite where |X| == 0 (flat images)
    residual = log_amp - _blur(log_amp, [1 / 3] * 3)  # what the average spectrum does not explain
    sal = torch.fft.ifft2(torch.polar(residual.exp(), X.angle())).abs()
    gauss = torch.exp(-torch.arange(-2, 3, dtype=torch.float64) ** 2 / (2 * 8**2))  # 5 taps, sd 8
    sal = _blur(sal, gauss / gauss.sum()) ** 2  # OpenCV blurs, then squares
    sal = (sal / sal.max()).float()
    return F.interpolate(sal[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]


# -----------------------------------------------------------------------------
# per-token scores and sampling


def token_scores(image, selector):
    """Reference image (PIL, (H, W, 3) array or (3, H, W) tensor, uint8 RGB, H and W multiples
    of 16) -> (H/16 * W/16,) float32 scores, row-major on the token grid: canny = fraction of
    edge pixels in the patch (cv2.Canny(grey, 100, 200)), saliency = mean saliency of the patch,
    random = 1 everywhere (uniform)."""
    rgb = _rgb_tensor(image)
    _, H, W = rgb.shape
    if H % PATCH or W % PATCH or H == 0 or W == 0:
        raise ValueError(f"image size {W}x{H} is not a positive multiple of {PATCH}")
    if selector == "random":
        return torch.ones(H // PATCH * W // PATCH)
    if selector == "canny":
        pixel_map = canny(rgb_to_gray(rgb)).float()
    elif selector == "saliency":
        pixel_map = spectral_residual_saliency(rgb_to_gray(rgb))
    else:
        raise ValueError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    return F.avg_pool2d(pixel_map[None, None], PATCH).flatten()


def _check_fraction(name, value, low_open):
    """keep must be in (0, 1], uniform_mix in [0, 1]; NaN fails both comparisons."""
    value = float(value)
    ok = (0 < value <= 1) if low_open else (0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1], got {value}")
    return value


def _sample(scores, k, seed, uniform_mix):
    """Draw k of N token indices without replacement, p_i = (1 - a) s_i / sum(s) + a / N.
    Returns a sorted (k,) LongTensor."""
    a = _check_fraction("uniform_mix", uniform_mix, low_open=False)
    s = torch.as_tensor(scores).detach().flatten().double().cpu()
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("token scores must be finite and >= 0")
    N = s.numel()
    p = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / N)  # no signal: uniform
    p = (1 - a) * p + a / N
    g = torch.Generator().manual_seed(seed)
    n_pos = int((p > 0).sum())
    if n_pos >= k:
        idx = torch.multinomial(p, k, replacement=False, generator=g)
    else:  # a == 0 and fewer scored tokens than k: take them all, fill up uniformly from the rest
        fill = torch.multinomial((p == 0).double(), k - n_pos, replacement=False, generator=g)
        idx = torch.cat([(p > 0).nonzero()[:, 0], fill])
    return idx.sort().values


def select_tokens(scores, keep, seed=0, uniform_mix=0.25):
    """Token scores (N,) -> sorted LongTensor of the max(1, round(keep * N)) kept indices.

    Sampled without replacement with p_i = (1 - a) s_i / sum(s) + a / N, a = uniform_mix
    (uniform if all scores are 0); deterministic for a given integer seed. keep in (0, 1].
    """
    keep = _check_fraction("keep", keep, low_open=True)
    return _sample(scores, n_keep(keep, torch.as_tensor(scores).numel()), seed, uniform_mix)


def _split_budget(total, weights, sizes):
    """Integers k_i in [1, N_i] with sum total (clipped to [n refs, sum N_i]), proportional to
    weights where the bounds allow: k_i = clip(t w_i, 1, N_i) with t found by bisection, then
    rounded so the sum is exact (largest fractional parts round up)."""
    w = torch.tensor(weights, dtype=torch.float64)
    N = torch.tensor(sizes, dtype=torch.float64)
    total = min(max(total, len(sizes)), int(N.sum()))

    def fill(t):  # k_i(t) = clip(t w_i, 1, N_i); its sum grows with t
        return torch.minimum((t * w).clamp_min(1), N)

    lo, hi = 0.0, float((N / w)[w > 0].max())  # at hi every reference with weight is full
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fill(mid).sum() < total else (lo, mid)
    x = fill(hi)
    k = x.floor()
    short = total - int(k.sum())
    k[(x - k).argsort(descending=True)[:short]] += 1  # x - k > 0 means x < N_i: room for one more
    return k.long().tolist()


def select_reference_tokens(images, keep, selector="canny", seed=0, uniform_mix=0.25,
                            budget="uniform", scores=None, multiple=1):
    """Kept token indices for each reference image: a list of sorted LongTensors.

    keep: a fraction in (0, 1] for every reference, or a list with one fraction per reference.
    Reference i samples with seed + i (changing one reference leaves the others' draws alone).
    budget:
      "uniform":  reference i keeps max(1, round(keep_i * N_i)) of its N_i tokens.
      "adaptive": the same total, round(sum_i keep_i * N_i), split by how much detail each
                  reference has. Reference i's share is w_i = (1 - a) E_i / sum_j E_j
                  + a N_i / sum_j N_j, where E_i is its number of Canny edge pixels (whatever the
                  selector: a flat reference is rebuilt from few tokens, a textured one needs
                  many; saliency is normalized per image, so it cannot compare references) and
                  a = uniform_mix, the same mix as within an image. Every reference keeps
                  between 1 and all of its tokens; what a full reference cannot take goes to
                  the others. The selector then picks which tokens inside each reference.
    scores: per-reference (N_i,) scores from elsewhere (selector "attention": the model's own,
            attention_selector.reference_attention) instead of a pixel map; the same sampling rule applies.
    multiple: every count ("uniform") or the total ("adaptive") rounded up to a multiple of it, or
              to all tokens (n_keep).
    """
    n_refs = len(images)
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep] * n_refs
    if len(keeps) != n_refs:
        raise ValueError(f"keep has {len(keeps)} fractions but there are {n_refs} references")
    keeps = [_check_fraction("keep", k, low_open=True) for k in keeps]
    a = _check_fraction("uniform_mix", uniform_mix, low_open=False)
    if budget not in ("uniform", "adaptive"):
        raise ValueError(f"unknown budget {budget!r}; choose 'uniform' or 'adaptive'")
    if (scores is None) == (selector == "attention"):
        raise ValueError("the attention selector takes the model's scores (scores=...), the others none")
    if selector not in SELECTORS + ("attention",):
        raise ValueError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)} or attention")
    if scores is None:
        scores = [token_scores(im, selector) for im in images]
    shapes = [_rgb_tensor(im).shape[1:] for im in images]  # (H, W) of each reference
    grids = [(h // PATCH) * (w // PATCH) for h, w in shapes]
    if len(scores) != n_refs or [len(s) for s in scores] != grids:
        raise ValueError(f"scores hold {[len(s) for s in scores]} tokens for reference grids of {grids}")
    counts = [n_keep(k, len(s), multiple) for k, s in zip(keeps, scores)]
    if budget == "adaptive" and n_refs:
        sizes = [len(s) for s in scores]
        area = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        edges = scores if selector == "canny" else [token_scores(im, "canny") for im in images]
        mass = torch.stack([e.double().sum() for e in edges])
        mass = mass / mass.sum() if mass.sum() > 0 else area  # no edges anywhere: by area
        total = round_up(round(sum(k * n for k, n in zip(keeps, sizes))), multiple, sum(sizes))
        counts = _split_budget(total, ((1 - a) * mass + a * area).tolist(), sizes)
    return [_sample(s, k, seed + i, uniform_mix) for i, (s, k) in enumerate(zip(scores, counts))]


@dataclass
class Selector:
    """A selection rule as pipeline.generate calls it: selector(images, keeps, scene) -> kept indices
    per reference, None keeping all (every keep 1 with the uniform budget: dense, bit-identical to klein).

    name "canny" (instruction editing), "saliency" (subject personalization) or "random" (training's
    rule); multiple: round each kept count up to a multiple of it (a compiled transformer's shapes).
    Model-aware rules (attention_selector.AttentionSelector) reuse it with the model's scores.
    """

    name: str = "canny"
    uniform_mix: float = 0.25
    budget: str = "uniform"
    seed: int = 0
    multiple: int = 1

    def __call__(self, images, keeps, scene=None, scores=None):
        if not is_sparse(keeps, self.budget):
            return [None] * len(images)
        return select_reference_tokens(images, keeps, self.name, self.seed, self.uniform_mix, self.budget,
                                       scores=scores, multiple=self.multiple)  # fmt: skip


def is_sparse(keeps, budget="uniform"):
    """Tokens are dropped: some keep below 1, or the adaptive budget."""
    return any(k < 1 for k in keeps) or budget == "adaptive"


# -----------------------------------------------------------------------------
# visualization


def draw_selection(image, kept, grid_w=None, dim=0.3):
    """The image with dropped tokens shown dark and grey, kept tokens untouched -> PIL RGB.

    kept: indices, row-major on a token grid grid_w wide; the patch side is the image width
    divided by grid_w (default: 16-px tokens, as for a preprocessed reference).
    """
    rgb = _rgb_tensor(image)
    _, H, W = rgb.shape
    grid_w = grid_w or W // PATCH
    patch = W // grid_w if grid_w else 0
    if patch == 0 or W % grid_w or H % patch:
        raise ValueError(f"a {W}x{H} image is not a grid {grid_w} tokens wide of square patches")
    mask = torch.zeros(H // patch * grid_w, dtype=torch.bool)
    mask[torch.as_tensor(kept, dtype=torch.long)] = True
    mask = mask.view(H // patch, grid_w).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    dropped = (rgb_to_gray(rgb).float() * dim).round().to(torch.uint8)  # (H, W)
    out = torch.where(mask, rgb, dropped)  # (3, H, W)
    return Image.fromarray(out.permute(1, 2, 0).numpy())
