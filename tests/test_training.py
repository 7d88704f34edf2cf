"""Training package: data generators, the corruption, the objective's pieces, and smoke training runs.

Fast (a few seconds each on two CPU cores); nothing here needs a GPU or the network.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from training import data as D
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
)
from worker.checkpoints import BOS_ID, EOS_ID, EOT_ID, PAD_ID, SOT_ID, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- sudoku data

def _check_grid_rules(grid: list[int]) -> None:
    rows = [grid[9 * r: 9 * r + 9] for r in range(9)]
    cols = [grid[c::9] for c in range(9)]
    boxes = [[grid[9 * (br + i) + bc + j] for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    for unit in rows + cols + boxes:
        assert sorted(unit) == list(range(1, 10))


def test_base_grids_are_valid_and_deterministic():
    grids = D.base_grids(12, seed=3)
    assert grids.shape == (12, 81)
    for g in grids.tolist():
        _check_grid_rules(g)
        assert D.is_valid_solution(g)
    assert (D.base_grids(12, seed=3) == grids).all()
    assert len({tuple(g) for g in grids.tolist()}) == 12


def test_is_valid_solution_rejects_broken_grids():
    grid = D.base_grids(1, seed=0)[0].tolist()
    broken = list(grid)
    broken[0], broken[1] = broken[1], broken[0]  # rows still fine, columns not
    assert not D.is_valid_solution(broken)
    assert not D.is_valid_solution([1] * 81)


def test_sampler_produces_valid_puzzles():
    sampler = D.SudokuSampler(D.base_grids(8, seed=1), "cpu", seed=5, min_blanks=40, max_blanks=64)
    batch = sampler.sample(128)
    assert batch.prompt.shape == (128, 82) and batch.canvas.shape == (128, 81)
    assert (batch.prompt[:, 0] == BOS_ID).all()
    blanks = (batch.puzzle == 0).sum(-1)
    assert blanks.min() >= 40 and blanks.max() <= 64
    assert (batch.fixed == (batch.puzzle != 0)).all()
    for puzzle, solution in zip(batch.puzzle.tolist(), batch.solution.tolist(), strict=True):
        _check_grid_rules(solution)
        assert D.consistent(puzzle, solution)
    # transforms give distinct grids, not 8 repeated ones
    assert len({tuple(s) for s in batch.solution.tolist()}) > 100
    # both blank characters are used
    assert (batch.prompt == D.DOT_ID).any() and (batch.prompt == D.DIGIT0_ID).any()


def test_prompt_and_canvas_ids_match_the_tokenizer():
    tok = D.sudoku_tokenizer()
    sampler = D.SudokuSampler(D.base_grids(4, seed=2), "cpu", seed=0, dot_prob=0.5)
    batch = sampler.sample(16)
    for i in range(16):
        puzzle = batch.puzzle[i].tolist()
        blank = "." if (batch.prompt[i] == D.DOT_ID).any() else "0"
        text = D.puzzle_string(puzzle, blank)
        assert tok(text)["input_ids"] == batch.prompt[i].tolist()  # <bos> + one token per cell
        solution = "".join(map(str, batch.solution[i].tolist()))
        assert tok(solution, add_special_tokens=False)["input_ids"] == batch.canvas[i].tolist()
        assert tok.decode(batch.canvas[i].tolist()) == solution
    assert (D.digits_from_ids(batch.canvas) == batch.solution).all()


def test_transform_preserves_validity_on_device_generator():
    grids = torch.as_tensor(D.base_grids(2, seed=9))
    g = torch.Generator().manual_seed(0)
    out = D.transform_grids(grids.repeat(50, 1), g)
    for s in out.tolist():
        _check_grid_rules(s)


def test_bundled_qqwing_eval_set():
    ev = D.load_sudoku_eval_set()
    assert len(ev) >= 200
    assert set(ev.difficulty) == set(D.QQWING_DIFFICULTIES)
    for p, s in zip(ev.puzzles, ev.solutions, strict=True):
        assert D.is_valid_solution(s) and D.consistent(p, s)
        assert 17 <= sum(1 for x in p if x) <= 45
    sub = ev.subset(8)
    assert len(sub) == 8 and set(sub.difficulty) == set(D.QQWING_DIFFICULTIES)


@pytest.mark.skipif(shutil.which("qqwing") is None, reason="qqwing not installed")
def test_qqwing_generator():
    pairs = D.qqwing_puzzles(2, "simple")
    assert len(pairs) == 2
    for p, s in pairs:
        assert D.is_valid_solution(D.parse_grid(s)) and D.consistent(D.parse_grid(p), D.parse_grid(s))


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


def test_diffusion_loss_trains_encoder_and_self_conditioning():
    model = _tiny_model().train()
    g = torch.Generator().manual_seed(0)
    sampler = D.SudokuSampler(D.base_grids(4, seed=0), "cpu", seed=0)
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


def test_smoke_training_sudoku_writes_a_loadable_checkpoint(tmp_path):
    from training.train import TrainConfig, train

    out = tmp_path / "sudoku"
    result = train(TrainConfig(task="sudoku", out=str(out), smoke=True, device="cpu"), log=lambda _: None)
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
    assert any("initialised from" in line for line in logs)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    # one step at a vanishing learning rate: the weights are the first run's, not a fresh seed-5 init
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_smoke_training_text_writes_a_loadable_checkpoint(tmp_path):
    from training.train import TrainConfig, train

    out = tmp_path / "text"
    result = train(TrainConfig(task="text", out=str(out), smoke=True, device="cpu"), log=lambda _: None)
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
