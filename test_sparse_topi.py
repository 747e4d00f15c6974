"""ToPi's recipe on the attention selector (calibrate.py, attention_selector.generate_rescored, sample.py
--calibrate / --attention-calibration / --attention-rescore-step) on tiny random models."""

import json
import os

import numpy as np
import pytest
import scipy.stats
import torch

import calibrate
from klein import grid_ids, initial_noise, schedule, text_ids
import pipeline
import sample
from calibrate import calibrate_attention, gated_reference_keys, load_calibration, save_calibration, spearman, token_influence
import attention_selector
from attention_selector import QUERIES, AttentionSelector, generate_rescored, reference_attention
from model import Flux2, Flux2Config, KVCache
from token_selectors import Selector
from tiny import make_inputs, make_pipeline_folder, photo, randomize_

CFG = Flux2Config(in_channels=16, hidden_size=48, num_heads=3, depth=2, depth_single=2, context_dim=24, axes_dim=(4, 4, 4, 4))


def tiny_model(seed=0, dtype=torch.float32):
    return randomize_(Flux2(CFG), seed=seed).eval().requires_grad_(False).to(dtype)


def tiny_inputs(seed=1, dtype=torch.float32):
    """img, img_ids, txt, txt_ids, t, ref, ref_ids: a batch of 2, two references (12 + 6 tokens)."""
    img, img_ids, txt, txt_ids, t, ref, ref_ids = make_inputs(refs=((3, 4), (2, 3)), seed=seed)
    return img.to(dtype), img_ids, txt.to(dtype), txt_ids, t.to(dtype), torch.cat(ref, 1).to(dtype), torch.cat(ref_ids)


def drop(ref, ref_ids, j):
    keep = [i for i in range(ref.shape[1]) if i != j]
    return ref[:, keep], ref_ids[keep]


# ----------------------------------------------------------------------------------------------
# Influence


@pytest.mark.parametrize("kv", [False, True])
def test_gate_is_token_removal(kv):
    """log g = 0 is the model; log g_j -> -inf is the model without token j (in every block, the KV
    pattern's reference self-attention included)."""
    model = tiny_model()
    img, img_ids, txt, txt_ids, t, ref, ref_ids = tiny_inputs()
    run = lambda r, ids: model(img, img_ids, txt, txt_ids, t, ref=r, ref_ids=ids, kv_pattern=kv)  # noqa: E731
    with torch.no_grad():
        full = run(ref, ref_ids)
        with gated_reference_keys(model, torch.zeros(2, ref.shape[1])):
            gated = run(ref, ref_ids)
        assert (gated - full).abs().max() <= 1e-5 * full.abs().max()
        for j in (0, 7, ref.shape[1] - 1):
            log_gate = torch.zeros(2, ref.shape[1])
            log_gate[:, j] = -1e4
            with gated_reference_keys(model, log_gate):
                gated = run(ref, ref_ids)
            removed = run(*drop(ref, ref_ids, j))
            assert (gated - removed).abs().max() <= 1e-5 * removed.abs().max()
            assert (removed - full).abs().max() > 1e-3 * full.abs().max()  # the token mattered
    assert not any("qkv" in vars(b) for b in [*model.double_blocks, *model.single_blocks])  # unwrapped again


