"""Training data: sudoku grids and puzzles, and a small public-domain English corpus.

Sudoku
    Training volume comes from `SudokuSampler`: puzzles with exactly one solution from the committed bank
    (`training/sudoku_bank.py`: minimal puzzles, qqwing's spread of difficulty), each example a random
    validity-preserving transform of one of them (digit relabelling, rows within bands, bands, columns within
    stacks, stacks, transpose), a share of them made easier by revealing extra givens. All on the training
    device. Evaluation uses qqwing puzzles (unique solutions), bundled in `training/data/sudoku_eval.csv` so that
    the GPU machine needs no qqwing; no bank puzzle equals one of them (tested).

    Checkpoint format: a character tokenizer over "0123456789."; prompt = <bos> + the 81 puzzle characters
    (blank = '0' or '.', both trained); canvas = the 81 solution digits (canvas_length 81). At inference the
    givens are clamped through a template, so training never noises them either.

Text
    The King James Bible (Debian's bible-kjv: the `bible` CLI), Debian's fortunes (/usr/share/games/fortunes) and
    The Devil's Dictionary (Debian's dict-devil), dumped by `build_corpus` to a JSON-lines file, one document
    per line. A small
    excerpt is bundled (`training/data/mini_corpus.jsonl`, < 200 KB) for CI and as a fallback.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.sudoku import is_valid_solution
from training.checkpoints import BOS_ID, EOS_ID, EOT_ID, PAD_ID, char_tokenizer
from training.sudoku_bank import BANK_PATH, DIFFICULTIES, load_bank

DATA_DIR = Path(__file__).resolve().parent / "data"
SUDOKU_EVAL_PATH = DATA_DIR / "sudoku_eval.csv"
MINI_CORPUS_PATH = DATA_DIR / "mini_corpus.jsonl"
DEFAULT_CORPUS_PATH = Path("build/corpus.jsonl.gz")

# ============================================================================================== sudoku

SUDOKU_ALPHABET = "0123456789."
SUDOKU_BLANKS = "0."  # both blank characters are trained; '0' is the canonical one
SUDOKU_CANVAS = 81
DIGIT0_ID = 9  # id of '0' in char_tokenizer(SUDOKU_ALPHABET); digit d has id 9 + d
DOT_ID = 19  # id of '.'
SUDOKU_VOCAB = 20


def sudoku_tokenizer():
    tok = char_tokenizer(SUDOKU_ALPHABET)
    assert tok.convert_tokens_to_ids("0") == DIGIT0_ID and tok.convert_tokens_to_ids(".") == DOT_ID
    assert len(tok) == SUDOKU_VOCAB
    return tok


def _random_perms(batch: int, n: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.argsort(torch.rand(batch, n, generator=generator, device=device), dim=-1)


def random_symmetry(batch: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random element of the Sudoku symmetry group per row: (relabel (B, 10) with 0 -> 0, index (B, 81)).

    digit relabelling x row permutations within bands x band permutations x the same for columns/stacks x
    optional transpose (about 1.2e12 images of a grid). Cell i of the image is cell index[i] of the original,
    relabelled: validity, givens and the number of solutions are all preserved."""
    relabel = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device),
                         _random_perms(batch, 9, generator, device) + 1], dim=1)

    def line_order() -> torch.Tensor:  # (B, 9): which old row (col) goes to each new row (col)
        bands = _random_perms(batch, 3, generator, device)  # (B, 3)
        within = torch.stack([_random_perms(batch, 3, generator, device) for _ in range(3)], dim=1)  # (B, 3, 3)
        return (bands[:, :, None] * 3 + within).reshape(batch, 9)

    rows, cols = line_order(), line_order()
    index = rows[:, :, None] * 9 + cols[:, None, :]  # (B, 9, 9)
    transpose = torch.rand(batch, generator=generator, device=device) < 0.5
    index = torch.where(transpose[:, None, None], index.transpose(1, 2), index).reshape(batch, 81)
    return relabel, index


