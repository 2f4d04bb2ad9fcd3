"""Teacher and student passes and the combined KaVa objective (METHOD.md sections 1-3).

``KavaModel(backbone, cfg)(batch)`` runs, for the methods whose objective is ``distill``
(kava.methods: KaVa, PCCoT, CODI): teacher pass (CE + captured CoT keys/values and
answer-span queries) -> eviction to M entries per (layer, KV head) -> student pass 0 + T
Jacobi iterations + answer pass -> losses. For the ``sft`` objective (CoT, No-CoT, iCoT)
it is plain supervised fine-tuning on the teacher sequence; for ``coconut`` the
continuous-thought passes of ``kava.coconut``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from kava import eviction, layers, losses
from kava.attention import RowCapture, positions_from_mask
from kava.backbone import Backbone
from kava.batching import Batch, CoconutBatch, StudentBatch, TeacherBatch
from kava.coconut import coconut_forward
from kava.config import KavaConfig
from kava.kv import KV, KVCache, stack_kv
from kava.parallel import draw_seed
from kava.tokens import IGNORE


def selected_nll(
    backbone: Backbone, hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL summed per row, computing logits only where a label exists.

    ``hidden [B, S, D]`` (final norm applied), ``labels [B, S]`` aligned with the inputs.
    Returns ``(nll_sum [B], count [B])`` — equal to ``losses.token_nll`` on full logits,
    without the full-vocabulary logits of question, latent and pad positions.
    """
    target = labels[:, 1:]
    sel = target != IGNORE
    flat = sel.flatten().nonzero().squeeze(1)  # [N_sel] into the B x (S-1) positions
    # index_select (backward: index_add), not a boolean mask (a sort-based index_put)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, flat)
    nll = backbone.nll(h, target.flatten()[flat])  # [N_sel], no [N_sel, V] logits kept
    rows = flat // target.shape[1]
    nll_sum = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(
        0, rows, nll
    )
    return nll_sum, sel.sum(-1)


@dataclass
class TeacherOutput:
    nll_sum: torch.Tensor  # [B]
    count: torch.Tensor  # [B]
    hidden: torch.Tensor | None  # [L, B, D] at the distillation position, detached
    capture: RowCapture | None  # answer-span queries, CoT keys/values (detached)

    @property
    def ce(self) -> torch.Tensor:
        return losses.mean_ce(self.nll_sum, self.count)


def teacher_forward(
    backbone: Backbone, batch: TeacherBatch, capture_kv: bool = True, hidden: bool = True
) -> TeacherOutput:
    """Teacher pass over ``question ++ cot ++ prompt ++ answer ++ eos`` (right-padded)."""
    mask = batch.attention_mask
    cap = RowCapture(batch.answer_index, batch.cot_index) if capture_kv else None
    out = backbone(
        backbone.embed(batch.input_ids),
        mask,
        positions_from_mask(mask, mask.shape[1]),
        output_hidden_states=hidden,
        capture=cap,
    )
    nll_sum, count = selected_nll(backbone, out.last_hidden_state, batch.labels)
    distill = None
    if hidden:
        rows = torch.arange(mask.shape[0], device=mask.device)
        distill = torch.stack(
            [h[rows, batch.distill_index] for h in out.hidden_states[1:]]
        ).detach()
    return TeacherOutput(nll_sum, count, distill, cap)


@dataclass
class LatentState:
    """What the latent passes leave behind for the answer pass (training or generation)."""

    key_mask: torch.Tensor  # [B, S_q + M] bool: question (left-padded) + <bot> + M latents
    question_kv: KV  # KV of question + <bot> from pass 0, [B, H_kv, S_q, d] per layer
    latent_kv: KV  # latent KV of the last pass (iteration T, or pass 0 when T=0), [B, H_kv, M, d]
    iteration_kv: list[KV] = field(default_factory=list)  # latent KV of every pass 0..T
    inputs: list[torch.Tensor] = field(
        default_factory=list
    )  # latent inputs x of iterations 1..T, [B, M, D]

    def answer_cache(self) -> KVCache:
        """The answer pass's cache: it reads the question KV, then the last latent KV."""
        return KVCache.growing(self.question_kv, self.latent_kv)


