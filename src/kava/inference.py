"""Batched greedy generation on a static KV cache, counting forward passes per question.

* latent (Jacobi): pass 0 + T Jacobi iterations + ``<eot> ++ prompt`` pass + one pass per
  further answer token: ``1 + T + 1 + (n_generated - 1)`` passes;
* Coconut: ``question ++ <bot>`` + one pass per further thought + the last thought with
  ``<eot> ++ prompt`` + one pass per further answer token: ``n_thoughts + n_generated``;
* text (CoT / No-CoT / iCoT): prefill of the prompt row + one pass per further token:
  ``1 + (n_generated - 1)``.

Every question of a batch lives in one ``kava.kv.KVCache`` in the static layout: the
question (left-padded), the M latent slots, ``<eot> ++ prompt`` and the decoded tokens
each own fixed columns, written in place. Nothing grows per token (no ``torch.cat``), the
decoding column is a device tensor, and the stop check (all rows produced eos) reads the
device every ``check_every`` tokens instead of every token. On CUDA each launch-bound
pass (a Jacobi iteration, the prompt pass, one decoding step) is captured once per batch
shape as a CUDA graph and replayed (``cuda_graphs``; off = the same code run eagerly),
after ``torch.compile`` has fused each layer pass's small kernels (``compile``); the
question pass (pass 0, prefill) runs uncompiled, and eagerly where it is large enough to
be compute-bound (``Generator._pass``).

Masks and positions are built exactly as in training (kava.attention), so a question
decodes the same alone or inside a left-padded batch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kava.attention import positions_from_mask
from kava.backbone import Backbone
from kava.batching import pad_rows
from kava.kv import KVCache
from kava.model import first_latent_inputs, next_latent_inputs


class Default(enum.Enum):
    """Marks an argument left at its default (``None`` means something else)."""

    DEFAULT = 0


DEFAULT = Default.DEFAULT


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per question (eos included when produced)
    texts: list[str]  # decoded without special tokens
    passes: list[int]  # forward passes spent on each question


@dataclass
class _Session:
    """Device buffers of one batch shape (and, with CUDA graphs, the captured passes)."""

    cache: KVCache
    key_mask: torch.Tensor  # [B, S_max] bool: real columns written so far
    inputs: torch.Tensor  # [B, S_in] ids of the first pass's rows (question ++ <bot> | prompt)
    input_mask: torch.Tensor  # [B, S_in] bool
    last_hidden: torch.Tensor  # [B, D] final hidden state of the last fed position
    tokens: torch.Tensor  # [B, max_new] generated ids (pad after a row's eos)
    done: torch.Tensor  # [B] bool: the row produced eos
    fed: torch.Tensor  # [B] the token fed by the next decoding pass
    cur: torch.Tensor  # 0-dim long: key column the next decoding pass writes
    step: torch.Tensor  # 0-dim long: index into ``tokens`` of the next selected token
    latents: torch.Tensor | None = None  # [B, M, D] inputs of the next Jacobi iteration
    prompt: torch.Tensor | None = None  # [B, P] ids of <eot> ++ answer prompt
    graphs: dict[str, torch.cuda.CUDAGraph] = field(default_factory=dict)
    pool: object | None = None

    def reset(self) -> None:
        self.cache.reset()
        self.key_mask.zero_()
        self.done.zero_()
        self.step.zero_()


class Generator:
    """Greedy generation for one backbone; keeps a session per batch shape.

    ``cuda_graphs``: capture each pass as a CUDA graph (default: on where the backbone is
    on CUDA). ``compile``: ``torch.compile`` the layer passes first
    (``Backbone.compile_generation``; batch, length and cache dims dynamic; default: on
    CUDA; a dict is passed to ``torch.compile`` as options). ``fused_qkv``: plain q/k/v
    (a merged copy) as one GEMM per layer (``Backbone.fused_qkv_generation``; default off,
    as ``eval.fused_qkv``, which evaluation passes on CUDA only; laid out here, before any
    graph is captured; the backbone keeps the last generator's setting). ``check_every``: decoding steps between two reads of
    "every row is done". ``graph_prefill_tokens``: the question pass (pass 0, prefill) is
    graphed too when it carries at most this many positions (batch x columns): small
    ones are launch-bound like decoding (batch 1 on an H200: 2.0 ms graphed, ~16 ms
    eager); large ones are compute-bound, where a graph saves nothing and its capture
    costs a warm-up pass per batch shape.
    """

    def __init__(
        self,
        backbone: Backbone,
        cuda_graphs: bool | None = None,
        check_every: int = 8,
        compile: bool | dict | None = None,
        graph_prefill_tokens: int = 2048,
        fused_qkv: bool = False,
    ):
        self.bb = backbone
        self.device = backbone.new_token_embeddings.device
        on_cuda = self.device.type == "cuda"
        if cuda_graphs is None:
            cuda_graphs = on_cuda
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the backbone on a CUDA device")
        self.cuda_graphs = cuda_graphs
        if compile is None:
            compile = on_cuda
        self.compiled = bool(compile) and backbone.compile_generation(
            **(compile if isinstance(compile, dict) else {})
        )
        self.fused_qkv = backbone.fused_qkv_generation(fused_qkv) > 0
        self.check_every = max(1, check_every)
        self.graph_prefill_tokens = graph_prefill_tokens
        self.sessions: dict[tuple, _Session] = {}

    # --- sessions and passes -------------------------------------------------------------
    def _session(self, key: tuple, batch: int, s_in: int, length: int, max_new: int) -> _Session:
        sess = self.sessions.get(key)
        if sess is None:
            dev, bb = self.device, self.bb
            dtype = bb.new_token_embeddings.dtype
            sess = _Session(
                cache=KVCache.static(length),
                key_mask=torch.zeros(batch, length, dtype=torch.bool, device=dev),
                inputs=torch.zeros(batch, s_in, dtype=torch.long, device=dev),
                input_mask=torch.zeros(batch, s_in, dtype=torch.bool, device=dev),
                last_hidden=torch.zeros(batch, bb.hidden_size, dtype=dtype, device=dev),
                tokens=torch.zeros(batch, max_new, dtype=torch.long, device=dev),
                done=torch.zeros(batch, dtype=torch.bool, device=dev),
                fed=torch.zeros(batch, dtype=torch.long, device=dev),
                cur=torch.zeros((), dtype=torch.long, device=dev),
                step=torch.zeros((), dtype=torch.long, device=dev),
            )
            self.sessions[key] = sess
        else:
            sess.reset()
        return sess

    def _run(self, sess: _Session, name: str, fn: Callable[[], None], graph: bool = True) -> None:
        """Run ``fn`` (a pass that only reads and writes ``sess`` buffers): eagerly, or by
        replaying its CUDA graph. The first call runs it for real on a side stream (the
        warm-up a capture needs) and then captures it; capturing executes nothing.
        ``graph=False``: always eagerly (the question pass, see ``_pass``)."""
        if not (self.cuda_graphs and graph):
            fn()
            return
        graph = sess.graphs.get(name)
        if graph is not None:
            graph.replay()
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if sess.pool is None:
            sess.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=sess.pool):
            fn()
        sess.graphs[name] = graph

    def _pass(self, sess: _Session, embeds: torch.Tensor, start: int | torch.Tensor, prefill=False):
        """One decoder pass over ``embeds [B, n, D]`` written at columns ``[start, start+n)``.

        ``prefill``: the question's pass (latent pass 0, text prefill), run uncompiled:
        with B x S_q positions of large matmuls it gains nothing from fusion and ran
        slower compiled (see ``Backbone.compile_generation``); it is graphed only when
        small (``graph_prefill_tokens``). Every other pass (Jacobi iterations, prompt
        pass, decoding steps) carries few tokens and is launch-bound: compiled, graphed.
        """
        n = embeds.shape[1]
        sess.cache.start = start
        return self.bb(
            embeds,
            sess.key_mask,
            positions_from_mask(sess.key_mask, n, start),
            sess.cache,
            query_start=start,
            compiled=not prefill,
        )

    def _decode(self, sess: _Session, max_new: int, stop: int | None) -> None:
        """Greedy tokens from ``sess.last_hidden`` on; each further token one pass. A row is
        done once it produced ``stop`` (None: every row generates ``max_new`` tokens)."""
        bb, ids = self.bb, self.bb.ids

        def select() -> None:
            nxt = bb.logits(sess.last_hidden).argmax(-1).masked_fill(sess.done, ids.pad)
            sess.tokens.index_copy_(1, sess.step.view(1), nxt[:, None])
            if stop is not None:
                sess.done.logical_or_(nxt == stop)
            sess.fed.copy_(nxt)
            sess.step.add_(1)

        def select_and_feed() -> None:
            select()
            # a row that is done feeds a masked pad column (its outputs are never read)
            sess.key_mask.index_copy_(1, sess.cur.view(1), (~sess.done)[:, None])
            out = self._pass(sess, bb.embed(sess.fed[:, None]), sess.cur)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])
            sess.cur.add_(1)

        for k in range(max_new):
            if k == max_new - 1:
                self._run(sess, "select", select)
            else:
                self._run(sess, "decode", select_and_feed)
            if (k + 1) % self.check_every == 0 and k < max_new - 1 and bool(sess.done.all()):
                break

    def _result(
        self, sess: _Session, batch: int, passes_before: int, stop: int | None
    ) -> Generation:
        """Per row: tokens up to and including ``stop``, and the passes they cost."""
        steps = int(sess.step)
        rows = sess.tokens[:batch, :steps].tolist()
        tokens = [r[: r.index(stop) + 1] if stop in r else r for r in rows]
        texts = self.bb.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        # the pass that fed the prompt (or the prefill) produced the first token
        return Generation(tokens, texts, [passes_before + len(t) for t in tokens])

    # --- the two kinds of generation -------------------------------------------------------
    @torch.no_grad()
    def latent(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        prompt_ids: list[int],
        num_latents: int,
        num_iterations: int,
        max_new_tokens: int = 16,
        stop_token: int | None | Default = DEFAULT,
    ) -> Generation:
        """Latent reasoning then the answer. ``question_ids [B, S_q]`` left-padded, ending
        in ``<bot>``; ``question_mask [B, S_q]``; ``prompt_ids``: the answer prompt's ids;
        ``stop_token``: eos by default, None = always ``max_new_tokens`` tokens."""
        stop = self.bb.ids.eos if stop_token is DEFAULT else stop_token
        bb, ids = self.bb, self.bb.ids
        b, s_q = question_ids.shape
        m, t = num_latents, num_iterations
        p = 1 + len(prompt_ids)  # <eot> ++ prompt
        length = s_q + m + p + max_new_tokens - 1
        key = (
            "latent",
            b,
            s_q,
            m,
            t,
            tuple(prompt_ids),
            max_new_tokens,
            stop,
        )  # graphs bake these in
        sess = self._session(key, b, s_q, length, max_new_tokens)
        sess.inputs.copy_(question_ids)
        sess.input_mask.copy_(question_mask)
        if sess.latents is None:
            sess.latents = torch.zeros(
                b, m, bb.hidden_size, dtype=sess.last_hidden.dtype, device=self.device
            )
            sess.prompt = torch.tensor([[ids.eot, *prompt_ids]] * b, device=self.device)

        def pass0() -> None:
            sess.key_mask[:, :s_q].copy_(sess.input_mask)
            sess.key_mask[:, s_q : s_q + m] = True
            slots = sess.inputs.new_full((b, m), ids.latent)
            out = self._pass(sess, bb.embed(torch.cat([sess.inputs, slots], 1)), 0, prefill=True)
            if t > 0:
                h = out.last_hidden_state[:, s_q - 1 : s_q - 1 + m]
                sess.latents.copy_(first_latent_inputs(bb, h))

        def iteration() -> None:
            out = self._pass(sess, sess.latents, s_q)  # rewrites the latent columns
            sess.latents.copy_(next_latent_inputs(bb, sess.latents, out.last_hidden_state))

        def prompt_pass() -> None:
            sess.key_mask[:, s_q + m : s_q + m + p] = True
            out = self._pass(sess, bb.embed(sess.prompt), s_q + m)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])
            sess.cur.fill_(s_q + m + p)

        self._run(sess, "pass0", pass0, graph=b * (s_q + m) <= self.graph_prefill_tokens)
        for _ in range(t):
            self._run(sess, "iteration", iteration)
        self._run(sess, "prompt", prompt_pass)
        self._decode(sess, max_new_tokens, stop)
        return self._result(sess, b, 1 + t, stop)

    @torch.no_grad()
    def coconut(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        prompt_ids: list[int],
        num_thoughts: int,
        max_new_tokens: int = 16,
        stop_token: int | None | Default = DEFAULT,
    ) -> Generation:
        """Coconut: ``question ++ <bot>`` (left-padded, ``question_ids [B, S_q]``), then
        ``num_thoughts`` continuous thoughts (each the last hidden state of the previous
        position, one pass per thought), then ``<eot> ++ prompt`` and the answer
        (``stop_token`` as in ``latent``). The last thought shares the ``<eot> ++ prompt``
        pass, as in training (kava.coconut): ``num_thoughts + n_generated`` passes, or
        ``1 + n_generated`` without thoughts."""
        stop = self.bb.ids.eos if stop_token is DEFAULT else stop_token
        bb, ids = self.bb, self.bb.ids
        b, s_q = question_ids.shape
        n = num_thoughts
        p = 1 + len(prompt_ids)  # <eot> ++ prompt
        length = s_q + n + p + max_new_tokens - 1
        key = ("thoughts", b, s_q, n, tuple(prompt_ids), max_new_tokens, stop)
        sess = self._session(key, b, s_q, length, max_new_tokens)
        sess.inputs.copy_(question_ids)
        sess.input_mask.copy_(question_mask)
        if sess.prompt is None:
            sess.prompt = torch.tensor([[ids.eot, *prompt_ids]] * b, device=self.device)

        def question_pass() -> None:
            sess.key_mask[:, :s_q].copy_(sess.input_mask)
            out = self._pass(sess, bb.embed(sess.inputs), 0, prefill=True)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])  # thought 1
            sess.cur.fill_(s_q)

        def thought_pass() -> None:  # writes the thought at column cur
            sess.key_mask.index_fill_(1, sess.cur.view(1), True)
            out = self._pass(sess, sess.last_hidden[:, None], sess.cur)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])  # the next thought
            sess.cur.add_(1)

        def final_pass() -> None:  # the last thought (if any) ++ <eot> ++ prompt
            start = s_q + n - 1 if n else s_q
            sess.key_mask[:, start : s_q + n + p] = True
            inputs = bb.embed(sess.prompt)
            if n:
                inputs = torch.cat([sess.last_hidden[:, None].to(inputs.dtype), inputs], 1)
            out = self._pass(sess, inputs, start)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])
            sess.cur.fill_(s_q + n + p)

        self._run(sess, "question", question_pass, graph=b * s_q <= self.graph_prefill_tokens)
        for _ in range(n - 1):
            self._run(sess, "thought", thought_pass)
        self._run(sess, "final", final_pass)
        self._decode(sess, max_new_tokens, stop)
        return self._result(sess, b, n if n else 1, stop)

    @torch.no_grad()
    def text(
        self,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        max_new_tokens: int,
        stop_token: int | None | Default = DEFAULT,
    ) -> Generation:
        """Plain greedy generation after left-padded prompt rows ``input_ids [B, S]``
        (``stop_token`` as in ``latent``)."""
        stop = self.bb.ids.eos if stop_token is DEFAULT else stop_token
        b, s_in = input_ids.shape
        key = ("text", b, s_in, max_new_tokens, stop)
        sess = self._session(key, b, s_in, s_in + max_new_tokens - 1, max_new_tokens)
        sess.inputs.copy_(input_ids)
        sess.input_mask.copy_(input_mask)

        def prefill() -> None:
            sess.key_mask[:, :s_in].copy_(sess.input_mask)
            out = self._pass(sess, self.bb.embed(sess.inputs), 0, prefill=True)
            sess.last_hidden.copy_(out.last_hidden_state[:, -1])
            sess.cur.fill_(s_in)

        self._run(sess, "prefill", prefill, graph=b * s_in <= self.graph_prefill_tokens)
        self._decode(sess, max_new_tokens, stop)
        return self._result(sess, b, 0, stop)


def generate_latent(
    backbone: Backbone,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    prompt_ids: list[int],
    num_latents: int,
    num_iterations: int,
    max_new_tokens: int = 16,
    cuda_graphs: bool | None = False,
) -> Generation:
    """One batch of latent generation (see ``Generator.latent``)."""
    gen = Generator(backbone, cuda_graphs)
    return gen.latent(
        question_ids, question_mask, prompt_ids, num_latents, num_iterations, max_new_tokens
    )


def generate_text(
    backbone: Backbone,
    prompts: list[list[int]],
    max_new_tokens: int,
    cuda_graphs: bool | None = False,
) -> Generation:
    """Greedy generation from token-id prompts (left-padded here), e.g. CoT / No-CoT."""
    device = backbone.new_token_embeddings.device
    ids = pad_rows(prompts, backbone.ids.pad, left=True).to(device)
    mask = pad_rows([[1] * len(p) for p in prompts], 0, left=True).bool().to(device)
    return Generator(backbone, cuda_graphs).text(ids, mask, max_new_tokens)
