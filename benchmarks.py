r"""Benchmarks as evaluation manifests: the format evaluate.py reads, and converters from the published layouts.

    python benchmarks.py dreambench dreambooth/dataset --out bench/dreambench
    python benchmarks.py pie-bench PIE-Bench_v1/data --out bench/pie
    python benchmarks.py subjects200k Subjects200K/data --out bench/s200k --limit 500

The manifest is data.py's training manifest (one JSON object a line, paths relative to the manifest) with
optional fields for evaluation:
    {"id": "backpack/00", "prompt": "a backpack in the jungle", "references": ["../../dreambooth/dataset/backpack/00.jpg"],
     "task": "subject", "subject_images": [...every image of the subject...], "group": "object"}
    {"id": "000000000000", "prompt": "change the cat to a dog", "references": ["...jpg"], "task": "edit",
     "mask": "masks/000000000000.png", "clip_text": "a dog sitting on a wooden bench", "group": "0"}
prompt, references (>= 1) and task ("edit" or "subject") are required; target (a ground-truth image), mask (white
= the edited region, as PIE-Bench draws it; the size of the first reference), subject_images (what DINO and
CLIP-I compare with; default the references), clip_text (what CLIP-T compares with; default the prompt), group
and id (default "line N") are optional. Any other field is an error (a typo would silently change a score).

The layouts, as published and read here:
- DreamBench (github.com/google/dreambooth, dataset/): one folder per subject (30; 4-6 JPEGs each, 00.jpg ...)
  and prompts_and_classes.txt: a "subject_name,class" table, then two Python prompt lists, "Object Prompts"
  and "Live Subject Prompts" (25 each), written 'a {0} {1} in the jungle'.format(unique_token, class_token).
  The live subjects are the 9 cats and dogs (DreamBooth's 21 objects + 9 live subjects). A reference-conditioned
  model needs no unique token: --token "" (default) gives "a backpack in the jungle"; the first --refs images
  condition, and every image of the subject is what DINO and CLIP-I compare with (DreamBooth's protocol).
- PIE-Bench (PnPInversion, github.com/cure-lab/PnPInversion, data/): mapping_file.json maps an id to
  {image_path, original_prompt, editing_prompt, editing_instruction, editing_type_id, blended_word, mask}, the
  image under annotation_images/; mask is a run-length list [start, length, start, length, ...] over the
  flattened 512x512 image, decoded as PnPInversion's mask_decode does (the one-pixel border counts as edited);
  prompts lose their [ ] marks as its evaluation strips them. The edit prompt is editing_instruction (klein
  edits by instruction; --prompt target gives editing_prompt); CLIP-T compares with editing_prompt.
- Subjects200K (huggingface.co/datasets/Yuanshi/Subjects200K, data/train-*.parquet): columns image (a pair side
  by side, 1056x528: two 512x512 panels with 8 px of padding around each, as OminiControl crops them),
  collection, quality_assessment {compositeStructure, objectConsistency, imageQuality} (0-5) and description
  {item, description_0, description_1, category, description_valid}. Kept: every score >= --min-quality (5,
  OminiControl's filter; a row without scores is dropped); the left panel is the reference, the right one the
  target, description_1 the prompt. Needs pyarrow.

A bad or missing file is reported by path with a count; --skip-bad skips it. Outputs are written atomically,
the manifest last.

May import: files, data (check_image, TASKS); pyarrow lazily. Never imported by the core.
"""

import glob
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from data import TASKS, check_image
from files import ArgumentParser, check_file, check_writable_folder, fail, read_json, write_atomic

REQUIRED = {"prompt": str, "references": list, "task": str}
OPTIONAL = {"id": str, "target": str, "mask": str, "subject_images": list, "clip_text": str, "group": str}
SHOWN = 5  # problems named in one error line


@dataclass
class EvalExample:
    id: str
    line: int
    prompt: str
    references: list  # absolute paths
    task: str
    target: str = None
    mask: str = None
    subject_images: list = field(default_factory=list)
    clip_text: str = None
    group: str = None


class BadInput(ValueError):
    pass


def problems_error(problems, what):
    """One error line: the count, then the first SHOWN problems, each naming its path."""
    shown = "; ".join(problems[:SHOWN]) + (f"; ... {len(problems) - SHOWN} more" if len(problems) > SHOWN else "")
    return BadInput(f"{len(problems)} bad {what} (--skip-bad skips them): {shown}")


def report_skipped(problems, what):
    if problems:
        print(f"skipped {len(problems)} bad {what}; the first: {problems[0]}", file=sys.stderr)


def check_mask(path, size):
    """None if the mask is a readable image of `size` (w, h), else the problem."""
    problem = check_image(path)
    if problem:
        return problem.replace("image", "mask", 1)
    with Image.open(path) as im:
        if im.size != tuple(size):
            return f"mask {path} is {im.size[0]}x{im.size[1]}, its reference {size[0]}x{size[1]}"
    return None


