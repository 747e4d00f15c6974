"""Training data as other klein LoRA trainers hold it, converted to this project's manifest in one command.

    python layouts.py ai-toolkit data/target --control data/control data/control2 --out train.jsonl
    python layouts.py musubi data/edit.jsonl --out train.jsonl
    python layouts.py hf data/my_dataset --cond-image-column input --caption-column prompt --out train.jsonl

then `python train.py --data train.jsonl ...` (or `python data.py train.jsonl ...` to cache it first). The
manifest names the images where they are (paths relative to it); only images stored inside a Hugging Face
dataset's parquet files are written out, next to it (--images). Every reference is kept, in its order.

The layouts, as each trainer's own code reads them:
  ai-toolkit (ostris/ai-toolkit, toolkit/config_modules.py DatasetConfig, toolkit/data_loader.py,
  toolkit/dataloader_mixins.py): a dataset's `folder_path` is walked recursively (hidden folders and
  `_controls` folders skipped) for .jpg .jpeg .png .webp (any case); the caption of img.png is img.txt beside
  it (`caption_ext`, default .txt; without one the prompt is empty, as there); its references are
  <folder>/img.jpg|.jpeg|.png|.webp (the first that exists) for each folder of `control_path` (a path or a
  list; the UI's `control_path_1`, `control_path_2`, `control_path_3` become that list), in that order; a
  folder without one is passed over, as there. Give the folders in that order: --control C1 [C2 C3].
  musubi-tuner (kohya-ss/musubi-tuner, src/musubi_tuner/dataset/datasources.py ImageJsonlDatasource,
  docs/dataset_config.md "Image Dataset with Control Images"): one JSON object a line, `image_path` (or
  `image_path_0`), `caption`, and `control_path` or `control_path_0`, `control_path_1`, ... (ordered by their
  number, so control_path_0000 is 0); a relative path is read from the working directory, else from the
  JSONL's folder.
  Hugging Face dataset (huggingface/diffusers examples/dreambooth/train_dreambooth_lora_flux2_klein_img2img.py):
  `load_dataset(--dataset_name)["train"]`, the target in --image_column (default image), the reference in
  --cond_image_column, the prompt in --caption_column. Here a local copy only (`hf download --repo-type
  dataset NAME --local-dir DIR` fetches one): a folder of parquet files, or an image folder whose
  metadata.jsonl names file_name, cond_file_name, ... (datasets' ImageFolder). --cond-image-column takes
  several columns, and a column holding a list of images, for more references. Needs the `datasets` library
  (pip install datasets), imported only for this layout.

The task: --task edit|subject for every example, or inferred per example: exactly one reference, of the
target's size in pixels, is an edit; anything else is subject-driven. Every example is checked as data.py
checks a manifest line (images exist, are readable, klein accepts their size); bad entries are reported by
file and line (row, image), with a count, and --skip-bad skips them.

May import: files, data; datasets (the hf layout only).
"""

import io
import json
import os
import tempfile

from PIL import Image

from data import ManifestError, check_image, json_object, report_bad
from files import ArgumentParser, check_file, check_writable, fail, write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # ai-toolkit's image_extensions / img_ext_list
LAYOUTS = ("ai-toolkit", "musubi", "hf")

# ----------------------------------------------------------------------------------------------
# Readers: each yields (where, record, problem): where names the entry (file and line, row or image),
# record is {prompt, target, references} with absolute paths, problem None or why the entry is bad.


def read_ai_toolkit(folder, controls, caption_ext=".txt"):
    """An ai-toolkit image folder with its control folders (references) and same-name caption files."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such image folder: {folder}")
    for c in controls:
        if not os.path.isdir(c):
            raise FileNotFoundError(f"no such control folder: {c}")
    caption_ext = caption_ext if caption_ext.startswith(".") else "." + caption_ext
    images = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if os.path.basename(root) != "_controls":
            images += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    for target in sorted(os.path.abspath(p) for p in images):
        stem = os.path.splitext(os.path.basename(target))[0]
        refs = [found for c in controls if (found := first_existing(c, stem)) is not None]
        caption = os.path.splitext(target)[0] + caption_ext
        prompt = ""
        if os.path.isfile(caption):
            try:
                with open(caption, encoding="utf-8") as f:
                    prompt = f.read().strip()
            except UnicodeDecodeError:
                yield target, None, f"caption {caption} is not UTF-8 text"
                continue
        problem = None if refs else f"no control image {stem}.* ({'/'.join(IMAGE_EXTENSIONS)}) in {', '.join(controls)}"
        yield target, dict(prompt=prompt, target=target, references=refs), problem


def first_existing(folder, stem):
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(folder, stem + ext)
        if os.path.exists(path):
            return os.path.abspath(path)
    return None


def read_musubi(path):
    """A musubi-tuner image JSONL with control images."""
    check_file(path, "musubi-tuner JSONL")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    for line, text in enumerate(lines, start=1):
        if text.strip():
            record, problem = musubi_record(text, folder)
            yield f"{path} line {line}", record, problem


def musubi_record(text, folder):
    item, problem = json_object(text)
    if problem:
        return None, problem
    if "control_path" in item:  # musubi renames it control_path_0
        if "control_path_0" in item:
            return None, "both control_path and control_path_0"
        item["control_path_0"] = item.pop("control_path")
    numbered = [k for k in item if k.startswith("control_path_")]
    if not all(k[len("control_path_"):].isdigit() for k in numbered):
        return None, f"control keys must be control_path or control_path_<number>, got {', '.join(numbered)}"
    target = item.get("image_path", item.get("image_path_0"))
    fields = [("image_path", target), ("caption", item.get("caption"))]
    fields += [(k, item[k]) for k in sorted(numbered, key=lambda k: int(k[len("control_path_"):]))]
    for name, value in fields:
        if not isinstance(value, str):
            return None, f"missing field {name!r}" if value is None else f"field {name!r} must be a string, got {type(value).__name__}"
    if not numbered:
        return None, "no control_path: an example needs at least one reference image"
    paths = [musubi_path(v, folder) for _, v in [fields[0]] + fields[2:]]
    return dict(prompt=fields[1][1], target=paths[0], references=paths[1:]), None


def musubi_path(path, folder):
    """musubi-tuner's rule: a relative path from the working directory, else from the JSONL's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(folder, path)


