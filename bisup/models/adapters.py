"""One small adapter per model family: where the norms, projections and rotary embedding live.

Everything model-specific that the methods need goes through an adapter, so RTN/GPTQ/Atom/QuaRot
are written once for Llama (incl. SmolLM2), Qwen2, Qwen3 and Gemma3.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
from torch import nn

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class ModelAdapter:
    """Generic decoder-only layout (model.model.layers[i].self_attn.q_proj, ..., model.lm_head)."""

    family: str = "generic"
    norm_offset: float = 0.0  # Gemma-style RMSNorm multiplies by (1 + weight)

    def __init__(self, model: nn.Module):
        self.model = model
        cfg = self.text_config
        self.hidden_size: int = cfg.hidden_size
        self.intermediate_size: int = cfg.intermediate_size
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_layers: int = cfg.num_hidden_layers

    # ---------------------------------------------------------------- config and top level
    @property
    def text_config(self):
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> List[nn.Module]:
        return list(self.decoder.layers)

    def embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def rotary_emb(self) -> nn.Module:
        return self.decoder.rotary_emb

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_index: int = 0
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) that layer `layer_index` expects, for running it alone."""
        return self.rotary_emb()(hidden, position_ids)

    @property
    def embed_scale(self) -> float:
        return 1.0

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head().weight is self.embeddings().weight

    # ---------------------------------------------------------------- inside a layer
    def attn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.input_layernorm

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def extra_norms(self, layer: nn.Module) -> List[nn.Module]:
        return []

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def q_proj(self, layer):
        return self.get_linear(layer, "self_attn.q_proj")

    def k_proj(self, layer):
        return self.get_linear(layer, "self_attn.k_proj")

    def v_proj(self, layer):
        return self.get_linear(layer, "self_attn.v_proj")

    def o_proj(self, layer):
        return self.get_linear(layer, "self_attn.o_proj")

    def gate_proj(self, layer):
        return self.get_linear(layer, "mlp.gate_proj")

    def up_proj(self, layer):
        return self.get_linear(layer, "mlp.up_proj")

    def down_proj(self, layer):
        return self.get_linear(layer, "mlp.down_proj")

    def linear_names(self) -> List[str]:
        return list(LINEAR_NAMES)

    def get_linear(self, layer: nn.Module, name: str) -> nn.Module:
        parent, attr = self._parent(layer, name)
        return getattr(parent, attr)

    def set_linear(self, layer: nn.Module, name: str, module: nn.Module) -> None:
        parent, attr = self._parent(layer, name)
        setattr(parent, attr, module)

    def _parent(self, layer: nn.Module, name: str) -> Tuple[nn.Module, str]:
        if name not in self.linear_names():
            raise KeyError(f"unknown linear {name!r}; expected one of {self.linear_names()}")
        path, attr = name.rsplit(".", 1)
        return layer.get_submodule(path), attr

    def named_linears(self) -> List[Tuple[str, nn.Module]]:
        """('model.layers.{i}.{name}', module) for every decoder linear, in execution order."""
        out = []
        for i, layer in enumerate(self.layers()):
            for name in self.linear_names():
                out.append((f"model.layers.{i}.{name}", self.get_linear(layer, name)))
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"heads={self.num_heads}/{self.num_kv_heads}x{self.head_dim}, layers={self.num_layers})"
        )


class LlamaAdapter(ModelAdapter):
    family = "llama"


class Qwen2Adapter(ModelAdapter):
    family = "qwen2"


class Qwen3Adapter(ModelAdapter):
    family = "qwen3"

    def extra_norms(self, layer):
        return [layer.self_attn.q_norm, layer.self_attn.k_norm]


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    norm_offset = 1.0

    def mlp_norm(self, layer):
        return layer.pre_feedforward_layernorm

    def extra_norms(self, layer):
        return [
            layer.self_attn.q_norm,
            layer.self_attn.k_norm,
            layer.post_attention_layernorm,
            layer.post_feedforward_layernorm,
        ]

    def position_embeddings(self, hidden, position_ids, layer_index=0):
        layer_type = self.text_config.layer_types[layer_index]
        return self.rotary_emb()(hidden, position_ids, layer_type)

    @property
    def embed_scale(self) -> float:
        emb = self.embeddings()
        return float(getattr(emb, "scalar_embed_scale", self.hidden_size**0.5))


# model_type -> adapter class
ADAPTERS: Dict[str, Type[ModelAdapter]] = {
    "llama": LlamaAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
    "gemma3_text": Gemma3Adapter,
    "gemma3": Gemma3Adapter,
}
SUPPORTED = ("Llama (incl. SmolLM2)", "Qwen2", "Qwen3", "Gemma3")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for a transformers causal LM; ValueError naming the supported families otherwise."""
    config = getattr(model, "config", None)
    model_type: Optional[str] = getattr(config, "model_type", None)
    cls = ADAPTERS.get(model_type)
    if cls is None or not hasattr(model, "lm_head"):
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); "
            f"bisup supports causal LMs of these families: {', '.join(SUPPORTED)}"
        )
    if model_type == "gemma3" and not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(
            "Gemma3 multimodal models are not supported; load the text model (Gemma3ForCausalLM). "
            f"Supported families: {', '.join(SUPPORTED)}"
        )
    return cls(model)