def transform_grids(grids: torch.Tensor, generator: torch.Generator,
                    givens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random validity-preserving transforms of grids (B, 81) and their givens (B, 81) bool, which move with
    their cells; all on the grids' device."""
    relabel, index = random_symmetry(grids.shape[0], generator, grids.device)
    return torch.gather(torch.gather(relabel, 1, grids), 1, index), torch.gather(givens, 1, index)


def reveal_extra(givens: torch.Tensor, reveal_prob: float, max_fraction: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Easier puzzles for a `reveal_prob` share of rows: each blank becomes a given with probability
    u ~ U(0, max_fraction) (per row). A unique puzzle with more givens is still unique."""
    batch = givens.shape[0]
    chosen = torch.rand(batch, generator=generator, device=givens.device) < reveal_prob
    rate = torch.rand(batch, generator=generator, device=givens.device) * max_fraction * chosen
    return givens | (torch.rand(givens.shape, generator=generator, device=givens.device) < rate[:, None])


def prompt_ids_from_digits(puzzle: torch.Tensor, dot_blank: torch.Tensor | bool = False) -> torch.Tensor:
    """Puzzle digits (B, 81), 0 = blank -> prompt ids (B, 82): <bos> + one token per cell.

    Blank cells become '0' (or '.' where `dot_blank` is True, per row), exactly what the tokenizer gives for the
    81-character puzzle string."""
    ids = puzzle + DIGIT0_ID
    if not isinstance(dot_blank, bool) or dot_blank:
        dot = torch.as_tensor(dot_blank, device=puzzle.device)
        dot = dot[:, None] if dot.ndim == 1 else dot
        ids = torch.where((puzzle == 0) & dot, torch.full_like(ids, DOT_ID), ids)
    bos = torch.full((puzzle.shape[0], 1), BOS_ID, dtype=ids.dtype, device=ids.device)
    return torch.cat([bos, ids], dim=1)


def canvas_ids_from_digits(solution: torch.Tensor) -> torch.Tensor:
    return solution + DIGIT0_ID


def digits_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """Canvas ids -> digits (anything that is not a digit 1..9 becomes 0)."""
    d = ids - DIGIT0_ID
    return torch.where((d >= 1) & (d <= 9), d, torch.zeros_like(d))


def puzzle_string(digits: Sequence[int], blank: str = "0") -> str:
    return "".join(blank if d == 0 else str(d) for d in digits)


def parse_grid(text: str) -> list[int]:
    """81 characters, '.' or '0' for blanks -> digits."""
    text = text.strip()
    if len(text) != 81:
        raise ValueError(f"expected 81 cells, got {len(text)}")
    return [0 if ch in ".0" else int(ch) for ch in text]


@dataclass
class SudokuBatch:
    prompt: torch.Tensor  # (B, 82) ids
    canvas: torch.Tensor  # (B, 81) solution ids
    fixed: torch.Tensor  # (B, 81) bool: givens (clamped at inference, never noised)
    puzzle: torch.Tensor  # (B, 81) digits, 0 = blank
    solution: torch.Tensor  # (B, 81) digits


class SudokuSampler:
    """Endless training puzzles with exactly one solution, generated on `device` without host round trips:
    a bank puzzle (`training/sudoku_bank.py`), optionally with extra givens revealed (`reveal_extra`), under a
    random symmetry of the grid, with '0' or '.' for its blanks."""

    def __init__(self, solutions: np.ndarray, givens: np.ndarray, device, seed: int, reveal_prob: float = 0.1,
                 reveal_max: float = 0.5, dot_prob: float = 0.5):
        self.device = torch.device(device)
        self.solutions = torch.as_tensor(np.asarray(solutions), dtype=torch.long, device=self.device)  # (N, 81)
        self.givens = torch.as_tensor(np.asarray(givens), dtype=torch.bool, device=self.device)  # (N, 81)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.reveal_prob, self.reveal_max, self.dot_prob = reveal_prob, reveal_max, dot_prob

    @classmethod
    def from_bank(cls, device, seed: int, path=None, **kwargs) -> SudokuSampler:
        bank = load_bank(path or BANK_PATH)
        return cls(bank.solutions, bank.givens, device, seed, **kwargs)

    def __len__(self) -> int:
        return self.solutions.shape[0]

    def sample(self, batch: int) -> SudokuBatch:
        g = self.generator
        pick = torch.randint(0, len(self), (batch,), generator=g, device=self.device)
        givens = reveal_extra(self.givens[pick], self.reveal_prob, self.reveal_max, g)
        solution, givens = transform_grids(self.solutions[pick], g, givens)
        puzzle = torch.where(givens, solution, torch.zeros_like(solution))
        dot = torch.rand(batch, generator=g, device=self.device) < self.dot_prob
        return SudokuBatch(prompt_ids_from_digits(puzzle, dot), canvas_ids_from_digits(solution), givens,
                           puzzle, solution)


def batch_from_puzzles(puzzles: Sequence[Sequence[int]], solutions: Sequence[Sequence[int]], device,
                       blank: str = "0") -> SudokuBatch:
    puzzle = torch.tensor(puzzles, dtype=torch.long, device=device)
    solution = torch.tensor(solutions, dtype=torch.long, device=device)
    return SudokuBatch(prompt_ids_from_digits(puzzle, blank == "."), canvas_ids_from_digits(solution),
                       puzzle != 0, puzzle, solution)


# ---------------------------------------------------------------------------------------------- qqwing

def qqwing_puzzles(n: int, difficulty: str = "simple", qqwing: str = "qqwing") -> list[tuple[str, str]]:
    """`n` (puzzle, solution) strings from Debian's qqwing ('.' = blank). Not seedable: qqwing draws its own."""
    exe = shutil.which(qqwing)
    if exe is None:
        raise FileNotFoundError("qqwing is not installed (apt-get install qqwing)")
    out = subprocess.run([exe, "--generate", str(n), "--csv", "--solution", "--difficulty", difficulty],
                         check=True, capture_output=True, text=True).stdout
    pairs = []
    for line in out.splitlines():
        parts = line.strip().split(",")
        if len(parts) >= 2 and len(parts[0]) == 81 and len(parts[1]) == 81:
            pairs.append((parts[0], parts[1]))
    return pairs


def write_sudoku_eval_set(path: str | Path, per_difficulty: int = 64,
                          difficulties: Iterable[str] = DIFFICULTIES) -> Path:
    """CSV `difficulty,puzzle,solution` of qqwing puzzles (unique solutions), checked for validity."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["difficulty,puzzle,solution"]
    for diff in difficulties:
        for puzzle, solution in qqwing_puzzles(per_difficulty, diff):
            p, s = parse_grid(puzzle), parse_grid(solution)
            assert is_valid_solution(p, s)
            lines.append(f"{diff},{puzzle},{solution}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class SudokuEvalSet:
    difficulty: list[str]
    puzzles: list[list[int]]
    solutions: list[list[int]]

    def __len__(self) -> int:
        return len(self.puzzles)

    def subset(self, n: int) -> SudokuEvalSet:
        """An even spread of `n` puzzles over the difficulties (deterministic)."""
        if n >= len(self):
            return self
        idx = np.linspace(0, len(self) - 1, n).round().astype(int)
        idx = sorted(set(idx.tolist()))
        return SudokuEvalSet([self.difficulty[i] for i in idx], [self.puzzles[i] for i in idx],
                             [self.solutions[i] for i in idx])


def load_sudoku_eval_set(path: str | Path = SUDOKU_EVAL_PATH) -> SudokuEvalSet:
    diff, puzzles, solutions = [], [], []
    for line in Path(path).read_text().splitlines()[1:]:
        if not line.strip():
            continue
        d, p, s = line.strip().split(",")[:3]
        diff.append(d)
        puzzles.append(parse_grid(p))
        solutions.append(parse_grid(s))
    return SudokuEvalSet(diff, puzzles, solutions)


# =============================================================================================== text

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_SKIP = {"art", "ascii-art"}  # drawings, not English
_OVERSTRIKE = re.compile(".\x08")
_BIBLE_HEADER = re.compile(r"^(?P<book>(?:\d )?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
_BIBLE_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")


def bible_documents(bible: str = "bible") -> list[dict]:
    """One document per chapter of the KJV: {"src": "kjv", "title": "Genesis 1", "verses": [...]}.

    Uses Debian's `bible` CLI (package bible-kjv; its text is bible-kjv-text)."""
    exe = shutil.which(bible)
    if exe is None:
        raise FileNotFoundError("the `bible` CLI is not installed (apt-get install bible-kjv)")
    out = subprocess.run([exe, "-l100000", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                         text=True, errors="replace").stdout
    docs: list[dict] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = _BIBLE_VERSE.match(line)
        if m and docs:
            docs[-1]["verses"].append(m.group("text").strip())
            continue
        h = _BIBLE_HEADER.match(line.strip())
        if h:
            docs.append({"src": "kjv", "title": line.strip(), "verses": []})
        elif docs and docs[-1]["verses"]:  # a wrapped line (should not happen with -l100000)
            docs[-1]["verses"][-1] += " " + line.strip()
    return [d for d in docs if d["verses"]]


def clean_fortune(text: str) -> str:
    text = _OVERSTRIKE.sub("", text).replace("\t", " ").replace("\r", "")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return "\n".join(lines).strip("\n")


def fortune_documents(directory: str | Path = FORTUNES_DIR) -> list[dict]:
    """One document per fortune: {"src": "fortunes/<file>", "text": ...}."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found (apt-get install fortunes)")
    docs = []
    for f in sorted(directory.iterdir()):
        if f.suffix in (".dat", ".u8") or f.is_symlink() or not f.is_file() or f.name in FORTUNES_SKIP:
            continue
        raw = f.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"\n%\n", "\n" + raw + "\n"):
            text = clean_fortune(chunk)
            if text and text != "%" and len(text) >= 10:
                docs.append({"src": f"fortunes/{f.name}", "text": text})
    return docs


DICTD_DIR = Path("/usr/share/dictd")
_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    n = 0
    for ch in text:
        n = n * 64 + _DICTD_B64.index(ch)
    return n


def dictd_documents(name: str = "devil", directory: str | Path = DICTD_DIR) -> list[dict]:
    """One document per entry of a dictd database (Debian's dict-devil: Ambrose Bierce's The Devil's Dictionary,
    1911, public domain): {"src": "<name>", "text": ...}, the `00database*` header entries left out."""
    directory = Path(directory)
    index, body = directory / f"{name}.index", directory / f"{name}.dict.dz"
    if not index.is_file() or not body.is_file():
        raise FileNotFoundError(f"{body} not found (apt-get install dict-{name})")
    raw = gzip.decompress(body.read_bytes())  # dictzip is gzip with an index in the header
    docs = []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        head, offset, length = line.split("\t")[:3]
        if head.startswith("00database"):
            continue
        start = _dictd_number(offset)
        text = raw[start:start + _dictd_number(length)].decode("utf-8", errors="replace").strip("\n")
        if len(text) >= 10:
            docs.append({"src": name, "text": text})
    return docs


def document_text(doc: dict) -> str:
    if "verses" in doc:
        return doc["title"] + "\n" + "\n".join(doc["verses"])
    return doc["text"]


def _write_jsonl(docs: Iterable[dict], path: Path) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(payload)  # mtime=0 and no name: byte-identical on every run
    else:
        path.write_bytes(payload)


def build_corpus(out: str | Path = DEFAULT_CORPUS_PATH) -> dict:
    """Dump the full corpus to `out` (.jsonl or .jsonl.gz), deterministically: KJV chapters + fortunes (both
    required) + The Devil's Dictionary (if dict-devil is installed). The Jargon File (dict-jargon, also public
    domain) is left out on purpose: its hacker slang, acronyms and {cross-references} are not the English the
    text model is asked to write."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    docs = bible_documents() + fortune_documents()
    try:
        docs += dictd_documents("devil")
    except FileNotFoundError:
        pass
    _write_jsonl(docs, out)
    chars = sum(len(document_text(d)) for d in docs)
    sources = sorted({d["src"].split("/")[0] for d in docs})
    return {"path": str(out), "documents": len(docs), "characters": chars, "bytes": out.stat().st_size,
            "sources": sources}


def build_mini_corpus(out: str | Path = MINI_CORPUS_PATH, max_bytes: int = 190_000) -> dict:
    """The bundled excerpt (< max_bytes): the first chapters of Genesis (45%), every 7th fortune (35%), the first
    chapters of Matthew (20%)."""
    bible = bible_documents()
    fortunes = fortune_documents()
    pools = [
        ([d for d in bible if d["title"].startswith("Genesis ")], 0.45),
        (fortunes[::7], 0.35),
        ([d for d in bible if d["title"].startswith("Matthew ")], 0.20),
    ]
    picked: list[dict] = []
    for pool, share in pools:
        budget = int(max_bytes * share)
        for doc in pool:
            size = len((json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode())
            if size > budget:
                break
            picked.append(doc)
            budget -= size
    _write_jsonl(picked, Path(out))
    return {"path": str(out), "documents": len(picked), "bytes": Path(out).stat().st_size}


def load_corpus(path: str | Path) -> list[dict]:
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in io.StringIO(raw.decode("utf-8")) if line.strip()]


def resolve_corpus(path: str | Path | None, log=print) -> tuple[list[dict], str]:
    """The corpus to train on: `path` if given and present; else the default dump if present; else build it
    from the system packages if they are installed; else the bundled excerpt (with a warning)."""
    candidates = [Path(path)] if path else []
    candidates.append(DEFAULT_CORPUS_PATH)
    for c in candidates:
        if c.is_file():
            return load_corpus(c), str(c)
    if path is None or not Path(path).exists():
        try:
            target = Path(path) if path else DEFAULT_CORPUS_PATH
            info = build_corpus(target)
            log(f"built corpus {info}")
            return load_corpus(target), str(target)
        except (FileNotFoundError, subprocess.CalledProcessError, OSError) as exc:
            log(f"WARNING: no full corpus ({exc}); training on the bundled excerpt {MINI_CORPUS_PATH}")
    return load_corpus(MINI_CORPUS_PATH), str(MINI_CORPUS_PATH)


# ------------------------------------------------------------------------------- chat-formatted docs

CHAT_QUESTIONS_FORTUNE = (
    "Tell me a fortune.", "Say something wise.", "Give me a quote.", "Tell me something funny.",
    "Any words of wisdom?", "Tell me a saying.",
)


def render_documents(docs: Sequence[dict], tokenizer, seed: int, chat_fraction: float = 0.2) -> list[list[int]]:
    """Token ids per document, each ending with <eos>. A `chat_fraction` of them is rendered as a chat (the
    checkpoint's Gemma turn template) so that the model also answers after `<start_of_turn>model` and stops
    with `<end_of_turn>`; the rest is plain text after <bos>."""
    rng = random.Random(seed)
    plain_texts, chats = [], []
    order = []
    for d in docs:
        if rng.random() < chat_fraction:
            if "verses" in d:
                v = rng.randrange(len(d["verses"]))
                q = f"Quote {d['title']}:{v + 1}."
                a = d["verses"][v]
            else:
                q = rng.choice(CHAT_QUESTIONS_FORTUNE)
                a = d["text"]
            chats.append(tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False))
            order.append(("chat", len(chats) - 1))
        else:
            plain_texts.append(document_text(d))
            order.append(("plain", len(plain_texts) - 1))
    plain_ids = tokenizer(plain_texts, add_special_tokens=False)["input_ids"] if plain_texts else []
    chat_ids = tokenizer(chats, add_special_tokens=False)["input_ids"] if chats else []
    out = []
    for kind, i in order:
        if kind == "chat":
            out.append(list(chat_ids[i]) + [EOS_ID])  # the template writes <bos> itself
        else:
            out.append([BOS_ID] + list(plain_ids[i]) + [EOS_ID])
    return out


def split_documents(docs: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(val_fraction * len(docs)))) if len(docs) > 1 else 0
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [docs[i] for i in train], [docs[i] for i in val]