def test_gate_gradient_equals_finite_differences():
    """r . dv/d(log g_j), the proxy's building block, against central differences (float64 weights;
    RoPE rounds q and k to float32, so the step is not tiny)."""
    model = tiny_model(dtype=torch.float64)
    img, img_ids, txt, txt_ids, t, ref, ref_ids = tiny_inputs(dtype=torch.float64)
    r = torch.randn(img.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def projected(log_gate):
        with gated_reference_keys(model, log_gate):
            return (r * model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)).sum()

    log_gate = torch.zeros(2, ref.shape[1], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(projected(log_gate), log_gate)
    eps = 1e-3
    for b, j in [(0, 0), (0, 11), (1, 4), (1, 17)]:
        e = torch.zeros(2, ref.shape[1], dtype=torch.float64)
        e[b, j] = eps
        with torch.no_grad():
            fd = (projected(e) - projected(-e)) / (2 * eps)
        assert abs(fd - grad[b, j]) <= 1e-3 * grad.abs().max(), (b, j, fd, grad[b, j])


@pytest.mark.parametrize("kv", [False, True])
def test_exact_influence_is_the_removal_loop(kv):
    model = tiny_model()
    img, img_ids, txt, txt_ids, t, ref, ref_ids = tiny_inputs()
    got = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=kv, exact=True)
    want = torch.zeros(2, ref.shape[1])
    with torch.no_grad():
        full = model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids, kv_pattern=kv)
        for j in range(ref.shape[1]):
            r, ids = drop(ref, ref_ids, j)
            v = model(img, img_ids, txt, txt_ids, t, ref=r, ref_ids=ids, kv_pattern=kv)
            for b in range(2):
                want[b, j] = ((v[b] - full[b]) ** 2).mean()
    assert got.shape == (2, ref.shape[1]) and (got >= 0).all()
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert want.max() > 4 * want.min()  # tokens matter unequally: a ranking to find


def test_proxy_estimates_the_first_order_change():
    """The proxy's expectation is |dv/d(log g_j)|^2 / (N C), from the full Jacobian; its seed fixes it."""
    model = tiny_model()
    img, img_ids, txt, txt_ids, t, ref, ref_ids = tiny_inputs()
    M = ref.shape[1]

    def velocity(log_gate):
        with gated_reference_keys(model, log_gate):
            return model(img, img_ids, txt, txt_ids, t, ref=ref, ref_ids=ref_ids)

    jac = torch.autograd.functional.jacobian(velocity, torch.zeros(2, M))  # (2, N, C, 2, M)
    want = torch.stack([jac[b, :, :, b].pow(2).mean(dim=(0, 1)) for b in range(2)])  # (2, M)
    many = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, projections=400)
    ratio = many / want
    assert abs(many.sum() / want.sum() - 1) < 0.1 and 0.6 < ratio.min() and ratio.max() < 1.5, ratio
    again = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids)
    assert torch.equal(again, token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids))


@pytest.mark.parametrize("kv", [False, True])
def test_proxy_ranks_tokens_like_the_exact_influence(kv):
    """Measured (32 projections, 3 random models, 2 rows each): Spearman 0.71 to 0.93, mean 0.86
    (standard pattern); 0.68 to 0.96, mean 0.83 (KV pattern). Seeded: the same numbers every run."""
    rhos = []
    for seed in range(3):
        model = tiny_model(seed)
        img, img_ids, txt, txt_ids, t, ref, ref_ids = tiny_inputs(seed + 1)
        exact = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=kv, exact=True)
        proxy = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=kv)
        rhos += [spearman(p, e) for p, e in zip(proxy, exact)]
    assert min(rhos) > 0.6 and np.mean(rhos) > 0.8, rhos


def test_spearman_equals_scipy():
    g = torch.Generator().manual_seed(0)
    for n in (5, 18, 200):
        a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        b2 = a + 0.5 * b
        tied = (a * 2).round()  # ties share their average rank
        for x, y in ((a, b), (a, b2), (tied, b2), (tied, tied.flip(0))):
            assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert spearman(torch.ones(6), torch.arange(6.0)) == 0.0


# ----------------------------------------------------------------------------------------------
# Calibration


def examples(n=2):
    out = []
    for s in range(n):
        img, img_ids, txt, txt_ids, _, ref, ref_ids = tiny_inputs(seed=10 + s)
        out.append((img, img_ids, txt, txt_ids, ref, ref_ids))
    return out