def read_hf(folder, cond_columns, caption_column, image_column="image", split="train", images=None):
    """A local Hugging Face dataset (parquet files or an image folder) as diffusers' klein img2img script
    reads it. Images stored in the files are written to `images` (one file each, their bytes as stored)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("the hf layout needs the datasets library: pip install datasets") from None
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such dataset folder: {folder} (a local copy: hf download --repo-type dataset NAME --local-dir DIR)")
    with tempfile.TemporaryDirectory() as cache:  # load_dataset's Arrow cache: gone with the conversion
        try:
            ds = datasets.load_dataset(folder, split=split, cache_dir=cache)
        except Exception as e:
            raise ValueError(f"cannot read {folder} as a dataset (parquet files or an image folder), split {split!r}: {e}") from None
        columns = [image_column, *cond_columns, caption_column]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise ValueError(f"{folder}: no column {', '.join(map(repr, missing))}; its columns: {', '.join(ds.column_names)}")
        for c in [image_column, *cond_columns]:
            ds = ds.cast_column(c, undecoded(ds.features[c], c, datasets))
        for row, item in enumerate(ds.select_columns(columns)):
            where = f"{folder} split {split} row {row}"
            try:
                target = hf_image(item[image_column], images, f"{row:06d}.target")
                refs = []
                for c in cond_columns:
                    values = item[c] if isinstance(item[c], list) else [item[c]]
                    refs += [hf_image(v, images, f"{row:06d}.{c}.{k}") for k, v in enumerate(values)]
            except ValueError as e:
                yield where, None, str(e)
                continue
            caption = item[caption_column]
            if caption is not None and not isinstance(caption, str):
                yield where, None, f"column {caption_column!r} must hold text, got {type(caption).__name__}"
                continue
            problem = None if refs else f"no image in column(s) {', '.join(cond_columns)}"
            yield where, dict(prompt=caption or "", target=target, references=refs), problem


def undecoded(feature, column, datasets):
    """An image feature (or a list of them) that gives {bytes, path} instead of a decoded image."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    inner = getattr(feature, "feature", None)
    if inner is not None and isinstance(inner, datasets.Image):
        return type(feature)(datasets.Image(decode=False))
    raise ValueError(f"column {column!r} holds {feature}, not images")


def hf_image(value, images, name):
    """The path of one image of a dataset row: its file if the dataset names one that exists (an image
    folder), else its stored bytes written to images/name.<its format>."""
    if value is None:
        raise ValueError(f"no image for {name.split('.', 1)[1]}")
    data, path = value.get("bytes"), value.get("path")
    if data is None:
        if path and os.path.isfile(path):
            return os.path.abspath(path)
        raise ValueError(f"image {path} not found")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception as e:
        raise ValueError(f"unreadable image bytes for {name.split('.', 1)[1]}: {e}") from None
    ext = os.path.splitext(path or "")[1].lower()
    ext = ext if ext in IMAGE_EXTENSIONS else "." + (fmt or "png").lower().replace("jpeg", "jpg")
    out = os.path.join(images, name + ext)
    os.makedirs(images, exist_ok=True)
    write_atomic(out, data)
    return out


# ----------------------------------------------------------------------------------------------
# The manifest


def infer_task(target, references):
    """edit: exactly one reference, of the target's size in pixels (an aligned before/after pair); else subject."""
    if len(references) != 1:
        return "subject"
    with Image.open(target) as a, Image.open(references[0]) as b:
        return "edit" if a.size == b.size else "subject"


