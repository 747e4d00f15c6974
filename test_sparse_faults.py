"""Faults and bad input for train.py, data.py and selection.py.

- A table of bad inputs: each one exits non-zero with exactly one line starting `error:`, no traceback,
  and leaves no new file. The CLIs' main(argv) run in this process (a subprocess pays seconds of imports
  per case); a few true subprocesses check what only a real process shows (tracebacks, FIFOs, WORLD_SIZE).
- Kills: train.py and data.py are SIGKILLed at every write point (a temporary file complete, renamed into
  place, a log line appended; `arm` wraps the writers in the child) and at random instants, in forked
  children; running the same command again (train.py with --resume) must end with the same files as an
  uninterrupted run.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import selection
import train
from files import STALE_TEMP, write_atomic
from tiny import write_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
CLIS = {"train": train.main, "data": data.main, "selectors": selection.main}


def train_args(root, data_path, out, *extra):
    return ["--model", str(root), "--data", str(data_path), "--out", str(out), "--steps", "4", "--save-every", "2",
            "--rank", "2", "--lr", "2e-3", "--warmup", "2", "--keep-all-prob", "0.5", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def fx(klein, tmp_path_factory):
    """Inputs for the table: the tiny repository, its cache, a finished 4-step run, a reference image."""
    root, manifest, cache = klein
    base = tmp_path_factory.mktemp("faults")
    run = base / "run"
    train.main(train_args(root, cache, run))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(base / "ref.png")
    return dict(root=root, manifest=manifest, cache=cache, run=run, base=base)


# ----------------------------------------------------------------------------------------------
# Bad inputs: what each case changes


def repo_with(rel, content):
    """Setup: a copy of the tiny repository (files symlinked) at {case}/repo with file rel replaced by
    content: a JSON value, bytes, or FIFO."""

    def setup(fx, case):
        shutil.copytree(fx["root"], case / "repo", copy_function=os.symlink, ignore=shutil.ignore_patterns("cache", "data"))
        path = case / "repo" / rel
        if path.is_symlink() or path.exists():
            path.unlink()
        if content == "FIFO":
            os.mkfifo(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())

    return setup


def config(rel, **change):
    """repo_with: the JSON file rel with fields changed (None removes one)."""

    def setup(fx, case):
        raw = json.loads((fx["root"] / rel).read_text()) | change
        repo_with(rel, {k: v for k, v in raw.items() if v is not None})(fx, case)

    return setup


def sharded(component, stem, weight_map):
    """repo_with: component's weights named by an index file whose weight_map is weight_map."""

    def setup(fx, case):
        repo_with(f"{component}/{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})(fx, case)

    return setup


def run_with(change):
    """Setup: a copy of the finished run at {case}/run, its checkpoint passed through change(path)."""

    def setup(fx, case):
        shutil.copytree(fx["run"], case / "run")
        change(case / "run" / "checkpoint.pt")

    return setup


def edit_checkpoint(edit):
    def change(path):
        state = torch.load(path, weights_only=True)
        torch.save(edit(state), path)

    return change


class Payload:
    def __reduce__(self):  # unpickling would call os.getcwd(): weights_only must refuse it
        return (os.getcwd, ())


def first_lora(state, value):
    state["lora"][next(iter(state["lora"]))] = value
    return state


def cache_with(change):
    """Setup: a copy of the cache at {case}/cache, then change(folder)."""

    def setup(fx, case):
        shutil.copytree(fx["cache"], case / "cache")
        change(case / "cache")

    return setup


def index_is(value):
    return cache_with(lambda c: (c / "index.json").write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode()))


def index_entry(**change):
    def edit(c):
        index = json.loads((c / "index.json").read_text())
        index[0] |= change
        (c / "index.json").write_text(json.dumps(index))

    return cache_with(edit)


def truncate_latents(c):
    path = c / "latents" / "00000001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def nan_latents(c):
    path = c / "latents" / "00000001.safetensors"
    z = load_file(path)
    z["target"][0, 0, 0] = float("nan")
    save_file(z, path)