def test_calibration_table_is_the_correlations_and_picks_its_best():
    model = tiny_model()
    exs = examples()
    sigmas = [1.0, 0.5]
    c = calibrate_attention(model, exs, sigmas)
    n_blocks = CFG.depth + CFG.depth_single
    assert [(r["sigma"], r["block"], r["queries"]) for r in c["table"]] == [(s, b, q) for s in sigmas for b in range(n_blocks) for q in QUERIES]
    best = max(c["table"], key=lambda r: r["spearman"])
    assert (c["block"], c["queries"], c["sigma"], c["spearman"]) == (best["block"], best["queries"], best["sigma"], best["spearman"])
    assert c["kv_cache"] is False and c["influence"] == "proxy"
    # one entry by hand: the mean over examples and rows of Spearman(attention scores, influence)
    row = c["table"][n_blocks * len(QUERIES) + 2 * len(QUERIES) + 1]  # sigma 0.5, block 2, text
    rhos = []
    for img, img_ids, txt, txt_ids, ref, ref_ids in exs:
        t = torch.full((2,), 0.5)
        inf = token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids)
        att = reference_attention(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=2, queries="text")
        rhos += [spearman(a, i) for a, i in zip(att, inf)]
    assert row["spearman"] == pytest.approx(np.mean(rhos), abs=1e-12)
    spread = [r["spearman"] for r in c["table"]]
    assert max(spread) - min(spread) > 0.2  # the candidates really differ
    only = calibrate_attention(model, exs, [1.0], blocks=[1, 3], queries=("both",), kv_pattern=True, exact=True)
    assert [(r["block"], r["queries"]) for r in only["table"]] == [(1, "both"), (3, "both")]
    assert only["kv_cache"] is True and only["influence"] == "exact"


def test_calibration_finds_a_block_that_tracks_the_influence(monkeypatch):
    """A block whose scores are the influence itself (Spearman 1) wins, whatever its place in the table."""
    model = tiny_model()
    real = calibrate.reference_attention

    def scores(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, block, queries, kv_pattern):
        if (block, queries) == (2, "references"):
            return token_influence(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, kv_pattern=kv_pattern) + 1
        return real(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, block=block, queries=queries, kv_pattern=kv_pattern)

    monkeypatch.setattr(calibrate, "reference_attention", scores)
    c = calibrate_attention(model, examples(), [0.7])
    assert (c["block"], c["queries"], c["sigma"]) == (2, "references", 0.7) and c["spearman"] == pytest.approx(1.0)


def test_calibration_file_round_trips(tmp_path):
    c = calibrate_attention(tiny_model(), examples(1), [0.9])
    path = tmp_path / "cal.json"
    save_calibration(path, c)
    assert json.loads(path.read_text()) == json.loads(json.dumps(c))  # every field, the table included
    assert load_calibration(path, 4) == dict(block=c["block"], queries=c["queries"], sigma=c["sigma"], kv_cache=False)
    assert os.listdir(tmp_path) == ["cal.json"]  # written atomically: no temporary left


