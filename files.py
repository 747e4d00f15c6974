"""Files and command lines, shared by every script: where a checkpoint is, how its tensors and JSON are
read and checked, how every output is written, which device runs, and how a bad option is reported.

Every config, index and checkpoint is read through check_file / read_json / field, so a bad one is one
error naming the file and the field; every output is written with write_atomic; every script's options
go through ArgumentParser and check_number, so a bad value is one `error:` line.

May import: the standard library, torch, safetensors, PIL, huggingface_hub. No module of this project.
"""

import argparse
import json
import math
import numbers
import os
import re
import stat
import sys
import tempfile

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save

# ----------------------------------------------------------------------------------------------
# Checkpoints: local files and folders, or hub repositories


def resolve_component(source, subfolder, hub_files, download=None):
    """A local file or folder for one pipeline component: `subfolder` of a repository folder if there is one
    (None: the repository itself); a hub repo id downloads only `hub_files` (with `download`, default
    huggingface_hub.snapshot_download)."""
    source = str(source)
    if not os.path.exists(source):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.startswith(".") or source.endswith(".safetensors"):
            raise FileNotFoundError(f"{source} is neither an existing folder or file nor a hub repo id (owner/name)")
        if download is None:
            from huggingface_hub import snapshot_download as download
        try:
            source = download(source, allow_patterns=hub_files)
        except Exception as e:
            raise FileNotFoundError(f"{source} is no local path, and downloading it as a hub repo failed: {e}") from e
    sub = os.path.join(source, subfolder or "")
    return sub if subfolder and os.path.isdir(sub) else source


def diffusers_weight_files(folder, stem):
    """The safetensors files of a diffusers/transformers component: `stem`.safetensors, or its shards."""
    index = os.path.join(folder, f"{stem}.safetensors.index.json")
    if os.path.exists(index):
        shards = field(read_json(index), "weight_map", index, dict).values()
        if not shards or not all(isinstance(n, str) and n == os.path.basename(n) not in ("", ".", "..") for n in shards):
            raise ValueError(f"{index}: field 'weight_map' must map tensor names to shard file names in {folder}")
        files = [os.path.join(folder, n) for n in sorted(set(shards))]
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
        return files
    single = os.path.join(folder, f"{stem}.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(f"no {stem}.safetensors (or its index) in {folder}")
    return [single]


def read_safetensors(paths):
    """Memory-mapped tensors of one or more safetensors files (no copy until used)."""
    sd = {}
    for p in paths:
        check_file(p, "safetensors file")
        try:
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as e:
            raise ValueError(f"cannot read safetensors file {p}: {e}") from None
    return sd


def load_into(model, sd, dtype=None, device=None, file_name=None):
    """Assign a state dict to a meta-device model, moving each tensor to `device` and casting floating-point
    ones to `dtype` (None: keep). A mismatch is one ValueError naming every missing, unexpected and mis-shaped
    key, as the file names it (file_name maps our key to the file's, when they differ). The parameters
    come out frozen (requires_grad False): a plain forward builds no autograd graph over its
    activations, and training unfreezes only what it trains (train.py's LoRA)."""
    name = file_name or (lambda k: k)
    expected = model.state_dict()
    missing = sorted(name(k) for k in set(expected) - set(sd))
    unexpected = sorted(name(k) for k in set(sd) - set(expected))
    shapes = sorted(f"{name(k)}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in sd and sd[k].shape != v.shape)
    kinds = sorted(f"{name(k)}: {sd[k].dtype}" for k, v in expected.items() if k in sd and sd[k].is_floating_point() != v.is_floating_point())
    if missing or unexpected or shapes or kinds:
        problems = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes), ("of the wrong dtype", kinds))
        parts = [f"{n}: {', '.join(v[:8])}" + (f" ({len(v)} in all)" if len(v) > 8 else "") for n, v in problems if v]
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    sd = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Reading and checking files


REQUIRED = object()
KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object",
         list: "a non-empty list of integers"}  # fmt: skip


