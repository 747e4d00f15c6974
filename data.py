"""Training data: a JSONL manifest, checked up front, then encoded once into a latent cache.

Manifest: one example per line, image paths relative to the manifest's folder:
    {"prompt": "make it snowy", "target": "out/0.png", "references": ["in/0.png"], "task": "edit"}
task is "edit" (instruction editing, spatially aligned) or "subject" (personalization). Data held the way
ai-toolkit, musubi-tuner or diffusers' klein scripts read it converts to this manifest with layouts.py.

Cache: the VAE latents and text context of every example, so that training holds only the
transformer (a 4B text encoder and the VAE never sit next to it):
    DIR/index.json                       the examples: files, token grids, task, manifest line
    DIR/latents/<line>.safetensors       target and ref.0, ref.1, ...: (128, h, w) normalized latents;
                                         with --compact S also ref.K.xS: reference K downscaled S times
    DIR/text/<sha1 of prompt>.safetensors  txt: (512, 3 * hidden); equal prompts share one file

    python data.py data/train.jsonl --model black-forest-labs/FLUX.2-klein-base-4B --out cache/
    python data.py data/train.jsonl --model ... --out cache/ --compact 2 3 4   # for train.py --compact

May import: files, pipeline (klein's image preparation), vae, text_encoder. No other script.
"""

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from files import ArgumentParser, check_file, check_number, fail, field, load_image, read_json, remove_stale_temps, resolve_device, write_atomic
from klein import compact_grid, compact_reference, prepare_reference, to_tensor

TASKS = ("edit", "subject")
MIN_AREA, MAX_AREA = 64 * 64, 8192 * 8192  # klein's smallest reference side is 64 px
MAX_COMPACT = 64  # a 1024 px reference downscaled 64x is one token
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
    if not os.path.exists(path):
        return f"image not found: {path}"
    if not os.path.isfile(path):  # a folder, FIFO or device: opening a FIFO would block
        return f"not a regular image file: {path}"
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


def json_object(text):
    """(object, problem): a JSONL line's object, or why it is not one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"bad JSON: {e}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def parse_line(text, folder):
    """(fields, problem): the example's fields with absolute paths, or why the line is bad."""
    record, problem = json_object(text)
    if problem:
        return None, problem
    for name, kind in FIELDS.items():
        if name not in record:
            return None, f"missing field {name!r}"
        if not isinstance(record[name], kind):
            return None, f"field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}"
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
    check_file(path, "manifest")
    folder = os.path.dirname(os.path.abspath(path))
    examples, errors = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text (byte {e.start})") from None
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        fields, problem = parse_line(text, folder)
        if problem:
            errors.append(f"{path} line {line}: {problem}")
        else:
            examples.append(Example(line=line, **fields))
    report_bad(errors, path, skip_bad, "lines", "line(s)")
    if not examples:
        raise ManifestError(f"{path} has no usable examples")
    return examples


