"""The masked-LM model: megatron-core embedding, transformer layers and BERT LM head.

Unlike megatron-core's `BertModel`, the LM head and the loss run on the predicted
positions only (gathered first), and the layers are run one by one so that a token plan
(which positions are live at each layer) can be executed between them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.models.bert.pooler import Pooler
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import get_linear_layer
from megatron.core.utils import make_viewless_tensor

from megatron_effmlm.model.engine import PlanRunner, gather_ids
from megatron_effmlm.model.plan import LiveSet, MLMOutput, TokenPlan
from megatron_effmlm.model.flops import cross_attention_flops, head_flops, layer_flops


HEAD_LOSS_SCOPE = "effmlm/head_loss"


class MLMModel(LanguageModule):
    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        position_embedding_type: str = "learned_absolute",
        rotary_percent: float = 1.0,
        add_binary_head: bool = False,
        share_embeddings_and_output_weights: bool = True,
        vp_stage: Optional[int] = None,
        decoder_layers: int = 0,
        decoder_layer_spec=None,
        post_layernorm: bool = False,
        num_tokentypes: int = 0,
        lm_head_chunk_size: int = 0,
        packed_attention: bool = False,
    ):
        super().__init__(config=config)
        # the layers' core attention takes packed live tokens (--attention-backend varlen)
        self.packed_attention = packed_attention
        # > 0: the LM head and loss run on chunks of this many predicted rows, each recomputed in
        # backward, so the [m, V/tp] fp32 logits never exist in full (chunked_head_losses).
        self.lm_head_chunk_size = lm_head_chunk_size
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = vocab_size
        self.position_embedding_type = position_embedding_type
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.add_binary_head = add_binary_head
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type=position_embedding_type,
                num_tokentypes=num_tokentypes or (2 if add_binary_head else 0),
            )
            if post_layernorm:  # BERT/RoBERTa: LayerNorm on the embedding sum, before its dropout
                from megatron_effmlm.model.post_ln import NormThenDropout
                from megatron_effmlm.model.specs import TorchLayerNorm

                norm = TorchLayerNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
                self.embedding.embedding_dropout = NormThenDropout(norm, self.embedding.embedding_dropout)
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=rotary_percent,
                use_cpu_initialization=config.use_cpu_initialization,
            )
        self.encoder = TransformerBlock(
            config=config,
            spec=transformer_layer_spec,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        # 3ML: decoder layers after the encoder and the learned [MASK] vector injected before
        # them (separate from the word embedding). Fine-tuning and export drop both.
        self.decoder = None
        if decoder_layers and post_process:
            # All decoder layers sit on the last pipeline stage (after its encoder layers):
            # built as a one-stage block so their numbering does not depend on the layout.
            dec_config = dataclasses.replace(config, num_layers=decoder_layers, pipeline_model_parallel_size=1,
                                             pipeline_model_parallel_layout=None)
            self.decoder = TransformerBlock(config=dec_config, spec=decoder_layer_spec, pre_process=True, post_process=True)
        cross = getattr(self.decoder.layers[0], "cross_attention", None) if self.decoder is not None else None
        self._te_cross_attention = type(getattr(cross, "core_attention", None)).__name__.startswith("TE")
        if decoder_layers and (pre_process or post_process):
            # e_mask lives beside the position embedding that builds the injected vectors.
            self.mask_embedding = torch.nn.Parameter(torch.empty(config.hidden_size, dtype=config.params_dtype))
            config.init_method(self.mask_embedding.data.view(1, -1))
        if decoder_layers and post_process and not pre_process:
            # 3ML's injection stage (the decoder's) builds e_mask + P[pos] itself, so the encoder
            # stages send only the T - m unmasked tokens. Its position table and e_mask are
            # copies of the first stage's, tied as megatron-core ties the output layer to the
            # word embedding: same start (tie_injection_params), gradients summed over the
            # embedding group (allreduce_tied_injection_grads), saved once (sharded_state_dict).
            self.injection_position_embeddings = torch.nn.Embedding(
                max_sequence_length, config.hidden_size, dtype=config.params_dtype)
            for p in (self.injection_position_embeddings.weight, self.mask_embedding):
                p.tied_to_first_stage = True
                p.shared = True  # megatron-core's grad norm counts a tied tensor once (param_is_not_shared)
        if post_process:
            # The head sees full (gathered) sequences of predicted tokens, never a
            # sequence-parallel shard: build it with sequence_parallel off.
            head_config = dataclasses.replace(config, sequence_parallel=False)
            self.lm_head = BertLMHead(config.hidden_size, head_config)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=head_config,
                init_method=config.init_method,
                bias=True,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
            )
            if add_binary_head:
                self.pooler = Pooler(config.hidden_size, config.init_method, head_config, False)
                self.binary_head = get_linear_layer(
                    config.hidden_size, 2, config.init_method, config.perform_initialization
                )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()
        # Forward FLOPs of the layers and head this stage ran, by the FLOP model; the trainer
        # reads and resets it every step (model TFLOP/s, --train-flops-budget).
        self.forward_flops = 0.0
        # Live-token counts are padded to a multiple of this: FP8 GEMMs need 16 (MXFP8 32).
        self.live_token_multiple = 1
        if config.fp8:
            from megatron.core.fp8_utils import get_fp8_align_size

            self.live_token_multiple = get_fp8_align_size(config.fp8_recipe)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron-core's, with the injection stage's tied copies saved as replicas of the first
        stage's position table and e_mask (so any layout loads them)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if hasattr(self, "injection_position_embeddings"):
            from megatron.core.utils import make_sharded_tensor_for_checkpoint

            dp = ps.get_data_parallel_rank(with_context_parallel=True)
            for key, first_key, tensor in (
                ("injection_position_embeddings.weight", "embedding.position_embeddings.weight",
                 self.injection_position_embeddings.weight),
                ("mask_embedding", "mask_embedding", self.mask_embedding),
            ):
                sd[prefix + key] = make_sharded_tensor_for_checkpoint(
                    tensor, prefix + first_key, replica_id=(1, ps.get_tensor_model_parallel_rank(), dp))
        return sd

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1
            input_tensor = input_tensor[0]
        self.encoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: Tensor,  # [b, s]
        position_ids: Tensor,  # [b, s]
        padding_mask: Tensor,  # [b, s], 1 on real tokens
        loss_mask: Optional[Tensor] = None,  # [b, s], 1 on predicted positions
        labels: Optional[Tensor] = None,  # [b, s]
        tokentype_ids: Optional[Tensor] = None,
        is_random: Optional[Tensor] = None,  # [b], sentence-order labels
        plan: Optional[TokenPlan] = None,  # None: every position live at every layer
        consistency_plan: Optional[TokenPlan] = None,  # a second pass on the same batch (ScTD)
        return_logits: bool = False,  # also the head's logits and input rows (export checks them)
    ):
        args = (input_ids, position_ids, padding_mask, loss_mask, labels, tokentype_ids, is_random)
        if plan is None:
            plan = TokenPlan(seq_len=input_ids.shape[1], input_live=LiveSet.all_positions(padding_mask))
        plans = [plan] + ([consistency_plan] if consistency_plan is not None else [])
        runners = [self._runner(p, padding_mask) for p in plans]
        carries = [None] * len(plans)
        if not self.pre_process:  # split what the previous stage sent between the passes
            sizes = [r.carry_rows(self._first_layer_index()) for r in runners]
            carries = list(torch.split(self.encoder.input_tensor, sizes, 0))
        outs = [self._run(r, c, *args, return_logits=return_logits) for r, c in zip(runners, carries)]
        if not self.post_process:
            carry = torch.cat(outs, 0)
            return make_viewless_tensor(carry, requires_grad=True, keep_graph=True)
        out = outs[0]
        if consistency_plan is not None:
            out.consistency = outs[1]
        return out

    def _runner(self, plan, padding_mask) -> PlanRunner:
        rotary = None
        if self.position_embedding_type == "rope":
            rotary = self.rotary_pos_emb(plan.seq_len)  # [T, 1, 1, d]
            rotary = torch.cat([rotary, rotary[:1]], 0)  # + the bin row
        c = self.config
        return PlanRunner(plan, padding_mask, rotary=rotary, sp=c.tensor_model_parallel_size if c.sequence_parallel else 1,
                          align=self.live_token_multiple, packed=self.packed_attention)

    def _first_layer_index(self) -> int:
        return self.encoder.layers[0].layer_number - 1

    def _run(self, runner, carry, input_ids, position_ids, padding_mask, loss_mask, labels, tokentype_ids, is_random,
             return_logits=False):
        b, T = input_ids.shape
        live = runner.plan.input_live
        if self.pre_process:
            if tokentype_ids is None and self.embedding.tokentype_embeddings is not None:
                tokentype_ids = torch.zeros_like(input_ids)  # single segment (an imported HF model's type 0)
            types = gather_ids(tokentype_ids, live) if tokentype_ids is not None else None
            hidden = self.embedding(gather_ids(input_ids, live), gather_ids(position_ids, live), tokentype_ids=types)
        else:  # [rows, b, h] from the previous pipeline stage
            hidden = runner.import_carry(carry, self._first_layer_index())
        if self.decoder is not None:  # 3ML, on the injection stage: e_mask + P[pos] at every position
            table = self.embedding.position_embeddings if self.pre_process else self.injection_position_embeddings
            inj = (table(position_ids) + self.mask_embedding).transpose(0, 1)  # [T, b, h]
            runner.injected = torch.cat([inj, inj.new_zeros(1, b, inj.shape[-1])], 0)  # + the bin row

        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext()
        with rng, self._fp8_context(whole_stage=True):
            hidden = self._run_block(self.encoder.layers, self._first_layer_index(), hidden, runner)
            if not self.post_process:
                return runner.export_carry(hidden, self.encoder.layers[-1].layer_number)
            if self.decoder is not None:
                if self.encoder.final_layernorm is not None:  # none in post-LN models
                    hidden = self.encoder.final_layernorm(hidden)  # the encoder's output, as exported
                hidden = self._run_block(self.decoder.layers, self.config.num_layers, hidden, runner, decoder=True)
        block = self.decoder if self.decoder is not None else self.encoder
        if block.final_layernorm is not None:
            hidden = block.final_layernorm(hidden)
        if self.config.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; backward splits (the head's input grad is already full).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        with torch.profiler.record_function(HEAD_LOSS_SCOPE):  # names the head in profiles (bench/profile_step.py)
            out = self.mlm_head(hidden, runner, loss_mask, labels, is_random, return_logits)
        out.captured = runner.captured
        self.forward_flops += head_flops(out.lm_losses.numel(), self.config.hidden_size, self.vocab_size)
        return out

    def _count_layer_flops(self, hidden, context):
        c = self.config
        sp = c.tensor_model_parallel_size if c.sequence_parallel else 1  # h holds n / tp tokens
        n, b = hidden.shape[0] * sp, hidden.shape[1]
        self.forward_flops += b * layer_flops(n, c.hidden_size, c.ffn_hidden_size)
        if context is not None:
            self.forward_flops += b * cross_attention_flops(n, context.shape[0] * sp, c.hidden_size)

    def _layer_forward(self, layer, hidden, mask, rotary, context, context_mask):
        """One unchanged TransformerLayer; with --recompute-granularity full its activations are
        recomputed in backward by megatron-core's checkpoint (which replays the RNG states,
        tracker included, so dropout masks match). Selective recompute (core attention) is
        megatron-core's own, inside the attention module."""

        def run(h, ctx):
            cross = dict(context=ctx, context_mask=context_mask) if ctx is not None else {}
            return layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rotary, **cross)[0]

        with self._fp8_context(layer_number=layer.layer_number):
            if self.config.recompute_granularity == "full" and self.training:
                return tensor_parallel.checkpoint(run, False, hidden, context)
            return run(hidden, context)

    def _fp8_context(self, whole_stage: bool = False, layer_number: int = 0):
        """Transformer Engine's FP8 autocast, as megatron-core's TransformerBlock enters it: once
        around the stage for the delayed-scaling recipe (one amax reduction), else per layer."""
        c = self.config
        if not c.fp8 or whole_stage != (c.fp8_recipe == "delayed"):
            return contextlib.nullcontext()
        from megatron.core.fp8_utils import get_fp8_context

        return get_fp8_context(c) if whole_stage else get_fp8_context(c, layer_number - 1)

    def _run_block(self, layers, first_index, hidden, runner, decoder=False):
        for i, layer in enumerate(layers):
            idx = first_index + i  # global layer index: encoder 0..L-1, then the decoder
            hidden = runner.before_layer(idx, hidden)
            context = runner.context if decoder else None
            context_mask = runner.cross_attention_mask() if context is not None else None
            if context is not None and self._te_cross_attention:
                # TE's padding mask for attention between different lengths: (queries, keys)
                context_mask = (runner.attention_mask(), context_mask)
            hidden = self._layer_forward(layer, hidden, runner.attention_mask(), runner.rotary(),
                                         context, context_mask)
            self._count_layer_flops(hidden, context)
            runner.after_layer(idx, hidden)
        return hidden

    def mlm_head(self, hidden: Tensor, runner: PlanRunner, loss_mask: Tensor, labels: Tensor, is_random=None,
                 return_logits: bool = False) -> MLMOutput:
        """LM head and loss on the predicted positions only."""
        flat_idx = loss_mask.reshape(-1).nonzero().squeeze(1)  # [m], row-major over [b, s]
        states = runner.predicted_states(hidden, flat_idx)  # [m, h]
        predicted = self.lm_head(states).unsqueeze(1)  # [m, 1, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        target = labels.reshape(-1)[flat_idx]  # [m]
        lm_losses = chunked_head_losses(self.output_layer, predicted, weight, target, self.lm_head_chunk_size)
        out = MLMOutput(lm_losses=lm_losses, labels=target)
        if return_logits:
            out.logits = self.output_layer(predicted, weight=weight)[0].squeeze(1)  # [m, V / tp]
            out.hidden = states
        if self.add_binary_head and is_random is not None:
            pooled = self.pooler(runner_full_first_token(hidden, runner), 0)  # [b, h]
            binary_logits = self.binary_head(pooled).float()
            out.binary_loss = torch.nn.functional.cross_entropy(binary_logits, is_random.long(), reduction="none")
        return out