class TextSampler:
    """Random (context, canvas) windows of a token stream, on `device`.

    A window starts at a document start (<bos>) with probability `align_prob`, else anywhere; the aligned
    document is the one holding a uniformly drawn token (so long documents are not under-represented). The context is
    `prompt_len` tokens (the same for the whole batch: no padding, positions exactly as the engine gives them);
    the canvas is the next `canvas_length` tokens, with everything after its first <eos>/<end_of_turn> turned
    into <pad>, which is what generation returns after an end token."""

    def __init__(self, documents: Sequence[Sequence[int]], canvas_length: int, device, seed: int,
                 align_prob: float = 0.3, max_prompt: int = 96):
        flat = [t for d in documents for t in d]
        starts, pos = [], 0
        for d in documents:
            starts.append(pos)
            pos += len(d)
        need = max_prompt + canvas_length + 1
        if len(flat) < need:  # tiny corpora (tests): repeat
            reps = need // max(1, len(flat)) + 1
            starts = [s + r * len(flat) for r in range(reps) for s in starts]
            flat = flat * reps
        self.stream = torch.tensor(flat, dtype=torch.long, device=device)
        self.doc_starts = torch.tensor(starts, dtype=torch.long, device=device)
        self.canvas_length = canvas_length
        self.device = torch.device(device)
        self.align_prob = align_prob
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    @property
    def tokens(self) -> int:
        return int(self.stream.numel())

    def sample(self, batch: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        g, L = self.generator, self.canvas_length
        span = prompt_len + L
        last = self.stream.numel() - span
        anywhere = torch.randint(0, last + 1, (batch,), generator=g, device=self.device)
        token = torch.randint(0, self.stream.numel(), (batch,), generator=g, device=self.device)
        doc = self.doc_starts[torch.searchsorted(self.doc_starts, token, right=True) - 1]
        aligned = torch.rand(batch, generator=g, device=self.device) < self.align_prob
        start = torch.where(aligned, doc.clamp_max(last), anywhere)
        window = self.stream[start[:, None] + torch.arange(span, device=self.device)[None]]
        return window[:, :prompt_len], pad_after_end(window[:, prompt_len:])


def pad_after_end(canvas: torch.Tensor, end_ids: Sequence[int] = (EOS_ID, EOT_ID)) -> torch.Tensor:
    """Everything after the first end token of each row becomes <pad> (the end token itself stays)."""
    is_end = torch.zeros_like(canvas, dtype=torch.bool)
    for e in end_ids:
        is_end |= canvas == e
    after = (torch.cumsum(is_end.int(), dim=-1) - is_end.int()) > 0
    return torch.where(after, torch.full_like(canvas, PAD_ID), canvas)