def manifest_text(text):
    """Setup: {case}/m.jsonl holding text (str or bytes); images from the tiny repository's data."""

    def setup(fx, case):
        img = fx["root"] / "data" / "img"
        body = text.replace("IMG", str(img)) if isinstance(text, str) else text
        (case / "m.jsonl").write_bytes(body.encode() if isinstance(body, str) else body)

    return setup


def good_line(**change):
    return json.dumps(dict(prompt="p", target="IMG/target0.png", references=["IMG/ref0.png"], task="edit") | change) + "\n"


def fifo(name):
    return lambda fx, case: os.mkfifo(case / name)


def files(name, content):
    return lambda fx, case: (case / name).write_bytes(content)


def mkdir(name):
    return lambda fx, case: (case / name).mkdir()


def both(*setups):
    def setup(fx, case):
        for s in setups:
            s(fx, case)

    return setup


def image(name, w, h):
    return lambda fx, case: Image.new("RGB", (w, h), "white").save(case / name)


T = ["--model", "{root}", "--data", "{cache}", "--out", "{case}/out", "--steps", "2"]  # a good train.py call
TR = ["--model", "{root}", "--data", "{cache}", "--out", "{case}/run", "--steps", "4", "--save-every", "2",
      "--rank", "2", "--lr", "2e-3", "--warmup", "2", "--keep-all-prob", "0.5", "--resume"]  # resumes fx's run  # fmt: skip
TM = ["--model", "{case}/repo", "--data", "{cache}", "--out", "{case}/out", "--steps", "2"]  # a changed repository
D = ["{manifest}", "--model", "{root}", "--out", "{case}/out"]  # a good data.py call
DM = ["{manifest}", "--model", "{case}/repo", "--out", "{case}/out"]
S = ["{base}/ref.png", "--out", "{case}/sel.png"]  # a good selection.py call
TE, TOK, VAE, DIT = "text_encoder/config.json", "tokenizer/tokenizer.json", "vae/config.json", "transformer/config.json"

