/* Sudoku puzzles with a unique solution, for the training bank (training/sudoku_bank.py builds and loads this with
 * gcc + ctypes; nothing at training time needs it: the bank is committed).
 *
 * A grid is 81 bytes, row-major, 0 = blank, 1..9 = digit. Candidates are 9-bit masks (bit d for digit d).
 *
 *   sg_count(puzzle, limit)                      solutions of `puzzle`, counted up to `limit`
 *   sg_generate(seed, n, puzzles, solutions)     n minimal unique puzzles: a random solved grid (randomized
 *                                                backtracking), then every cell in a random order is blanked
 *                                                unless that would admit a second solution (qqwing's method)
 */
#include <stdint.h>
#include <string.h>

#define ALL 0x3FEu /* bits 1..9 */

typedef struct {
    uint8_t g[81];
    uint16_t row[9], col[9], box[9];
    uint64_t rng;
} State;

static int box_of(int i) { return (i / 27) * 3 + (i % 9) / 3; }

static uint64_t next_rand(uint64_t *s) { /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static int load(State *s, const uint8_t *grid) {
    memset(s, 0, sizeof(*s));
    for (int i = 0; i < 81; i++) {
        uint8_t d = grid[i];
        if (d == 0) continue;
        if (d > 9) return 0;
        uint16_t bit = (uint16_t)(1u << d);
        int r = i / 9, c = i % 9, b = box_of(i);
        if ((s->row[r] | s->col[c] | s->box[b]) & bit) return 0; /* the givens conflict */
        s->g[i] = d;
        s->row[r] |= bit;
        s->col[c] |= bit;
        s->box[b] |= bit;
    }
    return 1;
}

static void place(State *s, int i, int d) {
    uint16_t bit = (uint16_t)(1u << d);
    s->g[i] = (uint8_t)d;
    s->row[i / 9] |= bit;
    s->col[i % 9] |= bit;
    s->box[box_of(i)] |= bit;
}

static void unplace(State *s, int i, int d) {
    uint16_t bit = (uint16_t)~(1u << d);
    s->g[i] = 0;
    s->row[i / 9] &= bit;
    s->col[i % 9] &= bit;
    s->box[box_of(i)] &= bit;
}

/* the empty cell with the fewest candidates: -1 when the grid is full, -2 when some cell has none */
static int most_constrained(const State *s, uint16_t *cands) {
    int best = -1, best_n = 10;
    for (int i = 0; i < 81; i++) {
        if (s->g[i]) continue;
        uint16_t m = (uint16_t)(ALL & ~(s->row[i / 9] | s->col[i % 9] | s->box[box_of(i)]));
        int n = __builtin_popcount(m);
        if (n < best_n) {
            best = i;
            best_n = n;
            *cands = m;
            if (n <= 1) break;
        }
    }
    if (best >= 0 && best_n == 0) return -2;
    return best;
}

static void count_rec(State *s, int limit, int *count) {
    uint16_t cands = 0;
    int i = most_constrained(s, &cands);
    if (i == -1) {
        (*count)++;
        return;
    }
    if (i == -2) return;
    for (int d = 1; d <= 9 && *count < limit; d++) {
        if (!(cands & (1u << d))) continue;
        place(s, i, d);
        count_rec(s, limit, count);
        unplace(s, i, d);
    }
}

int sg_count(const uint8_t *puzzle, int limit) {
    State s;
    if (!load(&s, puzzle)) return 0;
    int count = 0;
    count_rec(&s, limit, &count);
    return count;
}

static int fill_random(State *s) {
    uint16_t cands = 0;
    int i = most_constrained(s, &cands);
    if (i == -1) return 1;
    if (i == -2) return 0;
    int digits[9], n = 0;
    for (int d = 1; d <= 9; d++)
        if (cands & (1u << d)) digits[n++] = d;
    for (int k = n - 1; k > 0; k--) { /* Fisher-Yates */
        int j = (int)(next_rand(&s->rng) % (uint64_t)(k + 1));
        int t = digits[k];
        digits[k] = digits[j];
        digits[j] = t;
    }
    for (int k = 0; k < n; k++) {
        place(s, i, digits[k]);
        if (fill_random(s)) return 1;
        unplace(s, i, digits[k]);
    }
    return 0;
}

static void generate_one(uint64_t *rng, uint8_t *puzzle, uint8_t *solution) {
    State s;
    memset(&s, 0, sizeof(s));
    s.rng = *rng;
    fill_random(&s);
    *rng = s.rng;
    memcpy(solution, s.g, 81);
    memcpy(puzzle, s.g, 81);
    int order[81];
    for (int i = 0; i < 81; i++) order[i] = i;
    for (int k = 80; k > 0; k--) {
        int j = (int)(next_rand(rng) % (uint64_t)(k + 1));
        int t = order[k];
        order[k] = order[j];
        order[j] = t;
    }
    for (int k = 0; k < 81; k++) {
        int i = order[k];
        uint8_t kept = puzzle[i];
        puzzle[i] = 0;
        if (sg_count(puzzle, 2) != 1) puzzle[i] = kept;
    }
}

void sg_generate(uint64_t seed, int n, uint8_t *puzzles, uint8_t *solutions) {
    uint64_t rng = seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;
    if (rng == 0) rng = 1;
    for (int k = 0; k < n; k++) generate_one(&rng, puzzles + 81 * k, solutions + 81 * k);
}
