"""What differs between the two tasks (sudoku, text): data, batches, evaluation, generation config, metadata."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from training import data as D
from training.checkpoints import EOS_ID, EOT_ID, generation_config, train_tokenizer
from training.config import TrainConfig
from training.evaluate import SamplerSettings, evaluate_sudoku, text_samples, text_val_loss


class Task:
    """What differs between sudoku and text: data, batches, evaluation, generation config, metadata."""

    name: str
    metric_name: str

    def batch(self, step: int, size: int = 0) -> dict: ...  # size 0: the configured batch size

    def evaluate(self, model, final: bool) -> dict: ...

    def metric(self, result: dict) -> float: ...  # higher is better

    def generation_config(self): ...

    def metadata(self) -> dict: ...


class SudokuTask(Task):
    name = "sudoku"
    metric_name = "solve_rate"

    def __init__(self, cfg: TrainConfig, device: torch.device, log):
        self.cfg, self.device = cfg, device
        t = time.time()
        self.sampler = D.SudokuSampler.from_bank(device, seed=cfg.seed + 1, path=cfg.bank, reveal_prob=cfg.reveal_prob)
        log(f"sudoku: {len(self.sampler)} unique-solution bank puzzles on {device} in {time.time() - t:.1f}s")
        self.tokenizer = D.sudoku_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.canvas_length = D.SUDOKU_CANVAS
        eval_set = D.load_sudoku_eval_set()
        n_eval = cfg.eval_puzzles or (8 if cfg.smoke else len(eval_set))
        self.eval_set = eval_set.subset(n_eval)
        self.settings = SamplerSettings(max_denoising_steps=4 if cfg.smoke else cfg.sampler_steps)

    def batch(self, step: int, size: int = 0) -> dict:
        b = self.sampler.sample(size or self.cfg.batch_size)
        return dict(prompt=b.prompt, clean=b.canvas, fixed=b.fixed)

    def evaluate(self, model, final: bool) -> dict:
        # the sampler costs up to `sampler_steps` decoder passes: every evaluation on GPU, only at the end on CPU
        cuda = self.device.type == "cuda"
        run_sampler = final or cuda
        result = evaluate_sudoku(model, self.eval_set, self.device, self.settings, seed=self.cfg.seed + 99,
                                 sampler=run_sampler)
        if final and cuda and not self.cfg.smoke:
            # the checkpoint's generation_config takes the better of the default and a colder schedule
            cold = SamplerSettings(max_denoising_steps=self.settings.max_denoising_steps, t_min=0.1, t_max=0.5)
            other = evaluate_sudoku(model, self.eval_set, self.device, cold, seed=self.cfg.seed + 99)
            result["sweep"] = [{"t_min": s.t_min, "t_max": s.t_max, "solve_rate": r["solve_rate"],
                                "mean_steps": r["mean_steps"]} for s, r in ((self.settings, result), (cold, other))]
            if other["solve_rate"] > result["solve_rate"]:
                self.settings = cold
                other["sweep"] = result["sweep"]
                result = other
        return result

    def metric(self, result: dict) -> float:
        return result.get("solve_rate", 0.0) + 1e-3 * result["one_shot_cell_acc"]

    def generation_config(self):
        s = self.settings
        return generation_config(
            max_new_tokens=D.SUDOKU_CANVAS, max_denoising_steps=s.max_denoising_steps, t_min=s.t_min,
            t_max=s.t_max, stability_threshold=s.stability_threshold, confidence_threshold=s.confidence_threshold,
            sampler_config={"entropy_bound": s.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
        )

    def metadata(self) -> dict:
        return {
            "format": {
                "prompt": "<bos> + 81 characters, row-major; blank = '0' (or '.')",
                "canvas": "81 solution digits; clamp the givens with a template (position -> digit token id)",
                "alphabet": D.SUDOKU_ALPHABET,
                "digit_token_id": "9 + digit",
            },
            "data": {"bank": self.cfg.bank or "training/data/sudoku_bank.npz", "bank_puzzles": len(self.sampler),
                     "reveal_prob": self.cfg.reveal_prob,
                     "eval": "bundled qqwing puzzles (training/data/sudoku_eval.csv)",
                     "eval_puzzles": len(self.eval_set)},
        }


class TextTask(Task):
    name = "text"
    metric_name = "neg_val_loss"

    def __init__(self, cfg: TrainConfig, device: torch.device, log):
        self.cfg, self.device, self.log = cfg, device, log
        t = time.time()
        if cfg.smoke:
            docs, self.corpus_path = D.load_corpus(D.MINI_CORPUS_PATH), str(D.MINI_CORPUS_PATH)
            docs = docs[:60]
        else:
            docs, self.corpus_path = D.resolve_corpus(cfg.corpus, log=log)
        train_docs, val_docs = D.split_documents(docs, cfg.val_fraction, seed=cfg.seed)
        if cfg.init:  # continuing a checkpoint: its tokenizer, or its embeddings would mean other tokens
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.init)
        else:
            vocab = min(cfg.vocab_size, 400) if cfg.smoke else cfg.vocab_size
            self.tokenizer = train_tokenizer((D.document_text(d) for d in train_docs), vocab_size=vocab)
        self.vocab_size = len(self.tokenizer)
        train_ids = D.render_documents(train_docs, self.tokenizer, seed=cfg.seed, chat_fraction=cfg.chat_fraction)
        val_ids = D.render_documents(val_docs, self.tokenizer, seed=cfg.seed + 1, chat_fraction=cfg.chat_fraction)
        self.canvas_length = cfg.canvas_length
        max_prompt = max(cfg.prompt_lengths)
        self.train = D.TextSampler(train_ids, cfg.canvas_length, device, seed=cfg.seed + 1, max_prompt=max_prompt)
        self.val = D.TextSampler(val_ids, cfg.canvas_length, device, seed=cfg.seed + 2, max_prompt=max_prompt)
        self.docs = (len(train_docs), len(val_docs))
        log(f"text: corpus {self.corpus_path}: {len(docs)} documents, tokenizer {self.vocab_size} tokens, "
            f"{self.train.tokens} train / {self.val.tokens} val tokens, in {time.time() - t:.1f}s")
        self.gen = torch.Generator()
        self.gen.manual_seed(cfg.seed + 3)
        n_val = 2 if cfg.smoke else 8
        bs = min(cfg.batch_size, 256)
        self.val_batches = [(bs, cfg.prompt_lengths[i % len(cfg.prompt_lengths)]) for i in range(n_val)]
        self.autocast = nullcontext

    def batch(self, step: int, size: int = 0) -> dict:
        # one context length per batch (no padding); drawn on the CPU so that it costs no device sync
        plen = self.cfg.prompt_lengths[int(torch.randint(len(self.cfg.prompt_lengths), (1,), generator=self.gen))]
        prompt, canvas = self.train.sample(size or self.cfg.batch_size, plen)
        return dict(prompt=prompt, clean=canvas)

    def evaluate(self, model, final: bool) -> dict:
        result = {"val_loss": text_val_loss(model, self.val, self.val_batches, seed=self.cfg.seed + 7,
                                            autocast=self.autocast)}
        if final:
            prompts = ["In the beginning", "And Jesus said unto them,",
                       [{"role": "user", "content": "Tell me a fortune."}]]
            try:
                result["samples"] = text_samples(model, self.tokenizer, prompts, self.device,
                                                 max_new_tokens=2 * self.canvas_length, seed=self.cfg.seed)
            except Exception as exc:  # samples are informative only; never lose a checkpoint over them
                result["samples_error"] = repr(exc)
        return result

    def metric(self, result: dict) -> float:
        return -result["val_loss"]

    def generation_config(self):
        # 32 steps for a canvas of 64; 48 for 256, the real checkpoint's default for its 256
        steps = max(32, 3 * self.canvas_length // 16)
        return generation_config(max_new_tokens=3 * self.canvas_length, max_denoising_steps=steps,
                                 eos_token_id=[EOS_ID, EOT_ID])

    def metadata(self) -> dict:
        return {
            "format": {"prompt": "plain text (<bos> added by the tokenizer) or the Gemma chat template",
                       "canvas_length": self.canvas_length, "eos": [EOS_ID, EOT_ID]},
            "data": {"corpus": self.corpus_path, "documents_train_val": list(self.docs),
                     "train_tokens": self.train.tokens, "val_tokens": self.val.tokens,
                     "prompt_lengths": list(self.cfg.prompt_lengths), "chat_fraction": self.cfg.chat_fraction},
        }
