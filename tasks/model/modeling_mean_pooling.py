"""A sequence-classification head on mean-pooled token states (sentence-transformers style).

Self-contained on purpose (imports only torch and transformers): `save_pretrained` copies this file into
every saved folder and writes `auto_map` into config.json, so

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

work in a fresh process without this project. Inside the project, `import tasks.model.heads` registers the
classes with AutoConfig / AutoModelForSequenceClassification, so no remote code is needed there.

The encoder is `AutoModel` of the wrapped architecture (its first-token pooler is dropped), the head is
dropout + linear on the attention-mask-weighted mean of the last hidden states - the pooling the
sentence-transformers checkpoint was trained with.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "mean_pooling_classifier"
# Facts copied from the encoder config to the top level (hidden size for the head; sizes for estimates/ONNX).
_COPIED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
    "initializer_range",
    "type_vocab_size",
)


class MeanPoolingConfig(PretrainedConfig):
    """Config of MeanPoolingForSequenceClassification: the encoder's config (as a dict) + head settings."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        encoder: dict | PretrainedConfig | None = None,
        classifier_dropout: float | None = None,
        pooling: str = "mean",
        **kwargs,
    ):
        if isinstance(encoder, PretrainedConfig):
            encoder = encoder.to_dict()
        self.encoder = dict(encoder or {})
        for k in ("id2label", "label2id", "num_labels", "problem_type", "auto_map", "architectures"):
            self.encoder.pop(k, None)  # the head's facts live at the top level only
        self.pooling = pooling
        enc = self.encoder
        if classifier_dropout is None:
            classifier_dropout = enc.get("classifier_dropout") or enc.get("hidden_dropout_prob") or 0.1
        self.classifier_dropout = float(classifier_dropout)
        for k in _COPIED:
            if k in enc and k not in kwargs:
                kwargs[k] = enc[k]
        if "pad_token_id" not in kwargs and enc.get("pad_token_id") is not None:
            kwargs["pad_token_id"] = enc["pad_token_id"]
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        d = dict(self.encoder)
        model_type = d.pop("model_type")
        return AutoConfig.for_model(model_type, **d)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of token states over the positions where mask == 1 (all positions when mask is None)."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """encoder (AutoModel, no pooler) -> masked mean of last hidden states -> dropout -> linear."""

    config_class = MeanPoolingConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: MeanPoolingConfig):
        super().__init__(config)
        enc_cfg = config.encoder_config()
        try:
            self.encoder = AutoModel.from_config(enc_cfg, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler option
            self.encoder = AutoModel.from_config(enc_cfg)
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.num_labels = config.num_labels
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(enc_cfg.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        enc_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        if token_type_ids is not None:
            enc_kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            enc_kwargs["position_ids"] = position_ids
        if output_attentions:
            enc_kwargs["output_attentions"] = True
        if output_hidden_states:
            enc_kwargs["output_hidden_states"] = True
        out = self.encoder(**enc_kwargs)
        pooled = masked_mean(out.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            pt = self.config.problem_type
            if pt == "regression" or self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.view(-1).float(), labels.view(-1).float())
            elif pt == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels).float(), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )


# save_pretrained copies this file next to the weights and writes auto_map into config.json
MeanPoolingConfig.register_for_auto_class()
MeanPoolingForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
