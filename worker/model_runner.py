"""The model runner: the checkpoint's weights, the KV pool, fixed-shape buffers and CUDA graphs, and the passes.

Three passes, all over blocks of `canvas_length` (L) tokens per row, all through our own layer forward over the
weights `from_pretrained` loaded (transformers' modules stay the reference, in the tests):

    encode   prompt chunks and committed canvases: causal (sliding window where the layer has one), the new keys
             and values written into each row's pool slot, which then holds them
    decode   one denoising step: the noisy canvas and the self-conditioning signal -> final hidden states; the
             canvas attends bidirectionally to itself and read-only to the cache
    sample   the head and the sampler kernels: sampled tokens, argmax draft, entropies, next self-conditioning

A layer is 14 kernels (`worker/ops`): q/k/v GEMMs, norms + RoPE + K/V store, attention over true lengths, o GEMM,
residual + norms, dense gate/up + down, route, align, the two expert GEMMs, and the combine. Fixed-shape passes
run a batch in the smallest bucket that holds it; on CUDA each bucket is captured once as a CUDA graph, with every
length and offset in device buffers, so replays follow the rows' real lengths.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import worker.ops  # noqa: F401  (registers torch.ops.dgserve)
from worker import fp8, graphs, sampler
from worker.fp8 import Fp8Weight
from worker.kvcache import KVPool
from worker.ops.registry import PLAIN
from worker.quantize import is_quantized
from worker.transfer import to_device

log = logging.getLogger(__name__)

CPU_MOE_BLOCK = 16  # rows per expert block of the aligned layout on the CPU (any size is correct)


@dataclass
class LayerWeights:
    """One text layer's tensors, as loaded (no copies)."""

    kind: str
    input_norm: torch.Tensor
    q: torch.Tensor | Fp8Weight  # the projections and experts: Fp8Weight under DG_QUANTIZATION=fp8
    k: torch.Tensor | Fp8Weight
    v: torch.Tensor | Fp8Weight | None  # None: values are the keys (`attention_k_eq_v` layers)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor | Fp8Weight
    post_attn_norm: torch.Tensor
    pre_ff_norm: torch.Tensor
    pre_ff2_norm: torch.Tensor
    router_scale: torch.Tensor
    router: torch.Tensor
    per_expert_scale: torch.Tensor
    mlp_gate: torch.Tensor | Fp8Weight
    mlp_up: torch.Tensor | Fp8Weight
    mlp_down: torch.Tensor | Fp8Weight
    experts_gate_up: torch.Tensor | Fp8Weight  # (E, 2I, H)
    experts_down: torch.Tensor | Fp8Weight  # (E, H, I)
    post_ff1_norm: torch.Tensor
    post_ff2_norm: torch.Tensor
    post_ff_norm: torch.Tensor
    layer_scalar: torch.Tensor

    @classmethod
    def of(cls, layer, kind: str) -> LayerWeights:
        attn, w = layer.self_attn, fp8.weight_of
        return cls(
            kind=kind, input_norm=layer.input_layernorm.weight,
            q=w(attn.q_proj), k=w(attn.k_proj), v=w(attn.v_proj) if attn.v_proj is not None else None,
            q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight, o=w(attn.o_proj),
            post_attn_norm=layer.post_attention_layernorm.weight, pre_ff_norm=layer.pre_feedforward_layernorm.weight,
            pre_ff2_norm=layer.pre_feedforward_layernorm_2.weight, router_scale=layer.router.scale,
            router=layer.router.proj.weight, per_expert_scale=layer.router.per_expert_scale,
            mlp_gate=w(layer.mlp.gate_proj), mlp_up=w(layer.mlp.up_proj), mlp_down=w(layer.mlp.down_proj),
            experts_gate_up=w(layer.experts, "gate_up_proj"), experts_down=w(layer.experts, "down_proj"),
            post_ff1_norm=layer.post_feedforward_layernorm_1.weight,
            post_ff2_norm=layer.post_feedforward_layernorm_2.weight,
            post_ff_norm=layer.post_feedforward_layernorm.weight, layer_scalar=layer.layer_scalar,
        )