# 3ML's tied injection tensors under pipeline parallelism (MLMModel.__init__ says why)

def _injection_pairs(chunks):
    """3ML's tied tensors on this rank, in the order both ends of the embedding group use:
    the first stage's (position table, e_mask), or the injection stage's copies."""
    first = [c for c in chunks if c.pre_process and hasattr(c, "mask_embedding")]
    last = [c for c in chunks if hasattr(c, "injection_position_embeddings")]
    if first:
        return [first[0].embedding.position_embeddings.weight, first[0].mask_embedding]
    if last:
        return [last[0].injection_position_embeddings.weight, last[0].mask_embedding]
    return []


def _in_injection_tie(chunks) -> bool:
    return ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group(ignore_virtual=True) \
        and bool(_injection_pairs(chunks))


def tie_injection_params(chunks):
    """The injection stage's copies start as the first stage's values (as megatron-core starts
    the output layer: zero the copy, all-reduce over the embedding group)."""
    if not _in_injection_tie(chunks):
        return
    is_copy = hasattr(chunks[-1], "injection_position_embeddings")
    with torch.no_grad():
        for t in _injection_pairs(chunks):
            if is_copy:
                t.zero_()
            dist.all_reduce(t.data, group=ps.get_embedding_group())


def allreduce_tied_injection_grads(model) -> None:
    """Sum the gradients of the first stage's position table / e_mask and the injection stage's
    copies (after megatron-core's finalize_model_grads), so both take the same update."""
    chunks = [getattr(m, "module", m) for m in model]  # inside megatron-core's DDP
    if not _in_injection_tie(chunks):
        return
    for t in _injection_pairs(chunks):
        grad = t.main_grad if getattr(t, "main_grad", None) is not None else t.grad
        dist.all_reduce(grad, group=ps.get_embedding_group())


