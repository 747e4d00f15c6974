"""Training data: a JSONL manifest, checked up front, then encoded once into a latent cache.

Manifest: one example per line, image paths relative to the manifest's folder:
    {"prompt": "make it snowy", "target": "out/0.png", "references": ["in/0.png"], "task": "edit"}
task is "edit" (instruction editing, spatially aligned) or "subject" (personalization).

Cache: the VAE latents and text context of every example, so that training holds only the
transformer (a 4B text encoder and the VAE never sit next to it):
    DIR/index.json                       the examples: files, token grids, task, manifest line
    DIR/latents/<line>.safetensors       target and ref.0, ref.1, ...: (128, h, w) normalized latents
    DIR/text/<sha1 of prompt>.safetensors  txt: (512, 3 * hidden); equal prompts share one file

    python data.py data/train.jsonl --model black-forest-labs/FLUX.2-klein-base-4B --out cache/
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sample import load_image, prepare_reference, to_tensor

TASKS = ("edit", "subject")
FIELDS = {"prompt": str, "target": str, "references": list, "task": str}


@dataclass
class Example:
    line: int  # 1-based line of the manifest: names the example in errors and in the cache
    prompt: str
    target: str  # absolute paths
    references: list
    task: str


class ManifestError(ValueError):
    pass


def check_image(path):
    """None if PIL can read the image's header and klein accepts its size, else the problem."""
    if not os.path.isfile(path):
        return f"image not found: {path}"
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        return f"unreadable image {path}: {e}"
    if w < 64 or h < 64:
        return f"image too small: {path} is {w}x{h}, both sides must be at least 64 px"
    if max(w / h, h / w) > 8:
        return f"image aspect ratio too extreme: {path} is {w}x{h}, at most 8:1"
    return None


def parse_line(text, folder):
    """(fields, problem): the example's fields with absolute paths, or why the line is bad."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"bad JSON: {e}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    for field, kind in FIELDS.items():
        if field not in record:
            return None, f"missing field {field!r}"
        if not isinstance(record[field], kind):
            return None, f"field {field!r} must be a {kind.__name__}, got {type(record[field]).__name__}"
    if not all(isinstance(r, str) for r in record["references"]):
        return None, "field 'references' must be a list of strings (image paths)"
    if not record["references"]:
        return None, "no references: an example needs at least one reference image"
    if record["task"] not in TASKS:
        return None, f"unknown task {record['task']!r}; expected one of {', '.join(TASKS)}"
    paths = [os.path.join(folder, p) for p in [record["target"], *record["references"]]]
    for p in paths:
        problem = check_image(p)
        if problem:
            return None, problem
    return dict(prompt=record["prompt"], target=paths[0], references=paths[1:], task=record["task"]), None


def read_manifest(path, skip_bad=False):
    """The manifest's examples, every line checked (JSON, fields, types, task, images) before any work.

    Bad lines raise one ManifestError naming each line and its problem; skip_bad=True skips them
    instead and reports how many on stderr. Blank lines are ignored.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such manifest: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            fields, problem = parse_line(text, folder)
            if problem:
                errors.append(f"{path} line {line}: {problem}")
            else:
                examples.append(Example(line=line, **fields))
    if errors and not skip_bad:
        head = [] if len(errors) == 1 else [f"{len(errors)} bad lines in {path} (--skip-bad skips them):"]
        raise ManifestError("\n".join(head + errors))
    if errors:
        print(f"skipped {len(errors)} bad line(s) of {path}; the first: {errors[0]}", file=sys.stderr)
    if not examples:
        raise ManifestError(f"{path} has no usable examples")
    return examples


# ----------------------------------------------------------------------------------------------
# Cache