BAD_FILES = {  # case: (file content, substring of the error besides the file name)
    "not json": ("{", "not valid JSON"),
    "an array": ("[]", "JSON object"),
    "no block": ({"queries": "target", "sigma": 1}, "'block'"),
    "block negative": ({"block": -1, "queries": "target", "sigma": 1}, "'block'"),
    "block too deep": ({"block": 4, "queries": "target", "sigma": 1}, "'block' is 4"),
    "block a string": ({"block": "1", "queries": "target", "sigma": 1}, "'block'"),
    "block a bool": ({"block": True, "queries": "target", "sigma": 1}, "'block'"),
    "block a float": ({"block": 1.5, "queries": "target", "sigma": 1}, "'block'"),
    "queries unknown": ({"block": 1, "queries": "keys", "sigma": 1}, "'queries'"),
    "queries missing": ({"block": 1, "sigma": 1}, "'queries'"),
    "sigma 0": ({"block": 1, "queries": "text", "sigma": 0}, "'sigma'"),
    "sigma above 1": ({"block": 1, "queries": "text", "sigma": 1.5}, "'sigma'"),
    "sigma a string": ({"block": 1, "queries": "text", "sigma": "1"}, "'sigma'"),
    "sigma missing": ({"block": 1, "queries": "text"}, "'sigma'"),
    "kv_cache a string": ({"block": 1, "queries": "text", "sigma": 1, "kv_cache": "yes"}, "'kv_cache'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_calibration_files_name_the_file(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "bad-cal.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as e:
        load_calibration(path, 4)
    assert str(path) in str(e.value) and message in str(e.value), e.value


def test_missing_and_special_calibration_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_calibration(tmp_path / "nope.json", 4)
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ValueError, match="fifo.json"):
        load_calibration(tmp_path / "fifo.json", 4)


# ----------------------------------------------------------------------------------------------
# The temporal update (re-score at step K) in the sampler


REFS = [photo(80, 70, seed=1), photo(64, 100, seed=2)]


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """A tiny klein folder (1 double + 2 single blocks) and reference files."""
    root = tmp_path_factory.mktemp("klein")
    make_pipeline_folder(root, distilled=True)
    d = tmp_path_factory.mktemp("inputs")
    for k, im in enumerate(REFS):
        im.save(d / f"ref{k}.png")
    return root, d


def constant_scores(monkeypatch):
    """attention_selector's reference_attention, replaced by equal scores for every token; returns its call count."""
    calls = []

    def flat(model, img, img_ids, txt, txt_ids, t, ref, ref_ids, **kw):
        calls.append(kw)
        return torch.ones(img.shape[0], ref.shape[1])

    monkeypatch.setattr(attention_selector, "reference_attention", flat)
    return calls


@pytest.mark.parametrize("kv", [False, True])
def test_rescore_without_change_is_bit_identical(klein, monkeypatch, kv):
    root, _ = klein
    calls = constant_scores(monkeypatch)
    sampling = dict(seed=[3, 4], kv_cache=kv, keep=0.3, selector=AttentionSelector())
    plain, stats = pipeline.generate(str(root), "a red cube", REFS, **sampling)
    assert len(calls) == 1 and stats.rescored == []
    again, rescored = generate_rescored(str(root), "a red cube", REFS, 2, **sampling)
    assert len(calls) == 3  # the re-score ran: every reference token scored again
    assert all(torch.equal(a, b) for a, b in zip(rescored.rescored, stats.kept))
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(plain, again))