def head_losses(output_layer, predicted: Tensor, weight: Optional[Tensor], target: Tensor) -> Tensor:
    """[m] cross-entropy of [m, 1, h] predicted rows: the output layer, then megatron-core's
    vocab-parallel cross-entropy in fp32 (max and sum-exp all-reduced over the TP group)."""
    logits, _ = output_layer(predicted, weight=weight)  # [m, 1, V/tp]
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target.unsqueeze(1)).squeeze(1)


def chunked_head_losses(output_layer, predicted: Tensor, weight: Optional[Tensor], target: Tensor,
                        chunk: int) -> Tensor:
    """head_losses over chunks of `chunk` rows (0: all rows at once). Under autograd each chunk
    is a non-reentrant checkpoint: its logits and softmax are freed after its loss and
    recomputed in backward, so at most one chunk's [chunk, V/tp] logits exist at a time instead
    of all m rows' (the price: the head's forward GEMM runs twice). Every TP rank runs the same
    chunks in the same order, so the recompute's all-reduces pair up."""
    if chunk <= 0 or (chunk >= predicted.shape[0] and not torch.is_grad_enabled()):
        return head_losses(output_layer, predicted, weight, target)
    losses = []
    # split, not slicing: its backward concatenates the chunks' input gradients once
    for x, t in zip(torch.split(predicted, chunk), torch.split(target, chunk)):
        if torch.is_grad_enabled():
            losses.append(torch.utils.checkpoint.checkpoint(
                head_losses, output_layer, x, weight, t, use_reentrant=False, preserve_rng_state=False))
        else:
            losses.append(head_losses(output_layer, x, weight, t))
    return torch.cat(losses)


def runner_full_first_token(hidden: Tensor, runner: PlanRunner) -> Tensor:
    """[1, b, h]: the first position's final state, as the pooler expects a sequence."""
    return runner.state_at(hidden, 0).unsqueeze(0)