# (id, cli, argv, setup, environment)
CASES = [
    # train.py: hyperparameters
    ("steps-0", "train", T + ["--steps", "0"], None, None),
    ("steps-negative", "train", T + ["--steps", "-3"], None, None),
    ("steps-huge", "train", T + ["--steps", "1000000000000"], None, None),
    ("steps-not-int", "train", T + ["--steps", "two"], None, None),
    ("rank-0", "train", T + ["--rank", "0"], None, None),
    ("alpha-0", "train", T + ["--alpha", "0"], None, None),
    ("alpha-nan", "train", T + ["--alpha", "nan"], None, None),
    ("alpha-negative", "train", T + ["--alpha", "-1"], None, None),
    ("lr-inf", "train", T + ["--lr", "inf"], None, None),
    ("lr-0", "train", T + ["--lr", "0"], None, None),
    ("lr-negative", "train", T + ["--lr=-1e-4"], None, None),
    ("lr-nan", "train", T + ["--lr", "nan"], None, None),
    ("warmup-negative", "train", T + ["--warmup", "-2"], None, None),
    ("max-grad-norm-negative", "train", T + ["--max-grad-norm", "-1"], None, None),
    ("max-grad-norm-nan", "train", T + ["--max-grad-norm", "nan"], None, None),
    ("max-grad-norm-0", "train", T + ["--max-grad-norm", "0"], None, None),
    ("weight-decay-negative", "train", T + ["--weight-decay", "-1"], None, None),
    ("weight-decay-nan", "train", T + ["--weight-decay", "nan"], None, None),
    ("keep-range-reversed", "train", T + ["--keep-range", ".3", ".1"], None, None),
    ("keep-range-0", "train", T + ["--keep-range", "0", ".2"], None, None),
    ("keep-range-nan", "train", T + ["--keep-range", "nan", ".2"], None, None),
    ("keep-all-prob-1.5", "train", T + ["--keep-all-prob", "1.5"], None, None),
    ("keep-all-prob-nan", "train", T + ["--keep-all-prob", "nan"], None, None),
    ("batch-size-0", "train", T + ["--batch-size", "0"], None, None),
    ("grad-accum-0", "train", T + ["--grad-accum", "0"], None, None),
    ("save-every-0", "train", T + ["--save-every", "0"], None, None),
    ("seed-negative", "train", T + ["--seed", "-1"], None, None),
    ("train-max-area-100", "train", T + ["--max-area", "100"], None, None),
    ("targets-match-nothing", "train", T + ["--targets", "nothing.*"], None, None),
    ("weights-fp4", "train", T + ["--weights", "fp4"], None, None),
    ("targets-empty", "train", T + ["--targets", ""], None, None),
    ("no-model", "train", T[2:], None, None),
    ("unknown-option", "train", T + ["--bogus"], None, None),
    # train.py: --out and --resume
    ("out-is-a-file", "train", T, files("out", b"x"), None),
    ("out-holds-a-lora", "train", T, both(mkdir("out"), files("out/pytorch_lora_weights.safetensors", b"x")), None),
    ("out-holds-a-lora-resume", "train", T + ["--resume"], both(mkdir("out"), files("out/pytorch_lora_weights.safetensors", b"x")), None),
    ("resume-nothing", "train", T + ["--resume"], None, None),
    ("run-exists-no-resume", "train", TR[:-1], run_with(lambda p: None), None),
    ("resume-steps-below", "train", TR + ["--steps", "2"], run_with(lambda p: None), None),
    ("resume-other-rank", "train", TR + ["--rank", "4"], run_with(lambda p: None), None),
    ("resume-other-weights", "train", TR + ["--weights", "int8"], run_with(lambda p: None), None),
    # train.py: checkpoint.pt
    ("checkpoint-truncated", "train", TR + ["--steps", "6"], run_with(lambda p: p.write_bytes(p.read_bytes()[:300])), None),
    ("checkpoint-empty", "train", TR + ["--steps", "6"], run_with(lambda p: p.write_bytes(b"")), None),
    ("checkpoint-random", "train", TR + ["--steps", "6"], run_with(lambda p: p.write_bytes(np.random.default_rng(1).bytes(999))), None),
    ("checkpoint-pickle-payload", "train", TR + ["--steps", "6"], run_with(lambda p: torch.save({"step": Payload()}, p)), None),
    ("checkpoint-folder", "train", TR + ["--steps", "6"], run_with(lambda p: p.unlink() or p.mkdir()), None),
    ("checkpoint-fifo", "train", TR + ["--steps", "6"], run_with(lambda p: p.unlink() or os.mkfifo(p)), None),
    ("checkpoint-not-dict", "train", TR + ["--steps", "6"], run_with(lambda p: torch.save([1, 2], p)), None),
    ("checkpoint-no-lora", "train", TR + ["--steps", "6"], run_with(edit_checkpoint(lambda s: s | {"lora": None})), None),
    ("checkpoint-step-str", "train", TR + ["--steps", "6"], run_with(edit_checkpoint(lambda s: s | {"step": "two"})), None),
    ("checkpoint-wrong-shape", "train", TR + ["--steps", "6"], run_with(edit_checkpoint(lambda s: first_lora(s, torch.zeros(3)))), None),
    ("checkpoint-nan", "train", TR + ["--steps", "6"],
     run_with(edit_checkpoint(lambda s: first_lora(s, torch.full_like(next(iter(s["lora"].values())), float("nan"))))), None),
    ("checkpoint-optimizer-shape", "train", TR + ["--steps", "6"],
     run_with(edit_checkpoint(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)) or s)), None),
    # train.py: --data (a cache folder or a manifest)
    ("data-missing", "train", T[:3] + ["{case}/nowhere"] + T[4:], None, None),
    ("data-fifo", "train", T[:3] + ["{case}/fifo"] + T[4:], fifo("fifo"), None),
    ("index-empty-list", "train", T[:3] + ["{case}/cache"] + T[4:], index_is([]), None),
    ("index-object", "train", T[:3] + ["{case}/cache"] + T[4:], index_is({}), None),
    ("index-bad-json", "train", T[:3] + ["{case}/cache"] + T[4:], index_is(b"[{'latents': "), None),
    ("index-not-utf8", "train", T[:3] + ["{case}/cache"] + T[4:], index_is(b'["\xff\xfe"]'), None),
    ("index-target-str", "train", T[:3] + ["{case}/cache"] + T[4:], index_entry(target="x"), None),
    ("index-escapes-folder", "train", T[:3] + ["{case}/cache"] + T[4:], index_entry(latents="../../x.safetensors"), None),
    ("index-task-unknown", "train", T[:3] + ["{case}/cache"] + T[4:], index_entry(task="style"), None),
    ("index-grid-mismatch", "train", T[:3] + ["{case}/cache"] + T[4:], index_entry(target=[9, 9]), None),
    ("latents-truncated", "train", T[:3] + ["{case}/cache"] + T[4:], cache_with(truncate_latents), None),
    ("latents-nan", "train", T[:3] + ["{case}/cache"] + T[4:], cache_with(nan_latents), None),
    ("manifest-bad-line", "train", T[:3] + ["{case}/m.jsonl"] + T[4:], manifest_text(good_line() + good_line(task="style")), None),
    # train.py: the transformer's files
    ("dit-heads-0", "train", TM, config(DIT, num_attention_heads=0), None),
    ("dit-heads-str", "train", TM, config(DIT, num_attention_heads="two"), None),
    ("dit-axes-sum", "train", TM, config(DIT, axes_dims_rope=[2, 2, 2, 2]), None),
    ("dit-axes-odd", "train", TM, config(DIT, axes_dims_rope=[3, 3, 1, 1]), None),
    ("dit-config-list", "train", TM, repo_with(DIT, [1, 2]), None),
    ("dit-config-bad-json", "train", TM, repo_with(DIT, b'{"num_layers": 2,'), None),
    ("dit-config-no-layers", "train", TM, config(DIT, num_layers=None), None),
    ("dit-config-fifo", "train", TM, repo_with(DIT, "FIFO"), None),
    ("dit-mlp-ratio-nan", "train", TM, config(DIT, mlp_ratio=float("nan")), None),
    ("dit-shard-index-no-map", "train", TM,
     both(repo_with("transformer/diffusion_pytorch_model.safetensors.index.json", {"metadata": {}}),
          lambda fx, case: (case / "repo/transformer/diffusion_pytorch_model.safetensors").unlink()), None),  # fmt: skip
    ("dit-shard-index-list-map", "train", TM,
     both(sharded("transformer", "diffusion_pytorch_model", ["a"]),
          lambda fx, case: (case / "repo/transformer/diffusion_pytorch_model.safetensors").unlink()), None),  # fmt: skip
    ("dit-weights-int8", "train", TM, lambda fx, case: int8_weights(fx, case), None),
    ("dit-text-width-mismatch", "train", TM, config(DIT, joint_attention_dim=48), None),
    ("model-missing", "train", ["--model", "{case}/nowhere"] + T[2:], None, None),
    ("world-size-2-no-torchrun", "train", T, None, {"WORLD_SIZE": "2"}),
    ("world-size-junk", "train", T, None, {"WORLD_SIZE": "two"}),
    # data.py
    ("data-max-area-100", "data", D + ["--max-area", "100"], None, None),
    ("data-max-area-negative", "data", D + ["--max-area", "-5"], None, None),
    ("data-device-bogus", "data", D + ["--device", "bogus"], None, None),
    ("data-device-cuda-9", "data", D + ["--device", "cuda:9"], None, None),
    ("data-out-is-a-file", "data", D, files("out", b"x"), None),
    ("data-manifest-missing", "data", ["{case}/none.jsonl"] + D[1:], None, None),
    ("data-manifest-fifo", "data", ["{case}/fifo"] + D[1:], fifo("fifo"), None),
    ("data-manifest-folder", "data", ["{case}"] + D[1:], None, None),
    ("data-manifest-not-utf8", "data", ["{case}/m.jsonl"] + D[1:], manifest_text(b"\xff\xfe{}\n"), None),
    ("data-manifest-missing-field", "data", ["{case}/m.jsonl"] + D[1:], manifest_text(good_line(task=None)), None),
    ("data-manifest-list", "data", ["{case}/m.jsonl"] + D[1:], manifest_text("[1, 2]\n"), None),
    ("data-manifest-empty", "data", ["{case}/m.jsonl"] + D[1:], manifest_text("\n"), None),
    ("data-image-fifo", "data", ["{case}/m.jsonl"] + D[1:],
     both(fifo("img.png"), lambda fx, case: manifest_text(good_line(target=str(case / "img.png")))(fx, case)), None),
    ("data-image-small", "data", ["{case}/m.jsonl"] + D[1:],
     both(image("small.png", 32, 64), lambda fx, case: manifest_text(good_line(target=str(case / "small.png")))(fx, case)), None),
    ("vae-config-list", "data", DM, repo_with(VAE, []), None),
    ("vae-channels-str", "data", DM, config(VAE, block_out_channels="x"), None),
    ("vae-groups-0", "data", DM, config(VAE, norm_num_groups=0), None),
    ("vae-groups-mismatch", "data", DM, config(VAE, norm_num_groups=3), None),
    ("vae-latent-negative", "data", DM, config(VAE, latent_channels=-1), None),
    ("vae-eps-str", "data", DM, config(VAE, batch_norm_eps="small"), None),
    ("te-heads-0", "data", DM, config(TE, num_attention_heads=0), None),
    ("te-hidden-str", "data", DM, config(TE, hidden_size="big"), None),
    ("te-rope-list", "data", DM, config(TE, rope_parameters=[1], rope_scaling=[1]), None),
    ("te-layers-missing", "data", DM, config(TE, num_hidden_layers=None), None),
    ("te-bias-str", "data", DM, config(TE, attention_bias="no"), None),
    ("tokenizer-malformed", "data", DM, repo_with(TOK, b'{"model": 1'), None),
    ("tokenizer-fifo", "data", DM, repo_with(TOK, "FIFO"), None),
    ("tokenizer-config-pad-int", "data", DM, repo_with("tokenizer/tokenizer_config.json", {"pad_token": 5}), None),
    ("te-shard-index-map-str", "data", DM,
     both(sharded("text_encoder", "model", "model.safetensors"),
          lambda fx, case: (case / "repo/text_encoder/model.safetensors").unlink()), None),  # fmt: skip
    # selection.py
    ("sel-image-fifo", "selectors", ["{case}/fifo"] + S[1:], fifo("fifo"), None),
    ("sel-image-missing", "selectors", ["{case}/none.png"] + S[1:], None, None),
    ("sel-image-text", "selectors", ["{case}/x.png"] + S[1:], files("x.png", b"not a picture"), None),
    ("sel-image-tiny", "selectors", ["{case}/x.png"] + S[1:], image("x.png", 8, 8), None),
    ("sel-image-folder", "selectors", ["{case}"] + S[1:], None, None),
    ("sel-keep-0", "selectors", S + ["--keep", "0"], None, None),
    ("sel-keep-nan", "selectors", S + ["--keep", "nan"], None, None),
    ("sel-keep-1.5", "selectors", S + ["--keep", "1.5"], None, None),
    ("sel-uniform-mix-2", "selectors", S + ["--uniform-mix", "2"], None, None),
    ("sel-selector-bogus", "selectors", S + ["--selector", "bogus"], None, None),
    ("sel-seed-negative", "selectors", S + ["--seed", "-1"], None, None),
    ("sel-out-extension", "selectors", S[:2] + ["{case}/sel.xyz"], None, None),
    ("sel-out-no-folder", "selectors", S[:2] + ["{case}/nowhere/sel.png"], None, None),
    ("sel-out-folder", "selectors", S[:2] + ["{case}"], None, None),
    ("sel-no-out", "selectors", S[:1], None, None),
]


