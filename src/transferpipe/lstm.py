"""An LSTM text model in transformers' clothes: a next-token language model and a sequence classifier.

ULMFiT (Howard & Ruder, 2018) is the reference: an embedding, a stack of single-layer LSTMs and an output
projection tied to the embedding, pretrained as a language model, then fine-tuned as a classifier on
concat pooling (last state, masked max, masked mean) with discriminative learning rates and gradual
unfreezing. AWD-LSTM's regularization (Merity et al., 2017) is in the config, each 0 (off) by default:
embedding dropout (whole words), variational dropout (one mask per sequence, the same at every time step) on
the embedding output, between layers and before the output head, and DropConnect on the recurrent weights.
The layers are a ModuleList of single-layer LSTMs, so modeling.freeze, layer_groups, param_groups and
gradual_unfreezing see one block per layer, as they do for transformer encoders.

Both models are PreTrainedModels registered with the Auto classes (model_type `transferpipe_lstm`), so
save_pretrained / from_pretrained, AutoModelForSequenceClassification and transformers.pipeline work on them
once this module is imported. The MLflow model finetune logs (transferpipe.serving.TextClassifier) carries
this package as its code and imports it before loading the weights, so it needs no `trust_remote_code`.
A saved folder also carries a copy of this file and an `auto_map` in its config.json (transformers'
custom-code convention), so plain transformers without transferpipe installed loads it with
`trust_remote_code=True`. That is why this file imports nothing from transferpipe: it must work on its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, SequenceClassifierOutput


class LSTMConfig(PretrainedConfig):
    """Sizes of the LSTM model; the embedding is hidden_size wide so the output projection can be tied to it."""

    model_type = "transferpipe_lstm"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_hidden_layers: int = 3,
        classifier_dropout: float = 0.1,
        embed_dropout: float = 0.0,
        input_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        output_dropout: float = 0.0,
        initializer_range: float = 0.02,
        pad_token_id: int | None = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.classifier_dropout = classifier_dropout
        self.embed_dropout = embed_dropout  # whole rows of the embedding (every occurrence of a word), input only
        self.input_dropout = input_dropout  # variational, on the embedding output
        self.hidden_dropout = hidden_dropout  # variational, between LSTM layers
        self.weight_dropout = weight_dropout  # DropConnect on each layer's hidden-to-hidden weights
        self.output_dropout = output_dropout  # variational, on the last layer's output (both heads)
        self.initializer_range = initializer_range
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)


def shared_mask_dropout(x: torch.Tensor, p: float, mask_shape: tuple[int, ...], training: bool) -> torch.Tensor:
    """Dropout whose mask has `mask_shape` and broadcasts over x: every element along a size-1 axis of the mask
    is kept or dropped together. The survivors are scaled by 1 / (1 - p)."""
    if not training or p == 0:
        return x
    keep = x.new_empty(mask_shape).bernoulli_(1 - p)
    return x * keep / (1 - p)


def variational_dropout(hidden: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared by every time step (Gal & Ghahramani, 2016): (batch, seq, h)."""
    return shared_mask_dropout(hidden, p, (hidden.shape[0], 1, hidden.shape[2]), training)


# Rows of hidden states per chunk of the fused LM loss: a (256, vocab) block of logits stays in the CPU's cache
# while its softmax and gradient are computed (256-1024 were within noise at vocab 4,096; the whole batch at once
# was 10-20% slower).
LOSS_CHUNK = 256


class _LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of hidden @ weight.T + bias against targets (-100: no target), and its gradients,
    computed together chunk by chunk in the forward pass: the (tokens, vocab) logits never exist whole, and
    their softmax is read while still in cache. The backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor):
        valid = targets != -100  # (tokens,)
        count = valid.sum()
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # sums in fp32 at least
        loss = hidden.new_zeros((), dtype=accumulate)
        grad_hidden = torch.empty_like(hidden)  # (tokens, hidden)
        grad_weight = torch.zeros_like(weight, dtype=accumulate)  # (vocab, hidden)
        grad_bias = torch.zeros_like(bias, dtype=accumulate)  # (vocab,)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            h, target = hidden[start : start + LOSS_CHUNK], targets[start : start + LOSS_CHUNK]
            keep, index = valid[start : start + LOSS_CHUNK], target.clamp(min=0)
            logits = torch.addmm(bias, h, weight.t())  # (chunk, vocab); under autocast in its dtype
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the softmax in fp32 at least
            logsumexp = logits.logsumexp(-1)
            loss += ((logsumexp - logits.gather(1, index[:, None]).squeeze(1)) * keep).sum()
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count, zero on rows without a target.
            grad = logits.sub_(logsumexp[:, None]).exp_()
            grad[torch.arange(len(index), device=grad.device), index] -= 1
            grad.mul_((keep.to(grad.dtype) / count)[:, None])
            grad_hidden[start : start + LOSS_CHUNK] = grad @ weight
            grad_weight += grad.t() @ h
            grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=-100), the same mean over the same
    targets, without the (tokens, vocab) logits when it is differentiated: 2-D hidden (tokens, hidden_size),
    1-D targets. The profile's LM step (32 x 128 tokens, vocab 4,096, 256 x 3, fp32) takes 565 ms this way against
    637 with whole-batch logits (docs/LOG.md, 2026-12-04: a fused LM loss)."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or bias.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets)
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=-100)