@dataclass
class Rope:
    inv_freq: dict[str, torch.Tensor]
    scale: dict[str, float]

    @classmethod
    def of(cls, rotary, kinds) -> Rope:
        return cls({k: getattr(rotary, f"{k}_inv_freq").float() for k in kinds},
                   {k: float(getattr(rotary, f"{k}_attention_scaling")) for k in kinds})


@dataclass
class Block:
    """Inputs of one pass over a block of L tokens per row. As a bucket's buffers, the shapes never change."""

    ids: torch.Tensor  # (B, L) token ids
    positions: torch.Tensor  # (B, L)
    slots: torch.Tensor  # (B,) pool slot of each row
    start: dict[str, torch.Tensor]  # per layer kind (B,): where the block's keys go (= what the slot holds)
    kv_len: dict[str, torch.Tensor]  # per layer kind (B,): keys attended (start + L)
    soft: torch.Tensor | None = None  # (B, L, H) self-conditioning signal (decoder passes)
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    output: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, rows: int, L: int, kinds, device, soft: tuple[int, torch.dtype] | None = None) -> Block:
        zeros = dict(dtype=torch.long, device=device)
        return cls(ids=torch.zeros((rows, L), **zeros), positions=torch.zeros((rows, L), **zeros),
                   slots=torch.zeros(rows, **zeros), start={k: torch.zeros(rows, **zeros) for k in kinds},
                   kv_len={k: torch.full((rows,), L, **zeros) for k in kinds},
                   soft=None if soft is None else torch.zeros((rows, L, soft[0]), dtype=soft[1], device=device))

    @property
    def rows(self) -> int:
        return self.ids.shape[0]


