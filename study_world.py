"""The synthetic world of reproduce.py's study: photographs, tasks, codec, examples, training cache.

What the world is and why is reproduce.py's docstring ("The world."): 256x256 crops of scikit-image's
photographs (16x16-token references), whole photographs held out per split; three tasks told apart by a fixed random prompt
embedding; a fixed codec (each 16-px token is its patch's 4x4 colour thumbnail). make_split draws the
examples, as_item turns one into what train.py's CachedDataset returns, write_cache writes the cache
train.py reads. WORLD is the version of make_example: every cache key holds it.

May import: data, files, train (generator). Never reproduce, study_eval or study_report.
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from PIL import Image

from data import text_file
from files import write_atomic
from klein import compact_reference
from train import generator

# Fixed before any result was seen.
PHOTOS = {
    "test": ("astronaut", "coffee"),
    "val": ("chelsea",),
    "train": ("rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina",
              "camera", "moon", "coins", "clock", "brick", "grass", "gravel", "cell"),
}  # fmt: skip
SIZE, SUB, THUMB = 256, 128, 4  # image side, subject side, thumbnail side per 16-px token
SUBJECT_AT = ((SIZE - SUB) // 16,) * 2  # the subject's top-left token in its reference: the bottom-right quarter
CHANNELS, TXT_LEN, CONTEXT = 3 * THUMB * THUMB, 4, 32
EDITS = ("make it grayscale", "invert the colours", "draw its outlines")
SUBJECTS = ("the subject, centred", "the subject, centred and mirrored")
MULTI = "put the subjects into the scene"
TASKS = ("edit", "subject", "multi")
COMPACT = (2, 3, 4)  # compact references' factors: 1/4, 1/9 (25 of 256 tokens), 1/16 of the tokens
WORLD = 4  # the version of make_example: part of every cache key, so a changed world is rebuilt


def photo(name):
    """A scikit-image photograph as a (3, H, W) float tensor in [0, 1] (grey ones replicated)."""
    import skimage.data

    x = getattr(skimage.data, name)()
    x = x[0] if isinstance(x, tuple) else x  # stereo_motorcycle: the left view only
    x = torch.from_numpy(np.ascontiguousarray(x)).float() / 255
    x = x.permute(2, 0, 1)[:3] if x.ndim == 3 else x[None].expand(3, -1, -1)
    scale = 512 / min(x.shape[1:])  # the largest photographs down to 512 px: crops stay cheap
    if scale < 1:
        x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)


def rand(g, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def crop(g, image, side):
    """A random square crop of random scale (side / 2 to the photograph's short side: magnified up to 2x,
    so structure spans several tokens), resized to side x side, maybe mirrored."""
    _, H, W = image.shape
    c = int(round(math.exp(rand(g, math.log(min(side // 2, H, W)), math.log(min(H, W))))))
    top, left = int(torch.randint(H - c + 1, (), generator=g)), int(torch.randint(W - c + 1, (), generator=g))
    x = image[:, top : top + c, left : left + c]
    x = F.interpolate(x[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.flip(-1) if rand(g) < 0.5 else x


def grey(x):
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].expand(3, -1, -1)


def outline(x):
    """White Sobel edges on black, of the reference as its tokens carry it (the grey of the 4x4
    thumbnails): the target is a function of the reference tokens, neighbours included."""
    g = F.avg_pool2d(grey(x)[:1][None], 16 // THUMB)
    sobel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 4
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(gp, sobel[None, None]), F.conv2d(gp, sobel.T[None, None])
    e = (2 * (gx.square() + gy.square()).sqrt()).clamp(0, 1)
    return F.interpolate(e, scale_factor=16 // THUMB, mode="nearest")[0].expand(3, -1, -1)


def subject_image(g, photos):
    """(reference, subject, (row, col)): a SUB-px subject crop pasted at SUBJECT_AT (its top-left
    token) on a strongly blurred photograph (smooth, like a background that saliency tells apart)."""
    bg = crop(g, photos[int(torch.randint(len(photos), (), generator=g))], SIZE)
    bg = F.interpolate(F.avg_pool2d(bg[None], 16), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    subject = crop(g, photos[int(torch.randint(len(photos), (), generator=g))], SUB)
    r, c = SUBJECT_AT
    bg[:, 16 * r : 16 * r + SUB, 16 * c : 16 * c + SUB] = subject
    return bg, subject, (r, c)


def paste_source(src, k, at, of, mirror=False):
    """Record in src (n, n, 2) that the SUB-px square of target tokens at `at` (top-left token) comes
    from reference k's square at `of`, mirrored left-right or not."""
    S = SUB // 16
    rows, cols = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    src[at[0] : at[0] + S, at[1] : at[1] + S, 0] = k
    src[at[0] : at[0] + S, at[1] : at[1] + S, 1] = (of[0] + rows) * (SIZE // 16) + of[1] + (S - 1 - cols if mirror else cols)


def make_example(g, photos, task):
    """(prompt, target, [references], src) with images (3, SIZE, SIZE) in [0, 1] and src (n * n, 2):
    for each target token, the reference and the token of it that the target token is made from
    (-1, -1 where no reference is needed: the grey background), what the fill baseline copies."""
    n, o = SIZE // 16, (SIZE - SUB) // 2
    src = torch.full((n, n, 2), -1)
    if task == "edit":
        prompt = EDITS[int(torch.randint(len(EDITS), (), generator=g))]
        x = crop(g, photos[int(torch.randint(len(photos), (), generator=g))], SIZE)
        target = {EDITS[0]: grey, EDITS[1]: lambda y: 1 - y, EDITS[2]: outline}[prompt](x)
        src[..., 0], src[..., 1] = 0, torch.arange(n * n).view(n, n)
        return prompt, target, [x], src.flatten(0, 1)
    if task == "subject":
        prompt = SUBJECTS[int(torch.randint(len(SUBJECTS), (), generator=g))]
        ref, subject, at = subject_image(g, photos)
        mirror = prompt == SUBJECTS[1]
        target = torch.full((3, SIZE, SIZE), 0.5)
        target[:, o : o + SUB, o : o + SUB] = subject.flip(-1) if mirror else subject
        paste_source(src, 0, (o // 16, o // 16), at, mirror)
        return prompt, target, [ref], src.flatten(0, 1)
    scene = crop(g, photos[int(torch.randint(len(photos), (), generator=g))], SIZE)
    target, refs = scene.clone(), [scene]
    src[..., 0], src[..., 1] = 0, torch.arange(n * n).view(n, n)
    for corner in range(1 + int(torch.randint(2, (), generator=g))):
        ref, subject, at = subject_image(g, photos)
        o = corner * (SIZE - SUB)
        target[:, o : o + SUB, o : o + SUB] = subject
        paste_source(src, len(refs), (o // 16, o // 16), at)
        refs.append(ref)
    return MULTI, target, refs, src.flatten(0, 1)


def encode(x):
    """(B, 3, H, W) in [0, 1] -> (B, 48, H/16, W/16) tokens: each patch's 4x4 thumbnail, ~unit scale."""
    B, _, H, W = x.shape
    t = F.avg_pool2d(x, 16 // THUMB).view(B, 3, H // 16, THUMB, W // 16, THUMB)
    return (t.permute(0, 1, 3, 5, 2, 4).reshape(B, CHANNELS, H // 16, W // 16) - 0.5) * 4


def decode(z):
    """Inverse of encode: (B, 48, h, w) tokens -> (B, 3, 4h, 4w) thumbnail image in [0, 1], the
    resolution every metric is computed at (all the information a token carries)."""
    B, _, h, w = z.shape
    t = (z / 4 + 0.5).view(B, 3, THUMB, THUMB, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, 3, h * THUMB, w * THUMB)
    return t.clamp(0, 1)


def upsample(x):
    """Thumbnail images (B, 3, 4h, 4w) -> (B, 3, 16h, 16w) for display (bilinear)."""
    return F.interpolate(x, scale_factor=16 // THUMB, mode="bilinear", align_corners=False).clamp(0, 1)


def prompt_embedding(prompt):
    """A fixed random (TXT_LEN, CONTEXT) embedding per prompt: the stand-in for Qwen3."""
    return torch.randn(TXT_LEN, CONTEXT, generator=generator("prompt", prompt))


def make_split(split, count, seed):
    """count examples of each task from the photographs of one split, deterministic in (split, seed)."""
    photos = [photo(n) for n in PHOTOS[split]]
    out = []
    for task in TASKS:
        for i in range(count):
            prompt, target, refs, src = make_example(generator(seed, split, task, i), photos, task)
            out.append(dict(task=task, prompt=prompt, target=target, refs=refs, src=src, photos=list(PHOTOS[split]),
                            pixels=[to_uint8(r) for r in refs]))  # fmt: skip
    return out


def as_item(ex, compact=()):
    """An example in the form train.py's CachedDataset returns; compact: factors S whose downscaled
    references it holds too (compact {S: [(C, h', w')]}, as a cache made with data.py --compact)."""
    item = dict(target=encode(ex["target"][None])[0], refs=[encode(r[None])[0] for r in ex["refs"]],
                txt=prompt_embedding(ex["prompt"]), task=ex["task"])  # fmt: skip
    if compact:
        item["compact"] = {f: [encode(compact_pixels(px, f)[None])[0] for px in ex["pixels"]] for f in compact}
    return item


def compact_pixels(pixels, factor):
    """An (H, W, 3) uint8 reference downscaled as klein.compact_reference does: (3, H', W') in [0, 1]."""
    small = compact_reference(Image.fromarray(pixels), factor)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1)


def to_uint8(x):
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8 array, what the selectors and figures take."""
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def write_cache(folder, examples, compact=COMPACT):
    """A latent cache exactly as data.py writes one (index.json last), so train.py reads it as it is;
    with every reference also downscaled by each of compact (data.py --compact)."""
    index = []
    for i, ex in enumerate(tqdm(examples, desc="writing the training cache", leave=False)):
        item, latents = as_item(ex, compact), f"latents/{i:08d}.safetensors"
        z = {"target": item["target"]} | {f"ref.{k}": r for k, r in enumerate(item["refs"])}
        z |= {f"ref.{k}.x{f}": r for f, refs in item.get("compact", {}).items() for k, r in enumerate(refs)}
        write_atomic(os.path.join(folder, latents), lambda tmp: save_file(z, tmp))
        text = text_file(ex["prompt"])
        if not os.path.isfile(os.path.join(folder, text)):
            write_atomic(os.path.join(folder, text), lambda tmp: save_file({"txt": item["txt"]}, tmp))
        grid = [SIZE // 16, SIZE // 16]
        index.append(dict(latents=latents, text=text, target=grid, references=[grid] * len(ex["refs"]),
                          task="edit" if ex["task"] == "edit" else "subject", line=i + 1, photos=ex["photos"])
                     | ({"compact": list(compact)} if compact else {}))  # fmt: skip
    write_atomic(os.path.join(folder, "index.json"), json.dumps(index))
