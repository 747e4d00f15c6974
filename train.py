"""Train a Sparse Context LoRA for FLUX.2 [klein]: references lose most of their tokens at random.

    python train.py --model black-forest-labs/FLUX.2-klein-base-4B --data data/train.jsonl --out runs/sc
    torchrun --nproc_per_node 8 train.py --model ... --data runs/sc/cache --out runs/sc

--data is a latent cache folder (data.py) or a JSONL manifest. A manifest is first cached into
OUT/cache with the VAE and text encoder of --model, which are then freed: training holds only the
transformer. Under torchrun, process 0 caches it while the others wait.

Every option and file (model config, cache index and headers, checkpoint) is checked before any model
loads. Outputs survive a kill at any instant: each file is written atomically; the checkpoint is
written first and is the truth (it records the LoRA file's hash: --resume rewrites a LoRA file a kill
left behind); --resume drops the log lines after the checkpoint's step, and a line a kill cut short.
The first non-finite loss or gradient stops the run with an error naming the step, before the update.

--compact S [S ...] trains the alternative to dropping instead: each reference, unless the step keeps
all (--keep-all-prob), is downscaled by a factor drawn from the list (the step's draw, like the keep
fractions), every position at lower resolution at ids spanning the full grid (klein.reference_ids);
the cache must hold those latents (data.py --compact; a manifest is cached so).

This file reads top to bottom: the keyed draws and the training example, the loss, the step and the
loop (`train`), the command line. The loop calls hooks after every step: the validation loss
(--val-data; here, made of the same example and loss as training) and, from train_extras.py, preview
sheets (--sample-file) and the loss plot. train_run.py holds the run management the loop calls:
torchrun's processes, the checks of --out and the checkpoint, saving and resuming.

One step takes a global batch of G = batch_size x grad_accum x processes examples:
  - step n draws from a generator seeded by (seed, n, "keep") whether its examples keep every
    reference token (probability keep_all_prob: never seeing dense references costs dense quality),
    else one keep fraction f_k ~ U(keep_range) per reference slot k: the k-th reference of every
    example of the step keeps n_keep(f_k, its tokens);
  - example i at step n draws the rest from its own generator, seeded by (seed, n, i): sigma, noise,
    and which tokens of each reference survive (uniform, without replacement; survivors keep their
    original ids);
  - its loss is the mean over target tokens of |v - (e - x0)|^2 at x_s = (1 - s) x0 + s e;
  - the step minimizes the mean over the G examples: each process backpropagates its share divided
    by G, and the LoRA gradients are summed across processes.
Nothing random depends on which process holds an example, so the update equals the one-process
update with the same G (up to float summation order), and a resumed run repeats an uninterrupted one.

Sigma: logit-normal (mean 0, std 1), then klein's exponential shift s' = e^mu / (e^mu + 1/s - 1)
with mu = klein.empirical_mu(target tokens, 50): training puts its sigmas where klein's sampler
spends its steps at that resolution (50 is the base models' step count, the ones one fine-tunes).
Examples of one step that agree in target grid and kept reference-token count (equal reference
grids give equal counts: the step's fractions are shared) share a forward (up to batch_size), with no
padding and no attention mask, so every forward can take the fastest attention kernel (FlashAttention
on CUDA); examples that disagree run in separate forwards. Against a fraction drawn per example and
reference, each reference's distribution is the same (keep-all with probability keep_all_prob, else
f ~ U(keep_range), uniform survivors), so the expected loss and gradient are too; what changes is that
the examples of one step are no longer independent: they are dense together or sparse together, with
equal fractions, which makes the step-to-step gradient noisier.

--compile: torch.compile of the transformer (fullgraph) with dynamic shapes. Target grid, kept count
and group size change from step to step, so one graph with symbolic sizes serves them all, where
static shapes would compile once per combination (sampling, whose shapes a run fixes, compiles static
shapes and buckets the kept counts instead: cli.build_selector).
"""

import argparse
import hashlib
import math
import os
import time
from statistics import NormalDist

import torch
import torch.distributed as dist
from tqdm import tqdm

