"""Training package: data generators, the corruption, the objective's pieces, and smoke training runs.

Fast (a few seconds each on two CPU cores); nothing here needs a GPU or the network.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.sudoku import is_valid_solution
from training import data as D
from training import sudoku_bank as SB
from training.checkpoints import BOS_ID, EOS_ID, EOT_ID, PAD_ID, SOT_ID, train_tokenizer
from training.model import (
    CHECKPOINT_LIMIT_BYTES,
    SAFETY_BYTES,
    CacheRows,
    build_config,
    build_model,
    corrupt,
    decode,
    diffusion_loss,
    encode,
    param_bytes,
    use_dense_experts,
    use_fused_rms_norm,
    use_split_layers,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- sudoku data
# An independent solution counter (Knuth's Algorithm X over the 324 exact-cover constraints, dict of sets): it
# shares no code with training/sudoku_gen.c, which generated the bank.

def _cover_problem():
    digits = list(product(range(9), range(1, 10)))
    X = [("rc", rc) for rc in product(range(9), range(9))] + [(kind, x) for kind in ("rn", "cn", "bn") for x in digits]
    Y = {}
    for r, c, n in product(range(9), range(9), range(1, 10)):
        b = (r // 3) * 3 + c // 3
        Y[(r, c, n)] = [("rc", (r, c)), ("rn", (r, n)), ("cn", (c, n)), ("bn", (b, n))]
    Xd = {j: set() for j in X}
    for i, row in Y.items():
        for j in row:
            Xd[j].add(i)
    return Xd, Y


def _select(X, Y, r):
    cols = []
    for j in Y[r]:
        for i in X[j]:
            for k in Y[i]:
                if k != j:
                    X[k].remove(i)
        cols.append(X.pop(j))
    return cols


def _deselect(X, Y, r, cols):
    for j in reversed(Y[r]):
        X[j] = cols.pop()
        for i in X[j]:
            for k in Y[i]:
                if k != j:
                    X[k].add(i)


def _count(X, Y, limit, found):
    if not X:
        found.append(1)
        return
    c = min(X, key=lambda j: len(X[j]))
    for r in list(X[c]):
        cols = _select(X, Y, r)
        _count(X, Y, limit, found)
        _deselect(X, Y, r, cols)
        if len(found) >= limit:
            return


def exact_cover_count(puzzle, limit=2):
    X, Y = _cover_problem()
    for i, n in enumerate(puzzle):
        if n:
            if any(j not in X for j in Y[(i // 9, i % 9, n)]):
                return 0
            _select(X, Y, (i // 9, i % 9, n))
    found = []
    _count(X, Y, limit, found)
    return len(found)


def _check_grid_rules(grid: list[int]) -> None:
    rows = [grid[9 * r: 9 * r + 9] for r in range(9)]
    cols = [grid[c::9] for c in range(9)]
    boxes = [[grid[9 * (br + i) + bc + j] for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    for unit in rows + cols + boxes:
        assert sorted(unit) == list(range(1, 10))


@pytest.fixture(scope="module")
def bank():
    return SB.load_bank()


def _sample_indices(n_total: int, n: int) -> list[int]:
    return sorted({round(i * (n_total - 1) / (n - 1)) for i in range(n)})


def test_bank_puzzles_have_exactly_one_solution(bank):
    """A spread sample of the committed bank, counted by the independent solver: one solution, the stored one."""
    assert len(bank) >= 40_000
    for i in _sample_indices(len(bank), 40):
        puzzle, solution = bank.puzzles[i].tolist(), bank.solutions[i].tolist()
        _check_grid_rules(solution)
        assert is_valid_solution(puzzle, solution)
        assert exact_cover_count(puzzle, limit=2) == 1, i
        assert 17 <= sum(1 for d in puzzle if d) <= 35


def test_training_puzzles_have_exactly_one_solution(bank):
    """What the trainer is fed (bank puzzle, extra givens for some, random symmetry, on the device's generator):
    every puzzle has exactly one solution and the canvas is it. The old sampler (40-64 random blanks of a
    random grid) failed this on 59 of 60 puzzles."""
    sampler = D.SudokuSampler(bank.solutions, bank.givens, "cpu", seed=3, reveal_prob=0.5)
    batch = sampler.sample(32)
    blanks = (batch.puzzle == 0).sum(-1)
    assert blanks.max() >= 52 and blanks.min() < 52  # minimal puzzles and easier ones
    assert (batch.fixed == (batch.puzzle != 0)).all()
    for puzzle, solution in zip(batch.puzzle.tolist(), batch.solution.tolist(), strict=True):
        _check_grid_rules(solution)
        assert is_valid_solution(puzzle, solution)
        assert exact_cover_count(puzzle, limit=2) == 1


def test_no_bank_puzzle_is_an_eval_puzzle(bank):
    """Training never sees an evaluation puzzle, even relabelled (the bank stores canonical labels)."""
    keys = SB.bank_keys(bank)
    ev = D.load_sudoku_eval_set()
    probes = SB.puzzle_keys(np.array(ev.puzzles, dtype=np.uint8), np.array(ev.solutions, dtype=np.uint8))
    assert not keys & probes
    # the check can fail: a bank puzzle, relabelled, is found
    relabel = np.array([0, 3, 1, 2, 5, 4, 7, 9, 8, 6], dtype=np.uint8)
    assert SB.puzzle_keys(relabel[bank.puzzles[:1]], relabel[bank.solutions[:1]]) <= keys


def test_bank_difficulty_spread_is_reported(bank):
    """qqwing rated every bank puzzle; all four of its difficulties are present, roughly as qqwing generates them
    (measured on 2,000 `qqwing --generate --difficulty any`: simple 2.5 %, easy 47.5 %, intermediate 15.8 %,
    expert 34.3 %)."""
    spread = bank.spread()
    print("bank difficulty spread:", spread, "meta:", {k: v for k, v in bank.meta.items() if k != "counts"})
    assert set(spread) == set(SB.DIFFICULTIES) and abs(sum(spread.values()) - 1) < 1e-3
    assert all(v > 0 for v in spread.values())
    assert spread["expert"] > 0.2 and spread["intermediate"] > 0.1
    assert bank.meta["not_unique_by_qqwing"] == 0 and bank.meta["kept"] == len(bank)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_generator_makes_minimal_unique_puzzles():
    puzzles, solutions = SB.generate(4, seed=11)
    assert (SB.generate(4, seed=11)[0] == puzzles).all()  # deterministic in the seed
    for p, s in zip(puzzles.tolist(), solutions.tolist(), strict=True):
        _check_grid_rules(s)
        assert is_valid_solution(p, s)
        assert exact_cover_count(p) == 1 and SB.count_solutions(np.array(p)) == 1
        given = next(i for i, d in enumerate(p) if d)
        fewer = list(p)
        fewer[given] = 0  # minimal: any given removed admits a second solution
        assert exact_cover_count(fewer) == 2 and SB.count_solutions(np.array(fewer)) == 2
    assert SB.count_solutions(np.zeros(81, dtype=np.uint8), limit=5) == 5


def test_bank_packing_round_trip(tmp_path):
    puzzles, solutions = SB.generate(3, seed=2)
    SB.pack(tmp_path / "b.npz", puzzles, solutions, np.array([0, 1, 3]), {"x": 1})
    back = SB.load_bank(tmp_path / "b.npz")
    assert back.meta == {"x": 1} and back.difficulty.tolist() == [0, 1, 3]
    assert SB.puzzle_keys(puzzles, solutions) == SB.bank_keys(back)
    assert ((back.puzzles != 0) == (puzzles != 0)).all()


def test_prompt_and_canvas_ids_match_the_tokenizer(bank):
    tok = D.sudoku_tokenizer()
    sampler = D.SudokuSampler(bank.solutions[:64], bank.givens[:64], "cpu", seed=0, dot_prob=0.5)
    batch = sampler.sample(16)
    assert (batch.prompt[:, 0] == BOS_ID).all() and batch.prompt.shape == (16, 82)
    assert (batch.prompt == D.DOT_ID).any() and (batch.prompt == D.DIGIT0_ID).any()  # both blank characters
    for i in range(16):
        puzzle = batch.puzzle[i].tolist()
        blank = "." if (batch.prompt[i] == D.DOT_ID).any() else "0"
        text = D.puzzle_string(puzzle, blank)
        assert tok(text)["input_ids"] == batch.prompt[i].tolist()  # <bos> + one token per cell
        solution = "".join(map(str, batch.solution[i].tolist()))
        assert tok(solution, add_special_tokens=False)["input_ids"] == batch.canvas[i].tolist()
        assert tok.decode(batch.canvas[i].tolist()) == solution
    assert (D.digits_from_ids(batch.canvas) == batch.solution).all()
    # transforms give distinct grids, not 64 repeated ones
    assert len({tuple(s) for s in sampler.sample(256).solution.tolist()}) > 250


def test_transform_moves_masks_with_their_cells(bank):
    grids = torch.as_tensor(bank.solutions[:2], dtype=torch.long).repeat(50, 1)
    givens = torch.as_tensor(bank.givens[:2]).repeat(50, 1)
    g = torch.Generator().manual_seed(0)
    out, moved = D.transform_grids(grids, g, givens)
    assert (moved.sum(-1) == givens.sum(-1)).all()
    for s in out.tolist():
        _check_grid_rules(s)


def test_bundled_qqwing_eval_set():
    ev = D.load_sudoku_eval_set()
    assert len(ev) >= 200
    assert set(ev.difficulty) == set(SB.DIFFICULTIES)
    for p, s in zip(ev.puzzles, ev.solutions, strict=True):
        assert is_valid_solution(p, s)
        assert 17 <= sum(1 for x in p if x) <= 45
    sub = ev.subset(8)
    assert len(sub) == 8 and set(sub.difficulty) == set(SB.DIFFICULTIES)


@pytest.mark.skipif(shutil.which("qqwing") is None, reason="qqwing not installed")
def test_qqwing_generator():
    pairs = D.qqwing_puzzles(2, "simple")
    assert len(pairs) == 2
    for p, s in pairs:
        assert is_valid_solution(D.parse_grid(p), D.parse_grid(s))


# ------------------------------------------------------------------------------------------- corruption

def test_corrupt_never_noises_fixed_positions():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(9, 19, (64, 81), generator=g)
    fixed = torch.rand(64, 81, generator=g) < 0.4
    t = torch.ones(64)  # the strongest noise
    noisy, noised = corrupt(clean, t, vocab_size=20, generator=g, fixed=fixed)
    assert (noisy[fixed] == clean[fixed]).all()
    assert not noised[fixed].any()
    assert noised[~fixed].all()  # t = 1 redraws every free position


@pytest.mark.parametrize("level", [0.1, 0.5, 0.9])
def test_corrupt_noises_the_requested_fraction(level):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 2048, (256, 64), generator=g)
    noisy, noised = corrupt(clean, torch.full((256,), level), vocab_size=2048, generator=g)
    assert abs(noised.float().mean().item() - level) < 0.01
    # a redrawn token is uniform over the vocabulary: it rarely equals the clean one
    changed = (noisy != clean).float().mean().item()
    assert abs(changed - level * (1 - 1 / 2048)) < 0.01
    assert (noisy[~noised] == clean[~noised]).all()


def test_corrupt_draws_uniformly_from_the_whole_vocabulary():
    g = torch.Generator().manual_seed(2)
    clean = torch.full((200, 81), 10)
    noisy, noised = corrupt(clean, torch.ones(200), vocab_size=20, generator=g)
    counts = torch.bincount(noisy[noised], minlength=20).float()
    assert counts.numel() == 20 and (counts > 0).all()
    assert counts.max() / counts.min() < 1.3  # 16200 draws over 20 ids


# ------------------------------------------------------------------------------------------------- model

def test_presets_fit_the_checkpoint_limit_in_float32():
    for preset, vocab, length in (("sudoku", D.SUDOKU_VOCAB, 81), ("text", 2048, 64)):
        config = build_config(preset, vocab, length)
        with torch.device("meta"):
            from transformers import DiffusionGemmaForBlockDiffusion

            model = DiffusionGemmaForBlockDiffusion(config)
        assert param_bytes(model, torch.float32) + SAFETY_BYTES < CHECKPOINT_LIMIT_BYTES, preset


def _tiny_model(vocab=20, length=81):
    return build_model(build_config("smoke", vocab, length), seed=0)


def test_training_patches_match_the_reference_model():
    from transformers import DiffusionGemmaForBlockDiffusion

    config = build_config("smoke", 20, 81)
    torch.manual_seed(0)
    ref = DiffusionGemmaForBlockDiffusion(config).eval()
    patched = DiffusionGemmaForBlockDiffusion(config).eval()
    patched.load_state_dict(ref.state_dict())
    use_dense_experts(patched)
    assert use_fused_rms_norm(patched) > 0
    use_split_layers(patched)
    prompt = torch.randint(0, 20, (2, 82))
    canvas = torch.randint(0, 20, (2, 81))
    with torch.no_grad():
        a = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        b = patched(input_ids=prompt, decoder_input_ids=canvas).logits
        cache = encode(patched, prompt)
        c = decode(patched, canvas, cache, prompt_len=82)
        d = decode(patched, canvas[:1], CacheRows(cache, 1), prompt_len=82)
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(b, c, atol=1e-5)
    assert torch.allclose(c[:1], d, atol=1e-5)
    # the class itself is untouched: a fresh model still runs transformers' own norm
    assert "forward" not in vars(ref.model.decoder.norm)


def test_diffusion_loss_trains_encoder_and_self_conditioning(bank):
    model = _tiny_model().train()
    g = torch.Generator().manual_seed(0)
    sampler = D.SudokuSampler(bank.solutions[:8], bank.givens[:8], "cpu", seed=0)
    b = sampler.sample(8)
    out = diffusion_loss(model, b.prompt, b.canvas, g, fixed=b.fixed, sc_prob=0.5)
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    assert not out.noised[b.fixed].any()
    out.loss.backward()
    enc_q = model.model.encoder.language_model.layers[0].self_attn.q_proj.weight
    assert enc_q.grad is not None and enc_q.grad.abs().sum() > 0  # through the KV cache
    sc = model.model.decoder.self_conditioning.gate_proj.weight
    assert sc.grad is not None and sc.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- text

def test_mini_corpus_is_small_and_loads(tmp_path):
    assert D.MINI_CORPUS_PATH.stat().st_size < 200_000
    docs = D.load_corpus(D.MINI_CORPUS_PATH)
    assert len(docs) > 50
    assert {d["src"].split("/")[0] for d in docs} == {"kjv", "fortunes"}
    # write + read round trip, gzip included, byte-identical on a second write
    D._write_jsonl(docs, tmp_path / "c.jsonl.gz")
    first = (tmp_path / "c.jsonl.gz").read_bytes()
    D._write_jsonl(docs, tmp_path / "c.jsonl.gz")
    assert (tmp_path / "c.jsonl.gz").read_bytes() == first
    assert D.load_corpus(tmp_path / "c.jsonl.gz") == docs


@pytest.mark.skipif(shutil.which("bible") is None or not D.FORTUNES_DIR.is_dir(),
                    reason="bible-kjv / fortunes not installed")
def test_build_corpus_is_reproducible(tmp_path):
    a = D.build_corpus(tmp_path / "a.jsonl.gz")
    b = D.build_corpus(tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert a["documents"] > 10_000 and a["characters"] > 5_000_000
    docs = D.load_corpus(tmp_path / "a.jsonl.gz")
    assert docs[0]["title"] == "Genesis 1"
    assert docs[0]["verses"][0] == "In the beginning God created the heaven and the earth."
    assert b["documents"] == a["documents"]


def test_tokenizer_round_trip_and_rendering():
    docs = D.load_corpus(D.MINI_CORPUS_PATH)[:40]
    tok = train_tokenizer((D.document_text(d) for d in docs), vocab_size=512)
    for d in docs[:10]:
        text = D.document_text(d)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    rendered = D.render_documents(docs, tok, seed=0, chat_fraction=0.5)
    assert len(rendered) == len(docs)
    assert all(r[-1] == EOS_ID and r[0] == BOS_ID for r in rendered)
    chats = [r for r in rendered if r[1] == SOT_ID]
    assert chats and all(EOT_ID in r for r in chats)
    assert D.render_documents(docs, tok, seed=0, chat_fraction=0.5) == rendered  # deterministic


def test_text_sampler_windows_and_padding():
    docs = [[BOS_ID] + list(range(20, 60)) + [EOS_ID] for _ in range(30)]
    sampler = D.TextSampler(docs, canvas_length=16, device="cpu", seed=0, max_prompt=32)
    prompt, canvas = sampler.sample(64, prompt_len=24)
    assert prompt.shape == (64, 24) and canvas.shape == (64, 16)
    for row in canvas.tolist():
        if EOS_ID in row:
            cut = row.index(EOS_ID)
            assert all(t == PAD_ID for t in row[cut + 1:])
    x = torch.tensor([[7, 1, 8, 9], [7, 8, 5, 9], [4, 4, 4, 4]])
    assert D.pad_after_end(x).tolist() == [[7, 1, 0, 0], [7, 8, 5, 0], [4, 4, 4, 4]]


# ------------------------------------------------------------------------------------------ smoke runs

def _load(out):
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion.from_pretrained(out), AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="module")
def smoke_models(tmp_path_factory) -> tuple[Path, dict]:
    """<dir>/sudoku and <dir>/text trained in smoke mode (tiny, 6 steps), and their summaries."""
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one-thread fixture
    results = {task: train(TrainConfig(task=task, out=str(root / task), smoke=True, device="cpu"), log=lambda _: None)
               for task in ("sudoku", "text")}
    torch.set_num_threads(threads)
    return root, results


def test_smoke_training_sudoku_writes_a_loadable_checkpoint(smoke_models):
    out, result = smoke_models[0] / "sudoku", smoke_models[1]["sudoku"]
    assert result["steps"] == 6 and math.isfinite(result["loss"])
    assert (out / "model.safetensors").stat().st_size < CHECKPOINT_LIMIT_BYTES
    model, tok = _load(out)
    assert model.config.canvas_length == 81 and len(tok) == D.SUDOKU_VOCAB
    assert model.config.get_text_config().vocab_size == D.SUDOKU_VOCAB
    assert model.generation_config.max_new_tokens == 81
    meta = json.loads((out / "dgserve.json").read_text())
    assert meta["kind"] == "sudoku" and meta["seed"] == 0 and meta["trained"]
    assert "solve_rate" in meta["final_eval"] and meta["history"]
    # the checkpoint runs through transformers' reference generate()
    prompt = tok(D.puzzle_string(D.load_sudoku_eval_set().puzzles[0]), return_tensors="pt")["input_ids"]
    assert prompt.shape == (1, 82)
    out_ids = model.generate(prompt, max_denoising_steps=2).sequences
    assert out_ids.shape == (1, 82 + 81)


def test_training_can_continue_from_a_checkpoint(tmp_path):
    """--init: the next run starts from the saved weights (how a longer GPU run extends models/sudoku)."""
    from safetensors.torch import load_file

    from training.train import TrainConfig, train

    first, second = tmp_path / "a", tmp_path / "b"
    train(TrainConfig(task="sudoku", out=str(first), smoke=True, device="cpu"), log=lambda _: None)
    logs: list[str] = []
    result = train(TrainConfig(task="sudoku", out=str(second), smoke=True, device="cpu", init=str(first), seed=5,
                               max_steps=1, lr=1e-9), log=logs.append)
    assert result["init_from"]["path"] == str(first) and result["init_from"]["steps"] == 6
    assert result["evals"][0]["step"] == 0  # the starting point is measured: nothing worse is ever saved
    assert any("initialised from" in line for line in logs)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    # one step at a vanishing learning rate: the weights are the first run's, not a fresh seed-5 init
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_smoke_training_text_writes_a_loadable_checkpoint(smoke_models):
    out, result = smoke_models[0] / "text", smoke_models[1]["text"]
    assert result["steps"] == 6 and math.isfinite(result["loss"])
    model, tok = _load(out)
    assert model.config.get_text_config().vocab_size == len(tok)
    assert model.generation_config.eos_token_id == [EOS_ID, EOT_ID]
    meta = json.loads((out / "dgserve.json").read_text())
    assert meta["kind"] == "text" and "val_loss" in meta["eval"]
    assert len(meta["final_eval"]["samples"]) == 3
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == BOS_ID
    seq = model.generate(ids, max_new_tokens=model.config.canvas_length, max_denoising_steps=2).sequences
    assert seq.shape[1] == ids.shape[1] + model.config.canvas_length


def test_cli_smoke_and_summary(tmp_path, capsys):
    from training.cli import main
    from training.gpu import summarize

    assert main(["sudoku", "--smoke", "--device", "cpu", "--out", str(tmp_path / "sudoku"), "--max-steps", "3"]) == 0
    assert json.loads((tmp_path / "sudoku" / "dgserve.json").read_text())["run"]["steps"] == 3
    text, rows = summarize(tmp_path, ["sudoku", "text"], {"sudoku": 0}, "cpu", 1.0)
    assert rows[0]["steps"] == 3 and "solve" in rows[0]["metric"]
    assert "no checkpoint" in text  # text was not trained here


def test_safe_mode_follows_the_same_trajectory(tmp_path):
    """--safe (transformers' own experts and norms) and the default fast paths train identically."""
    from training.train import TrainConfig, train

    losses = []
    for safe in (False, True):
        cfg = TrainConfig(task="sudoku", out=str(tmp_path / f"s{int(safe)}"), smoke=True, device="cpu",
                          max_steps=3, safe=safe)
        losses.append(train(cfg, log=lambda _: None)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_compile_with_safe_is_refused_before_anything_is_built():
    from training.config import TrainConfig
    from training.run import build_run

    logs: list[str] = []
    with pytest.raises(SystemExit, match="drop --safe"):
        build_run(TrainConfig(task="sudoku", out="/nonexistent", smoke=True, device="cpu", compile=True, safe=True),
                  logs.append)
    assert logs == []  # no bank loaded, no model built


@pytest.mark.parametrize("caller", ["train", "throughput"])
def test_a_step_out_of_memory_halves_the_batch_and_goes_on(caller, tmp_path, monkeypatch):
    """Both the training loop and the throughput measurement halve the batch after an out-of-memory first step
    and go on; at 16 or fewer examples they give up with the error."""
    from training import throughput, train
    from training.config import TrainConfig

    module = train if caller == "train" else throughput
    real, sizes = module.first_step, []

    def out_of_memory_once(run, *args):
        sizes.append(run.cfg.batch_size)
        if len(sizes) == 1:
            raise torch.OutOfMemoryError("simulated")
        return real(run, *args)

    monkeypatch.setattr(module, "first_step", out_of_memory_once)
    logs: list[str] = []

    def go(batch_size: int) -> int:
        cfg = TrainConfig(task="sudoku", out=str(tmp_path / str(batch_size)), smoke=True, device="cpu",
                          preset="smoke", max_steps=2, batch_size=batch_size)
        if caller == "train":
            return train.train(cfg, log=logs.append)["config"]["batch_size"]
        return throughput.measure(cfg, steps=1, warmup=1, log=logs.append)["batch_size"]

    assert go(32) == 16 and sizes == [32, 16]
    assert any("out of memory" in line and "batch size halved to 16" in line for line in logs)
    sizes.clear()
    with pytest.raises(torch.OutOfMemoryError):
        go(16)
    assert sizes == [16]


def test_the_gpu_script_runs_on_the_cpu_with_a_tiny_config(smoke_models, tmp_path):
    """training/gpu_train.sh end to end as the GPU call runs it (both models side by side, continued from the
    given checkpoints, the text canvas set, packed), on the CPU in smoke mode: seconds, not minutes."""
    import tarfile

    root = Path(__file__).resolve().parents[1]
    out, packed = tmp_path / "out", tmp_path / "pack"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(root / "training" / "gpu_train.sh"), str(out), "120", "--device", "cpu", "--smoke",
         "--init-from", str(smoke_models[0]), "--text-canvas", "12", "--pack", str(packed)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((packed / "summary.json").read_text())
    assert [r["model"] for r in rows] == ["sudoku", "text"] and all(r["rc"] == 0 for r in rows)
    for name in ("sudoku", "text"):
        with tarfile.open(packed / f"{name}.tar.gz") as tar:
            tar.extractall(tmp_path / "unpacked", filter="data")
        meta = json.loads((tmp_path / "unpacked" / name / "dgserve.json").read_text())
        assert meta["init_from"]["path"] == str(smoke_models[0] / name)
        assert meta["throughput"]["examples_per_s"] > 0 and meta["throughput"]["flops_per_example"] > 0
    model, tok = _load(tmp_path / "unpacked" / "text")
    assert model.config.canvas_length == 12
    assert tok.get_vocab() == _load(smoke_models[0] / "text")[1].get_vocab()  # the continued model's tokenizer


def test_dictd_entries_become_documents(tmp_path):
    """The dictd reader (The Devil's Dictionary comes as a dictd database): offsets and lengths in dictd's
    base 64, the gzip body, the header entries skipped."""
    import gzip

    entries = [("00databaseinfo", "header, not text"), ("ABSURDITY", "ABSURDITY, n.  A statement of belief."),
               ("BORE", "BORE, n.  A person who talks when you wish him to listen.")]
    body, index = b"", []
    for head, text in entries:
        raw = (text + "\n\n").encode()
        index.append(f"{head}\t{D._DICTD_B64[len(body) // 64]}{D._DICTD_B64[len(body) % 64]}\t"
                     f"{D._DICTD_B64[len(raw) // 64]}{D._DICTD_B64[len(raw) % 64]}")
        body += raw
    (tmp_path / "x.index").write_text("\n".join(index) + "\n")
    (tmp_path / "x.dict.dz").write_bytes(gzip.compress(body))
    docs = D.dictd_documents("x", tmp_path)
    assert docs == [{"src": "x", "text": entries[1][1]}, {"src": "x", "text": entries[2][1]}]


def test_layer_halves_trace_whole_for_the_compiler():
    """What the GPU run compiles (training/split_layers.py) traces as whole graphs, no graph break, and computes
    the same loss and gradients as the eager layers. Dynamo's tracing only (backend "eager"): inductor's code
    generation takes minutes on this CPU (checked by hand: loss equal to 1e-6, gradients to 8e-8)."""
    from training import split_layers as S

    prompt, canvas = torch.randint(9, 19, (4, 82)), torch.randint(9, 19, (4, 81))
    fixed = torch.rand(4, 81, generator=torch.Generator().manual_seed(1)) < 0.3
    results = []
    for traced in (False, True):
        model = _tiny_model()
        if traced:
            S.use_split_layers(model, torch.compile(S.project_qkv, backend="eager", fullgraph=True),
                               torch.compile(S.feed_forward_half, backend="eager", fullgraph=True))
        out = diffusion_loss(model, prompt, canvas, torch.Generator().manual_seed(0), fixed=fixed, sc_prob=0.5)
        out.loss.backward()
        results.append((out.loss.item(), model.model.decoder.layers[0].mlp.gate_proj.weight.grad))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_bank_command_without_qqwing_says_so_without_a_traceback(tmp_path, monkeypatch, capsys):
    """Fails before generating anything (it used to find out after minutes of generation)."""
    from training.cli import main

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert main(["sudoku-bank", "--puzzles", "10", "--out", str(tmp_path / "b.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: qqwing is not installed") and "Traceback" not in err
    assert not (tmp_path / "b.npz").exists()