def test_two_segments_with_the_same_set_are_one_run(klein):
    """Without a cache, denoising the same set in two segments split at step K (as generate_rescored
    does when the set changes) is bit-identical to one run: the same Euler steps."""
    root, _ = klein
    transformer = Flux2.from_pretrained(str(root))
    images = pipeline.load_references(REFS)
    h, w = pipeline.output_size(images, None, None)
    with torch.no_grad():
        txts, _, encoded = pipeline.encode_inputs(str(root), ["a red cube"], images, False, torch.float32, torch.device("cpu"))
        kept = [torch.tensor([0, 3, 5, 8]), torch.tensor([1, 2, 20])]
        ref, ref_ids = pipeline.gather_references(encoded, kept)
        jobs = [("a red cube", 3), ("a red cube", 4)]
        one = pipeline.sample_latents(transformer, jobs, txts, h, w, 4, ref, ref_ids)
        sigmas, two = schedule(4, h * w), []
        for p, s in jobs:
            x = initial_noise(s, 16, h, w, torch.float32)
            for part in (sigmas[:3], sigmas[2:]):
                x = pipeline.denoise(transformer, x, grid_ids(h, w), txts[p], text_ids(txts[p].shape[1]), part, ref=ref, ref_ids=ref_ids)
            two.append(x)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_rescore_with_cache_equals_the_new_set_by_hand_from_step_k(klein):
    """With the KV cache, a re-score that changes the kept set equals: denoise steps 0..K-1 on the first
    set (its cache), score every token from the first image's latent at sigma_K, draw with the same
    rule, denoise steps K.. on the new set with a new cache, filled at step K; two images share both."""
    from token_selectors import select_reference_tokens

    root, _ = klein
    K, seeds = 2, [3, 4]
    images_out, stats = generate_rescored(str(root), "a red cube", REFS, K, seed=seeds, kv_cache=True, keep=0.3,
                                          selector=AttentionSelector())  # fmt: skip
    assert "token scoring" in stats.seconds
    changed = sum(not torch.equal(a, b) for a, b in zip(stats.kept, stats.rescored))
    assert changed, "this case must change the kept set"
    # by hand
    device, dtype = torch.device("cpu"), torch.float32
    images = pipeline.load_references(REFS)
    h, w = pipeline.output_size(images, None, None)
    transformer = Flux2.from_pretrained(str(root))
    with torch.no_grad():
        txts, _, encoded = pipeline.encode_inputs(str(root), ["a red cube"], images, False, dtype, device)
        txt = txts["a red cube"]
        txt_ids, img_ids = text_ids(txt.shape[1]), grid_ids(h, w)
        sigmas = schedule(4, h * w)
        ref0, ids0 = pipeline.gather_references(encoded, stats.kept)
        ref1, ids1 = pipeline.gather_references(encoded, stats.rescored)
        cache0, cache1 = KVCache(), KVCache()
        latents = []
        for i, seed in enumerate(seeds):
            x = initial_noise(seed, 16, h, w, dtype)
            x = pipeline.denoise(transformer, x, img_ids, txt, txt_ids, sigmas[: K + 1], ref=ref0, ref_ids=ids0, kv_cache=cache0)
            if i == 0:  # the re-score: every token, from this latent at sigma_K
                every, every_ids = pipeline.gather_references(encoded, [None, None])
                scores = reference_attention(transformer, x, img_ids, txt, txt_ids, sigmas[K].reshape(1), every, every_ids,
                                             kv_pattern=True)[0]  # the selector's pass runs in the sampler's pattern
                sizes = [tokens.shape[1] for tokens, _ in encoded]
                kept = select_reference_tokens(images, 0.3, "attention", seed=0, uniform_mix=0.25, scores=list(scores.split(sizes)))
                assert all(torch.equal(a, b) for a, b in zip(kept, stats.rescored))
            x = pipeline.denoise(transformer, x, img_ids, txt, txt_ids, sigmas[K:], ref=ref1, ref_ids=ids1, kv_cache=cache1)
            latents.append(x)
        assert cache1.num_ref_tokens == ref1.shape[1]  # the new cache holds the new set only
        from vae import AutoEncoder

        want = pipeline.decode_latents(AutoEncoder.from_pretrained(str(root)), latents, h, w)
        no_rescore = pipeline.generate(str(root), "a red cube", REFS, seed=seeds, kv_cache=True, keep=0.3,
                                       selector=AttentionSelector())[0]  # fmt: skip
    for got, exp, old in zip(images_out, want, no_rescore):
        assert np.array_equal(np.array(got), np.array(exp))
    assert any(not np.array_equal(np.array(a), np.array(b)) for a, b in zip(images_out, no_rescore))