import lora
import quant
import train_extras
from data import MAX_COMPACT, check_max_area
from files import ArgumentParser, fail
from klein import empirical_mu, grid_ids, n_keep, pack, reference_ids, text_ids
from model import Flux2
from train_run import (
    DIST_TIMEOUT_MINUTES,
    LORA_FILE,
    MAX_OPTIMIZER_STEPS,
    NonFiniteError,
    append_log,
    check_run,
    open_data,
    resume,
    run_processes,
    save,
)

MU_STEPS = 50  # the step count whose schedule shift training follows (base klein's default)
KEEP_RANGE = [0.05, 0.25]  # the paper's range of keep fractions


def generator(*key):
    """A CPU generator seeded by a hash of the key, e.g. (seed, step, example index)."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_sigma(g, num_tokens):
    """Logit-normal sigma, shifted like klein's schedule for a target of num_tokens tokens."""
    return shift_sigma(torch.sigmoid(torch.randn((), generator=g, dtype=torch.float64)).item(), num_tokens)


def shift_sigma(s, num_tokens):
    """klein's exponential shift of sigma s for a target of num_tokens tokens: e^mu / (e^mu + 1/s - 1)."""
    e = math.exp(empirical_mu(num_tokens, MU_STEPS))
    return e / (e + (1 / s - 1))


def keep_fractions(g, n_refs, keep_range, keep_all_prob):
    """The keep fraction of each of n_refs reference slots, or None: keep every token. Drawn from a step's
    generator (seed, step, "keep"), every example of the step gets the same ones; drawn one by one, the
    first k are the same whatever n_refs is."""
    if torch.rand((), generator=g).item() < keep_all_prob:
        return None
    lo, hi = keep_range
    return [lo + (hi - lo) * torch.rand((), generator=g).item() for _ in range(n_refs)]


def compact_factors(g, n_refs, factors, keep_all_prob):
    """--compact: the factor each of n_refs reference slots is downscaled by, or None: full size; drawn
    like keep_fractions, from the step's generator, so every example of the step gets the same ones."""
    if torch.rand((), generator=g).item() < keep_all_prob:
        return None
    return [factors[int(torch.randint(len(factors), (), generator=g))] for _ in range(n_refs)]


def compact_item(item, factors):
    """item with reference k replaced by its compact latents at factors[k] (the cache's ref.K.xS) and the
    full-size grid each stands for (spans); factors None leaves it as it is."""
    if factors is None:
        return item
    refs = [item["compact"][f][k] for k, f in enumerate(factors)]
    return item | dict(refs=refs, spans=[tuple(z.shape[1:]) for z in item["refs"]])


def drop_references(refs, g, keeps, spans=None):
    """Reference latents [(C, h, w)] -> surviving tokens (M, C) and their original ids (M, 4): reference
    k keeps n_keep(keeps[k], h w) tokens drawn by g (uniform, without replacement); keeps None keeps all.
    spans: the full-size grid of each compact reference (klein.reference_ids), else None."""
    tokens, ids = [], []
    for k, z in enumerate(refs):
        h, w = z.shape[1:]
        x, i = pack(z[None])[0], reference_ids(k, h, w, spans[k] if spans else None)  # (h * w, C), (h * w, 4)
        if keeps is not None:
            keep = torch.randperm(h * w, generator=g)[: n_keep(keeps[k], h * w)].sort().values
            x, i = x[keep], i[keep]
        tokens.append(x)
        ids.append(i)
    return torch.cat(tokens), torch.cat(ids)


def training_example(item, g, keeps):
    """One example's tensors for one step; everything random comes from g, in a fixed order, and the
    step's keep fractions keeps (keep_fractions)."""
    h, w = item["target"].shape[1:]
    x0 = pack(item["target"][None].float())[0]  # (N, C)
    s = sample_sigma(g, h * w)
    noise = torch.randn(x0.shape, generator=g)
    ref, ref_ids = drop_references(item["refs"], g, keeps, item.get("spans"))
    txt = item["txt"].float()
    return dict(x0=x0, noise=noise, s=torch.tensor(s), img_ids=grid_ids(h, w), ref=ref.float(), ref_ids=ref_ids, txt=txt)


