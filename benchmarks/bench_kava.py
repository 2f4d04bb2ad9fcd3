"""Benchmark kava training and inference speed on a real architecture with random weights.

What it measures (see benchmarks/README.md for how to run it):

1. Training throughput of ``kava.model.KavaModel`` (KaVa, M=24, T=3, LoRA r=128/alpha 32
   on q/k/v/o, projection on) on synthetic batches with realistic lengths, built with
   ``kava.batching.Encoded`` + ``kava.batching.collate``: examples/s, tokens/s, step time
   (median after warm-up, synchronised), peak memory, MFU; then a separate instrumented
   run that times the phases (teacher forward, eviction, student latent passes, answer
   pass + losses, backward, optimizer) with a synchronize between them.
2. Latent inference (``kava.inference.generate_latent``) against explicit-CoT greedy
   generation (``kava.inference.generate_text``) forced to a fixed number of tokens, on
   GSM8k-test-sized synthetic questions, at several batch sizes.
3. A correctness pre-check first: one small batch's loss in fp32 and under bf16 autocast
   must agree within bf16 tolerance, and the instrumented forward must reproduce
   ``KavaModel.forward`` exactly.

No network is used: models are built from configs with random weights, and the tokenizer
is a word-level ``tokenizers`` tokenizer built in-process with the real vocabulary size.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kava import layers, qkv
from kava.backbone import Backbone
from kava.batching import Batch, Encoded, collate, pad_rows
from kava.config import KavaConfig, load_config
from kava.inference import Generator
from kava.model import KavaModel, answer_pass
from kava.tokens import BOT, EOT, LATENT, PAD
from kava.train import apply_speed_options

PEAK_TFLOPS_H100 = 780.0  # measured bf16 matmul ceiling on the lent H100 (shared/DEVICE.md)
PROMPT_LEN = 4  # " The answer is:" is 4 tokens in the Llama-3 / SmolLM2 / Qwen2 tokenizers
MFU_FORMULA = (
    "MFU = 4 * (N_nonemb + N_lm_head) * tokens_per_step / step_time_s / (peak_tflops * 1e12); "
    "N_nonemb = base-LM parameters without the input embedding and lm_head (LoRA and "
    "projection excluded), N_lm_head = vocab * hidden (counted whether tied or not); "
    "4 = 2 (forward) + 2 (backward wrt activations; the base weights are frozen); "
    "tokens_per_step = real (non-pad) tokens of every pass run: teacher sequence + "
    "pass 0 (question + <bot> + M) + T * M + answer pass (<eot> + prompt + answer + eos); "
    "attention score FLOPs are not counted"
)

# --- architectures --------------------------------------------------------------------
# tok_vocab: size of the real tokenizer before kava adds its 4 tokens (Backbone.from_model
# resizes the embeddings only when the tokenizer outgrows them, e.g. not for Qwen2).


def _arch(hf, family, vocab, tok_vocab, hidden, layers, heads, kv_heads, head_dim, ffn, **kw):
    names = ("hf", "family", "vocab", "tok_vocab", "hidden", "layers", "heads", "kv_heads")
    values = (hf, family, vocab, tok_vocab, hidden, layers, heads, kv_heads)
    base = dict(zip(names, values), head_dim=head_dim, ffn=ffn, tied=True, bos=True)
    return {**base, "rms_eps": 1e-5, "rope_theta": 500000.0, **kw}


# All tied. Qwen2 gets q/k/v biases from its HF class; the tokenizer of Qwen2.5 (151,665)
# is smaller than its embedding (151,936), so kava adds its tokens without a resize.
# fmt: off
ARCHS: dict[str, dict[str, Any]] = {
    # _arch(HF shape, family, vocab, tokenizer vocab, hidden, layers, heads, KV heads, head_dim, FFN)
    "llama-1b": _arch("meta-llama/Llama-3.2-1B-Instruct", "llama", 128256, 128256, 2048, 16, 32, 8, 64, 8192),
    "llama-3b": _arch("meta-llama/Llama-3.2-3B-Instruct", "llama", 128256, 128256, 3072, 28, 24, 8, 128, 8192),
    "qwen-0.5b": _arch("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 151936, 151665, 896, 24, 14, 2, 64, 4864,
                       bos=False, rms_eps=1e-6, rope_theta=1e6),
    "smollm2-135m": _arch("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 49152, 49152, 576, 30, 9, 3, 64, 1536,
                          bos=False, rope_theta=1e5),
    "tiny": _arch(None, "llama", 512, 512, 64, 2, 4, 2, 16, 128, rope_theta=1e4),
}
# fmt: on

# Defaults that --quick replaces (any of them given explicitly on the command line wins).
FULL_DEFAULTS = dict(
    global_batch=128,
    steps=5,
    warmup=2,
    phase_steps=2,
    infer_questions=1319,
    infer_batches="64,256",
    cot_tokens="40,120",
)
QUICK_DEFAULTS = dict(
    global_batch=4,
    steps=2,
    warmup=1,
    phase_steps=1,
    infer_questions=6,
    infer_batches="4",
    cot_tokens="4,8",
)


def log(msg: str) -> None:
    print(msg, flush=True)


# --- tokenizer and model ----------------------------------------------------------------


def build_tokenizer(arch: dict[str, Any]):
    """Offline word-level tokenizer with ``arch['tok_vocab']`` entries, + kava's 4 tokens.

    ids 0/1/2 = <unk>/<bos>/<eos>, then the digits, then filler words. Llama-style archs
    prepend <bos> (so kava's ``special_ids`` finds a bos, as with the real Llama-3 one).
    The new tokens are added exactly as ``kava.backbone.load_tokenizer`` adds them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    size = arch["tok_vocab"]
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for d in range(10):
        vocab[str(d)] = len(vocab)
    for i in range(len(vocab), size):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if arch["bos"]:
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.add_special_tokens({"additional_special_tokens": [BOT, EOT, LATENT], "pad_token": PAD})
    return tok


def build_lm(arch: dict[str, Any], device: torch.device, seed: int):
    """A randomly initialised causal LM of the architecture, built directly on ``device``, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=arch["vocab"],
        hidden_size=arch["hidden"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        num_key_value_heads=arch["kv_heads"],
        head_dim=arch["head_dim"],
        intermediate_size=arch["ffn"],
        tie_word_embeddings=arch["tied"],
        rms_norm_eps=arch["rms_eps"],
        rope_theta=arch["rope_theta"],
        max_position_embeddings=32768,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    if arch["family"] == "llama":
        cls, cfg = LlamaForCausalLM, LlamaConfig(**common)
    else:  # qwen2: q/k/v biases are built in
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(use_sliding_window=False, **common)
    torch.manual_seed(seed)
    with device:
        lm = cls(cfg)
    return lm.float()


def param_counts(backbone: Backbone) -> dict[str, int]:
    lm = backbone.lm
    base = {id(p): p for n, p in lm.named_parameters() if "lora_" not in n}
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    tied = head is emb
    total = sum(p.numel() for p in base.values())
    non_emb = total - emb.numel() - (0 if tied else head.numel())
    lora = sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n)
    return dict(
        base_total=total,
        non_embedding=non_emb,
        embedding=emb.numel(),
        lm_head=head.numel(),
        tied=tied,
        lora=lora,
        projection=sum(p.numel() for p in backbone.prj.parameters()),
        trainable=sum(p.numel() for p in backbone.trainable_parameters()),
        vocab_rows=emb.shape[0],
    )


def cast_frozen_(backbone: Backbone, dtype: torch.dtype) -> None:
    """Frozen base weights to ``dtype``; LoRA, new-token rows and projection stay fp32.

    Same result as building with ``ModelConfig.dtype=bfloat16`` (peft keeps adapters fp32).
    """
    for p in backbone.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


# --- synthetic data -------------------------------------------------------------------


@dataclasses.dataclass
class Lengths:
    question: int
    cot: int
    jitter: float

    def draw(self, rng: random.Random, mean: int) -> int:
        lo = max(1, round(mean * (1 - self.jitter)))
        hi = max(lo, round(mean * (1 + self.jitter)))
        return rng.randint(lo, hi)


class Synth:
    """Random-token examples in kava's ``Encoded`` form, with realistic lengths."""

    def __init__(self, backbone: Backbone, lengths: Lengths, seed: int, bucket: int = 1):
        self.ids = backbone.ids
        self.bucket = bucket
        self.lengths = lengths
        self.rng = random.Random(seed)
        self.lo = 13  # after <unk>, <bos>, <eos> and the digits
        self.hi = backbone.first_new_id - 1
        self.prompt = self.tokens(PROMPT_LEN)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.randint(self.lo, self.hi) for _ in range(n)]

    def question(self, n: int) -> list[int]:
        bos = [self.ids.bos] if self.ids.bos is not None else []
        return bos + self.tokens(n - len(bos))

    def example(self) -> Encoded:
        ln = self.lengths
        return Encoded(
            question=self.question(ln.draw(self.rng, ln.question)),
            cot=self.tokens(ln.draw(self.rng, ln.cot)),
            prompt=self.prompt,
            answer=self.tokens(self.rng.randint(2, 4)),  # + eos: span of ~8 with the prompt
        )

    def batch(self, n: int) -> Batch:
        return collate([self.example() for _ in range(n)], self.ids, self.bucket)