def test_rescore_with_kv_reference_queries_changes_nothing(klein):
    """In the KV pattern the references' mutual attention depends on neither prompt nor latent: the
    re-score with queries "references" draws the same set, and the run is bit-identical."""
    root, _ = klein
    sampling = dict(seed=5, kv_cache=True, keep=0.3, selector=AttentionSelector(Selector(uniform_mix=0.0), queries="references"))
    plain, stats = pipeline.generate(str(root), "a red cube", REFS, **sampling)
    again, rescored = generate_rescored(str(root), "a red cube", REFS, 1, **sampling)
    assert all(torch.equal(a, b) for a, b in zip(stats.kept, rescored.rescored))
    assert np.array_equal(np.array(plain), np.array(again))


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_calibrate_then_sample_with_it(klein, tmp_path, capsys):
    """--calibrate writes the file (sampling nothing); --attention-calibration samples with its block,
    queries and sigma, as generate() with those values does; --attention-rescore-step reports the swap."""
    root, d = klein
    cal = tmp_path / "cal.json"
    common = ["--model", str(root), "--ref", str(d / "ref0.png"), str(d / "ref1.png"), "--prompt", "a red cube"]
    sample.main(common + ["--seeds", "0", "1", "--calibrate", str(cal)])
    out = capsys.readouterr().out
    assert f"wrote {cal}" in out and "Spearman" in out and os.listdir(tmp_path) == ["cal.json"]
    c = json.loads(cal.read_text())
    assert len(c["table"]) == 3 * len(QUERIES) * 4  # 3 blocks, every queries choice, the 4 steps' sigmas
    h, w = pipeline.output_size(pipeline.load_references(REFS), None, None)
    assert sorted({r["sigma"] for r in c["table"]}, reverse=True) == schedule(4, h * w)[:4].tolist()
    assert c["kv_cache"] is False and c["influence"] == "proxy"

    sample.main(common + ["--keep", "0.3", "--selector", "attention", "--attention-calibration", str(cal), "--attention-rescore-step",
                          "2", "--out", str(tmp_path / "o.png"), "--seed", "7"])  # fmt: skip
    assert "re-scored at step 2" in capsys.readouterr().out
    selector = AttentionSelector(block=c["block"], queries=c["queries"], sigma=c["sigma"])
    want, _ = generate_rescored(str(root), "a red cube", REFS, 2, seed=7, keep=0.3, selector=selector)
    got = np.array(pipeline.load_image(tmp_path / "o.png"))
    assert np.array_equal(got, np.array(want))
    assert sorted(os.listdir(tmp_path)) == ["cal.json", "o.png"]


def calibration(d, name, **fields):
    path = d / name
    save_calibration(path, dict(dict(block=1, queries="text", sigma=0.9, kv_cache=False), **fields))
    return str(path)