class ModelRunner:
    def __init__(self, model, max_batch: int, max_context: int, decode_mode: str = "eager",
                 sample_chunk_rows: int = 4, sampler_mode: str = "fast"):
        self.model = model
        self.text_config = model.config.get_text_config(decoder=True)
        self.canvas_length: int = model.config.canvas_length
        self.hidden_size: int = self.text_config.hidden_size
        self.device = next(model.parameters()).device
        self.dtype = model.model.decoder.embed_tokens.weight.dtype
        self.eps: float = self.text_config.rms_norm_eps
        self.top_k: int = self.text_config.top_k_experts
        self.num_experts: int = self.text_config.num_experts
        self.window: int = self.text_config.sliding_window
        self.pad_id: int = self.text_config.pad_token_id or 0
        self.quantized = is_quantized(model)
        # torchao's tensor subclasses implement aten ops, not ours: quantized weights run the plain-torch bodies
        self.ops = SimpleNamespace(**PLAIN) if self.quantized else torch.ops.dgserve
        self.moe_block = self._moe_block()
        self.sample_chunk_rows = max(1, sample_chunk_rows)
        self.sampler_mode = sampler_mode
        self.pool = KVPool(self.text_config, max_batch, max_context, self.canvas_length, self.device, self.dtype)
        n = self.text_config.num_hidden_layers
        kinds = list(self.text_config.layer_types[:n])
        dec, enc = model.model.decoder, model.model.encoder.language_model
        self.decoder_layers = [LayerWeights.of(layer, kinds[i]) for i, layer in enumerate(dec.layers[:n])]
        self.encoder_layers = [LayerWeights.of(layer, kinds[i]) for i, layer in enumerate(enc.layers[:n])]
        self.decoder_rope = Rope.of(dec.rotary_emb, set(kinds))
        self.encoder_rope = Rope.of(enc.rotary_emb, set(kinds))
        self.embed_scale = float(dec.embed_tokens.embed_scale)  # a float32 buffer: its exact value
        self.encoder_embed_scale = float(enc.embed_tokens.embed_scale)
        self.final_norm = dec.norm.weight
        # batched passes by (pass, path): path is graph (CUDA-graph replay), static (fixed shapes, eager) or eager
        self.forwards: Counter[tuple[str, str]] = Counter()
        self.decode_mode = decode_mode
        self.decode_buckets: dict[int, Block] = {}
        self.encode_buckets: dict[int, Block] = {}
        if decode_mode in ("static", "graphs"):
            self._build_buckets(max_batch, capture=decode_mode == "graphs")

    def _moe_block(self) -> int:
        if self.device.type == "cuda" and not self.quantized:
            from worker.ops.triton_kernels import triton_function

            if triton_function("moe_align") is not None:
                from worker.ops.triton.moe import BLOCK_M

                return BLOCK_M
        return CPU_MOE_BLOCK

    # ---------------------------------------------------------------- layers
    def _layers(self, block: Block, h: torch.Tensor, x: torch.Tensor, layers: list[LayerWeights], rope: Rope,
                w_last: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Run `layers` over a block. h (N, H) the stream, x its first input norm -> rms(out, w_last) (N, H).

        Encoder passes (causal) need only the last layer's keys and values: its attention and feed-forward are
        skipped (`w_last` None).
        """
        ops, pool, N = self.ops, self.pool, h.shape[0]
        for i, lw in enumerate(layers):
            last = i == len(layers) - 1
            # fp8.linear etc.: F.linear or the op, or their fp8 twins for Fp8Weights
            q = ops.qk_norm_rope_store(
                fp8.linear(ops, x, lw.q), fp8.linear(ops, x, lw.k), None if lw.v is None else fp8.linear(ops, x, lw.v),
                lw.q_norm, lw.k_norm, block.positions, rope.inv_freq[lw.kind], rope.scale[lw.kind], pool.keys[i],
                pool.values[i], block.slots, block.start[lw.kind], self.eps)  # (B, L, Hq, D)
            if causal and last:
                return x
            window = self.window if causal and lw.kind == "sliding_attention" else 0
            a = ops.attention(q, pool.keys[i], pool.values[i], block.slots, block.kv_len[lw.kind],
                              block.start[lw.kind], causal, window, 1.0)
            a = fp8.linear(ops, a.view(N, -1), lw.o)
            h, x_mlp, x_moe, x_router = ops.post_attention(h, a, lw.post_attn_norm, lw.pre_ff_norm, lw.pre_ff2_norm,
                                                           lw.router_scale, self.eps, self.hidden_size ** -0.5)
            m = fp8.linear(ops, fp8.gate_up_gelu(ops, x_mlp, lw.mlp_gate, lw.mlp_up), lw.mlp_down)
            weights, ids = ops.moe_route(x_router, lw.router, lw.per_expert_scale, self.top_k)
            sorted_ids, block_expert, num_padded = ops.moe_align(ids, self.num_experts, self.moe_block)
            act = fp8.moe_gate_up(ops, x_moe, lw.experts_gate_up, sorted_ids, block_expert, num_padded, self.top_k)
            e = fp8.moe_down(ops, act, lw.experts_down, sorted_ids, block_expert, num_padded, N, self.top_k)
            w_next = layers[i + 1].input_norm if not last else w_last
            h, x = ops.ffn_combine(h, m, e, weights, lw.post_ff1_norm, lw.post_ff2_norm, lw.post_ff_norm,
                                   lw.layer_scalar, w_next, self.eps)
        return x

    def decoder_forward(self, block: Block) -> torch.Tensor:
        """One denoising step over a block: canvas ids and soft signal -> final hidden states (B, L, H)."""
        dec = self.model.model.decoder
        sc = dec.self_conditioning
        B, L = block.ids.shape
        soft = block.soft.view(B * L, -1)
        signal = F.linear(self.ops.gate_up_gelu(self.ops.rms_norm(soft, sc.pre_norm.weight, self.eps),
                                                sc.gate_proj.weight, sc.up_proj.weight), sc.down_proj.weight)
        layers = self.decoder_layers
        h, x = self.ops.embed_condition(block.ids.view(-1), dec.embed_tokens.weight, self.embed_scale, signal,
                                        layers[0].input_norm, self.eps)
        return self._layers(block, h, x, layers, self.decoder_rope, self.final_norm, causal=False).view(B, L, -1)

    def encoder_forward(self, block: Block) -> None:
        """Encode a block of new tokens per row into the pool (their keys and values, after what each holds)."""
        enc = self.model.model.encoder.language_model
        layers = self.encoder_layers
        h, x = self.ops.embed_norm(block.ids.view(-1), enc.embed_tokens.weight, self.encoder_embed_scale,
                                   layers[0].input_norm, self.eps)
        self._layers(block, h, x, layers, self.encoder_rope, None, causal=True)

    # ---------------------------------------------------------------- passes
    def _fill(self, block: Block, n: int, slots: list[int], pad_slots: int | list[int]) -> None:
        """Row offsets of `slots` (what each holds) into the first n rows of `block`; padding rows after them
        point at `pad_slots` with nothing held. One non-blocking copy from pinned memory: no host sync."""
        L, rows = self.canvas_length, block.rows
        pads = [pad_slots] * (rows - n) if isinstance(pad_slots, int) else list(pad_slots)
        none = [0] * (rows - n)
        per_row = [slots + pads, [self.pool.total[s] for s in slots] + none]
        per_row += [[self.pool.held(s, kind) for s in slots] + none for kind in self.pool.kinds]
        staged = to_device(per_row, torch.long, self.device)  # (2 + kinds, rows)
        block.slots.copy_(staged[0])
        block.positions.copy_(staged[1][:, None] + torch.arange(L, device=self.device)[None, :])
        for i, kind in enumerate(self.pool.kinds):
            block.start[kind].copy_(staged[2 + i])
            block.kv_len[kind].copy_(staged[2 + i] + L)

    def encode(self, slots: list[int], ids: list[list[int]], what: str) -> None:
        """Encode `ids[i]` after what slot `slots[i]` holds, in chunks of L tokens (one pass per chunk round)."""
        L = self.canvas_length
        offset = 0
        while True:
            rows = [(s, x[offset: offset + L]) for s, x in zip(slots, ids, strict=True) if len(x) > offset]
            if not rows:
                return
            self._encode_block([s for s, _ in rows], [x for _, x in rows], what)
            offset += L

    def _encode_block(self, slots: list[int], ids: list[list[int]], what: str) -> None:
        n, L = len(slots), self.canvas_length
        padded = to_device([x + [self.pad_id] * (L - len(x)) for x in ids], torch.long, self.device)
        if self.encode_buckets:  # the bucket's buffers take the rows (the graph reads them there)
            block = self.encode_buckets[min(b for b in self.encode_buckets if b >= n)]
            path = "graph" if block.graph is not None else "static"
            block.ids[:n].copy_(padded)
            block.ids[n:] = self.pad_id
        else:  # shapes follow the batch: the inputs are the block's
            block, path = Block.empty(n, L, self.pool.kinds, self.device), "eager"
            block.ids = padded
        self._fill(block, n, slots, self.pool.spare_slot)
        self._run(block, self.encoder_forward)
        self.forwards[(f"{what}_encode", path)] += 1
        self.pool.commit(slots, [len(x) for x in ids])

    def decode(self, canvas: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """One denoising step of rows 0..n-1 (slot b = row b). canvas (n, L), soft (n, L, H) -> hidden (n, L, H)."""
        n = canvas.shape[0]
        if self.decode_buckets:  # the bucket's buffers take the rows (the graph reads them there)
            block = self.decode_buckets[min(b for b in self.decode_buckets if b >= n)]
            path = "graph" if block.graph is not None else "static"
            block.ids[:n].copy_(canvas)
            block.soft[:n].copy_(soft)  # type: ignore[index]
        else:  # shapes follow the batch: the inputs are the block's, no copies
            block, path = Block.empty(n, self.canvas_length, self.pool.kinds, self.device), "eager"
            block.ids, block.soft = canvas, soft
        # padding rows decode their own canvas in the unowned slots n..bucket-1
        self._fill(block, n, list(range(n)), list(range(n, block.rows)))
        self.forwards[("decoder", path)] += 1
        return self._run(block, self.decoder_forward)[:n]

    def _run(self, block: Block, forward):
        if block.graph is not None:
            block.graph.replay()
            return block.output
        return forward(block)

    # ---------------------------------------------------------- buckets, graphs
    def _build_buckets(self, max_batch: int, capture: bool) -> None:
        from tqdm.auto import tqdm

        L, kinds = self.canvas_length, self.pool.kinds
        mempool = torch.cuda.graph_pool_handle() if capture else None
        buckets = sorted(graphs.buckets_for(max_batch), reverse=True)  # largest first: smaller ones reuse its memory
        bar = tqdm(buckets, desc="capturing decoder steps and encoder passes" if capture else "static buckets",
                   unit="bucket", disable=not capture)
        for bucket in bar:
            decode = Block.empty(bucket, L, kinds, self.device, (self.hidden_size, self.dtype))
            decode.slots.copy_(torch.arange(bucket))
            encode = Block.empty(bucket, L, kinds, self.device)
            encode.slots.fill_(self.pool.spare_slot)
            if capture:
                try:
                    seconds = 0.0
                    for block, forward in ((decode, self.decoder_forward), (encode, self.encoder_forward)):
                        block.graph, block.output, took = graphs.capture(lambda b=block, f=forward: f(b), mempool)
                        seconds += took
                except Exception:  # serve without graphs rather than not at all
                    log.exception("CUDA graph capture failed at bucket %d; running eagerly instead", bucket)
                    self.decode_buckets.clear()
                    self.encode_buckets.clear()
                    self.decode_mode = "eager"
                    return
                bar.set_postfix(bucket=bucket, seconds=f"{seconds:.1f}")
            self.decode_buckets[bucket] = decode
            self.encode_buckets[bucket] = encode

    # ---------------------------------------------------------------- sampling
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped float32 logits, computed in place after the head. (b, L, H) -> (b, L, V)."""
        cap = self.model.final_logit_softcapping
        logits = self.model.lm_head(hidden).float()
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _soft_embedding(self, scaled_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The next step's self-conditioning signal, as the reference decoder computes it from its logits."""
        embed = self.model.model.decoder.embed_tokens
        if self.dtype == torch.float32:
            weights = probs  # softmax of the same float32 logits: identical
        else:
            weights = torch.softmax(scaled_logits.to(self.dtype), dim=-1, dtype=torch.float32).to(self.dtype)
        return torch.matmul(weights, embed.weight) * embed.embed_scale.to(self.dtype)

    def _sample_torch(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """The reference's ops: float32 logits, softmax, then `exact` multinomial or `fast` inverse-CDF draws."""
        logits = self._logits(hidden)  # (b, L, V) float32
        logits.div_(temp[:, None, None])
        probs = torch.softmax(logits, dim=-1)
        draw = sampler.sample_rows if self.sampler_mode == "exact" else sampler.sample_rows_inverse_cdf
        sampled = draw(probs, generators)
        draft = logits.argmax(dim=-1)
        soft = self._soft_embedding(logits, probs)
        entropy = sampler.token_entropy_(logits, probs)  # last: makes logits log-probabilities
        return sampled, draft, entropy, soft

    def _sample_fused(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """Two Triton passes over the model-dtype head output; no float32 vocabulary tensor."""
        from worker import fused

        logits = self.model.lm_head(hidden).contiguous()  # (b, L, V) model dtype
        inv_temp = (1.0 / temp).float().contiguous()
        seeds = torch.cat([torch.randint(0, 2**62, (1,), generator=g, device=self.device) for g in generators])
        cap = self.model.final_logit_softcapping
        stats = fused.fused_stats(logits, inv_temp, seeds, cap, self.dtype)
        probs = fused.fused_probs(logits, inv_temp, stats, cap, self.dtype)
        del logits
        embed = self.model.model.decoder.embed_tokens
        soft = torch.matmul(probs, embed.weight) * embed.embed_scale.to(self.dtype)
        return stats["sample"], stats["argmax"], stats["entropy"], soft

    def sample(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """hidden (n, L, H), temp (n,) -> sampled, draft (n, L) int64, entropy (n, L) float32, next soft (n, L, H).

        At most `sample_chunk_rows` rows of full-vocabulary logits are alive at once."""
        n, L = hidden.shape[:2]
        dev = self.device
        sampled = torch.empty((n, L), dtype=torch.long, device=dev)
        draft = torch.empty((n, L), dtype=torch.long, device=dev)
        entropy = torch.empty((n, L), dtype=torch.float32, device=dev)
        soft = torch.empty((n, L, self.hidden_size), dtype=self.dtype, device=dev)
        run = self._sample_fused if self.sampler_mode == "fused" else self._sample_torch
        chunk = self.sample_chunk_rows
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            sampled[a:b], draft[a:b], entropy[a:b], soft[a:b] = run(hidden[a:b], temp[a:b], generators[a:b])
        return sampled, draft, entropy, soft

