"""Tiny random-init causal LMs of every supported family, for fast tests (no downloads).

Widths are deliberately not powers of two (48, 80, 96, 160, 192) so that rotations and group
quantization are exercised on awkward sizes; every width is a multiple of 16 (the test group size).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
TINY_VOCAB = 128
TINY_GROUP = 16  # divides every width below


def tiny_config(family: str, num_layers: int = 2):
    """A small config of `family` (llama / qwen2 / qwen3 / gemma3)."""
    common = dict(vocab_size=TINY_VOCAB, num_hidden_layers=num_layers, max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "llama":
        # head_dim 32, GQA 3:1, hidden 96, intermediate 160, tied embeddings like SmolLM2
        return LlamaConfig(hidden_size=96, intermediate_size=160, num_attention_heads=3, num_key_value_heads=1,
                           tie_word_embeddings=True, **common)
    if family == "qwen2":
        # q/k/v biases, untied head
        return Qwen2Config(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **common)
    if family == "qwen3":
        # explicit head_dim, q/k norms
        return Qwen3Config(hidden_size=80, intermediate_size=96, num_attention_heads=5, num_key_value_heads=1,
                           head_dim=16, tie_word_embeddings=True, **common)
    if family == "gemma3":
        # heads*head_dim (64) != hidden (48), (1 + w) norms, sliding + full layers, scaled embeddings
        return Gemma3TextConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers],
                                tie_word_embeddings=True, **common)
    raise ValueError(f"unknown tiny family {family!r}; expected one of {list(FAMILIES)}")


GEMMA3_MASSIVE_CHANNEL = 5  # the tiny Gemma3's massive residual channel (gemma3_statistics)
MASSIVE_VALUE = 150.0  # its value in the residual stream (the other channels: ~1)


def tiny_model(family: str, seed: int = 0, num_layers: int = 2, dtype: torch.dtype = torch.float32,
               randomize_norms: bool = True):
    """A random-init model in eval mode. randomize_norms perturbs every RMSNorm weight, so that tests
    of norm folding / rotation cannot pass by accident with all-ones (or all-zeros for Gemma) norms;
    for gemma3 it gives the norms the statistics of a trained Gemma3 instead (gemma3_statistics)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers), dtype=dtype, attn_implementation="sdpa")
    if randomize_norms:
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        with torch.no_grad():
            for name, module in model.named_modules():
                if type(module).__name__.endswith("RMSNorm"):
                    w = module.weight
                    w.copy_(w + 0.2 * torch.randn(w.shape, generator=gen, device="cpu").to(w.device, w.dtype))
            if family == "gemma3":
                gemma3_statistics(model, gen)
    return model.eval()


@torch.no_grad()
def gemma3_statistics(model, gen: torch.Generator, channel: int = GEMMA3_MASSIVE_CHANNEL) -> None:
    """Give a random-init Gemma3 the statistics of the trained gemma-3-270m that matter to a quantizer
    (measured on its weights and activations, scales 1 + w; docs/architecture.md, "Gemma3"), which
    random norms near 1 hide:
    - every token's residual stream holds one massive channel, ~99% of its energy after
      normalisation (the real model: channel 400, then 163, 85-95%). The real model writes it
      through huge post-norm scales (153 to 1649 on that channel); here the embedding carries it as
      a constant column (a stable channel, as in the real model, whose value a random block would
      otherwise flip from token to token; constant over the vocabulary, so the tied head's logits
      do not change) and the post norms leave it alone;
    - the pre-feedforward norm zeroes that channel (1 + w = 0 exactly, w = -1) and the input norm
      damps it (~1.5 against a mean of ~15): the readers never see it;
    - the input norms' other scales are large and spread (mean ~15, up to ~60), the pre-feedforward
      ones ~6, the post norms ~1-5, the q/k norms ~2, the final norm ~25 (0 on the massive channel).
    A method that quantizes the normalised stream BEFORE these scales (QuaRot folding them into the
    readers and rotating) spreads the massive channel over every weight's quantization error; on
    random norms near 1 it would not."""
    def scales(norm, mean: float, std: float, low: float = 0.05) -> torch.Tensor:
        w = norm.weight
        s = (mean + std * torch.randn(w.shape, generator=gen, device="cpu")).abs().clamp(min=low)
        return s

    def set_scales(norm, s: torch.Tensor) -> None:
        norm.weight.copy_((s - 1.0).to(norm.weight.device, norm.weight.dtype))

    for layer in model.model.layers:
        s = scales(layer.input_layernorm, 15.0, 8.0, low=1.0)
        s[channel] = 1.5
        set_scales(layer.input_layernorm, s)
        s = scales(layer.pre_feedforward_layernorm, 6.0, 2.0)
        s[channel] = 0.0
        set_scales(layer.pre_feedforward_layernorm, s)
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            s = scales(norm, 1.0, 2.0)
            s[channel] = 0.0
            set_scales(norm, s)
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            set_scales(norm, scales(norm, 2.0, 0.8))
    emb = model.model.embed_tokens.weight
    emb[:, channel] = MASSIVE_VALUE / float(model.model.embed_tokens.embed_scale)
    s = scales(model.model.norm, 25.0, 20.0)
    s[channel] = 0.0  # (the real model: 0.19) no constant offset on the logits, so raw-logit errors stay meaningful
    set_scales(model.model.norm, s)


def tiny_models(seed: int = 0) -> Dict[str, torch.nn.Module]:
    return {f: tiny_model(f, seed) for f in FAMILIES}


def random_tokens(n: int, seq_len: int, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """LongTensor [n, seq_len] of token ids (calibration / eval data for tiny models)."""
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator(device="cpu").manual_seed(seed),
                         device="cpu")


def tiny_tokenizer():
    """A real (saveable) transformers tokenizer for tiny models: one token per printable ASCII char."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "\n": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: UTF-8 bytes folded into the tiny vocabulary."""

    def __init__(self, vocab_size: int = TINY_VOCAB):
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def __call__(self, text: str, return_tensors=None, add_special_tokens: bool = False):
        ids = self.encode(text)
        return {"input_ids": torch.tensor([ids], device="cpu") if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