def manifest_lines(entries, source, task=None, skip_bad=False):
    """The manifest records of the readers' entries, each checked like a manifest line; the bad ones
    raise one ManifestError naming each and counting them (skip_bad: skipped, counted on stderr)."""
    records, errors = [], []
    for where, record, problem in entries:
        if problem is None:
            problem = next((p for p in map(check_image, [record["target"], *record["references"]]) if p), None)
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        records.append(record | dict(task=task or infer_task(record["target"], record["references"])))
    report_bad(errors, source, skip_bad, "entries", "entry" if len(errors) == 1 else "entries")
    if not records:
        raise ManifestError(f"{source} has no usable examples")
    return records


def write_manifest(records, out):
    """The manifest at out, atomically; image paths relative to its folder."""
    folder = os.path.dirname(os.path.abspath(out))
    rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
    lines = [json.dumps(dict(prompt=r["prompt"], target=rel(r["target"]), references=[rel(p) for p in r["references"]],
                             task=r["task"])) + "\n" for r in records]  # fmt: skip
    write_atomic(out, "".join(lines))


def convert(layout, source, out, task=None, skip_bad=False, **options):
    """Read `source` in `layout` (ai-toolkit: controls, caption_ext; hf: cond_columns, caption_column,
    image_column, split, images) and write the manifest `out`. Returns the records written."""
    if layout == "ai-toolkit":
        entries = read_ai_toolkit(source, options["controls"], options.get("caption_ext", ".txt"))
    elif layout == "musubi":
        entries = read_musubi(source)
    elif layout == "hf":
        images = options.get("images") or os.path.splitext(os.path.abspath(out))[0] + "-images"
        entries = read_hf(source, options["cond_columns"], options["caption_column"], options.get("image_column", "image"),
                          options.get("split", "train"), images)  # fmt: skip
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    records = manifest_lines(entries, source, task, skip_bad)
    write_manifest(records, out)
    return records


def main(argv=None):
    p = ArgumentParser(description="Convert ai-toolkit folders, a musubi-tuner JSONL or a local Hugging Face dataset "
                                   "into a training manifest (train.py --data, data.py).",
                       epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[1].splitlines()[:3]))  # fmt: skip
    sub = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT", help=", ".join(LAYOUTS))
    a = sub.add_parser("ai-toolkit", help="an image folder, its control folders, same-name .txt captions")
    a.add_argument("folder", help="the dataset's folder_path: target images and their captions")
    a.add_argument("--control", nargs="+", required=True, metavar="FOLDER",
                   help="control_path folder(s), in order (control_path_1, _2, _3): reference k is in folder k")
    a.add_argument("--caption-ext", default=".txt", help="caption_ext")
    m = sub.add_parser("musubi", help="a musubi-tuner image JSONL: image_path, caption, control_path(_0, _1, ...)")
    m.add_argument("jsonl", help="the dataset's image_jsonl_file")
    h = sub.add_parser("hf", help="a local Hugging Face dataset: parquet files or an image folder (needs datasets)")
    h.add_argument("folder", help="the local copy of --dataset_name")
    h.add_argument("--image-column", "--image_column", default="image", help="the target image's column")
    h.add_argument("--cond-image-column", "--cond_image_column", nargs="+", required=True, metavar="COLUMN",
                   help="the reference image column(s), in order; a column may hold a list of images")
    h.add_argument("--caption-column", "--caption_column", required=True, help="the prompt's column")
    h.add_argument("--split", default="train", help="the split to read")
    h.add_argument("--images", default=None, help="folder for the images stored in the dataset's files (default: OUT's name + -images)")
    for s in (a, m, h):
        s.add_argument("--out", required=True, help="the manifest to write (.jsonl); its folder must exist")
        s.add_argument("--task", choices=["edit", "subject"], default=None,
                       help="every example's task (default: per example, edit for one reference of the target's size, else subject)")
        s.add_argument("--skip-bad", action="store_true", help="skip bad entries (counted) instead of stopping")
    args = p.parse_args(argv)
    try:
        check_writable(args.out, "--out")
        source = args.jsonl if args.layout == "musubi" else args.folder
        options = {}
        if args.layout == "ai-toolkit":
            options = dict(controls=args.control, caption_ext=args.caption_ext)
        elif args.layout == "hf":
            options = dict(cond_columns=args.cond_image_column, caption_column=args.caption_column, image_column=args.image_column,
                           split=args.split, images=args.images)  # fmt: skip
        records = convert(args.layout, source, args.out, args.task, args.skip_bad, **options)
    except (ValueError, OSError) as e:
        fail(e)
    tasks = {t: sum(r["task"] == t for r in records) for t in ("edit", "subject")}
    refs = sum(len(r["references"]) for r in records)
    empty = sum(not r["prompt"] for r in records)
    print(f"wrote {args.out}: {len(records)} examples ({tasks['edit']} edit, {tasks['subject']} subject), {refs} references"
          + (f"; {empty} with an empty prompt" if empty else ""))


if __name__ == "__main__":
    main()