def forward_groups(examples, size):
    """Examples that can share one forward without padding (same target grid, text length and number of
    kept reference tokens), <= size each."""
    groups = {}
    for e in examples:
        groups.setdefault((e["x0"].shape, e["txt"].shape, e["ref"].shape), []).append(e)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]


def flow_matching_loss(model, examples, kv, device):
    """Per-example loss (B,) of examples of equal shapes (forward_groups), in one forward with no mask."""
    stack = lambda k: torch.stack([e[k] for e in examples]).to(device)
    x0, noise, s = stack("x0"), stack("noise"), stack("s").float()
    x_t = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    txt, txt_ids = stack("txt"), text_ids(examples[0]["txt"].shape[0]).to(device)
    v = model(x_t, stack("img_ids"), txt, txt_ids, s, ref=stack("ref"), ref_ids=stack("ref_ids"), kv_pattern=kv)
    return (v.float() - (noise - x0)).pow(2).mean(dim=(1, 2))


def epoch_batches(buckets, size, seed, epoch):
    """The global batches of one epoch: every bucket (target grid) shuffled and cut into batches of
    `size`, the remainders pooled into mixed batches, the batch order shuffled. The batch count is the
    same every epoch, and the result depends on (seed, epoch) only, so every process agrees on it."""
    g = generator(seed, "epoch", epoch)
    batches, rest = [], []
    for key in sorted(buckets):
        idx = [buckets[key][i] for i in torch.randperm(len(buckets[key]), generator=g)]
        cut = len(idx) - len(idx) % size
        batches += [idx[i : i + size] for i in range(0, cut, size)]
        rest += idx[cut:]
    batches += [rest[i : i + size] for i in range(0, len(rest), size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


# ----------------------------------------------------------------------------------------------
# Validation (--val-data) and the hooks the loop calls (train_extras.py: options, previews, the loss plot)

VAL_QUANTILES = (0.125, 0.375, 0.625, 0.875)  # of training's sigma distribution: the validation sigmas




def make_hooks(args, cfg, rank, world, device):
    """The hooks the options ask for, built before the transformer loads: [Validation, Previews (process 0),
    LossPlot (process 0, with --val-data)]."""
    out = []
    if args.val_data is not None:
        val = open_data(args, rank, world, device, args.val_data, "val-cache")
        check_fits(val, cfg, "--val-data")
        out.append(Validation(val, args, rank, world, device))
    if args.sample_file is not None and rank == 0:
        out.append(train_extras.Previews(args, device))
    if args.val_data is not None and rank == 0:
        out.append(train_extras.LossPlot(args.out, args.steps, args.val_keep))
    return out




class Validation:
    """The validation loss, dense and at --val-keep, every --val-every steps (and at step 0 and the last)."""

    def __init__(self, data, args, rank, world, device):
        self.data, self.args, self.rank, self.world, self.device = data, args, rank, world, device

    def __call__(self, record, model):
        if not train_extras.is_due(record["step"], self.args.val_every, self.args.steps):
            return {}
        start = time.perf_counter()
        dense, sparse = validation_losses(model, self.data, self.args.val_keep, self.args.batch_size, self.args.kv,
                                          self.rank, self.world, self.device)  # fmt: skip
        if self.rank == 0:
            tqdm.write(f"step {record['step']}: validation loss {dense:.5f} dense, {sparse:.5f} at keep {self.args.val_keep}")
        return dict(val_dense=dense, val_sparse=sparse, val_seconds=round(time.perf_counter() - start, 3))


def validation_sigmas(num_tokens):
    """The fixed validation sigmas of a target of num_tokens tokens: training's (logit-normal, then
    klein's shift) at the midpoints of its quartiles."""
    return [shift_sigma(1 / (1 + math.exp(-NormalDist().inv_cdf(q))), num_tokens) for q in VAL_QUANTILES]


def validation_example(item, i, j, keeps):
    """Example i at fixed sigma j: noise and kept tokens from the generator ("val", i, j), whatever the step or seed."""
    example = training_example(item, generator("val", i, j), keeps)
    h, w = item["target"].shape[1:]
    return example | dict(s=torch.tensor(validation_sigmas(h * w)[j]), unit=(i, j))


def validation_work(data, batch_size):
    """The forwards of a validation pass: (example, sigma) pairs of one shape (target and reference grids),
    at most batch_size a forward, in an order that does not depend on the number of processes."""
    shapes = {}
    for i, entry in enumerate(data.index):
        key = (tuple(entry["target"]), tuple(tuple(r) for r in entry["references"]))
        shapes.setdefault(key, []).extend((i, j) for j in range(len(VAL_QUANTILES)))
    forwards = []
    for key in sorted(shapes):
        forwards += [shapes[key][a : a + batch_size] for a in range(0, len(shapes[key]), batch_size)]
    return forwards


@torch.no_grad()
def validation_losses(model, data, keep, batch_size, kv, rank, world, device):
    """(dense, sparse) mean flow-matching loss over every example of data and every validation sigma; this
    process runs forwards rank, rank + world, ...; the result is the same for any world (module docstring)."""
    table = torch.zeros(len(data), len(VAL_QUANTILES), 2, dtype=torch.float64)
    for forward in validation_work(data, batch_size)[rank::world]:
        items = {i: data[i] for i in dict.fromkeys(i for i, _ in forward)}
        for v in (0, 1):  # dense, sparse
            examples = [validation_example(items[i], i, j, None if v == 0 else [keep] * len(items[i]["refs"])) for i, j in forward]
            for group in forward_groups(examples, batch_size):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    losses = flow_matching_loss(model, group, kv, device)
                for e, loss in zip(group, losses.tolist()):
                    table[e["unit"]][v] = loss
    if world > 1:  # every entry was computed by one process and is zero elsewhere: the sum is exact
        table = table.to(device)
        dist.all_reduce(table)
        table = table.cpu()
    return table[..., 0].mean().item(), table[..., 1].mean().item()


# ----------------------------------------------------------------------------------------------
# The step and the loop


def lora_model(args, device):
    """The frozen transformer (bf16 on a GPU, float32 on the CPU; 8-bit block Linears with --weights) with
    a float32 LoRA injected, the LoRA parameters, and AdamW over them."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 weights, float32 LoRA, autocast
    if args.weights is None:
        model = Flux2.from_pretrained(args.model, dtype=dtype, device=device)
    else:
        model = quant.from_pretrained(args.model, args.weights, dtype=dtype, device=device)
    model.requires_grad_(False)
    lora.inject(model, args.targets, args.rank, args.alpha, args.seed)
    model.gradient_checkpointing = args.gradient_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # zeros, not None: a process without examples in a step still sums its share
        p.grad = torch.zeros_like(p)
    return model, params, torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def step_examples(data, batch, step, rank, world, args):
    """This process's share of a global batch (indices into data), as training examples of step `step`."""
    mine = batch[rank::world]
    items = [data[i] for i in mine]
    if args.compact:  # downscaled references instead of dropped tokens
        items = [compact_item(item, compact_factors(generator(args.seed, step, "keep"), len(item["refs"]), args.compact,
                                                    args.keep_all_prob)) for item in items]  # fmt: skip
        keeps = [None] * len(items)
    else:
        keeps = [keep_fractions(generator(args.seed, step, "keep"), len(item["refs"]), args.keep_range, args.keep_all_prob)
                 for item in items]  # keyed by the step: shared by its examples  # fmt: skip
    draws = [generator(args.seed, step, i) for i in mine]  # keyed by the example, not by the process
    return [training_example(item, g, k) for item, g, k in zip(items, draws, keeps)]


def gradient(model, params, examples, n, args, world, device):
    """The gradient of the mean loss over a global batch of n examples (this process holds `examples`)
    into the params' zeroed .grad, clipped to --max-grad-norm: (mean loss, gradient norm before clipping)."""
    loss_sum = torch.zeros(1, device=device)
    for group in forward_groups(examples, args.batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses = flow_matching_loss(model, group, args.kv, device)
        (losses.sum() / n).backward()
        loss_sum += losses.detach().sum()
    if world > 1:  # sum the shares of all processes: the gradient of the mean over the n examples
        flat = torch.cat([p.grad.flatten() for p in params] + [loss_sum])
        dist.all_reduce(flat)
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
        loss_sum = flat[-1:]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    return loss_sum.item() / n, grad_norm.item()


def check_fits(data, cfg, option="--data", compact=()):
    """data (a CachedDataset), if its latents and text fit the transformer config cfg (and it holds the
    compact latents --compact asks for)."""
    missing = sorted({f for e in data.index for f in compact if f not in e.get("compact", [])})
    if missing:
        raise ValueError(f"--compact {' '.join(map(str, missing))}: {option} holds no references downscaled by that factor; "
                         f"cache it with data.py --compact {' '.join(map(str, compact))}")  # fmt: skip
    if (data.channels, data.text_dim) != (cfg.in_channels, cfg.context_dim):
        raise ValueError(f"{option}: the cache does not fit the model: latents of {data.channels} channels and text of "
                         f"{data.text_dim} (the transformer takes {cfg.in_channels} and {cfg.context_dim})")
    return data


def train(args, rank, world, device):
    """The run, in process `rank` of `world` (train_run.run_processes): check, load, resume, then step to
    --steps; process 0 logs every step and saves every --save-every."""
    checked = check_run(args, rank, world)  # --out, --model, LoRA layout, checkpoint: before any model loads
    if checked is None:
        return
    cfg, run, state = checked
    train_extras.check_files(args)  # --val-data, --sample-file: read and checked before any model loads
    data = check_fits(open_data(args, rank, world, device), cfg, compact=args.compact)
    hooks = make_hooks(args, cfg, rank, world, device)  # validation, previews, loss plot: before the transformer
    model, params, opt = lora_model(args, device)
    start = resume(args.out, state, model, opt, rank)
    del state
    if args.compile:  # every step changes the shapes (target grid, kept count, group size): one graph for all
        model.compile(fullgraph=True, dynamic=True)
    lora_path = os.path.join(args.out, LORA_FILE)
    if start == args.steps:
        if rank == 0:
            print(f"the run had reached step {start}; restored its LoRA: {lora_path}")
        return

    if start == 0 and hooks:  # before the first step: the base model's validation loss and previews, as step 0
        record = dict(step=0)
        for hook in hooks:
            record |= hook(record, model)
        if rank == 0:
            append_log(args.out, record)
    G = run["global_batch"]
    buckets = data.buckets()
    per_epoch = len(epoch_batches(buckets, G, args.seed, 0))
    epoch, batches, saved = None, None, start
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0, desc="training")
    for step in bar:
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(buckets, G, args.seed, epoch)
        batch = batches[step % per_epoch]
        examples = step_examples(data, batch, step, rank, world, args)
        opt.zero_grad(set_to_none=False)
        loss, grad_norm = gradient(model, params, examples, len(batch), args, world, device)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # every process sees the same sums
            raise NonFiniteError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopped before the update "
                                 f"(lower --lr, or check the data); {args.out} keeps its last save, step {saved}")
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        bar.set_postfix(loss=f"{loss:.4f}")

        record = dict(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm)
        for hook in hooks:  # train_extras: validation loss, previews, loss plot, each adding its log fields
            record |= hook(record, model)
        if rank == 0:
            append_log(args.out, record)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                if not all(torch.isfinite(p).all() for p in params):
                    raise NonFiniteError(f"step {step + 1}: the LoRA became non-finite; nothing saved (lower --lr)")
                save(args.out, model, opt, step + 1, run)
                saved = step + 1
    if rank == 0:
        print(f"wrote {lora_path} (step {args.steps}; checkpoint and log.jsonl in {args.out})")


# ----------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = ArgumentParser(description="Train a Sparse Context LoRA (random reference-token dropping) for klein.")
    p.add_argument("--model", required=True, help="klein repository folder, transformer folder, BFL file or hub id")
    p.add_argument("--data", required=True, help="latent cache folder (data.py) or JSONL manifest (cached to OUT/cache)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, pytorch_lora_weights.safetensors")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues to this many)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    p.add_argument("--targets", nargs="+", default=list(lora.DEFAULT_TARGETS),
                   help="glob patterns of the Linear layers to adapt, BFL names (default: diffusers' klein trainer's)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=50, help="steps of linear learning-rate warmup, then constant")
    p.add_argument("--batch-size", type=int, default=1,
                   help="at most this many examples per forward; they stack when their target grids agree")
    p.add_argument("--grad-accum", type=int, default=1, help="each process takes batch-size x grad-accum examples per step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the LoRA gradient to this norm")
    p.add_argument("--keep-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"each reference keeps a fraction ~ U(LO, HI) of its tokens (default: {KEEP_RANGE[0]} {KEEP_RANGE[1]}, the paper's)")
    p.add_argument("--keep-all-prob", type=float, default=0.1, help="probability that an example keeps all reference tokens")
    p.add_argument("--compact", type=int, nargs="+", default=[], metavar="S",
                   help="instead of dropping tokens, downscale each reference by a factor drawn from these (compact references; "
                        "a cache made with data.py --compact S ...; a manifest is cached so) (default: drop)")  # fmt: skip
    p.add_argument("--kv", action="store_true", help="train in the KV pattern: references at t = 0 attend only to references")
    p.add_argument("--weights", choices=sorted(quant.FORMATS), default=None,
                   help="a frozen 8-bit base: the block Linears in fp8 or int8, dequantized per matmul (default: bf16 on GPU)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block's activations in backward: memory for one block's activations, not all "
                        "(a dense step with six 1024 px references needs it on a 24-80 GiB card)")  # fmt: skip
    p.add_argument("--dist-timeout", type=int, default=DIST_TIMEOUT_MINUTES,
                   help="minutes any torchrun collective may wait, the others' wait while process 0 caches a manifest included")
    p.add_argument("--save-every", type=int, default=250, help="write checkpoint and LoRA every this many steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the LoRA init, the data order and every per-example draw")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--max-area", type=int, default=1024 * 1024, help="when caching a manifest: largest image area in pixels")
    p.add_argument("--skip-bad", action="store_true", help="when caching a manifest: skip bad lines instead of stopping")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (fullgraph, dynamic shapes: one compilation for every kept count)")
    train_extras.add_options(p)
    args = p.parse_args(argv)
    train_extras.check_options(p, args)
    for f in args.compact:
        if not 2 <= f <= MAX_COMPACT:
            p.error(f"--compact must be an integer in [2, {MAX_COMPACT}], got {f}")
    if args.compact and args.keep_range is not None:
        p.error("--keep-range cannot apply with --compact (compact references keep every token they have)")
    args.keep_range = args.keep_range or KEEP_RANGE
    lo, hi = args.keep_range
    if not 0 < lo <= hi <= 1:
        p.error(f"--keep-range needs 0 < LO <= HI <= 1, got {lo} {hi}")
    if not 0 <= args.keep_all_prob <= 1:
        p.error(f"--keep-all-prob must be in [0, 1], got {args.keep_all_prob}")
    for name in ("steps", "rank", "batch_size", "grad_accum", "save_every", "dist_timeout"):
        if not 1 <= getattr(args, name) <= MAX_OPTIMIZER_STEPS:
            p.error(f"--{name.replace('_', '-')} must be in [1, {MAX_OPTIMIZER_STEPS}], got {getattr(args, name)}")
    if not 0 <= args.warmup <= MAX_OPTIMIZER_STEPS:
        p.error(f"--warmup must be in [0, {MAX_OPTIMIZER_STEPS}], got {args.warmup}")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must be in [0, 2^63), got {args.seed}")
    for name in ("lr", "max_grad_norm") + (("alpha",) if args.alpha is not None else ()):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(args, name)}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not all(args.targets) or len(set(args.targets)) != len(args.targets):
        p.error("--targets must be distinct, non-empty patterns")
    try:
        check_max_area(args.max_area)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run_processes(train, args)
    except (ValueError, OSError) as e:
        fail(e)


if __name__ == "__main__":
    main()