def parse_example(record, line, folder, seen):
    """(EvalExample, None) or (None, problem)."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    for name in REQUIRED:
        if name not in record:
            return None, f"missing field {name!r}"
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return None, f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join([*REQUIRED, *OPTIONAL])}"
    for name, kind in {**REQUIRED, **OPTIONAL}.items():
        if name in record and not isinstance(record[name], kind):
            return None, f"field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}"
    for name in ("references", "subject_images"):
        if not all(isinstance(p, str) for p in record.get(name, [])):
            return None, f"field {name!r} must be a list of strings (image paths)"
    if not record["references"]:
        return None, "no references: an example needs at least one reference image"
    if record["task"] not in TASKS:
        return None, f"unknown task {record['task']!r}; expected one of {', '.join(TASKS)}"
    ex = EvalExample(id=record.get("id", f"line {line}"), line=line, prompt=record["prompt"], task=record["task"],
                     references=[os.path.join(folder, p) for p in record["references"]],
                     subject_images=[os.path.join(folder, p) for p in record.get("subject_images", [])],
                     target=os.path.join(folder, record["target"]) if "target" in record else None,
                     mask=os.path.join(folder, record["mask"]) if "mask" in record else None,
                     clip_text=record.get("clip_text"), group=record.get("group"))  # fmt: skip
    if ex.id in seen:
        return None, f"id {ex.id!r} repeats line {seen[ex.id]}'s"
    for p in [*ex.references, *ex.subject_images] + ([ex.target] if ex.target else []):
        problem = check_image(p)
        if problem:
            return None, problem
    if ex.mask:
        with Image.open(ex.references[0]) as im:
            problem = check_mask(ex.mask, im.size)
        if problem:
            return None, problem
    return ex, None


def read_manifest(path, skip_bad=False):
    """The evaluation manifest's examples, every line and image checked before any work. Bad lines are one
    BadInput naming the count and the first lines; skip_bad skips them (reported on stderr)."""
    check_file(path, "manifest")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text (byte {e.start})") from None
    examples, problems, seen = [], [], {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            ex, problem = None, f"bad JSON: {e.msg}"
        else:
            ex, problem = parse_example(record, n, folder, seen)
        if problem:
            problems.append(f"{path} line {n}: {problem}")
        else:
            seen[ex.id] = n
            examples.append(ex)
    if problems and not skip_bad:
        raise problems_error(problems, "manifest lines")
    report_skipped(problems, "manifest lines")
    if not examples:
        raise BadInput(f"{path} has no usable examples")
    return examples


def write_manifest(out_dir, records):
    """manifest.jsonl in out_dir, paths made relative to it, written atomically."""
    path = os.path.join(out_dir, "manifest.jsonl")
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    lines = []
    for r in records:
        r = dict(r)
        for k in ("target", "mask"):
            if k in r:
                r[k] = rel(r[k])
        for k in ("references", "subject_images"):
            if k in r:
                r[k] = [rel(p) for p in r[k]]
        lines.append(json.dumps(r, ensure_ascii=False))
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# DreamBench


LIVE_CLASSES = ("cat", "dog")  # DreamBench's 9 live subjects: cat, cat2, dog, dog2, dog3, dog5 .. dog8
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def read_dreambench_prompts(path):
    """({subject: class}, object templates, live templates) from prompts_and_classes.txt."""
    check_file(path, "DreamBench prompts file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    classes = dict(re.findall(r"^([a-z0-9_]+),([^\n,]+)$", text.split("Prompts", 1)[0], flags=re.M))
    classes.pop("subject_name", None)
    lists = re.split(r"^(Object Prompts|Live Subject Prompts)\s*$", text, flags=re.M)
    templates = {lists[i]: re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", lists[i + 1]) for i in range(1, len(lists) - 1, 2)}
    objects, live = templates.get("Object Prompts", []), templates.get("Live Subject Prompts", [])
    if not classes or not objects or not live:
        raise BadInput(f"{path} is not DreamBench's prompts_and_classes.txt: found {len(classes)} subjects, {len(objects)} object "
                       f"and {len(live)} live prompts")  # fmt: skip
    return classes, objects, live


def dreambench(dataset, out_dir, refs=1, token="", skip_bad=False):
    """Manifest records of DreamBench: 25 prompts per subject, the first `refs` images as references."""
    classes, objects, live = read_dreambench_prompts(os.path.join(dataset, "prompts_and_classes.txt"))
    records, problems = [], []
    for subject, cls in classes.items():
        folder = os.path.join(dataset, subject)
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
        bad = [f"{subject}: {check_image(p)}" for p in paths if check_image(p)]
        if not os.path.isdir(folder):
            bad = [f"subject folder not found: {folder}"]
        elif len(paths) - len(bad) < refs:
            bad += [f"{folder} has {len(paths) - len(bad)} readable images, --refs asks for {refs}"]
        if bad:
            problems += bad
            continue
        group = "live" if cls in LIVE_CLASSES else "object"
        for i, template in enumerate(live if group == "live" else objects):
            prompt = " ".join(template.format(token, cls).split())
            records.append(dict(id=f"{subject}/{i:02d}", prompt=prompt, references=paths[:refs], task="subject",
                                subject_images=paths, group=group))  # fmt: skip
    return records, problems


# ----------------------------------------------------------------------------------------------
# PIE-Bench


def mask_decode(encoded, shape=(512, 512)):
    """PnPInversion's mask_decode: 1 on every run [start, start + length) of the flattened image, and on the
    one-pixel border ("to avoid annotation errors in boundary"). Returns (h, w) uint8."""
    if not isinstance(encoded, list) or len(encoded) % 2 or not all(isinstance(v, int) and v >= 0 for v in encoded):
        raise ValueError("field 'mask' must be a list of non-negative integers [start, length, ...] of even length")
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for start, length in zip(encoded[::2], encoded[1::2], strict=True):
        flat[start : start + length] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


PIE_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id", "mask")


def pie_bench(data, out_dir, prompt="instruction", types=None, skip_bad=False):
    """Manifest records of PIE-Bench and {mask path: mask image} to write."""
    mapping = read_json(os.path.join(data, "mapping_file.json"))
    records, masks, problems = [], {}, []
    for key, item in mapping.items():
        where = f"{os.path.join(data, 'mapping_file.json')} entry {key}"
        if not isinstance(item, dict) or any(not isinstance(item.get(f), (str, list)) for f in PIE_FIELDS):
            problems.append(f"{where}: needs fields {', '.join(PIE_FIELDS)}")
            continue
        if types is not None and str(item["editing_type_id"]) not in types:
            continue
        image = os.path.join(data, "annotation_images", item["image_path"])
        problem = check_image(image)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        with Image.open(image) as im:
            w, h = im.size
        try:
            mask = mask_decode(item["mask"], (h, w))
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        path = os.path.join(out_dir, "masks", f"{key}.png")
        masks[path] = Image.fromarray(mask * 255)
        strip = lambda s: s.replace("[", "").replace("]", "")  # noqa: E731
        text = item["editing_instruction"] if prompt == "instruction" else strip(item["editing_prompt"])
        records.append(dict(id=key, prompt=text, references=[image], task="edit", mask=path,
                            clip_text=strip(item["editing_prompt"]), group=str(item["editing_type_id"])))  # fmt: skip
    return records, masks, problems


# ----------------------------------------------------------------------------------------------
# Subjects200K


QUALITY = ("compositeStructure", "objectConsistency", "imageQuality")
PADDING = 8  # px around each panel (OminiControl's subject config crops with padding 8)


def split_pair(image, padding=PADDING):
    """(left panel, right panel) of a side-by-side pair with `padding` px around each panel."""
    w, h = image.size
    side = h - 2 * padding
    if side < 64 or w != 2 * side + 4 * padding:
        raise ValueError(f"image is {w}x{h}; a Subjects200K pair is 2 panels of (h - {2 * padding}) px with {padding} px padding")
    left = image.crop((padding, padding, side + padding, side + padding))
    right = image.crop((side + 3 * padding, padding, 2 * side + 3 * padding, side + padding))
    return left.convert("RGB"), right.convert("RGB")


def subjects200k(sources, out_dir, limit=1000, min_quality=5, collection=None, skip_bad=False):
    """Manifest records of the first `limit` pairs (file order) whose quality scores all reach min_quality;
    each pair's panels are written as PNGs as they are read (atomically; an existing one is kept)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInput("subjects200k needs pyarrow to read parquet files: pip install -r requirements-eval.txt") from None
    files = []
    for s in sources:
        files += sorted(glob.glob(os.path.join(glob.escape(s), "**", "*.parquet"), recursive=True)) if os.path.isdir(s) else [s]
    if not files:
        raise BadInput(f"no parquet files in {', '.join(sources)}")
    records, problems = [], []
    for path in files:
        try:
            table = pq.ParquetFile(check_file(path, "parquet file"))
            missing = {"image", "quality_assessment", "description"} - set(table.schema_arrow.names)
            if missing:
                raise ValueError(f"no column(s) {', '.join(sorted(missing))}")
            columns = sorted({"image", "quality_assessment", "description", "collection"} & set(table.schema_arrow.names))
            batches = table.iter_batches(batch_size=64, columns=columns)
        except Exception as e:
            problems.append(f"{path}: cannot read as a Subjects200K parquet file: {e}")
            continue
        row = -1
        for batch in batches:
            for item in batch.to_pylist():
                row += 1
                quality = item.get("quality_assessment") or {}
                if not all(isinstance(quality.get(k), (int, float)) and quality[k] >= min_quality for k in QUALITY):
                    continue
                if collection is not None and item.get("collection") != collection:
                    continue
                where = f"{path} row {row}"
                try:
                    prompt = (item.get("description") or {}).get("description_1")
                    if not isinstance(prompt, str) or not prompt.strip():
                        raise ValueError("no description.description_1")
                    data = (item.get("image") or {}).get("bytes")
                    if not data:
                        raise ValueError("no image bytes")
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                        left, right = split_pair(im)
                except Exception as e:
                    problems.append(f"{where}: {e}")
                    continue
                stem = f"{os.path.splitext(os.path.basename(path))[0]}_{row:06d}"
                ref, target = (os.path.join(out_dir, "images", f"{stem}_{k}.png") for k in ("reference", "target"))
                for p, im in ((ref, left), (target, right)):
                    if not os.path.isfile(p):
                        write_atomic(p, im)
                records.append(dict(id=stem, prompt=prompt.strip(), references=[ref], target=target, task="subject",
                                    group=item.get("collection") or ""))  # fmt: skip
                if len(records) == limit:
                    return records, problems
    return records, problems


