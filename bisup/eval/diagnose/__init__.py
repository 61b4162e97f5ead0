"""bisup.eval.diagnose: see quantization error propagate, vertically (through the layers of one
token) and horizontally (across tokens, through attention).

    report = bisup.eval.diagnose(fp_model, {"rtn": q1, "quarot": "dir/"}, tokens)
    report.save("out/")   # report.json, report.md, linears.md, vertical.png, horizontal.png, injection.png

Reference. A quantized model is compared with the full-precision computation *in its own bases*
(align.py): the FP model, or, for methods that rotate (QuaRot), the FP model put through the same
method with every bit width at 16 (its unquantized twin; checked to compute the FP model's NLL and
to have the quantized model's embeddings). Errors are per token, ||h_q,t - h_ref,t|| / ||h_ref,t||,
then averaged over tokens and windows (a per-token mean, so the huge first-token "attention sink"
states do not dominate as they would in one Frobenius norm).

Vertical (per decoder layer l, residual stream after l):
- accumulated: the quantized model end to end against the reference;
- local: one forward pass of the quantized model in which a pre-hook replaces every layer's input
  by the reference's input to that layer, so layer l runs on exact inputs: its own error only.

Horizontal (per position t of a window; last layer's output error and NLL increase over the FP
model, averaged over windows):
- P = 0: the end-to-end run above;
- P > 0 (a full-precision system prompt of P tokens): the first P tokens of the window go through
  `bisup.generate(model, ids[P:], system_ids=ids[:P], max_new_tokens=1)`, the library's own FP16
  prompt segment (its K/V computed with activations and KV unquantized and kept unquantized, every
  later token's K/V at the model's kv_bits; fake and real mode alike), and hooks on the last layer
  and the final norm read the prefill of the T-P later tokens (logits = lm_head of the normed
  state). No re-quantization and no knowledge of the KV internals is needed, and what is measured
  is what a user running generate with that system prompt gets. Positions < P are the prompt:
  no value there (NaN / null).
- KV injection (FP model only): hooks on every layer's k_proj / v_proj output quantize the K and V
  of one position s (asymmetric per head along head_dim, fp16 scales, `inject_bits`; before RoPE
  and any rotation), everything else FP; the heat map is the last layer's output error at every t
  for each s. Causality: it is exactly 0 for t < s.

Per linear: during the reference's forward each quantized linear is run on exactly the input the
reference linear got, and compared with that linear's output (weights + activation quantization of
that one linear, nothing upstream). Activation statistics, per token over channels and averaged:
kurtosis and max|x| / mean|x| of the FP model's input to the linear (before the method's
transform) and of what the quantizer sees (the reference input after the linear's
`input_transform`, e.g. QuaRot's online Hadamard, without Atom's high-precision `outlier_idx`
channels). KV quantization is not a linear: it shows in the local error of the layer.

Memory: one window at a time; per window the residual streams of the reference's layers and one
model's; directories are loaded one at a time.
"""
from bisup.eval.diagnose.measure import diagnose, model_label  # noqa: F401
from bisup.eval.diagnose.report import Report  # noqa: F401