def count_tokens(batch: Batch, m: int, t: int) -> dict[str, int]:
    """Tokens processed per pass of one micro-batch, real (non-pad) and padded."""
    tb, sb = batch.teacher, batch.student
    b = tb.input_ids.shape[0]
    real = dict(
        teacher=int(tb.attention_mask.sum()),
        pass0=int(sb.question_mask.sum()) + b * m,
        iterations=b * m * t,
        answer=int(sb.answer_mask.sum()),
    )
    padded = dict(
        teacher=tb.input_ids.numel(),
        pass0=sb.question_ids.numel() + b * m,
        iterations=b * m * t,
        answer=sb.answer_ids.numel(),
    )
    return {
        **{f"{k}_real": v for k, v in real.items()},
        **{f"{k}_padded": v for k, v in padded.items()},
        "real": sum(real.values()),
        "padded": sum(padded.values()),
    }


# --- timing helpers ---------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stall_counters(device: torch.device) -> dict[str, int]:
    """Counters that explain a slow step: allocator retries (a cudaMalloc failed, the cache
    was freed and the allocation retried), cudaMalloc/cudaFree calls, Python GC passes."""
    out = {f"gc_gen{g}": st["collections"] for g, st in enumerate(gc.get_stats())}
    if device.type == "cuda":
        ms = torch.cuda.memory_stats(device)
        out |= {
            "alloc_retries": ms.get("num_alloc_retries", 0),
            "cuda_mallocs": ms.get("num_device_alloc", 0),
            "cuda_frees": ms.get("num_device_free", 0),
        }
    return out


