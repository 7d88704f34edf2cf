// Sudoku grid helpers (the page's small equivalents of protocol/sudoku.py) and bundled example puzzles.
// A puzzle is 81 characters row by row with "0" for a blank; a grid of cells is 81 characters, a digit
// 1-9 or "." for a cell without a digit.

export const DIGITS = "123456789";

// From training/data/sudoku_eval.csv (qqwing puzzles, one unique solution each).
export const EXAMPLES = [
  { name: "Simple A", difficulty: "simple",
    puzzle: "95.1......6..2....1......8..36.4.......8...4...1..6593.235....9...4....8685...1.." },
  { name: "Simple B", difficulty: "simple",
    puzzle: ".14.........3.9.....3..89...47..5.1..8..9.7....9.6.35....1......7....436.....7..." },
  { name: "Easy A", difficulty: "easy",
    puzzle: "...6.......1..8...8...3.7.46..78.41.....43....2.9.......94.....4...169..1.6..78.." },
  { name: "Easy B", difficulty: "easy",
    puzzle: ".4..957.3.....7.5....3...46.........1...32...9.6........49..5..7.15.....25...3..9" },
  { name: "Intermediate A", difficulty: "intermediate",
    puzzle: "......7.5....4.....24..........1.95.6.9..2.8...14.9..69.7......4...25..7....871.." },
  { name: "Intermediate B", difficulty: "intermediate",
    puzzle: ".4.31.95...372....12......3...8...95.9.4....7..8...1..58.9...3.........4....7...." },
  { name: "Expert A", difficulty: "expert",
    puzzle: "...23....4.........86..9...6.....1..7.4....62..91..3...2.6...3.8....1.24..1.2...8" },
  { name: "Expert B", difficulty: "expert",
    puzzle: "..6.187.....3.....2...........173..6.........1..2.6..85......3.8...654.7.4.....81" },
];

const SEPARATORS = new Set([" ", "\t", "\r", "\n", "|", "+", "-", "_"]);

// 81 characters with "0" for every blank, or throws an Error naming the problem (like normalize_puzzle).
export function normalizePuzzle(text) {
  const cells = [...String(text)].filter((ch) => !SEPARATORS.has(ch));
  const bad = [...new Set(cells.filter((ch) => !DIGITS.includes(ch) && ch !== "0" && ch !== "."))].sort();
  if (bad.length) throw new Error(`a puzzle holds digits 1-9 and 0 or . for blanks; found ${JSON.stringify(bad.join(""))}`);
  if (cells.length !== 81) throw new Error(`a puzzle has 81 cells; got ${cells.length}`);
  return cells.map((ch) => (ch === "." ? "0" : ch)).join("");
}

// Row, column and box of every cell, and the 27 units.
export const UNITS = (() => {
  const units = [];
  for (let r = 0; r < 9; r++) units.push({ kind: "row", n: r + 1, cells: [...Array(9)].map((_, c) => 9 * r + c) });
  for (let c = 0; c < 9; c++) units.push({ kind: "column", n: c + 1, cells: [...Array(9)].map((_, r) => 9 * r + c) });
  for (let b = 0; b < 9; b++) {
    const br = 3 * Math.floor(b / 3), bc = 3 * (b % 3), cells = [];
    for (let r = 0; r < 3; r++) for (let c = 0; c < 3; c++) cells.push(9 * (br + r) + bc + c);
    units.push({ kind: "box", n: b + 1, cells });
  }
  return units;
})();

// Indices of the cells whose digit repeats in one of their units.
export function clashes(cells) {
  const out = new Set();
  for (const unit of UNITS) {
    const seen = new Map();
    for (const i of unit.cells) {
      const d = cells[i];
      if (!DIGITS.includes(d)) continue;
      if (seen.has(d)) { out.add(i); out.add(seen.get(d)); } else seen.set(d, i);
    }
  }
  return out;
}

// How far a grid is from a solution: cells without a digit plus cells in conflict (0 = solved).
export function badness(cells) {
  let blanks = 0;
  for (const ch of cells) if (!DIGITS.includes(ch)) blanks++;
  return blanks + clashes(cells).size;
}

// The 81 cells a streamed Sudoku step drafts, as digits or ".". Per-position strings (`draft_tokens`)
// when the event has them; else the token ids, each digit's id learnt from the givens (which the canvas
// template clamps), the sudoku tokenizer's id 9 + digit otherwise; else the decoded text.
export function stepCells(puzzle, event) {
  const tokens = event.draft_tokens;
  if (Array.isArray(tokens) && tokens.length >= 81) {
    return tokens.slice(0, 81).map((t) => { const s = String(t).trim(); return DIGITS.includes(s) && s.length === 1 ? s : "."; }).join("");
  }
  const ids = event.draft_ids;
  if (Array.isArray(ids) && ids.length >= 81) {
    const digitOf = new Map();
    for (let d = 1; d <= 9; d++) digitOf.set(9 + d, String(d));
    for (let i = 0; i < 81; i++) if (puzzle[i] !== "0") digitOf.set(ids[i], puzzle[i]);
    return ids.slice(0, 81).map((id) => digitOf.get(id) || ".").join("");
  }
  let text = String(event.draft_text || "");
  if (text.length !== 81) text = text.split(/\s+/).join("");
  return [...text.slice(0, 81).padEnd(81, ".")].map((ch) => (DIGITS.includes(ch) ? ch : ".")).join("");
}

// What to show for a draft: the givens of the puzzle, the draft's cells elsewhere.
export function overlay(puzzle, cells) {
  let out = "";
  for (let i = 0; i < 81; i++) out += puzzle[i] !== "0" ? puzzle[i] : cells[i];
  return out;
}
