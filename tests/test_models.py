"""The shipped checkpoints: they load through the same path as the real one, and the Sudoku model solves
puzzles through the engine and through POST /sudoku; malformed puzzles get a clear 422."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from protocol import contract
from protocol.sudoku import EXAMPLE_PUZZLE, canvas_cells, is_valid_solution
from tests.procs import Service
from worker.engine import Engine, EngineConfig
from worker.types import EngineRequest

MODELS = Path(__file__).resolve().parents[1] / "models"
# held-out qqwing puzzles (training/data/sudoku_eval.csv) that the committed model solves with seed 0
SOLVED = [
    ".14.........3.9.....3..89...47..5.1..8..9.7....9.6.35....1......7....436.....7...",
    "8..3.7..6...2...985.316..................1...7..5.3...17...59....57.9.82.8.....3.",
    "95.1......6..2....1......8..36.4.......8...4...1..6593.235....9...4....8685...1..",
    "..3...4.746....5..9....6.2.1.....6.5.9.5...41.......7..123.....7......34..6...29.",
]


@pytest.mark.parametrize("name, canvas", [("text", 64), ("sudoku", 81)])
def test_shipped_checkpoints_load_like_the_real_one(name, canvas):
    path = MODELS / name
    assert sum(f.stat().st_size for f in path.iterdir()) < 25e6
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.canvas_length == canvas
    assert model.config.get_text_config().num_experts > 1  # the MoE architecture, scaled down
    assert tokenizer.decode(tokenizer("In the beginning 123").input_ids, skip_special_tokens=True)


def test_the_sudoku_model_solves_fixed_puzzles_through_the_engine():
    torch.set_num_threads(1)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(MODELS / "sudoku").eval()
    tok = AutoTokenizer.from_pretrained(MODELS / "sudoku")
    gc = model.generation_config
    engine = Engine(model, EngineConfig(max_batch=4, max_context=256, sampler="fast"))
    puzzles = [p.replace(".", "0") for p in SOLVED]
    for i, p in enumerate(puzzles):
        template = {j: tok(ch, add_special_tokens=False).input_ids[0] for j, ch in enumerate(p) if ch != "0"}
        engine.add(EngineRequest(f"p{i}", tok(p).input_ids,
                                 contract.default_sampling(gc, seed=0, max_new_tokens=81, eos_token_ids=()),
                                 template=template))
    done = engine.complete()
    for i, p in enumerate(puzzles):
        ev = done[f"p{i}"]
        solution = canvas_cells(p, tok.decode(ev.token_ids, skip_special_tokens=True), ev.token_ids)
        assert is_valid_solution(p, solution), (i, solution)
        assert ev.denoising_steps < gc.max_denoising_steps  # the adaptive stop fired: it was confident


@pytest.fixture(scope="module")
def sudoku_service(tmp_path_factory):
    with Service({"sudoku": MODELS / "sudoku"}, tmp_path_factory.mktemp("sudoku")) as svc:
        svc.up("sudoku", max_batch=16)
        yield svc


def test_post_sudoku_solves_and_says_so(sudoku_service):
    r = httpx.post(sudoku_service.url + "/sudoku", json={"puzzle": EXAMPLE_PUZZLE, "seed": 1, "attempts": 8},
                   timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is True and body["problems"] == []
    assert is_valid_solution(EXAMPLE_PUZZLE, body["solution"])
    assert 1 <= body["steps"] <= 32 and body["total_steps"] >= body["steps"]


@pytest.mark.parametrize("body, words", [
    ({"puzzle": "123"}, "81 cells"),
    ({"puzzle": "x" * 81}, "digits 1-9"),
    ({"puzzle": "11" + "0" * 79}, "the givens conflict: row 1 repeats 1"),
    ({"puzzle": EXAMPLE_PUZZLE, "attempts": 99}, "less than or equal to 32"),
    ({"puzzle": EXAMPLE_PUZZLE, "bogus": True}, "Extra inputs"),
    ({}, "Field required"),
])
def test_post_sudoku_rejects_malformed_puzzles_with_a_422(sudoku_service, body, words):
    r = httpx.post(sudoku_service.url + "/sudoku", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert any(words in d["msg"] for d in r.json()["detail"]), r.json()