def first_latent_inputs(backbone: Backbone, hidden: torch.Tensor) -> torch.Tensor:
    """Inputs of the first Jacobi iteration from pass 0's last-layer hidden states.

    ``hidden [B, M, D]``: the outputs at ``<bot>`` and latent slots 1..M-1 (shifted by one),
    so ``x[1] = prj(h[<bot>])`` and ``x[j] = prj(h[latent j-1])``. Returns ``[B, M, D]``.
    """
    return backbone.prj(hidden)


def next_latent_inputs(backbone: Backbone, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One Jacobi update: ``x_next[1] = x[1]`` (fixed), ``x_next[j] = prj(y[j-1])``.

    ``x``: the iteration's inputs ``[B, M, D]``; ``y``: its last-layer outputs ``[B, M, D]``.
    """
    return torch.cat([x[:, :1], backbone.prj(y[:, :-1])], dim=1)


def latent_passes(
    backbone: Backbone, question_ids: torch.Tensor, question_mask: torch.Tensor, m: int, t: int
) -> LatentState:
    """Pass 0 and ``t`` Jacobi iterations (PCCoT) over M latent slots.

    ``question_ids [B, S_q]`` left-padded, ending with ``<bot>``; ``question_mask [B, S_q]``.
    Pass 0 reads ``question ++ <bot> ++ M x <latent>``; the inputs of the iterations are
    shifted hidden states through ``prj``: ``x[1] = prj(h[<bot>])`` (fixed) and
    ``x[j] = prj(y[j-1])``. No detach: gradients flow through every iteration.
    """
    b, s_q = question_ids.shape
    key_mask = torch.cat([question_mask, question_mask.new_ones(b, m)], dim=1)
    ids0 = torch.cat([question_ids, question_ids.new_full((b, m), backbone.ids.latent)], dim=1)
    cache = KVCache.growing()
    out = backbone(backbone.embed(ids0), key_mask, positions_from_mask(key_mask, s_q + m), cache)
    question_kv, latent_kv = cache.columns(0, s_q), cache.columns(s_q)
    state = LatentState(key_mask, question_kv, latent_kv, [latent_kv])
    if t == 0:  # pause tokens: the answer reads pass 0's latent KV; no inputs to build
        return state
    x = first_latent_inputs(backbone, out.last_hidden_state[:, s_q - 1 : s_q - 1 + m])
    latent_pos = positions_from_mask(key_mask, m)
    for i in range(t):
        state.inputs.append(x)
        cache = KVCache.growing(question_kv)
        out = backbone(x, key_mask, latent_pos, cache)
        state.latent_kv = cache.new
        state.iteration_kv.append(state.latent_kv)
        if i < t - 1:
            x = next_latent_inputs(backbone, x, out.last_hidden_state)
    return state


@dataclass
class StudentOutput:
    nll_sum: torch.Tensor  # [B]
    count: torch.Tensor  # [B]
    hidden: torch.Tensor  # [L, B, D] at the distillation position (with grad)
    state: LatentState

    @property
    def ce(self) -> torch.Tensor:
        return losses.mean_ce(self.nll_sum, self.count)


def answer_pass(backbone: Backbone, batch: StudentBatch, state: LatentState) -> StudentOutput:
    """``<eot> ++ prompt ++ answer ++ eos`` on the question + last latent KV of ``state``."""
    key_mask = torch.cat([state.key_mask, batch.answer_mask], dim=1)
    s_a = batch.answer_ids.shape[1]
    out = backbone(
        backbone.embed(batch.answer_ids),
        key_mask,
        positions_from_mask(key_mask, s_a),
        cache=state.answer_cache(),
        output_hidden_states=True,
    )
    nll_sum, count = selected_nll(backbone, out.last_hidden_state, batch.answer_labels)
    hidden = torch.stack([h[:, batch.distill_index] for h in out.hidden_states[1:]])
    return StudentOutput(nll_sum, count, hidden, state)


def student_forward(backbone: Backbone, batch: StudentBatch, m: int, t: int) -> StudentOutput:
    """Latent passes (pass 0 + ``t`` Jacobi iterations), then the answer pass."""
    state = latent_passes(backbone, batch.question_ids, batch.question_mask, m, t)
    return answer_pass(backbone, batch, state)


@dataclass
class CompressedKV:
    k: torch.Tensor  # [L, B, H_kv, M, d]
    v: torch.Tensor  # [L, B, H_kv, M, d]
    slot_mask: torch.Tensor  # [L, B, H_kv, M] bool


@torch.no_grad()
def compress_teacher_kv(
    capture: RowCapture,
    batch: TeacherBatch,
    m: int,
    method: str = "rkv",
    lam: float = 0.1,
    order: str = "position",
    generator: torch.Generator | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> CompressedKV:
    """Evict the teacher's CoT KV to ``m`` entries per (layer, KV head), all layers at once.

    ``rope``: ``cos, sin [B, N_c, d]`` of the CoT positions: the kept keys are returned
    un-rotated (pre-RoPE); the eviction scores always use the post-RoPE keys."""
    q, k, v = capture.stacked("queries"), capture.stacked("keys"), capture.stacked("values")
    # Scores in fp32 even inside a bf16 autocast region (einsum would otherwise run in bf16).
    with torch.autocast(k.device.type, enabled=False):
        kept = k if rope is None else layers.unrotate(k.float(), *rope).to(k.dtype)
        return _compress(q, k, kept, v, batch, m, method, lam, order, generator)


def _compress(q, k, k_kept, v, batch, m, method, lam, order, generator) -> CompressedKV:
    """Score with ``k``, keep the top-m entries of ``k_kept`` / ``v``."""
    n_layers, b = k.shape[:2]

    def fold(x: torch.Tensor) -> torch.Tensor:  # [L, B, ...] -> [L*B, ...]
        return x.flatten(0, 1)

    def rep(mask: torch.Tensor) -> torch.Tensor:  # [B, N] -> [L*B, N]
        return mask[None].expand(n_layers, *mask.shape).flatten(0, 1)

    scores = eviction.eviction_scores(
        method, fold(q), fold(k), rep(batch.answer_mask), rep(batch.cot_mask), lam, generator, m
    )
    ck, cv, slot = eviction.compress(fold(k_kept), fold(v), scores, rep(batch.cot_mask), m, order)
    shape = (n_layers, b, *ck.shape[1:])
    return CompressedKV(ck.view(shape), cv.view(shape), slot.view(shape[:-1]))


@dataclass
class LossOutput:
    total: torch.Tensor
    metrics: dict[str, torch.Tensor]  # detached 0-dim loss terms (no host sync until read)
    teacher: TeacherOutput | None = None
    student: StudentOutput | None = None
    compressed: CompressedKV | None = None

    @property
    def terms(self) -> dict[str, float]:
        """The loss breakdown as floats (one device sync)."""
        return dict(zip(self.metrics, torch.stack(list(self.metrics.values())).tolist()))


class KavaModel(nn.Module):
    """The training objective of ``cfg.method`` around a ``Backbone``."""

    def __init__(self, backbone: Backbone, cfg: KavaConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        # what accelerate's FSDP auto-wrap shards one by one (the decoder layer class)
        self._no_split_modules = getattr(backbone.lm, "_no_split_modules", None)
        # random eviction (rkv.method random); the trainer reseeds it per micro-batch
        self.generator = torch.Generator().manual_seed(cfg.rkv.seed)

    def seed_draws(self, step: int, micro: int) -> None:
        """Seed the random eviction of global micro-batch ``micro`` of optimizer ``step``
        (``kava.parallel.draw_seed``): the same draws on 1 or N processes and after
        ``--resume``, with no generator state to save."""
        self.generator = torch.Generator().manual_seed(draw_seed(self.cfg.rkv.seed, step, micro))

    def forward(self, batch: Batch | CoconutBatch) -> LossOutput:
        objective = self.cfg.method_spec.objective
        if objective == "thoughts":  # continuous thoughts, one per pass (kava.coconut)
            ce = losses.mean_ce(*coconut_forward(self.backbone, batch))
            return LossOutput(ce, {"loss": ce.detach(), "student_ce": ce.detach()})
        if objective == "sft":  # fine-tuning on the written sequence
            teacher = teacher_forward(self.backbone, batch.teacher, capture_kv=False, hidden=False)
            ce = teacher.ce
            return LossOutput(ce, {"loss": ce.detach(), "teacher_ce": ce.detach()}, teacher=teacher)
        teacher = self.teacher_pass(batch)
        compressed = self.compress(teacher, batch)
        state = self.latent_passes(batch)
        student = answer_pass(self.backbone, batch.student, state)
        return self.combine(teacher, student, compressed)

    # The phases of ``forward`` for the latent methods, public so that benchmarks time
    # exactly this code (benchmarks/bench_kava.py).
    def teacher_pass(self, batch: Batch) -> TeacherOutput:
        cfg = self.cfg
        # The teacher's graph is only needed for its own CE term.
        grad_ctx = contextlib.nullcontext() if cfg.teacher.weight > 0 else torch.no_grad()
        with grad_ctx:
            return teacher_forward(
                self.backbone,
                batch.teacher,
                capture_kv=cfg.effective_alpha2 > 0,
                hidden=cfg.effective_alpha1 > 0,
            )

    def compress(self, teacher: TeacherOutput, batch: Batch) -> CompressedKV | None:
        """The teacher's CoT KV evicted to M slots, or None when there is no KV loss."""
        if self.cfg.effective_alpha2 <= 0:
            return None
        r = self.cfg.rkv
        rope = None
        if self.cfg.kv_loss.keys == "pre_rope":
            tb = batch.teacher
            positions = positions_from_mask(tb.attention_mask, tb.attention_mask.shape[1])
            rope = self.backbone.rope(positions.gather(1, tb.cot_index))
        return compress_teacher_kv(
            teacher.capture,
            batch.teacher,
            self.cfg.latent.num_latents,
            r.method,
            r.lam,
            r.order,
            self.generator,
            rope,
        )

    def latent_passes(self, batch: Batch) -> LatentState:
        s, cfg = batch.student, self.cfg
        return latent_passes(
            self.backbone,
            s.question_ids,
            s.question_mask,
            cfg.latent.num_latents,
            cfg.effective_iterations,
        )

    def student_latent_keys(
        self, state: LatentState, passes: list[KV]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(k, v)`` ``[L, B, H_kv, M, d]`` of the latent passes the KV loss reads; keys
        un-rotated at the latent positions when ``kv_loss.keys`` is ``pre_rope``."""
        stacked = [stack_kv(p) for p in passes]
        if self.cfg.kv_loss.keys == "post_rope":
            return stacked
        m = self.cfg.latent.num_latents
        cos, sin = self.backbone.rope(positions_from_mask(state.key_mask, m))
        return [(layers.unrotate(k, cos, sin), v) for k, v in stacked]

    def combine(
        self, teacher: TeacherOutput, student: StudentOutput, compressed: CompressedKV | None
    ) -> LossOutput:
        """``CE_student + w_teacher * CE_teacher + alpha1 * L_CODI + alpha2 * L_KV``."""
        cfg = self.cfg
        alpha1, alpha2, w_teacher = cfg.effective_alpha1, cfg.effective_alpha2, cfg.teacher.weight
        zero = student.ce.new_zeros(())
        codi, kv = zero, zero
        if alpha1 > 0:
            codi = losses.codi_loss(
                student.hidden, teacher.hidden, cfg.codi_loss.type, cfg.codi_loss.layerwise_std
            )
        if compressed is not None:
            passes = student.state.iteration_kv[1:] or student.state.iteration_kv
            if cfg.kv_loss.iterations == "last":
                passes = passes[-1:]
            student_keys = self.student_latent_keys(student.state, passes)
            kv = torch.stack(
                [
                    losses.kv_loss(
                        k,
                        v,
                        compressed.k,
                        compressed.v,
                        compressed.slot_mask,
                        cfg.kv_loss.type,
                        cfg.kv_loss.layerwise_std,
                    )
                    for k, v in student_keys
                ]
            ).mean()
        total = student.ce + w_teacher * teacher.ce + alpha1 * codi + alpha2 * kv
        terms = {
            "loss": total,
            "student_ce": student.ce,
            "teacher_ce": teacher.ce,
            "codi_loss": codi,
            "kv_loss": kv,
        }
        metrics = {k: v.detach().float() for k, v in terms.items()}
        return LossOutput(total, metrics, teacher, student, compressed)
