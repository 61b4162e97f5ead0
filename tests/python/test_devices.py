"""Every bisup path creates its tensors on the device of the tensors they meet.

Run on a CPU-only machine: the model lives on the CPU while the pipeline runs under
`with torch.device("meta")`, so a tensor created without `device=` lands on `meta` and refuses to
mix with the model's tensors, just as a CPU tensor would with a CUDA model (plain transformers
forward and generate pass under this context). A few calls (matmul, linear, indexing, scatter) take a
meta operand beside a CPU one without complaint, so every torch call is checked for mixed devices too."""
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from transformers.cache_utils import DynamicSlidingWindowLayer

import bisup
from bisup.config import BiSupConfig, QuantConfig
from bisup.eval.perplexity import PROMPT_KV_MODES
from bisup.models.tiny import FAMILIES, TINY_GROUP, random_tokens, tiny_model, tiny_tokenizer
from bisup.nn.fake_quant import ActQuantizer
from bisup.quant.groups import as_index

G = 32  # real-mode QuantLinear groups are multiples of 32
BISUP = BiSupConfig(epochs=1, batch_size=2, rank=2)
METHODS = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "atom": dict(method="atom", atom_outliers=16),
    "atom-gptq": dict(method="atom", atom_outliers=16, gptq=True),
    "quarot": dict(method="quarot"),
    "quarot-gptq": dict(method="quarot", gptq=True),
    "bisup-quarot": dict(method="quarot", bisup=BISUP),
    "bisup-atom": dict(method="atom", atom_outliers=16, bisup=BISUP),
    # without learned rounding BiSup exports GPTQ codes (input Hessians of the trained block); without
    # smoothing its penalty is a constant
    "bisup-gptq": dict(method="gptq", bisup=BiSupConfig(epochs=1, batch_size=2, rank=2, rounding=False, smooth=False)),
}
pytestmark = [pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def sliding_window_layers_on_the_cpu(monkeypatch):
    """transformers' sliding-window cache layer (Gemma3) makes a tensor on the default device and moves
    it to the keys' device on first use: right on a GPU, but meta data cannot move. Not bisup's."""
    init = DynamicSlidingWindowLayer.__init__

    def on_cpu(self, *args, **kwargs):
        with torch.device("cpu"):
            init(self, *args, **kwargs)

    monkeypatch.setattr(DynamicSlidingWindowLayer, "__init__", on_cpu)


class _NoMixedDevices(TorchFunctionMode):
    """Fails every call given tensors on two devices (a 0-dim CPU tensor is a scalar, on CUDA too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {str(t.device) for t in tensors if t.dim() or t.device.type != "cpu"}
        assert len(devices) <= 1, f"{func} mixes tensors on {sorted(devices)}"
        return func(*args, **kwargs)


@contextmanager
def meta_default_device():
    """Tensors created without a device land on meta; no torch call may mix them with CPU tensors."""
    with torch.device("meta"), _NoMixedDevices():
        yield


def _on_cpu(t: torch.Tensor) -> torch.Tensor:
    assert t.device.type == "cpu", t.device
    return t


def _finite(t: torch.Tensor) -> None:
    assert torch.isfinite(_on_cpu(t)).all()


def _all_on_cpu(model) -> None:
    wrong = [name for name, t in model.state_dict().items() if t.device.type != "cpu"]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_path_creates_its_tensors_on_the_model_device(tmp_path, family, method):
    model = tiny_model(family)
    calib = random_tokens(2, 16)
    ids, system_ids = random_tokens(1, 6, seed=1), random_tokens(1, 4, seed=2)
    config = QuantConfig(w_group_size=G, a_group_size=G, kv_bits=4, kv_group_size=TINY_GROUP, **METHODS[method])
    with meta_default_device():
        bisup.quantize_model(model, config, calib_data=calib.tolist(), progress=False)  # token-id lists
        _all_on_cpu(model)
        with torch.no_grad():
            _finite(model(ids).logits)
        out = bisup.generate(model, ids, system_ids=system_ids, max_new_tokens=2, do_sample=False)
        assert _on_cpu(out).shape == (1, 12)
        bisup.save_quantized(model, tmp_path / "fake")
        loaded = bisup.load_quantized(tmp_path / "fake", mode="real")  # Gemma3's sliding layers too
        bisup.save_quantized(loaded, tmp_path / "real")  # real -> fake linears on the way out
        _all_on_cpu(loaded)
        with torch.no_grad():
            _finite(loaded(ids).logits)
        out = bisup.generate(loaded, ids, system_ids=system_ids, max_new_tokens=3, do_sample=False)
        assert _on_cpu(out).shape == (1, 13)


@pytest.mark.parametrize("placement", ["all", "layer 0 and lm_head"])
@pytest.mark.parametrize("method", ["rtn", "quarot"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_on_another_device_meets_no_cpu_tensor(family, method, placement):
    """The converse: a tensor made on the CPU on purpose (a Hadamard matrix from numpy, seeded signs)
    is moved to the device of the module it meets. The methods that need no data run on a model
    that lives on meta, or with one layer and lm_head there and the rest on the CPU."""
    model = tiny_model(family)
    if placement == "all":
        model.to("meta")
    else:
        model.model.layers[0].to("meta")
        model.lm_head.to("meta")
    config = QuantConfig(w_group_size=G, a_group_size=G, kv_bits=4, kv_group_size=TINY_GROUP, **METHODS[method])
    with _NoMixedDevices():
        bisup.quantize_model(model, config, progress=False)
    for name, t in model.state_dict().items():
        if placement == "all" or name.startswith("model.layers.0."):
            assert t.is_meta, name
        elif name.startswith("model.layers.1."):
            assert t.device.type == "cpu", name


@pytest.mark.parametrize("family", FAMILIES)
def test_embedded_corpus_calibration_and_perplexity_on_the_model_device(family):
    model, fp_model, tokenizer = tiny_model(family), tiny_model(family), tiny_tokenizer()
    mode = "fake" if family == "gemma3" else "real"
    config = QuantConfig(method="gptq", mode=mode, w_group_size=G, a_group_size=G, kv_bits=4,
                         kv_group_size=TINY_GROUP, n_calib=2, calib_seq_len=16)
    system_prompt = tokenizer.encode("You are tiny.")
    with meta_default_device():
        bisup.quantize_model(model, config, tokenizer=tokenizer, progress=False)  # the embedded corpus
        _all_on_cpu(model)
        for prompt_kv in PROMPT_KV_MODES:
            ppl = bisup.eval.perplexity(model, tokenizer, seq_len=16, max_windows=2, progress=False,
                                        system_prompt=system_prompt, prompt_kv=prompt_kv, fp_model=fp_model)
            assert 1.0 < ppl < float("inf")


def test_diagnose_on_the_model_device():
    fp_model = tiny_model("llama")
    config = QuantConfig(method="quarot", w_group_size=G, a_group_size=G, kv_bits=4, kv_group_size=TINY_GROUP)
    model = bisup.quantize_model(tiny_model("llama"), config, progress=False)
    with meta_default_device():
        report = bisup.eval.diagnose(fp_model, {"quarot": model}, random_tokens(2, 16, seed=3), seq_len=16,
                                     prompt_lens=(4,), inject_positions=2, progress=False)
        assert report.to_json()


def test_an_index_tensor_stays_on_its_device():
    with meta_default_device():
        assert as_index(torch.tensor([3, 1], device="cpu")).device.type == "cpu"
        assert ActQuantizer(4, 16, outlier_idx=torch.tensor([3, 1], device="cpu")).outlier_idx.device.type == "cpu"