def report_bad(errors, source, skip_bad, plural, counted):
    """Bad entries of a source, each named by where it is: one ManifestError listing them ("3 bad
    {plural} in ..."), or with skip_bad their count ("skipped 3 bad {counted} of ...") and the first."""
    if errors and not skip_bad:
        head = [] if len(errors) == 1 else [f"{len(errors)} bad {plural} in {source} (--skip-bad skips them):"]
        raise ManifestError("\n".join(head + errors))
    if errors:
        print(f"skipped {len(errors)} bad {counted} of {source}; the first: {errors[0]}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Cache


def text_file(prompt):
    return f"text/{hashlib.sha1(prompt.encode()).hexdigest()}.safetensors"


def header(path):
    """{tensor name: shape} of a safetensors file, its metadata: the header only; a damaged file is one
    ValueError naming it (safetensors checks the header against the file's length)."""
    check_file(path, "cache file")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise ValueError(f"cannot read cache file {path}: {e}") from None


def cached_source(path):
    """The `source` metadata of a cached latents file, or None if there is none (yet, or readable)."""
    try:
        return header(path)[1].get("source")
    except (ValueError, FileNotFoundError):
        return None


def grids(shapes):
    """Token grids [h, w] of a latents file's {name: (C, h, w)}: the target's, then each reference's."""
    refs = sorted((k for k in shapes if k.startswith("ref.") and k.count(".") == 1), key=lambda k: int(k.split(".")[1]))
    return list(shapes["target"][1:]), [list(shapes[k][1:]) for k in refs]


def check_out_dir(out_dir, flag="--out"):
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{flag} {out_dir} is a file, not a folder")


@torch.no_grad()
def cache_dataset(manifest, vae, text_encoder, out_dir, max_area=1024 * 1024, skip_bad=False, progress=True, compact=()):
    """Encode every example once: VAE latents of target and references, text context of the prompt.

    Images are prepared like klein's references (klein.prepare_reference: at most max_area pixels,
    center-cropped to multiples of 16), targets too, so an edit stays pixel-aligned with its source.
    Resumable: an example whose latents file exists for the same images and max_area is skipped, and
    so is a prompt already encoded; every file is written atomically, index.json last, so a run
    killed at any instant and run again ends with the same files as an uninterrupted one.
    compact: factors S; each reference is also encoded downscaled by S (klein.compact_reference) as
    ref.K.xS, for train.py --compact.
    """
    check_out_dir(out_dir)
    compact = sorted(set(compact))
    examples = read_manifest(manifest, skip_bad)
    with open(manifest, encoding="utf-8") as f:  # every other non-blank line was bad, and skipped
        bad_lines = sum(1 for text in f if text.strip()) - len(examples)
    for folder in (out_dir, os.path.join(out_dir, "latents"), os.path.join(out_dir, "text")):
        remove_stale_temps(folder)
    index, skipped, encoded, prompts = [], 0, 0, set()
    for ex in tqdm(examples, desc="caching", disable=not progress):
        latents = f"latents/{ex.line:08d}.safetensors"
        source = json.dumps(dict(target=ex.target, references=ex.references, max_area=max_area) | ({"compact": compact} if compact else {}))
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
            for f in compact:
                names += [f"ref.{k}.x{f}" for k in range(len(ex.references))]
                images += [compact_reference(im, f) for im in images[1 : 1 + len(ex.references)]]
            z = {n: vae.encode(to_tensor(im))[0].cpu().contiguous() for n, im in zip(names, images)}  # (128, h, w)
            if not all(torch.isfinite(v).all() for v in z.values()):
                raise ValueError(f"{manifest} line {ex.line}: the VAE gave non-finite latents (check the VAE weights)")
            write_atomic(path, z, metadata={"source": source})
            encoded += 1
        text = text_file(ex.prompt)
        prompts.add(text)
        if not os.path.isfile(os.path.join(out_dir, text)):
            txt = text_encoder.encode([ex.prompt])[0].cpu().contiguous()  # (512, 3 * hidden)
            if not torch.isfinite(txt).all():
                raise ValueError(f"{manifest} line {ex.line}: the text encoder gave non-finite values (check its weights)")
            write_atomic(os.path.join(out_dir, text), {"txt": txt})
        target, refs = grids(header(path)[0])
        index.append(dict(latents=latents, text=text, target=target, references=refs, task=ex.task, line=ex.line)
                     | ({"compact": compact} if compact else {}))
    if skipped:
        print(f"skipped {skipped} example(s) whose images failed to load", file=sys.stderr)
    if not index:
        raise ManifestError(f"{manifest}: no example could be cached")
    write_atomic(os.path.join(out_dir, "index.json"), json.dumps(index, indent=1))
    if progress:
        print(f"cached {len(index)} examples in {out_dir}: {encoded} encoded, {len(index) - encoded} already cached, "
              f"{bad_lines + skipped} skipped ({bad_lines} bad manifest lines, {skipped} whose images failed to load); "
              f"{len(prompts)} distinct prompts")
    return CachedDataset(out_dir)


def check_entry(entry, where):
    """One index.json entry, checked: file names inside the cache, grids of positive ints, a known task."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__}")
    for name in ("latents", "text"):
        p = field(entry, name, where, str)
        if os.path.isabs(p) or ".." in p.split("/"):
            raise ValueError(f"{where}: field {name!r} must be a path inside the cache folder, got {p!r}")
    field(entry, "line", where)
    if len(field(entry, "target", where, list)) != 2:
        raise ValueError(f"{where}: field 'target' must be a token grid [h, w]")
    refs = entry.get("references")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, list) and len(r) == 2 for r in refs):
        raise ValueError(f"{where}: field 'references' must be a non-empty list of token grids [h, w]")
    for r in refs:
        field({"references": r}, "references", where, list)  # positive ints
    factors = entry.get("compact", [])
    if not isinstance(factors, list) or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors):
        raise ValueError(f"{where}: field 'compact' must be a list of integer factors >= 1")
    if field(entry, "task", where, str) not in TASKS:
        raise ValueError(f"{where}: field 'task' must be one of {', '.join(TASKS)}, got {entry['task']!r}")
    return entry


class CachedDataset:
    """The examples of a cache folder; item i is a dict of CPU tensors:
    target (C, h, w), refs [(C, h_k, w_k), ...], txt (L, J), and task; in a cache made with --compact
    also compact {S: [(C, h_k', w_k'), ...]}, each reference downscaled by S.

    Opening checks index.json and the header of every file it names (shapes agree with the index and
    with each other), so a damaged cache fails here, before anything is trained or written."""

    def __init__(self, folder):
        path = os.path.join(folder, "index.json")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no such cache folder: {folder}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} is not a latent cache (no index.json); cache a manifest first")
        self.folder = folder
        self.index = [check_entry(e, f"{path} entry {i}") for i, e in enumerate(read_json(path, list))]
        if not self.index:
            raise ValueError(f"{path} lists no examples")
        dims = set()
        for i, entry in enumerate(self.index):
            latents, text = (os.path.join(folder, entry[k]) for k in ("latents", "text"))
            shapes, _ = header(latents)
            want = {"target": entry["target"], **{f"ref.{k}": g for k, g in enumerate(entry["references"])}}
            for f in entry.get("compact", []):
                want |= {f"ref.{k}.x{f}": list(compact_grid(*g, f)) for k, g in enumerate(entry["references"])}
            if set(shapes) != set(want) or any(len(s) != 3 or list(s[1:]) != want[k] for k, s in shapes.items()):
                raise ValueError(f"{latents} does not match {path} entry {i}: tensors {shapes}, the index says grids {want}")
            txt = header(text)[0]
            if list(txt) != ["txt"] or len(txt["txt"]) != 2:
                raise ValueError(f"{text} must hold one tensor txt (L, J), got {txt}")
            channels = {s[0] for s in shapes.values()}
            dims.add((channels.pop() if len(channels) == 1 else None, txt["txt"][1]))
        if len(dims) != 1 or None in next(iter(dims)):
            raise ValueError(f"the files of {folder} disagree in latent channels or text width: {dims}")
        self.channels, self.text_dim = next(iter(dims))

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        entry = self.index[i]
        z, txt = (self.load(entry[k]) for k in ("latents", "text"))
        refs = [z[f"ref.{k}"] for k in range(len(entry["references"]))]
        compact = {f: [z[f"ref.{k}.x{f}"] for k in range(len(refs))] for f in entry.get("compact", [])}
        return dict(target=z["target"], refs=refs, txt=txt["txt"], task=entry["task"]) | ({"compact": compact} if compact else {})

    def load(self, name):
        path = os.path.join(self.folder, name)
        try:
            tensors = load_file(check_file(path, "cache file"))
        except (ValueError, FileNotFoundError):
            raise
        except Exception as e:
            raise ValueError(f"cannot read cache file {path}: {e}") from None
        if not all(t.is_floating_point() and torch.isfinite(t).all() for t in tensors.values()):
            raise ValueError(f"cache file {path} holds non-finite or non-float values")
        return tensors

    def buckets(self):
        """{(h, w) target token grid: [example indices]}: examples of one bucket stack into a batch."""
        out = {}
        for i, entry in enumerate(self.index):
            out.setdefault(tuple(entry["target"]), []).append(i)
        return out


def check_max_area(max_area):
    if not MIN_AREA <= max_area <= MAX_AREA:
        raise ValueError(f"--max-area must be in [{MIN_AREA}, {MAX_AREA}] pixels (64x64 to 8192x8192), got {max_area}")
    return max_area


def main(argv=None):
    p = ArgumentParser(description="Encode a training manifest into a latent cache (VAE latents + text context).")
    p.add_argument("manifest", help="JSONL manifest: prompt, target, references, task per line")
    p.add_argument("--model", required=True, help="klein repository folder or hub id with vae/, text_encoder/, tokenizer/")
    p.add_argument("--out", required=True, help="cache folder (created; an existing one is resumed)")
    p.add_argument("--max-area", type=int, default=1024 * 1024, help="largest image area in pixels; larger ones are resized")
    p.add_argument("--skip-bad", action="store_true", help="skip bad manifest lines instead of stopping")
    p.add_argument("--device", default=None, help="device for the encoders: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--compact", type=int, nargs="+", default=[], metavar="S",
                   help="also encode each reference downscaled by S per side, for train.py --compact (default: none)")
    args = p.parse_args(argv)
    try:
        check_max_area(args.max_area)
        for f in args.compact:
            check_number("--compact", f, 2, MAX_COMPACT, integer=True)
        encode_manifest(args.manifest, args.model, args.out, args.max_area, args.skip_bad, resolve_device(args.device)[0], args.compact)
    except (ValueError, OSError) as e:
        fail(e)


def encode_manifest(manifest, model, out_dir, max_area, skip_bad, device, compact=()):
    """Load klein's VAE and text encoder from `model` and cache the manifest with them."""
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    check_out_dir(out_dir)
    if not skip_bad:
        read_manifest(manifest)  # bad input fails before any model loads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoEncoder.from_pretrained(model, dtype=dtype, device=device)
    text_encoder = TextEncoder.from_pretrained(model, dtype=dtype, device=device)
    return cache_dataset(manifest, vae, text_encoder, out_dir, max_area, skip_bad, compact=compact)


if __name__ == "__main__":
    main()