# ----------------------------------------------------------------------------------------------


def parser():
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="benchmark", required=True)
    d = sub.add_parser("dreambench", help="google/dreambooth's dataset/ folder")
    d.add_argument("dataset", help="the dataset/ folder: subject folders and prompts_and_classes.txt")
    d.add_argument("--refs", type=int, default=1, help="images of each subject that condition (the first N, sorted) (default: 1)")
    d.add_argument("--token", default="", help="DreamBooth's unique token in every prompt, e.g. sks (default: none)")
    e = sub.add_parser("pie-bench", help="PnPInversion's data/ folder (mapping_file.json, annotation_images/)")
    e.add_argument("data", help="the data/ folder")
    e.add_argument("--prompt", choices=["instruction", "target"], default="instruction",
                   help="the prompt klein gets: editing_instruction or editing_prompt (default: instruction)")  # fmt: skip
    e.add_argument("--types", nargs="+", default=None, help="editing_type_id values to keep, 0 to 9 (default: all)")
    s = sub.add_parser("subjects200k", help="Yuanshi/Subjects200K's parquet files")
    s.add_argument("sources", nargs="+", help="parquet files, or folders searched for them (data/train-*.parquet)")
    s.add_argument("--limit", type=int, default=1000, help="pairs to keep, in file order (default: 1000)")
    s.add_argument("--min-quality", type=int, default=5, help="every quality score at least this, 0-5 (default: 5)")
    s.add_argument("--collection", default=None, help="keep only this collection, e.g. collection_2 (default: all)")
    for q in (d, e, s):
        q.add_argument("--out", required=True, help="output folder: manifest.jsonl (and masks/ or images/) (required)")
        q.add_argument("--skip-bad", action="store_true", help="skip bad or missing files instead of stopping")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        check_writable_folder(args.out, "--out")
        if args.benchmark == "dreambench":
            if not 1 <= args.refs <= 100:
                raise ValueError(f"--refs must be an integer in [1, 100], got {args.refs}")
            records, problems = dreambench(args.dataset, args.out, args.refs, args.token, args.skip_bad)
            masks = {}
        elif args.benchmark == "pie-bench":
            if args.types is not None and not set(args.types) <= {str(i) for i in range(10)}:
                raise ValueError(f"--types must be editing_type_id values 0 to 9, got {' '.join(args.types)}")
            records, masks, problems = pie_bench(args.data, args.out, args.prompt, args.types, args.skip_bad)
        else:
            if args.limit < 1:
                raise ValueError(f"--limit must be at least 1, got {args.limit}")
            if not 0 <= args.min_quality <= 5:
                raise ValueError(f"--min-quality must be in [0, 5], got {args.min_quality}")
            for src in args.sources:
                if not os.path.exists(src):
                    raise FileNotFoundError(f"parquet file or folder not found: {src}")
            records, problems = subjects200k(args.sources, args.out, args.limit, args.min_quality, args.collection, args.skip_bad)
            masks = {}
        if problems and not args.skip_bad:
            raise problems_error(problems, "files or entries")
        report_skipped(problems, "files or entries")
        if not records:
            raise BadInput("no example left to write")
        for path, mask in masks.items():
            write_atomic(path, mask)
        manifest = write_manifest(args.out, records)
    except (OSError, ValueError) as e:
        fail(e)
    digest = hashlib.sha1(open(manifest, "rb").read()).hexdigest()[:12]
    print(f"wrote {manifest}: {len(records)} examples (sha1 {digest})" + (f", {len(masks)} masks" if masks else ""))


if __name__ == "__main__":
    main()