def check_file(path, what="file"):
    """path, if it is a regular file. Checked with stat before anything opens it: a FIFO would block
    forever, a device could be endless. Missing: FileNotFoundError; anything else: ValueError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a FIFO, device or socket)")
    return path


def read_json(path, kind=dict):
    """The JSON object (kind=dict) or array (kind=list) in a file; anything else is one ValueError naming it."""
    check_file(path, "JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} must hold a JSON {'object' if kind is dict else 'array'}, not {type(value).__name__}")
    return value


def field(raw, name, where, kind=int, default=REQUIRED, positive=True):
    """raw[name] checked, `where` naming the file: kind int (not a bool), float (finite; an int will do),
    bool, str, dict, or list (non-empty, of ints, returned as a tuple); numbers and list items > 0 if
    positive. Missing or null: the default, or an error without one."""
    value = raw.get(name)
    if value is None:
        if default is REQUIRED:
            raise ValueError(f"{where}: missing field {name!r}")
        return default
    items = list(value) if kind is list and isinstance(value, (list, tuple)) and value else [value]
    item_kind = int if kind is list else kind
    ok = kind is not list or isinstance(value, (list, tuple))
    for v in items:
        if item_kind in (int, float):
            ok &= isinstance(v, (int, float) if item_kind is float else int) and not isinstance(v, bool)
            ok = ok and math.isfinite(v) and (v > 0 or not positive)
        else:
            ok &= isinstance(v, item_kind)
    if not ok:
        sign = " > 0" if positive and item_kind in (int, float) else ""
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise ValueError(f"{where}: field {name!r} must be {KINDS[kind]}{sign}, got {shown}")
    return tuple(value) if kind is list else value


def load_image(path):
    """A PIL image, fully read; a missing, special or unreadable file is one error naming it."""
    check_file(path, "image")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Writing: atomically, and only where it can succeed


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # what outputs may be


def image_format(path):
    """PIL's format name for an output image's extension (.png, .jpg, .jpeg, .webp); another is a ValueError."""
    fmt = IMAGE_FORMATS.get(os.path.splitext(str(path))[1].lower())
    if fmt is None:
        raise ValueError(f"unknown image format for {path}; use .png, .jpg or .webp")
    return fmt


def check_writable(path, what="output"):
    """path can be created or replaced: not a folder, and its folder exists and is writable. The one
    rule for every output: a missing folder is an error (a typo in it would go unnoticed), except the
    output folder a script is given (check_writable_folder), which it creates."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder")
    folder = os.path.dirname(path)
    if not os.path.exists(folder):
        raise ValueError(f"cannot write {what} {path}: folder {folder} does not exist")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {path}: {folder} is not a writable folder")


def check_writable_folder(path, what="--out-dir"):
    """An output folder: an existing writable folder, or one whose parent exists (it is created)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} exists and is not a folder")
    if os.path.isdir(path):
        check_writable(os.path.join(path, "x"), what)
    else:
        check_writable(os.path.abspath(path), what)


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path, content, metadata=None):
    """Write content to a temporary file next to path, then rename it over path: a reader, or a process
    killed at any instant, sees the old file or the new one, never half of one.

    content: bytes; str (UTF-8 text); a PIL image (in the format of path's extension); a dict of
    tensors (a safetensors file, with string `metadata`); or a function writing to the path it is given.
    The file gets the mode any new file gets (0666 less the umask; mkstemp would leave 0600). A kill
    leaves at most a stale `.NAME.*.tmp`, which remove_stale_temps deletes.
    """
    if isinstance(content, dict):  # serialized here: safetensors' save_file renames a temporary file of its own
        content = save(content, metadata=metadata)
    if isinstance(content, Image.Image):
        fmt = image_format(path)
        write = lambda tmp: content.save(tmp, format=fmt)  # noqa: E731
    elif isinstance(content, (bytes, str)):
        mode, encoding = ("wb", None) if isinstance(content, bytes) else ("w", "utf-8")

        def write(tmp):
            with open(tmp, mode, encoding=encoding) as f:
                f.write(content)
    else:
        write = content
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


STALE_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # write_atomic's temporary names


def remove_stale_temps(folder):
    """Delete the temporary files write_atomic leaves in folder when its process is killed mid-write."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if STALE_TEMP.fullmatch(name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------
# Devices and command lines


# --dtype: our short names and torch's
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # fmt: skip


def resolve_device(device=None, dtype=None):
    """(torch.device, dtype) with the defaults: cuda and bf16 when there is a GPU, else cpu and fp32.
    dtype may be a torch dtype or one of DTYPES' names. A device this machine lacks is one ValueError."""
    name = device
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "mps":  # refused here, not by a traceback deep in the first forward
        raise ValueError(f"device {name}: not supported (klein's RoPE tables are float64, which MPS lacks); use cpu or cuda")
    available = {"cpu": True, "cuda": torch.cuda.is_available()}
    if device.type not in available:
        raise ValueError(f"device {name}: not supported; use cpu, cuda or cuda:N")
    if not available[device.type]:
        raise ValueError(f"device {name}: no {device.type.upper()} device here (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def check_number(option, value, low=None, high=None, integer=False, low_open=False):
    """value is a finite number (an integer if asked) in [low, high] ((low, high] if low_open)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{option} must be {kind}{' ' + bounds if bounds else ''}, got {value!r}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description's own layout kept; each option's default shown once: the help's own "(default:
    ...)" where it says one, else argparse's; a required option says so."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text or "required" in text:
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: {'off' if action.default is False else 'none' if action.default is None else '%(default)s'})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that shows every default once and reports a bad option as one line, `error: ...`, exit
    status 1: the same status as every other bad value (fail)."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter} | kwargs)

    def error(self, message):
        self.exit(1, f"error: {message} (see --help)\n")


def fail(e, options=("device", "dtype")):
    """A checked error, as the one `error:` line a script ends with (exit status 1). A library error
    about one of `options` (resolve_device's "device ...", "dtype ...") names the option: --device."""
    message = str(e)
    if message.split(" ", 1)[0] in options:
        message = "--" + message
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