class LSTMPreTrainedModel(PreTrainedModel):
    config_class = LSTMConfig
    base_model_prefix = "lstm"
    main_input_name = "input_ids"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # LSTMs: Xavier-uniform weights, zero biases
        if isinstance(module, nn.Embedding):
            # PyTorch's N(0, 1), not transformers' N(0, 0.02): behind Xavier-initialized gates an input of std
            # 0.02 is all but invisible, and the LM sat at unigram statistics for its first hundreds of steps
            # (a 3-layer 32-wide LM on a repeated sentence: loss 2.9 after 60 steps at std 0.02, 0.07 at std 1).
            init.normal_(module.weight, mean=0.0, std=1.0)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LSTM):
            # Forget-gate bias 1 (Jozefowicz et al., 2015): cells remember by default early in training.
            # PyTorch orders the gates input, forget, cell, output. Slicing loses the loaded-weight flag,
            # so it is checked here (as transformers does for the embedding's padding row).
            for name, param in module.named_parameters():
                if name.startswith("bias_ih") and not getattr(param, "_is_hf_initialized", False):
                    hidden = param.shape[0] // 4
                    with torch.no_grad():
                        param[hidden : 2 * hidden].fill_(1.0)


class LSTMModel(LSTMPreTrainedModel):
    """Embedding and stacked LSTMs; `layers` and `embeddings` are where modeling.py looks for them."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(
            nn.LSTM(config.hidden_size, config.hidden_size, batch_first=True) for _ in range(config.num_hidden_layers)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.Tensor, **kwargs) -> BaseModelOutput:
        """Right padding (the tokenizers' default) needs no mask here: a left-to-right LSTM's state at a real
        token never depends on the padding after it. The heads use attention_mask to skip the padding.
        The last layer's output comes back without dropout: each head applies output_dropout itself."""
        config, weight = self.config, self.embeddings.weight
        weight = shared_mask_dropout(weight, config.embed_dropout, (weight.shape[0], 1), self.training)  # whole rows
        hidden = F.embedding(input_ids, weight, self.embeddings.padding_idx)  # (batch, seq_len, hidden)
        hidden = variational_dropout(hidden, config.input_dropout, self.training)
        for i, layer in enumerate(self.layers):
            if i:
                hidden = variational_dropout(hidden, config.hidden_dropout, self.training)
            if self.training and config.weight_dropout:
                # DropConnect: this forward runs on a dropped copy of the recurrent weights; the gradient
                # reaches the parameter itself, and state_dict keys stay those of a plain nn.LSTM.
                recurrent = F.dropout(layer.weight_hh_l0, config.weight_dropout, training=True)
                hidden, _ = functional_call(layer, {"weight_hh_l0": recurrent}, (hidden,))
            else:
                hidden, _ = layer(hidden)
        return BaseModelOutput(last_hidden_state=hidden)


class LSTMForCausalLM(LSTMPreTrainedModel):
    """Next-token language model: logits at position t predict token t+1; `labels` are the input ids
    (the shift happens here, as in transformers' causal LMs), -100 where no loss is wanted."""

    _tied_weights_keys = {"lm_head.weight": "lstm.embeddings.weight"}

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.lstm = LSTMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lstm.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.lstm.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutput:
        """skip_logits (with labels): the loss alone, through linear_cross_entropy, which never builds the
        (batch, seq_len, vocab) logits; pretraining asks for it."""
        hidden = self.lstm(input_ids).last_hidden_state
        hidden = variational_dropout(hidden, self.config.output_dropout, self.training)  # (batch, seq_len, hidden)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        # Position t predicts token t+1 and the last position nothing. Shifting the labels, not slicing the
        # logits, spares the backward a zero-filled copy of the whole (batch, seq_len, vocab) gradient.
        targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
        if skip_logits:
            head = self.lm_head
            return CausalLMOutput(
                loss=linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets)
            )
        logits = self.lm_head(hidden)  # (batch, seq_len, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


class LSTMForSequenceClassification(LSTMPreTrainedModel):
    """ULMFiT's classifier: concat pooling of the last real token's state, the masked max and the masked mean
    over time, then dropout and a linear layer. Inputs must be right-padded (checked)."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.lstm = LSTMModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(3 * config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lstm.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.lstm.embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.lstm(input_ids).last_hidden_state  # (batch, seq_len, hidden)
        hidden = variational_dropout(hidden, self.config.output_dropout, self.training)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("LSTMForSequenceClassification needs right padding (tokenizer.padding_side='right')")
        lengths = mask.sum(1).clamp(min=1)  # (batch,)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (batch, hidden)
        keep = mask.unsqueeze(-1)  # (batch, seq_len, 1)
        maximum = hidden.masked_fill(~keep, torch.finfo(hidden.dtype).min).amax(1)
        mean = (hidden * keep).sum(1) / lengths.unsqueeze(-1).to(hidden.dtype)
        logits = self.classifier(self.dropout(torch.cat([last, maximum, mean], dim=-1)))  # (batch, num_labels)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# save_pretrained writes an auto_map into config.json and copies this file beside the weights.
LSTMConfig.register_for_auto_class()
LSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
LSTMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

# Only the package module registers itself: transformers also executes the copy saved beside a model
# (trust_remote_code), and registering that copy's classes under the same model_type would clash.
if __name__ == "transferpipe.lstm":
    AutoConfig.register(LSTMConfig.model_type, LSTMConfig)
    AutoModelForCausalLM.register(LSTMConfig, LSTMForCausalLM)
    AutoModelForSequenceClassification.register(LSTMConfig, LSTMForSequenceClassification)
