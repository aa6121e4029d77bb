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
from torch import Tensor

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


@dataclasses.dataclass
class MLMOutput:
    """What the last stage hands to the loss function."""

    lm_losses: Tensor  # [m] cross-entropy of each predicted position
    binary_loss: Optional[Tensor] = None  # [b] sentence-order loss, with --bert-binary-head
    num_sequences: int = 0


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
    ):
        super().__init__(config=config)
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
                num_tokentypes=2 if add_binary_head else 0,
            )
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
    ):
        # True where attention is blocked; [b, 1, 1, s] broadcasts over heads and queries.
        attention_mask = (padding_mask == 0)[:, None, None, :]
        if self.pre_process:
            hidden = self.embedding(input_ids, position_ids, tokentype_ids=tokentype_ids)  # [s, b, h]
        else:
            hidden = self.encoder.input_tensor  # from the previous pipeline stage
        rotary = None
        if self.position_embedding_type == "rope":
            rotary = self.rotary_pos_emb(input_ids.shape[1])

        rng = tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext()
        with rng:
            for layer in self.encoder.layers:
                hidden, _ = layer(hidden_states=hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)
        if not self.post_process:
            return make_viewless_tensor(hidden, requires_grad=True, keep_graph=True)
        if self.encoder.final_layernorm is not None:
            hidden = self.encoder.final_layernorm(hidden)
        if self.config.sequence_parallel:
            # [s/tp, b, h] -> [s, b, h]; backward splits (the head's input grad is already full).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        return self.mlm_head(hidden, loss_mask, labels, is_random)

    def mlm_head(self, hidden: Tensor, loss_mask: Tensor, labels: Tensor, is_random=None) -> MLMOutput:
        """LM head and loss on the predicted positions only."""
        seq_len = hidden.shape[0]
        flat_idx = loss_mask.reshape(-1).nonzero().squeeze(1)  # [m], row-major over [b, s]
        rows, pos = flat_idx // seq_len, flat_idx % seq_len
        predicted = hidden[pos, rows]  # [m, h]
        predicted = self.lm_head(predicted).unsqueeze(1)  # [m, 1, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(predicted, weight=weight)  # [m, 1, V/tp]
        target = labels.reshape(-1)[flat_idx].unsqueeze(1)  # [m, 1]
        lm_losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target).squeeze(1)
        out = MLMOutput(lm_losses=lm_losses, num_sequences=hidden.shape[1])
        if self.add_binary_head and is_random is not None:
            pooled = self.pooler(hidden, 0)  # [b, h]
            binary_logits = self.binary_head(pooled).float()
            out.binary_loss = torch.nn.functional.cross_entropy(binary_logits, is_random.long(), reduction="none")
        return out
