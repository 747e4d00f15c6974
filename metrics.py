r"""The image metrics evaluate.py publishes, computed by the libraries the field trusts.

    DINO     cosine of DINO ViT-S/16 class tokens (DreamBooth's choice): facebook/dino-vits16 via transformers'
             ViTModel, the last layer's normalized [CLS] (what DINO's own ViT returns); DINOv2 (DreamBench++)
             the same with Dinov2Model, facebook/dinov2-base by default.
    CLIP-I   cosine of CLIP image embeddings (the projected, pooled [CLS]); CLIP-T cosine of the image's and
             the prompt's embeddings (torchmetrics' CLIPScore, which PIE-Bench reports, is 100 max(CLIP-T, 0)).
             Checkpoint openai/clip-vit-large-patch14 by default (torchmetrics' CLIPScore default, PIE-Bench's).
    LPIPS    the `lpips` package (Zhang et al. 2018, v0.1 linear heads): AlexNet by default; PIE-Bench's
             evaluation uses SqueezeNet (torchmetrics' net_type="squeeze"): --lpips-net squeeze.
    PSNR, SSIM  compare.psnr and metrics.ssim (compare.ssim's separable form on the device), both equal to
             scikit-image's (SSIM: gaussian 11x11, sigma 1.5, population statistics, valid windows).

Preprocessing is each checkpoint's own preprocessor_config.json, applied as transformers' PIL image processors
apply it (`Preprocess`; tested equal to CLIPImageProcessor / ViTImageProcessor / BitImageProcessor): CLIP
resizes the short side to 224 (bicubic) and center-crops 224x224, OpenAI's mean/std; dino-vits16 resizes to
224x224 (bilinear, aspect not kept), ImageNet mean/std; dinov2 resizes the short side to 256 (bicubic),
center-crops 224, ImageNet mean/std. Doing it here keeps a score independent of whether transformers picks its
torchvision backend (which resizes differently) or its PIL one. LPIPS sees the images at their own size, in
[-1, 1]. Weights come from the hub (only config, preprocessor, tokenizer and safetensors files) or a folder.

    python metrics.py tiny FOLDER      # tiny random CLIP, DINO and DINOv2 folders (save_pretrained), no download

May import: compare (psnr, gaussian_window), files; transformers and lpips lazily (requirements-eval.txt). The core never
imports this file.
"""

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from compare import gaussian_window, psnr
from files import read_json, resolve_component

CLIP_DEFAULT = "openai/clip-vit-large-patch14"
DINO_DEFAULT = "facebook/dino-vits16"
DINOV2_DEFAULT = "facebook/dinov2-base"
LPIPS_NETS = ("alex", "vgg", "squeeze")
HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "vocab.json", "merges.txt", "special_tokens_map.json"]  # fmt: skip
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SQUARE_BY_DEFAULT = ("ViTImageProcessor", "ViTFeatureExtractor")  # an int `size` means size x size for these


# ----------------------------------------------------------------------------------------------
# Preprocessing: the checkpoint's preprocessor_config.json, as transformers' PIL processors apply it