def write_atomic(path, write):
    """write(tmp) to a temporary file next to path, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def text_file(prompt):
    return f"text/{hashlib.sha1(prompt.encode()).hexdigest()}.safetensors"


def cached_source(path):
    """The `source` metadata of a cached latents file, or None if there is none yet."""
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("source")


def grids(path):
    """Token grids (h, w) of a latents file: the target's, then each reference's."""
    with safe_open(path, framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape()[1:] for k in f.keys()}
    refs = sorted((k for k in shapes if k.startswith("ref.")), key=lambda k: int(k.split(".")[1]))
    return shapes["target"], [shapes[k] for k in refs]


@torch.no_grad()
def cache_dataset(manifest, vae, text_encoder, out_dir, max_area=1024 * 1024, skip_bad=False, progress=True):
    """Encode every example once: VAE latents of target and references, text context of the prompt.

    Images are prepared like klein's references (sample.prepare_reference: at most max_area pixels,
    center-cropped to multiples of 16), targets too, so an edit stays pixel-aligned with its source.
    Resumable: an example whose latents file exists for the same images and max_area is skipped, and
    so is a prompt already encoded; every file is written atomically; index.json comes last.
    """
    examples = read_manifest(manifest, skip_bad)
    index, skipped = [], 0
    for ex in tqdm(examples, desc="caching", disable=not progress):
        latents = f"latents/{ex.line:08d}.safetensors"
        source = json.dumps(dict(target=ex.target, references=ex.references, max_area=max_area))
        path = os.path.join(out_dir, latents)
        if cached_source(path) != source:
            try:
                images = [prepare_reference(load_image(p), max_area) for p in [ex.target, *ex.references]]
            except (ValueError, FileNotFoundError) as e:
                if not skip_bad:
                    raise ManifestError(f"{manifest} line {ex.line}: {e}") from None
                skipped += 1
                continue
            names = ["target"] + [f"ref.{k}" for k in range(len(ex.references))]
            z = {n: vae.encode(to_tensor(im))[0].cpu().contiguous() for n, im in zip(names, images)}  # (128, h, w)
            write_atomic(path, lambda tmp: save_file(z, tmp, metadata={"source": source}))
        text = text_file(ex.prompt)
        if not os.path.isfile(os.path.join(out_dir, text)):
            txt = text_encoder.encode([ex.prompt])[0].cpu().contiguous()  # (512, 3 * hidden)
            write_atomic(os.path.join(out_dir, text), lambda tmp: save_file({"txt": txt}, tmp))
        target, refs = grids(path)
        index.append(dict(latents=latents, text=text, target=target, references=refs, task=ex.task, line=ex.line))
    if skipped:
        print(f"skipped {skipped} example(s) whose images failed to load", file=sys.stderr)

    def write_index(tmp):
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)

    write_atomic(os.path.join(out_dir, "index.json"), write_index)
    return CachedDataset(out_dir)


class CachedDataset:
    """The examples of a cache folder; item i is a dict of CPU tensors:
    target (C, h, w), refs [(C, h_k, w_k), ...], txt (L, J), and task."""

    def __init__(self, folder):
        path = os.path.join(folder, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} is not a latent cache (no index.json); cache a manifest first")
        self.folder = folder
        with open(path) as f:
            self.index = json.load(f)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        entry = self.index[i]
        z = load_file(os.path.join(self.folder, entry["latents"]))
        refs = [z[f"ref.{k}"] for k in range(len(entry["references"]))]
        txt = load_file(os.path.join(self.folder, entry["text"]))["txt"]
        return dict(target=z["target"], refs=refs, txt=txt, task=entry["task"])

    def buckets(self):
        """{(h, w) target token grid: [example indices]}: examples of one bucket stack into a batch."""
        out = {}
        for i, entry in enumerate(self.index):
            out.setdefault(tuple(entry["target"]), []).append(i)
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Encode a training manifest into a latent cache (VAE latents + text context).")
    p.add_argument("manifest", help="JSONL manifest: prompt, target, references, task per line")
    p.add_argument("--model", required=True, help="klein repository folder or hub id with vae/, text_encoder/, tokenizer/")
    p.add_argument("--out", required=True, help="cache folder (created; an existing one is resumed)")
    p.add_argument("--max-area", type=int, default=1024 * 1024, help="largest image area in pixels; larger ones are resized")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines instead of stopping")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device for the encoders")
    args = p.parse_args(argv)
    try:
        encode_manifest(args.manifest, args.model, args.out, args.max_area, args.skip_bad, torch.device(args.device))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def encode_manifest(manifest, model, out_dir, max_area, skip_bad, device):
    """Load klein's VAE and text encoder from `model` and cache the manifest with them."""
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    if not skip_bad:
        read_manifest(manifest)  # bad input fails before any model loads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoEncoder.from_pretrained(model, dtype=dtype, device=device)
    text_encoder = TextEncoder.from_pretrained(model, dtype=dtype, device=device)
    return cache_dataset(manifest, vae, text_encoder, out_dir, max_area, skip_bad)


if __name__ == "__main__":
    main()