BAD_CLI = {  # case: (arguments after --model, --prompt and --ref; substring of the one error line)
    "calibrate with out": (["--calibrate", "{t}/c.json", "--out", "{t}/o.png"], "--out cannot apply with --calibrate"),
    "calibrate with keep and selector": (["--calibrate", "{t}/c.json", "--keep", "0.3", "--selector", "attention"],
                                         "--keep, --selector cannot apply with --calibrate"),  # fmt: skip
    "calibrate with attention block": (["--calibrate", "{t}/c.json", "--attention-block", "1"], "--attention-block cannot apply with --calibrate"),
    "calibrate with a calibration": (["--calibrate", "{t}/c.json", "--attention-calibration", "{good}"], "--attention-calibration cannot apply"),
    "calibrate with guidance": (["--calibrate", "{t}/c.json", "--guidance", "2"], "--guidance cannot apply with --calibrate"),
    "calibrate with rescore": (["--calibrate", "{t}/c.json", "--attention-rescore-step", "1"], "--attention-rescore-step cannot apply"),
    "calibrate without refs": (["--no-ref", "--calibrate", "{t}/c.json"], "--calibrate needs reference images"),
    "calibrate into a folder": (["--calibrate", "{t}/dir.json"], "is a folder"),
    "calibrate under a file": (["--calibrate", "{t}/file/c.json"], "cannot write --calibrate"),
    "calibrate steps 0": (["--calibrate", "{t}/c.json", "--steps", "0"], "--steps"),
    "calibrate bad model": (["--calibrate", "{t}/c.json", "--model", "{t}/no-model"], "no-model"),
    "calibrate exact alone": (["--calibrate-exact", "--out", "{t}/o.png"], "--calibrate-exact cannot apply without --calibrate"),
    "calibration without the selector": (["--keep", "0.3", "--attention-calibration", "{good}", "--out", "{t}/o.png"],
                                         "--attention-calibration cannot apply without the attention selector"),  # fmt: skip
    "calibration with keep 1": (["--selector", "attention", "--attention-calibration", "{good}", "--out", "{t}/o.png"],
                                "--selector cannot apply with --keep 1"),  # fmt: skip
    "calibration and block": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{good}", "--attention-block",
                               "1", "--out", "{t}/o.png"], "not both"),  # fmt: skip
    "calibration and queries": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{good}", "--attention-queries",
                                 "text", "--out", "{t}/o.png"], "not both"),  # fmt: skip
    "calibration missing": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{t}/nope.json", "--out",
                             "{t}/o.png"], "nope.json"),  # fmt: skip
    "calibration not json": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{t}/file", "--out", "{t}/o.png"],
                             "not valid JSON"),  # fmt: skip
    "calibration block too deep": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{deep}", "--out",
                                    "{t}/o.png"], "deep.json: field 'block' is 3"),  # fmt: skip
    "calibration queries unknown": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{keys}", "--out",
                                     "{t}/o.png"], "keys.json: field 'queries'"),  # fmt: skip
    "calibration sigma 0": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{sigma0}", "--out", "{t}/o.png"],
                            "sigma0.json: field 'sigma'"),  # fmt: skip
    "calibration for the kv cache": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{kv}", "--out",
                                      "{t}/o.png"], "kv.json was calibrated with --kv-cache"),  # fmt: skip
    "calibration without the kv cache": (["--keep", "0.3", "--selector", "attention", "--attention-calibration", "{good}", "--kv-cache",
                                          "--out", "{t}/o.png"], "good.json was calibrated without --kv-cache"),  # fmt: skip
    "rescore without the selector": (["--keep", "0.3", "--attention-rescore-step", "1", "--out", "{t}/o.png"],
                                     "--attention-rescore-step cannot apply without the attention selector"),  # fmt: skip
    "rescore step 0": (["--keep", "0.3", "--selector", "attention", "--attention-rescore-step", "0", "--out", "{t}/o.png"],
                       "--attention-rescore-step must be"),  # fmt: skip
    "rescore step = steps": (["--keep", "0.3", "--selector", "attention", "--attention-rescore-step", "4", "--out", "{t}/o.png"],
                             "--attention-rescore-step must be an integer >= 1 and <= 3"),  # fmt: skip
    "rescore with one step": (["--keep", "0.3", "--selector", "attention", "--attention-rescore-step", "1", "--steps", "1", "--out",
                               "{t}/o.png"], "needs at least 2 denoising steps"),  # fmt: skip
    "rescore with compile": (["--keep", "0.3", "--selector", "attention", "--attention-rescore-step", "1", "--compile", "--out",
                              "{t}/o.png"], "cannot be combined with --compile"),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_bad_input_table(klein, tmp_path_factory, monkeypatch, capsys, case):
    """One `error:` line naming the option or file, a non-zero exit, nothing written, no model loaded."""
    from text_encoder import TextEncoder
    from vae import AutoEncoder

    root, d = klein
    t = tmp_path_factory.mktemp("bad")
    (t / "file").write_text("x")
    (t / "dir.json").mkdir()
    files = dict(t=t, good=calibration(t, "good.json"), deep=calibration(t, "deep.json", block=3), keys=calibration(t, "keys.json", queries="keys"),
                 sigma0=calibration(t, "sigma0.json", sigma=0), kv=calibration(t, "kv.json", kv_cache=True))  # fmt: skip
    for cls in (Flux2, TextEncoder, AutoEncoder):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded"))
    extra, message = BAD_CLI[case]
    extra = [a.format(**files) for a in extra]
    args = ["--prompt", "x"] + ([] if "--no-ref" in extra else ["--ref", str(d / "ref0.png")])
    extra = [a for a in extra if a != "--no-ref"]
    if "--model" not in extra:
        args += ["--model", str(root)]
    before = sorted(t.iterdir())
    with pytest.raises(SystemExit) as exit:
        sample.main(args + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(t.iterdir()) == before