@dataclass
class Preprocess:
    """PIL images -> (B, 3, H, W) float32 pixel values. size: ("shortest_edge", n) or ("size", (h, w));
    crop (h, w) or None; resample a PIL filter number; mean, std per channel."""

    size: tuple
    resample: int
    crop: tuple
    rescale: float
    mean: list
    std: list

    @classmethod
    def from_config(cls, path):
        cfg = read_json(path)
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
        size = cfg.get("size", 224)
        if isinstance(size, int):
            size = ("size", (size, size)) if kind.removesuffix("Pil") in SQUARE_BY_DEFAULT else ("shortest_edge", size)
        elif "shortest_edge" in size:
            size = ("shortest_edge", int(size["shortest_edge"]))
        elif "height" in size and "width" in size:
            size = ("size", (int(size["height"]), int(size["width"])))
        else:
            raise ValueError(f"{path}: field 'size' must be an integer, {{shortest_edge}} or {{height, width}}, got {size!r}")
        crop = cfg.get("crop_size", 224) if cfg.get("do_center_crop", False) else None
        if isinstance(crop, dict):
            crop = (int(crop["height"]), int(crop["width"]))
        elif crop is not None:
            crop = (int(crop), int(crop))
        if not cfg.get("do_resize", True):
            raise ValueError(f"{path}: do_resize false is not supported (every metric model takes a fixed size)")
        normalize = cfg.get("do_normalize", True)
        mean = cfg.get("image_mean", IMAGENET_MEAN) if normalize else [0.0] * 3
        std = cfg.get("image_std", IMAGENET_STD) if normalize else [1.0] * 3
        rescale = cfg.get("rescale_factor", 1 / 255) if cfg.get("do_rescale", True) else 1.0
        return cls(size, int(cfg.get("resample", Image.Resampling.BICUBIC)), crop, rescale, list(mean), list(std))

    def output_size(self, w, h):
        """(h, w) after the resize, as transformers' get_resize_output_image_size computes it."""
        kind, n = self.size
        if kind == "size":
            return n
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = n, int(n * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def __call__(self, images):
        out = []
        for image in images:
            image = image.convert("RGB")
            h, w = self.output_size(*image.size)
            x = np.array(image.resize((w, h), resample=self.resample))  # (h, w, 3) uint8
            if self.crop is not None:
                ch, cw = self.crop
                if ch > h or cw > w:
                    raise ValueError(f"image resized to {w}x{h} is smaller than the {cw}x{ch} crop")
                top, left = (h - ch) // 2, (w - cw) // 2
                x = x[top : top + ch, left : left + cw]
            x = (x.astype(np.float64) * self.rescale).astype(np.float32)
            x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
            out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
        return torch.stack(out)


def model_folder(source, what):
    """A local folder holding a transformers checkpoint: `source` itself or its hub download (only the
    config, preprocessor, tokenizer and safetensors files)."""
    folder = resolve_component(source, None, HUB_FILES)
    for name in ("config.json", "preprocessor_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{what} {source}: no {name} in {folder}")
    return folder


def check_source(source, what):
    """Before any model loads: a local folder must hold config.json and preprocessor_config.json; anything
    else must look like a hub id (owner/name), fetched when the metric models load."""
    if os.path.exists(source):
        model_folder(source, what)
    elif source.count("/") != 1 or source.startswith((".", "/")) or not all(source.split("/")):
        raise ValueError(f"{what} {source} is neither a model folder nor a hub id (owner/name)")


# ----------------------------------------------------------------------------------------------
# The embedding models


def _features(out):
    """transformers 4 returns the projected features as a tensor, 5 as an output's pooler_output."""
    return out if torch.is_tensor(out) else out.pooler_output


class CLIP:
    """CLIP image and text embeddings, L2-normalized, float32."""

    def __init__(self, source, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel

        self.source = source
        folder = model_folder(source, "--clip")
        self.preprocess = Preprocess.from_config(os.path.join(folder, "preprocessor_config.json"))
        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.device = device

    @torch.no_grad()
    def images(self, images):
        x = self.preprocess(images).to(self.device)
        return torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts):
        t = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        f = self.model.get_text_features(input_ids=t["input_ids"].to(self.device), attention_mask=t["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(_features(f).float(), dim=-1).cpu()


class DINO:
    """DINO (ViTModel) or DINOv2 (Dinov2Model) class tokens of the last layer (after its layer norm),
    L2-normalized, float32."""

    def __init__(self, source, device="cpu", what="--dino"):
        from transformers import Dinov2Model, ViTModel

        self.source = source
        folder = model_folder(source, what)
        kind = read_json(os.path.join(folder, "config.json")).get("model_type")
        if kind not in ("vit", "dinov2"):
            raise ValueError(f"{what} {source}: model_type {kind!r}; expected vit (DINO) or dinov2")
        self.preprocess = Preprocess.from_config(os.path.join(folder, "preprocessor_config.json"))
        load = dict(dtype=torch.float32) | (dict(add_pooling_layer=False) if kind == "vit" else {})
        self.model = (ViTModel if kind == "vit" else Dinov2Model).from_pretrained(folder, **load).eval().to(device)
        self.device = device

    @torch.no_grad()
    def images(self, images):
        x = self.preprocess(images).to(self.device)
        return torch.nn.functional.normalize(self.model(pixel_values=x).last_hidden_state[:, 0].float(), dim=-1).cpu()


def lpips_available():
    """None if the lpips package (and the torchvision it builds its backbones with) imports, else why not."""
    try:
        import lpips  # noqa: F401
    except ImportError as e:
        return f"LPIPS needs the lpips package and torchvision ({e}); pip install -r requirements-eval.txt"
    return None


class LPIPS:
    """The lpips package's LPIPS v0.1 (its linear heads ship with it; the backbone is torchvision's ImageNet
    weights, or random with random=True: a smoke run with no download). Images (B, 3, H, W) in [0, 1]."""

    def __init__(self, net="alex", device="cpu", random=False):
        import lpips

        if net not in LPIPS_NETS:
            raise ValueError(f"--lpips-net {net!r}: choose one of {', '.join(LPIPS_NETS)}")
        self.net, self.random = net, random
        self.model = lpips.LPIPS(net=net, version="0.1", pnet_rand=random, verbose=False).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, a, b):
        return self.model(a.float().to(self.device), b.float().to(self.device), normalize=True).flatten().double().cpu()


def ssim(a, b, k1=0.01, k2=0.03):
    """compare.ssim (= scikit-image's structural_similarity, gaussian 11x11, sigma 1.5, population statistics,
    valid windows only) on the images' own device, with the separable window: 22 instead of 121 taps per
    pixel, so a 1024 px SSIM takes milliseconds on a GPU instead of seconds on a CPU core. (3, H, W) in [0, 1]."""
    a, b = a.double()[None], b.double()[None]
    taps = gaussian_window().to(a.device)
    C = a.shape[1]
    if min(a.shape[-2:]) < len(taps):
        raise ValueError(f"SSIM needs images of at least {len(taps)}x{len(taps)} px, got {a.shape[-1]}x{a.shape[-2]}")

    def blur(x):  # valid 2-D gaussian as two 1-D passes
        x = torch.nn.functional.conv2d(x, taps.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
        return torch.nn.functional.conv2d(x, taps.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = k1**2, k2**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


# ----------------------------------------------------------------------------------------------
# What is compared with what


def pixels(image):
    """PIL -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def fit(image, size, resample=Image.Resampling.BICUBIC):
    """image resized to size (w, h) if it differs."""
    return image if image.size == tuple(size) else image.resize(tuple(size), resample)


@dataclass
class Context:
    """What one example's images are scored against (every field optional): the prompt for CLIP-T; the
    subject's images (DreamBench: every real image of the subject); the source image and its background
    (1 outside the edit mask) for background preservation; a ground-truth target."""

    text: str = None
    subject: list = None
    source: Image.Image = None
    background: torch.Tensor = None  # (H, W) float, 1 where preserved
    target: Image.Image = None


class Metrics:
    """The loaded metric models and the definitions of every score. names: any of clip, dino, dinov2,
    lpips, psnr, ssim."""

    def __init__(self, names, clip=CLIP_DEFAULT, dino=DINO_DEFAULT, dinov2=DINOV2_DEFAULT, lpips_net="alex",
                 lpips_random=False, device="cpu"):  # fmt: skip
        self.names, self.device = tuple(names), device
        self.clip = CLIP(clip, device) if "clip" in names else None
        self.dino = DINO(dino, device) if "dino" in names else None
        self.dinov2 = DINO(dinov2, device, "--dinov2") if "dinov2" in names else None
        self.lpips = LPIPS(lpips_net, device, lpips_random) if "lpips" in names else None

    def prepare(self, ctx):
        """The embeddings an example's images are compared with, computed once per example."""
        emb = {}
        if self.clip and ctx.text is not None:
            emb["clip_text"] = self.clip.texts([ctx.text])
        for name, model in (("clip", self.clip), ("dino", self.dino), ("dinov2", self.dinov2)):
            if model and ctx.subject:
                emb[f"{name}_subject"] = model.images(ctx.subject)
            if model and ctx.target is not None:
                emb[f"{name}_target"] = model.images([ctx.target])
        return emb

    def score(self, image, ctx, emb, dense=None):
        """{metric: value} of one generated image; dense: the baseline image of the same seed (fidelity
        to dense). NaN where PIE-Bench gives one (no background pixel left)."""
        out = {}
        embedded = {n: m.images([image]) for n, m in (("clip", self.clip), ("dino", self.dino), ("dinov2", self.dinov2)) if m}
        if "clip_text" in emb:
            out["clip_t"] = (embedded["clip"] @ emb["clip_text"].T).item()
        for name, e in embedded.items():
            prefix = "clip_i" if name == "clip" else name
            if f"{name}_subject" in emb:  # DreamBooth: the mean over the subject's real images
                out[prefix] = (e @ emb[f"{name}_subject"].T).mean().item()
            if f"{name}_target" in emb:
                out[f"{prefix}_target"] = (e @ emb[f"{name}_target"].T).item()
        x = pixels(image)
        if dense is not None:
            out.update(self.pixel_scores(x, pixels(fit(dense, image.size)), "dense"))
        if ctx.target is not None and self.lpips:
            out["lpips_target"] = self.lpips(x[None], pixels(fit(ctx.target, image.size))[None]).item()
        if ctx.source is not None and ctx.background is not None:
            keep = torch.nn.functional.interpolate(ctx.background[None, None], size=x.shape[1:], mode="nearest")[0]
            if keep.sum() == 0:
                out.update({f"{m}_bg": float("nan") for m in ("psnr", "ssim", "lpips") if m in self.names})
            else:  # PnPInversion's evaluation: both images times the background mask, scored whole
                out.update(self.pixel_scores(x * keep, pixels(fit(ctx.source, image.size)) * keep, "bg"))
        return out

    def pixel_scores(self, a, b, suffix):
        out = {}
        if "psnr" in self.names:
            out[f"psnr_{suffix}"] = psnr(a, b).item()
        if "ssim" in self.names:
            out[f"ssim_{suffix}"] = ssim(a.to(self.device), b.to(self.device)).item()
        if self.lpips:
            out[f"lpips_{suffix}"] = self.lpips(a[None], b[None]).item()
        return out

    def describe(self):
        return describe(self.names, *(m.source if m else None for m in (self.clip, self.dino, self.dinov2)),
                        self.lpips.net if self.lpips else None, self.lpips.random if self.lpips else False)  # fmt: skip


def describe(names, clip=CLIP_DEFAULT, dino=DINO_DEFAULT, dinov2=DINOV2_DEFAULT, lpips_net="alex", lpips_random=False):
    """{metric: its checkpoint} of the metrics `names` (for the table and the score cache's key), known
    before any metric model loads."""
    d = {n: src for n, src in (("clip", clip), ("dino", dino), ("dinov2", dinov2)) if n in names}
    if "lpips" in names:
        d["lpips"] = f"lpips v0.1 {lpips_net}" + (" (random backbone)" if lpips_random else "")
    return d | {n: f"{'compare.psnr' if n == 'psnr' else 'metrics.ssim'} (equal to scikit-image)" for n in ("psnr", "ssim") if n in names}


# what each column means (the table's legend)
DEFINITIONS = {
    "clip_t": "CLIP-T: cosine of the image's and the prompt's CLIP embeddings (x100 = torchmetrics' CLIPScore when > 0)",
    "clip_i": "CLIP-I: cosine of CLIP image embeddings, mean over the subject's images",
    "dino": "DINO: cosine of DINO ViT-S/16 [CLS] tokens, mean over the subject's images (DreamBooth)",
    "dinov2": "DINOv2: the same with DINOv2's [CLS] (DreamBench++)",
    "clip_i_target": "CLIP-I against the example's target image",
    "dino_target": "DINO against the example's target image",
    "dinov2_target": "DINOv2 against the example's target image",
    "lpips_target": "LPIPS against the target (resized to the output, bicubic); lower is closer",
    "psnr_dense": "PSNR (dB) against the dense image of the same seed: fidelity to dense",
    "ssim_dense": "SSIM against the dense image of the same seed",
    "lpips_dense": "LPIPS against the dense image of the same seed; lower is closer",
    "psnr_bg": "PSNR (dB) against the source outside the edit mask (both images x background mask, PIE-Bench)",
    "ssim_bg": "SSIM against the source outside the edit mask (PIE-Bench's masking)",
    "lpips_bg": "LPIPS against the source outside the edit mask (PIE-Bench's masking); lower is closer",
}
LOWER_IS_BETTER = ("lpips_dense", "lpips_bg", "lpips_target")


# ----------------------------------------------------------------------------------------------
# Tiny random metric models (tests and the README's offline example)


def clip_tokenizer(folder):
    """A CLIP tokenizer whose vocabulary is the 256 byte-level symbols (each alone and word-final) and
    CLIP's special tokens, no merges: every prompt tokenizes, character by character."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
    symbols += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    symbols += [chr(256 + n) for n in range(256 - len(symbols))]  # GPT-2's byte-to-unicode table
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer.from_pretrained(folder)  # CLIP's files (vocab.json, merges.txt), read as transformers 4 and 5 read them
    tok.save_pretrained(folder)
    return tok, len(vocab)


def pil_processor(name):
    """transformers' PIL image processor class: CLIPImageProcessorPil in transformers 5, CLIPImageProcessor
    (then PIL-based) in 4."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def make_tiny_metric_models(root, seed=0):
    """clip/, dino/ and dinov2/ under root: random weights at tiny shapes, each with the preprocessor
    config of its real checkpoint's kind (sizes scaled to 32 px), written by transformers' save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    names = ("CLIPImageProcessor", "ViTImageProcessor", "BitImageProcessor")
    clip_processor, vit_processor, bit_processor = (pil_processor(n) for n in names)

    root = str(root)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    _, vocab = clip_tokenizer(os.path.join(root, "clip"))
    cfg = CLIPConfig(text_config=dict(tower, vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=dict(tower, image_size=32, patch_size=8), projection_dim=16)  # fmt: skip
    CLIPModel(cfg).save_pretrained(os.path.join(root, "clip"))
    clip_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(os.path.join(root, "clip"))
    ViTModel(ViTConfig(**tower, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(os.path.join(root, "dino"))
    vit_processor(size={"height": 32, "width": 32}, resample=Image.Resampling.BILINEAR, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD).save_pretrained(os.path.join(root, "dino"))  # fmt: skip
    Dinov2Model(Dinov2Config(**tower, image_size=32, patch_size=8)).save_pretrained(os.path.join(root, "dinov2"))
    bit_processor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                         image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(os.path.join(root, "dinov2"))  # fmt: skip
    return {k: os.path.join(root, k) for k in ("clip", "dino", "dinov2")}


def main(argv=None):
    from files import ArgumentParser, check_writable_folder, fail

    p = ArgumentParser(description=__doc__)
    p.add_argument("command", choices=["tiny"], help="tiny: write tiny random CLIP, DINO and DINOv2 folders")
    p.add_argument("folder", help="the folder to write clip/, dino/ and dinov2/ into (created; its parent must exist)")
    args = p.parse_args(argv)
    try:
        check_writable_folder(args.folder, "folder")
        if os.path.isdir(args.folder) and os.listdir(args.folder):
            raise ValueError(f"folder {args.folder} is not empty")
    except (OSError, ValueError) as e:
        fail(e)
    folders = make_tiny_metric_models(args.folder)
    print(json.dumps(folders, indent=1))
    if lpips_available():
        print(f"note: {lpips_available()}", file=sys.stderr)


if __name__ == "__main__":
    main()