class PhaseTimer:
    """Accumulates wall time between ``tick`` calls, synchronising the device each time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self.last = 0.0

    def start(self) -> None:
        sync(self.device)
        self.last = time.perf_counter()

    def tick(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


class _NoTimer:
    def tick(self, name: str) -> None:
        pass


def instrumented_forward(model: KavaModel, batch: Batch, timer=None):
    """``KavaModel.forward`` for the latent methods, phase by phase, with a timer tick after
    each: the same ``KavaModel`` phase methods that ``forward`` composes. Returns
    ``(total, terms)``.
    """
    timer = timer or _NoTimer()
    teacher = model.teacher_pass(batch)
    timer.tick("teacher_forward")
    compressed = model.compress(teacher, batch)
    timer.tick("eviction")
    state = model.latent_passes(batch)
    timer.tick("student_latent_passes")
    out = model.combine(teacher, answer_pass(model.backbone, batch.student, state), compressed)
    timer.tick("answer_pass_and_losses")
    return out.total, out.terms


def amp_context(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --- the benchmark sections -------------------------------------------------------------


def precheck(model: KavaModel, synth: Synth, device, tol: float) -> dict[str, Any]:
    """Same small batch: fp32 loss vs bf16-autocast loss; instrumented == KavaModel.forward.

    Run on the fp32-weight model, dropout off (eval mode), before any training step.
    """
    model.eval()
    batch = synth.batch(4).to(device)
    with torch.no_grad():
        out32 = model(batch)
        inst_total, _ = instrumented_forward(model, batch)
        with amp_context(device, True):
            out16 = model(batch)
    f32, b16 = out32.terms, out16.terms
    rel = abs(b16["loss"] - f32["loss"]) / max(abs(f32["loss"]), 1e-12)
    inst_ok = math.isclose(inst_total.item(), f32["loss"], rel_tol=1e-5, abs_tol=1e-6)
    finite = all(math.isfinite(v) for v in (*f32.values(), *b16.values()))
    res = dict(
        loss_fp32=f32["loss"],
        loss_bf16_autocast=b16["loss"],
        rel_diff=rel,
        tolerance=tol,
        terms_fp32=f32,
        terms_bf16_autocast=b16,
        instrumented_loss=inst_total.item(),
        instrumented_matches=inst_ok,
        ok=bool(rel <= tol and inst_ok and finite),
    )
    log(
        f"precheck: loss fp32 {f32['loss']:.6f} | bf16 autocast {b16['loss']:.6f} | "
        f"rel diff {rel:.2e} (tol {tol:.0e}) | instrumented {inst_total.item():.6f} "
        f"-> {'OK' if res['ok'] else 'FAIL'}"
    )
    for k in f32:
        log(f"  {k:>11}: fp32 {f32[k]:.6f}  bf16 {b16[k]:.6f}")
    model.train()
    return res


def compile_check(model: KavaModel, synth: Synth, device, args) -> dict[str, Any]:
    """Compiled layer pass vs eager on the same batch (bf16 autocast, dropout off): loss
    and gradient norm; also the time of the first compiled forward + backward (compile)."""
    from torch._dynamo.utils import counters

    bb = model.backbone
    compiled = bb._layer_fn
    batch = synth.batch(args.micro_batch).to(device)
    model.eval()
    res: dict[str, Any] = {}
    for name, fn in (("eager", layers.layer_pass), ("compiled", compiled)):
        bb._layer_fn = fn
        bb.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        with amp_context(device, args.amp):
            out = model(batch)
        out.total.backward()
        sync(device)
        grad = torch.stack([p.grad.float().norm() for p in bb.trainable_parameters()]).norm()
        res[name] = dict(
            loss=out.terms, grad_norm=float(grad), first_call_s=time.perf_counter() - t0
        )
        del out
    bb._layer_fn = compiled
    bb.zero_grad(set_to_none=True)
    model.train()
    e, c = res["eager"], res["compiled"]
    res["loss_rel_diff"] = abs(c["loss"]["loss"] - e["loss"]["loss"]) / abs(e["loss"]["loss"])
    res["grad_norm_rel_diff"] = abs(c["grad_norm"] - e["grad_norm"]) / e["grad_norm"]
    res["compiled_graphs"] = counters["stats"].get("unique_graphs", 0)
    log(
        f"compile check: loss eager {e['loss']['loss']:.5f} compiled {c['loss']['loss']:.5f} "
        f"(rel {res['loss_rel_diff']:.1e}), grad norm rel {res['grad_norm_rel_diff']:.1e}, "
        f"first compiled step {c['first_call_s']:.1f} s, {res['compiled_graphs']} graphs"
    )
    return res


def make_optimizer(params, cfg: KavaConfig, device):
    """As kava.train: AdamW over the trainable parameters, fused on CUDA."""
    return torch.optim.AdamW(
        params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=device.type == "cuda"
    )


def bench_train(model: KavaModel, synth: Synth, args, device, counts: dict) -> dict[str, Any]:
    cfg = model.cfg
    m, t = cfg.latent.num_latents, cfg.effective_iterations
    accum = args.global_batch // args.micro_batch
    params = model.backbone.trainable_parameters()
    opt = make_optimizer(params, cfg, device)
    clip = cfg.train.grad_clip

    def new_step() -> tuple[list[Batch], list[dict[str, int]]]:
        cpu = [synth.batch(args.micro_batch) for _ in range(accum)]
        return [b.to(device) for b in cpu], [count_tokens(b, m, t) for b in cpu]

    def step(micro: list[Batch], timer: PhaseTimer | None = None) -> dict[str, float]:
        terms: dict[str, float] = {}
        for mb in micro:
            with amp_context(device, args.amp):
                if timer is None:
                    out = model(mb)
                    total, terms = out.total, out.terms
                    del out
                else:
                    total, terms = instrumented_forward(model, mb, timer)
            (total / accum).backward()
            del total
            if timer is not None:
                timer.tick("backward")
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timer is not None:
            timer.tick("optimizer")
        return terms

    model.train()
    n_steps = args.warmup + args.steps
    built = [new_step() for _ in range(n_steps + args.phase_steps)]
    batches, tok = [b for b, _ in built], [c for _, c in built]
    log(
        f"train: global batch {args.global_batch} = micro {args.micro_batch} x {accum}, "
        f"{args.warmup} warm-up + {args.steps} timed steps + {args.phase_steps} instrumented"
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses_seen, graphs_per_step, stalls_per_step = [], [], [], []
    stats = torch._dynamo.utils.counters["stats"]  # a step that compiles adds graphs
    for i, micro in enumerate(batches[:n_steps]):
        graphs = stats["unique_graphs"]
        sync(device)
        before = stall_counters(device)
        t0 = time.perf_counter()
        terms = step(micro)
        sync(device)
        dt = time.perf_counter() - t0
        after = stall_counters(device)
        losses_seen.append(terms["loss"])
        graphs_per_step.append(stats["unique_graphs"] - graphs)
        stalls_per_step.append({k: after[k] - before[k] for k in after})
        if i >= args.warmup:
            times.append(dt)
        log(
            f"  step {i:>2} {'(warm-up)' if i < args.warmup else '':<9} {dt:8.3f} s  loss {terms['loss']:.4f}"
            + (f"  ({graphs_per_step[-1]} new compiled graphs)" if graphs_per_step[-1] else "")
            + "".join(
                f"  {k} {v}"
                for k, v in stalls_per_step[-1].items()
                if v and k in ("alloc_retries", "gc_gen2")
            )
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # token counts of the timed steps (mean per step)
    timed = tok[args.warmup : n_steps]
    keys = timed[0][0].keys()
    per_step = {k: statistics.mean(sum(c[k] for c in s) for s in timed) for k in keys}
    med = statistics.median(times)
    flops_per_token = 4 * (counts["non_embedding"] + counts["lm_head"])
    tflops = flops_per_token * per_step["real"] / med / 1e12

    # instrumented run: phases
    phase_runs = []
    for micro in batches[n_steps:]:
        timer = PhaseTimer(device)
        timer.start()
        terms = step(micro, timer)
        losses_seen.append(terms["loss"])
        phase_runs.append(timer.times)
    phase_names = [
        "teacher_forward",
        "eviction",
        "student_latent_passes",
        "answer_pass_and_losses",
        "backward",
        "optimizer",
    ]
    phases_ms = {k: 1e3 * statistics.median(r.get(k, 0.0) for r in phase_runs) for k in phase_names}
    phase_sum = sum(phases_ms.values())
    model.zero_grad(set_to_none=True)
    return dict(
        examples_per_s=args.global_batch / med,
        tokens_per_s=per_step["real"] / med,
        padded_tokens_per_s=per_step["padded"] / med,
        step_time_s=med,
        step_times_s=times,
        new_compiled_graphs_per_step=graphs_per_step,  # warm-up steps included
        stall_counters_per_step=stalls_per_step,  # likewise: see stall_counters
        tokens_per_step=per_step["real"],
        padded_tokens_per_step=per_step["padded"],
        tokens_per_step_by_pass={k: v for k, v in per_step.items() if k not in ("real", "padded")},
        peak_mem_gib=peak,
        achieved_tflops=tflops,
        mfu=tflops / args.peak_tflops,
        mfu_formula=MFU_FORMULA,
        flops_per_token=flops_per_token,
        peak_tflops=args.peak_tflops,
        losses=losses_seen,
        losses_finite=all(math.isfinite(x) for x in losses_seen),
        phases_ms=phases_ms,
        phase_fraction={k: v / phase_sum for k, v in phases_ms.items()},
        phase_sum_ms=phase_sum,
        phase_note="separate instrumented steps (same kava.model calls as KavaModel.forward) "
        "with a device synchronize after each phase; the sum exceeds step_time_s by the "
        "CPU/GPU overlap the synchronizes remove",
        instrumented_step_ms=[1e3 * sum(r.values()) for r in phase_runs],
    )


def bench_inference(model: KavaModel, synth: Synth, args, device, report: dict, save) -> None:
    """Latent generation vs fixed-length greedy CoT on the same questions, both through
    ``kava.inference.Generator`` (static KV cache, CUDA graphs unless ``--no-graphs``) on
    a LoRA-merged bf16 copy unless ``--no-merge`` (what ``kava eval`` runs).

    No stop token (``stop_token=None``): random weights would stop a row only by chance,
    so every question generates exactly the requested number of tokens. Fills ``report``
    in place and calls ``save()`` after every run, so that a run cut short by a time limit
    keeps the rows it finished.
    """
    bb, cfg = model.backbone, model.cfg
    m, t = cfg.latent.num_latents, cfg.effective_iterations
    rng = random.Random(args.seed + 1)
    questions = [synth.question(rng.randint(40, 80)) for _ in range(args.infer_questions)]
    questions.sort(key=len, reverse=True)  # as kava.evaluate batches: longest first
    prompt = synth.prompt
    model.eval()
    runner = bb.merged_copy() if args.merge else bb
    amp = args.amp and runner is bb  # a merged copy is bf16 throughout
    ids = runner.ids
    # the reference for the token check: the same weights, eager, uncompiled, no graphs
    # (deep-copied before the fast generator lays its q/k/v out: the reference runs unfused)
    not_eager = not args.no_graphs or args.compile_generation or args.fused_generation
    reference = copy.deepcopy(runner) if not_eager else None
    gens = {
        "fast": Generator(
            runner,
            not args.no_graphs,
            compile=args.compile_generation,
            fused_qkv=args.fused_generation,
        )
    }
    if reference is not None:
        gens["eager"] = Generator(reference, cuda_graphs=False, compile=False, fused_qkv=False)
    else:
        gens["eager"] = gens["fast"]

    def padded(rows: list[list[int]]):
        q = pad_rows(rows, ids.pad, left=True, multiple_of=args.eval_bucket).to(device)
        mask = pad_rows([[1] * len(r) for r in rows], 0, left=True, multiple_of=args.eval_bucket)
        return q, mask.bool().to(device)

    calls = [0]  # passes seen by a hook (eager runs only: a graph replay calls no module)
    runner.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))

    def run(mode: str, n_tokens: int, bs: int, qs: list[list[int]], fast: bool = True):
        gen = gens["fast" if fast else "eager"]
        passes, gen_tokens, tokens = [], [], []
        calls[0] = 0
        weighted_calls = 0
        for i in range(0, len(qs), bs):
            chunk = qs[i : i + bs]
            before = calls[0]
            with amp_context(device, amp):
                if mode == "latent":
                    qids, qmask = padded([q + [ids.bot] for q in chunk])
                    g = gen.latent(qids, qmask, prompt, m, t, n_tokens, stop_token=None)
                else:
                    qids, qmask = padded(chunk)
                    g = gen.text(qids, qmask, n_tokens, stop_token=None)
            passes += g.passes
            gen_tokens += [len(x) for x in g.tokens]
            tokens += g.tokens
            weighted_calls += (calls[0] - before) * len(chunk)
        hooked = None if gen.cuda_graphs else weighted_calls / len(qs)
        return passes, gen_tokens, tokens, hooked

    modes = [("latent", args.latent_answer_tokens)] + [("cot", n) for n in args.cot_tokens]
    runs: list[dict[str, Any]] = []
    speedup: dict[str, float] = {}
    report.update(
        questions=len(questions),
        question_len_range=[40, 80],
        order="sorted by length, longest first (as kava.evaluate)",
        latent_answer_tokens=args.latent_answer_tokens,
        stop_token=None,
        lora_merged=runner is not bb,
        cuda_graphs=not args.no_graphs,
        compiled=gens["fast"].compiled,
        fused_qkv=gens["fast"].fused_qkv,
        fused_qkv_layers=sum(qkv.laid_out(x.self_attn) is not None for x in runner.layers),
        eval_bucket=args.eval_bucket,
        small_batch_questions=args.small_batch_questions,
        runs=runs,
        latent_speedup=speedup,
    )
    # correctness first: the fast path (compiled, graphed, fused) generates what eager does.
    # bf16 greedy decoding of random weights has near-ties, so compare the first tokens
    # as well as the whole run, and count the rows that differ.
    if gens["fast"] is not gens["eager"]:
        same = {}
        for mode, n in modes:
            chunk = questions[: min(64, args.infer_questions)]
            a = run(mode, n, len(chunk), chunk)[2]
            b = run(mode, n, len(chunk), chunk, fast=False)[2]
            first = min(n, 8)
            same[f"{mode}{n}"] = dict(
                equal=a == b,
                rows_differing=sum(x != y for x, y in zip(a, b)),
                rows_differing_in_first_tokens=sum(x[:first] != y[:first] for x, y in zip(a, b)),
                first_tokens=first,
                rows=len(a),
            )
        report["fast_equals_eager"] = same
        log(f"  fast (compiled, graphed, fused q/k/v) == eager tokens: {same}")

    def questions_for(bs: int) -> list[list[int]]:
        return questions[: args.small_batch_questions] if bs < 64 else questions

    for bs in args.infer_batches:  # warm-up: compiles, captures this batch size's graphs
        for mode, n in modes:
            run(mode, n, bs, questions[:bs])
    for bs in args.infer_batches:
        qs = questions_for(bs)
        for mode, n in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            passes, gen, _, hooked = run(mode, n, bs, qs)
            sync(device)
            dt = time.perf_counter() - t0
            row = dict(
                mode=mode,
                new_tokens=n,
                batch=bs,
                questions=len(qs),
                time_s=dt,
                questions_per_s=len(qs) / dt,
                passes_per_question=statistics.mean(passes),
                passes_per_question_hooked=hooked,
                generated_tokens_per_question=statistics.mean(gen),
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
            )
            runs.append(row)
            lat = next((r for r in runs if r["batch"] == bs and r["mode"] == "latent"), None)
            if mode == "cot" and lat is not None:
                speedup[f"batch{bs}_vs_cot{n}"] = lat["questions_per_s"] / row["questions_per_s"]
            save()
            log(
                f"  infer {mode:<6} new={n:<4} batch={bs:<4} {row['questions_per_s']:9.1f} q/s"
                f"  {row['passes_per_question']:.1f} passes/q  {dt:7.2f} s"
            )
    if gens["fast"].cuda_graphs:
        report["pass_ms"] = graph_pass_ms(gens["fast"], device)
        save()
        log(f"  graphed pass costs (ms, median replay): {report['pass_ms']}")


def graph_pass_ms(gen: Generator, device: torch.device, n: int = 20) -> dict[str, dict]:
    """Median replay time (ms, CUDA events) of every captured pass of ``gen``'s sessions
    of the largest question length per batch size: where a generation call's time goes
    (pass 0, one Jacobi iteration, the prompt pass, one decoding step, prefill)."""
    chosen: dict[tuple, Any] = {}
    for key, sess in gen.sessions.items():  # key = (mode, batch, length, ...)
        pick = (key[0], key[1]) + tuple(key[3:])
        if pick not in chosen or key[2] > chosen[pick][0][2]:
            chosen[pick] = (key, sess)
    out: dict[str, dict] = {}
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for key, sess in chosen.values():
        label = f"{key[0]} batch {key[1]} length {key[2]}" + (
            f" new {key[-2]}" if key[0] == "text" else ""
        )
        cur = int(sess.cur)  # the decoding column after the run; replays start just before
        times = {}
        for name, graph in sess.graphs.items():
            ts = []
            for _ in range(n):
                sess.cur.fill_(max(cur - 2, 0))  # stays inside the cache
                sess.step.zero_()
                start.record()
                graph.replay()
                stop.record()
                stop.synchronize()
                ts.append(start.elapsed_time(stop))
            times[name] = statistics.median(ts)
        out[label] = times
    sync(device)
    return out


# --- reporting --------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(),
        device=device.type,
    )
    for name in ("peft", "accelerate", "tokenizers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional package
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
        )
    else:
        env.update(
            gpu=None,
            cpu=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
        )
    return env


def table(res: dict[str, Any]) -> str:
    s, env = res["settings"], res["environment"]
    lines = [
        "",
        f"== kava benchmark: {res['arch']['name']} on {env.get('gpu') or 'CPU'} | "
        f"{s['precision']} | M={s['M']} T={s['T']} | lengths q~{s['question_len']} "
        f"cot~{s['cot_len']} ==",
    ]
    pc = res.get("precheck")
    if pc:
        lines.append(
            f"precheck   loss fp32 {pc['loss_fp32']:.5f}  bf16 {pc['loss_bf16_autocast']:.5f}  "
            f"rel {pc['rel_diff']:.1e}  instrumented==model {pc['instrumented_matches']}  "
            f"-> {'OK' if pc['ok'] else 'FAIL'}"
        )
    tr = res.get("train")
    if tr and "error" in tr:
        lines.append(f"train      {tr['error']}")
    elif tr:
        peak = f"{tr['peak_mem_gib']:.1f} GiB" if tr["peak_mem_gib"] is not None else "n/a"
        lines += [
            f"train      batch {s['global_batch']} = {s['micro_batch']} x {s['accumulation']} | "
            f"step {tr['step_time_s'] * 1e3:.1f} ms | {tr['examples_per_s']:.1f} ex/s | "
            f"{tr['tokens_per_s']:,.0f} tok/s ({tr['padded_tokens_per_s']:,.0f} padded) | "
            f"peak {peak} | {tr['achieved_tflops']:.3g} TFLOP/s = MFU {100 * tr['mfu']:.3g}%",
            f"MFU        = 4 x (N_nonemb {res['arch']['params']['non_embedding'] / 1e6:.1f}M + "
            f"N_lm_head {res['arch']['params']['lm_head'] / 1e6:.1f}M) x real tokens/s / "
            f"{tr['peak_tflops']:g}e12 (see train.mfu_formula)",
            "phases ms  "
            + " | ".join(f"{k} {v:.1f}" for k, v in tr["phases_ms"].items())
            + f" | sum {tr['phase_sum_ms']:.1f}",
        ]
    inf = res.get("inference")
    if inf:
        lines.append(
            f"inference  {inf['questions']} questions (40-80 tokens), eos disabled, "
            f"latent answer = {inf['latent_answer_tokens']} tokens"
        )
        lines.append(f"  {'mode':<7}{'new':>5}{'batch':>7}{'q/s':>10}{'passes/q':>10}{'time s':>9}")
        for r in inf["runs"]:
            lines.append(
                f"  {r['mode']:<7}{r['new_tokens']:>5}{r['batch']:>7}{r['questions_per_s']:>10.1f}"
                f"{r['passes_per_question']:>10.1f}{r['time_s']:>9.2f}"
            )
        lines.append(
            "  latent speed-up: "
            + ", ".join(f"{k} x{v:.1f}" for k, v in inf["latent_speedup"].items())
        )
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Benchmark kava: KaVa training throughput (examples/s, tokens/s, step time, "
            "per-phase split, peak memory, MFU) and latent vs explicit-CoT inference speed, "
            "on a named architecture with random weights (no network needed). Writes a "
            "JSON with every number and prints a short table last."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama-1b", help="architecture")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes for CPU smoke tests")
    g = p.add_argument_group("training")
    g.add_argument("--global-batch", type=int, help="examples per optimizer step (128; quick 4)")
    g.add_argument(
        "--micro-batch", type=int, help="examples per forward (32 on cuda, 8 on cpu, quick 2)"
    )
    g.add_argument("--steps", type=int, help="timed optimizer steps (5; quick 2)")
    g.add_argument("--warmup", type=int, help="untimed warm-up steps (2; quick 1)")
    g.add_argument(
        "--phase-steps", type=int, help="extra instrumented steps for the phase split (2; quick 1)"
    )
    g.add_argument("--nl", action="store_true", help="natural-language CoT (~120 tokens, not ~40)")
    g.add_argument("--question-len", type=int, default=50, help="mean question tokens (incl. bos)")
    g.add_argument("--cot-len", type=int, help="mean CoT tokens (40, or 120 with --nl)")
    g.add_argument("--jitter", type=float, default=0.25, help="uniform +-fraction on lengths")
    g.add_argument(
        "--weights",
        choices=["fp32", "bf16"],
        default="fp32",
        help="frozen base weights: fp32 (kava's default ModelConfig.dtype, fp32 master "
        "weights) or bf16 (ModelConfig.dtype=bfloat16); LoRA, projection and new-token "
        "rows are fp32 either way",
    )
    g.add_argument(
        "--amp",
        choices=["auto", "bf16", "off"],
        default="auto",
        help="autocast: auto = bf16 on cuda, off on cpu (kava's train.mixed_precision=auto)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="kava config override (dotted key, e.g. kv_loss.iterations=all); repeatable",
    )
    g.add_argument(
        "--compile",
        choices=["none", "layers"],
        help="train.compile (default: layers on cuda, none on cpu)",
    )
    g.add_argument(
        "--activation-checkpointing", action="store_true", help="train.activation_checkpointing"
    )
    g.add_argument("--bucket", type=int, default=8, help="train.bucket (length buckets)")
    g.add_argument(
        "--attention",
        choices=["repeat_kv", "grouped"],
        default="repeat_kv",
        help="train.attention: grouped-query attention in training with K/V copied per "
        "query head (repeat_kv, kava's default) or without copies (grouped: less memory)",
    )
    g.add_argument(
        "--fused-qkv",
        action="store_true",
        help="train.fused_qkv: q/k/v projections fused (one base GEMM, one LoRA-A matmul)",
    )
    g.add_argument(
        "--generation-attention",
        choices=["grouped", "repeat_kv"],
        default="grouped",
        help="grouped-query attention of generation (kava's: grouped, no K/V copies; "
        "repeat_kv: with copies, for an A/B of decoding)",
    )
    g.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H100, help="MFU denominator")
    g = p.add_argument_group("inference")
    g.add_argument("--infer-questions", type=int, help="questions (1319 = GSM8k test; quick 6)")
    g.add_argument("--infer-batches", help="comma-separated batch sizes (64,256; quick 4)")
    g.add_argument(
        "--cot-tokens", help="comma-separated CoT lengths generated exactly (40,120; quick 4,8)"
    )
    g.add_argument(
        "--latent-answer-tokens",
        type=int,
        default=3,
        help="answer tokens generated after the latents (eos disabled): passes = 1 + T + this",
    )
    g.add_argument(
        "--no-merge",
        dest="merge",
        action="store_false",
        help="keep LoRA unmerged (eval.merge_lora)",
    )
    g.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (eval.cuda_graphs)")
    g.add_argument(
        "--no-compile-generation",
        dest="compile_generation",
        action="store_false",
        help="generation layer passes uncompiled (eval.compile; compiled by default on cuda)",
    )
    g.add_argument(
        "--fused-generation",
        action="store_true",
        help="generation's q/k/v as one fused GEMM (eval.fused_qkv, off by default; cuda only)",
    )
    g.add_argument(
        "--small-batch-questions",
        type=int,
        default=64,
        help="batch sizes below 64 run on the first this many questions only",
    )
    g.add_argument("--eval-bucket", type=int, default=16, help="eval.bucket")
    g = p.add_argument_group("run")
    g.add_argument("--skip-train", action="store_true")
    g.add_argument("--skip-inference", action="store_true")
    g.add_argument("--skip-precheck", action="store_true")
    g.add_argument("--precheck-tol", type=float, default=2e-2, help="relative loss tolerance")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's own; quick on cpu: 1, which avoids "
        "OpenMP spin-wait slow-downs on a busy machine)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, help="write all numbers here as JSON")
    args = p.parse_args(argv)

    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.micro_batch is None:
        args.micro_batch = 2 if args.quick else (32 if args.device == "cuda" else 8)
    args.micro_batch = min(args.micro_batch, args.global_batch)
    if args.global_batch % args.micro_batch:
        p.error(
            f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}"
        )
    if args.threads is None and args.quick and args.device == "cpu":
        args.threads = 1
    if args.cot_len is None:
        args.cot_len = 120 if args.nl else 40
    if args.compile is None:
        args.compile = "layers" if args.device == "cuda" else "none"
    if args.device != "cuda":
        args.no_graphs = True  # CUDA graphs need CUDA
        args.compile_generation = False  # inductor's CPU code: not what is measured here
        args.fused_generation = False  # eval.fused_qkv takes effect on CUDA only
    args.infer_batches = [int(x) for x in str(args.infer_batches).split(",") if x]
    args.cot_tokens = [int(x) for x in str(args.cot_tokens).split(",") if x]
    args.amp = args.amp == "bf16" or (args.amp == "auto" and args.device == "cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.weights == "bf16" and not args.amp:
        p.error("--weights bf16 needs bf16 autocast (--amp bf16, or --amp auto on cuda)")
    if args.steps < 1 or args.phase_steps < 1:
        p.error("--steps and --phase-steps must be >= 1")
    return args


def kava_config(args) -> KavaConfig:
    overrides = [
        "method=kava",
        "latent.num_latents=24",
        "latent.num_iterations=3",
        "latent.use_projection=true",
        "lora.enabled=true",
        "lora.r=128",
        "lora.alpha=32",
        "lora.dropout=0.1",
        f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}",
        f"model.dtype={'float32' if args.weights == 'fp32' else 'bfloat16'}",
        f"train.compile={args.compile}",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"train.bucket={args.bucket}",
        f"train.attention={args.attention}",
        f"train.fused_qkv={str(args.fused_qkv).lower()}",
        "train.mixed_precision=" + ("bf16" if args.amp else "'no'"),  # quoted: YAML's no = false
        *args.set,
    ]
    cfg = load_config(overrides=overrides)
    if not cfg.is_latent:
        raise SystemExit(f"method {cfg.method!r}: this benchmark times the latent methods only")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(cli)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args, cli)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, cli: list[str]) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.generation_attention == "repeat_kv":  # before anything is compiled
        layers.grouped_attention = layers.repeated_kv_attention
    cfg = kava_config(args)
    arch = ARCHS[args.arch]
    env = environment(device)
    log(
        f"kava bench: {args.arch} on {env.get('gpu') or 'CPU'} | torch {env['torch']} | "
        f"transformers {env['transformers']} | peft {env['peft']}"
    )
    results: dict[str, Any] = dict(
        command=" ".join(["python benchmarks/bench_kava.py", *cli]),
        argv=cli,
        environment=env,
    )

    def save() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str))

    t0 = time.perf_counter()
    tok = build_tokenizer(arch)
    lm = build_lm(arch, device, args.seed)
    backbone = Backbone.from_model(lm, tok, cfg.lora, cfg.latent.use_projection).to(device)
    model = KavaModel(backbone, cfg)
    counts = param_counts(backbone)
    log(
        f"built in {time.perf_counter() - t0:.1f} s: {counts['base_total'] / 1e6:.1f}M base params "
        f"({counts['non_embedding'] / 1e6:.1f}M non-embedding), {counts['trainable'] / 1e6:.1f}M trainable"
    )
    lengths = Lengths(args.question_len, args.cot_len, args.jitter)
    synth = Synth(backbone, lengths, args.seed, args.bucket)
    precision = (
        f"{'bf16 autocast' if args.amp else 'no autocast (fp32)'}, frozen base weights "
        f"{args.weights}, trainable (LoRA, projection, new-token rows) fp32"
    )
    results.update(
        arch=dict(name=args.arch, hf_shape_of=arch["hf"], **arch, params=counts),
        settings=dict(
            method=cfg.method,
            M=cfg.latent.num_latents,
            T=cfg.effective_iterations,
            lora=dataclasses.asdict(cfg.lora),
            use_projection=cfg.latent.use_projection,
            alpha1=cfg.alpha1,
            alpha2=cfg.effective_alpha2,
            kv_loss=dataclasses.asdict(cfg.kv_loss),
            rkv=dataclasses.asdict(cfg.rkv),
            precision=precision,
            weights=args.weights,
            autocast_bf16=args.amp,
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            accumulation=args.global_batch // args.micro_batch,
            optimizer=f"AdamW lr {cfg.train.lr} wd {cfg.train.weight_decay}"
            + (" fused" if device.type == "cuda" else "")
            + f", grad clip {cfg.train.grad_clip}",
            train_step="as kava.train: per micro-batch KavaModel(batch) under bf16 autocast, "
            "(loss / accumulation).backward(); then clip, optimizer step, zero_grad "
            "(torch.autocast directly instead of accelerate's wrapper; no LR scheduler)",
            question_len=args.question_len,
            cot_len=args.cot_len,
            answer_span="prompt 4 + answer 2-4 + eos (teacher); + <eot> (student)",
            jitter=args.jitter,
            nl=args.nl,
            data="random token ids, collated by kava.batching.collate; batches built and "
            "moved to the device before timing",
            compile=args.compile,
            activation_checkpointing=args.activation_checkpointing,
            bucket=args.bucket,
            attention=args.attention,
            fused_qkv=args.fused_qkv,
            fused_generation=args.fused_generation,
            generation_attention=args.generation_attention,
            overrides=args.set,
        ),
    )
    log(f"precision: {precision}")
    if not args.skip_precheck:
        results["precheck"] = precheck(model, synth, device, args.precheck_tol)
        save()
    if args.weights == "bf16":
        cast_frozen_(backbone, torch.bfloat16)
    apply_speed_options(backbone, cfg, device)  # as kava.train: compile, checkpointing, casts
    if args.compile == "layers" and not args.skip_precheck:
        results["compile_check"] = compile_check(model, synth, device, args)
        save()
    dtypes: dict[str, int] = {}
    for p in backbone.parameters():
        key = f"{'trainable' if p.requires_grad else 'frozen'} {str(p.dtype).replace('torch.', '')}"
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    results["settings"]["param_dtypes"] = dtypes
    log(f"parameters by dtype: {dtypes}")
    if not args.skip_train:
        try:
            results["train"] = bench_train(model, synth, args, device, counts)
            # layers whose q/k/v ran fused (kava.qkv lays them out at their first pass):
            # --fused-qkv on a layout it does not handle would otherwise time unfused code
            results["train"]["fused_qkv_layers"] = sum(
                qkv.laid_out(layer.self_attn) is not None for layer in backbone.layers
            )
        except torch.OutOfMemoryError as e:  # keep going: the inference numbers still count
            results["train"] = dict(error=f"out of memory: {e}".splitlines()[0])
            log(f"train: {results['train']['error']} (try a smaller --micro-batch)")
            model.zero_grad(set_to_none=True)
        save()
    if not args.skip_inference:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log("inference:")
        results["inference"] = {}
        bench_inference(model, synth, args, device, results["inference"], save)
        save()
    results["wall_s"] = time.perf_counter() - t0
    save()
    log(table(results))
    return results


if __name__ == "__main__":
    main()