def int8_weights(fx, case):
    """The transformer's weights stored as int8: one line naming the tensors, not a screen of copy errors."""
    rel = "transformer/diffusion_pytorch_model.safetensors"
    sd = {k: v.to(torch.int8) for k, v in load_file(fx["root"] / rel).items()}
    repo_with(rel, b"")(fx, case)
    save_file(sd, case / "repo" / rel)


def tree(folder):
    return sorted(os.path.join(d, n) for d, dirs, names in os.walk(folder) for n in names + dirs)


def run_main(cli, argv):
    """main(argv) of a CLI in this process: (exit code, stderr). An exception other than SystemExit
    escapes: that is a traceback, and fails the test. SIGALRM fails a case that hangs."""
    err = io.StringIO()

    def hang(*_):
        raise TimeoutError(f"{cli} {argv} did not finish in 60 s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            CLIS[cli](argv)
        code = 0
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):  # sys.exit("error: ...") prints the message to stderr
            err.write(code + "\n")
            code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


def check_error(code, err):
    assert code not in (0, None), err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]], err
    assert "Traceback" not in err, err


@pytest.mark.parametrize("name,cli,argv,setup,env", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fx, tmp_path, monkeypatch, name, cli, argv, setup, env):
    """One bad input: non-zero exit, one `error:` line (the last), no traceback, nothing written."""
    if name == "data-device-cuda-9" and torch.cuda.device_count() > 9:
        pytest.skip("this machine has 10 GPUs")
    if setup is not None:
        setup(fx, tmp_path)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    values = dict(root=fx["root"], cache=fx["cache"], manifest=fx["manifest"], base=fx["base"], case=tmp_path)
    argv = [a.format(**values) for a in argv]
    before = tree(fx["base"]), tree(tmp_path), tree(fx["root"])
    code, err = run_main(cli, argv)
    print(f"\n{name}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    check_error(code, err)
    assert (tree(fx["base"]), tree(tmp_path), tree(fx["root"])) == before, f"{name} wrote files"


def test_resume_of_a_finished_run_is_a_no_op(fx, tmp_path, capsys):
    """A requeued job: --resume with the --steps the run already reached exits 0 and changes nothing;
    a LoRA file a kill left stale is rewritten from the checkpoint."""
    run_with(lambda p: None)(fx, tmp_path)
    argv = [a.format(root=fx["root"], cache=fx["cache"], case=tmp_path) for a in TR]
    before = {p: open(p, "rb").read() for p in tree(tmp_path / "run") if os.path.isfile(p)}
    assert run_main("train", argv)[0] == 0
    assert {p: open(p, "rb").read() for p in tree(tmp_path / "run") if os.path.isfile(p)} == before
    lora_path = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    lora_path.write_bytes(b"stale")
    assert run_main("train", argv)[0] == 0
    assert lora_path.read_bytes() == before[str(lora_path)]


def test_bad_input_table_size():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_bad_input_in_real_processes(fx, tmp_path):
    """What only a real process shows: the exact stderr (no traceback from any thread), no hang on a
    FIFO, and WORLD_SIZE set without torchrun. Run side by side."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "repo").mkdir()
    config(DIT, num_attention_heads=0)(fx, tmp_path / "repo")
    root, cache = str(fx["root"]), str(fx["cache"])
    out = str(tmp_path / "out")
    runs = {
        "world-size": (["train.py", "--model", root, "--data", cache, "--out", out], {"WORLD_SIZE": "2"}),
        "fifo-image": (["selection.py", str(tmp_path / "fifo"), "--out", str(tmp_path / "sel.png")], {}),
        "fifo-manifest": (["data.py", str(tmp_path / "fifo"), "--model", root, "--out", out], {}),
        "bad-config": (["train.py", "--model", str(tmp_path / "repo" / "repo"), "--data", cache, "--out", out], {}),
    }
    before = tree(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, os.path.join(HERE, a[0]), *a[1:]], env=env | e, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (a, e) in runs.items()}  # fmt: skip
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        print(f"\n{name}: exit {p.returncode}: {err.strip()}")
        check_error(p.returncode, err)
        assert len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == before


def test_non_finite_training_stops(fx, tmp_path):
    """A learning rate that blows the LoRA up: the first non-finite loss stops the run with an error
    naming the step, and every file left behind is finite."""
    out = tmp_path / "run"
    code, err = run_main("train", train_args(fx["root"], fx["cache"], out, "--steps", "8", "--save-every", "1", "--lr", "1e30", "--warmup", "0"))
    check_error(code, err)
    print("\n" + err.strip().splitlines()[-1])
    assert err.strip().splitlines()[-1].startswith("error: step ")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["lora"].values())
    assert all(torch.isfinite(v).all() for v in load_file(out / "pytorch_lora_weights.safetensors").values())
    assert len((out / "log.jsonl").read_text().splitlines()) == state["step"]


def test_outputs_respect_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").close())
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        write_atomic(str(tmp_path / "a.txt"), lambda tmp: open(tmp, "w").close())
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["a.txt"]


# ----------------------------------------------------------------------------------------------
# Kills


def arm(kill_at):
    """In a forked child: SIGKILL it the N-th time it reaches STAGE (kill_at "STAGE:N"): written (a temporary
    file of files.write_atomic is complete, not yet renamed), renamed (it replaced its target), appended
    (train.py appended a log line, train_run.append_log). The child's writers are wrapped from here: the
    product code has no hook."""
    stage, n = kill_at.rsplit(":", 1)
    hits = 0

    def reached(point):
        nonlocal hits
        if point == stage:
            hits += 1
            if hits == int(n):
                os.kill(os.getpid(), signal.SIGKILL)

    replace, append_log = os.replace, train.append_log

    def atomic_replace(src, dst, *args, **kwargs):  # write_atomic's rename: its temporary over the target
        temporary = STALE_TEMP.fullmatch(os.path.basename(src)) is not None
        if temporary:
            reached("written")
        replace(src, dst, *args, **kwargs)
        if temporary:
            reached("renamed")

    def append(*args, **kwargs):
        append_log(*args, **kwargs)
        reached("appended")

    os.replace, train.append_log = atomic_replace, append


def forked(fn, log, kill_at=None, kill_after=None):
    """Run fn() in a forked child (torch is imported already: no start-up cost): its exit status, -9 when
    SIGKILLed. kill_at arms the child's writers (arm); kill_after (seconds) kills it from outside."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            if kill_at:
                arm(kill_at)
            with open(log, "a") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
                try:
                    fn()
                    code = 0
                except SystemExit as e:
                    print(e.code, file=f)
                    code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def flat(x, prefix=""):
    """Every leaf of nested dicts and lists, by path."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}/{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in flat(val, f"{prefix}/{i}").items()}
    return {prefix: x}


def same_files(a, b):
    """Two output folders hold the same files, byte for byte, except checkpoint.pt: torch.save stamps a
    random serialization id into every file, so its tensors are compared bit for bit instead."""
    assert [os.path.relpath(p, a) for p in tree(a)] == [os.path.relpath(p, b) for p in tree(b)]
    for path in tree(a):
        rel = os.path.relpath(path, a)
        if os.path.isdir(path):
            continue
        if rel.endswith(".pt"):
            x, y = (flat(torch.load(os.path.join(d, rel), weights_only=True)) for d in (a, b))
            assert x.keys() == y.keys()
            for k in x:
                same = torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                assert same, f"{rel}{k}"
        else:
            assert open(path, "rb").read() == open(os.path.join(b, rel), "rb").read(), rel


def kill_everywhere(run, rerun, reference, base, stages):
    """Kill run(out) at every write point of every stage, then rerun(out): the files equal the reference's.
    Returns {kill point: outcome}."""
    results = {}
    for stage in stages:
        for n in range(1, 100):
            out = base / f"{stage}-{n}"
            log = base / f"{stage}-{n}.log"
            code = forked(lambda: run(out), log, kill_at=f"{stage}:{n}")
            if code == 0:  # the run never reached this point: every one of this stage is covered
                assert n > 1
                break
            assert code == -signal.SIGKILL, log.read_text()
            again = forked(lambda: rerun(out), log)
            message = log.read_text().strip().splitlines()[-1]
            assert again == 0 or "already at step" in message, log.read_text()
            same_files(out, reference)
            results[f"{stage}:{n}"] = "rerun exact" if again == 0 else "was complete; --resume refuses, files exact"
    return results


def test_train_survives_kills(fx, tmp_path):
    """train.py SIGKILLed at each of its write points (checkpoint and LoRA temporaries written, renamed,
    each log line appended), at random instants, and with the last log line cut in
    half: `--resume` ends with the files of the uninterrupted run."""
    root, cache = fx["root"], fx["cache"]
    run = lambda out: train.main(train_args(root, cache, out))
    resume = lambda out: train.main(train_args(root, cache, out, *(["--resume"] if out.exists() else [])))
    reference = tmp_path / "reference"
    start = time.perf_counter()
    assert forked(lambda: run(reference), tmp_path / "reference.log") == 0
    seconds = time.perf_counter() - start
    mask = os.umask(0)
    os.umask(mask)
    assert all(os.stat(p).st_mode & 0o777 == 0o666 & ~mask for p in tree(reference) if os.path.isfile(p))

    results = kill_everywhere(run, resume, reference, tmp_path, ("written", "renamed", "appended"))
    rng = np.random.default_rng(0)
    for i in range(3):
        out = tmp_path / f"random-{i}"
        delay = rng.uniform(0.1, 0.8) * seconds
        code = forked(lambda: run(out), tmp_path / "random.log", kill_after=delay)
        again = forked(lambda: resume(out), tmp_path / "random.log") if code != 0 else 0
        assert again == 0, (tmp_path / "random.log").read_text()
        same_files(out, reference)
        results[f"random {delay:.2f}s"] = "killed, rerun exact" if code else "finished first"

    out = tmp_path / "cut-log"  # killed after log line 3 (checkpoint of step 2), line 3 then cut in half
    assert forked(lambda: run(out), tmp_path / "cut.log", kill_at="appended:3") == -signal.SIGKILL
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    assert forked(lambda: resume(out), tmp_path / "cut.log") == 0
    same_files(out, reference)
    results["appended:3 + half a line"] = "rerun exact"
    print(f"\ntrain.py kills ({len(results)}):", json.dumps(results, indent=1))
    assert len(results) == 4 + 4 + 4 + 3 + 1  # 2 saves x (checkpoint, LoRA) x (written, renamed); 4 log lines


def test_data_survives_kills(fx, tmp_path):
    """data.py SIGKILLed at each of its write points (every latents, text and index file: temporary
    written, renamed) and at random instants; running it again ends with the uninterrupted run's files."""
    manifest = write_dataset(tmp_path / "images", n=4)
    run = lambda out: data.main([str(manifest), "--model", str(fx["root"]), "--out", str(out)])
    reference = tmp_path / "reference"
    start = time.perf_counter()
    assert forked(lambda: run(reference), tmp_path / "reference.log") == 0
    seconds = time.perf_counter() - start
    results = kill_everywhere(run, run, reference, tmp_path, ("written", "renamed"))
    rng = np.random.default_rng(1)
    for i in range(2):
        out = tmp_path / f"random-{i}"
        delay = rng.uniform(0.3, 1.0) * seconds
        code = forked(lambda: run(out), tmp_path / "random.log", kill_after=delay)
        assert forked(lambda: run(out), tmp_path / "random.log") == 0
        same_files(out, reference)
        results[f"random {delay:.2f}s"] = "killed, rerun exact" if code else "finished first"
    print(f"\ndata.py kills ({len(results)}):", json.dumps(results, indent=1))
    assert len(results) >= 2 * (4 + 2 + 1)
