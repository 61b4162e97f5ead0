"""Report: the numbers of one diagnose run, as JSON, markdown and plots."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LINEARS_MD = "linears.md"
PLOTS = ("vertical.png", "horizontal.png", "injection.png")
DISTANCES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _clean(x):
    """NaN/inf -> None (JSON has no NaN), floats to 7 significant digits; tuples -> lists; dict keys -> str."""
    if isinstance(x, float):
        return float(f"{x:.7g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


@dataclass
class Report:
    """settings: what was measured; fp: the FP model's perplexity; models: one dict per compared model
    (vertical / horizontal curves, per-linear rows, summary); injection: the KV-injection heat map."""

    settings: Dict[str, Any]
    fp: Dict[str, Any]
    models: List[Dict[str, Any]] = field(default_factory=list)
    injection: Dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        return _clean({"settings": self.settings, "fp": self.fp, "models": self.models, "injection": self.injection})

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        d = json.loads(text)
        return cls(settings=d["settings"], fp=d["fp"], models=d["models"], injection=d["injection"])

    @classmethod
    def load(cls, path) -> "Report":
        path = Path(path)
        return cls.from_json((path / REPORT_JSON if path.is_dir() else path).read_text())

    def model(self, name: str) -> Dict[str, Any]:
        for m in self.models:
            if m["name"] == name:
                return m
        raise KeyError(f"no model {name!r} in the report; models: {[m['name'] for m in self.models]}")

    # ------------------------------------------------------------------ markdown
    def to_markdown(self, top: int = 12) -> str:
        s = self.settings
        out = ["# bisup diagnose", "",
               f"{s['windows']} windows x {s['seq_len']} tokens; FP perplexity {_f(self.fp['ppl'])}. "
               f"Errors: {s['error']}.", ""]
        out += ["## Vertical: error through the layers", "",
                "| model | ppl | end to end, last layer | layer alone, last layer | layer alone, mean | ratio |",
                "|---|---|---|---|---|---|"]
        for m in self.models:
            v = m["summary"]
            out.append(f"| {m['name']} | {_f(m['ppl'])} | {_f(v['accumulated_last_layer'])} | "
                       f"{_f(v['local_last_layer'])} | {_f(v['local_mean'])} | {_f(v['accumulated_over_local_last_layer'], 3)} |")
        out += ["", "ratio: accumulated / local error at the last layer (what the layers before it added).", ""]
        out += ["## Horizontal: error across positions", "",
                "| model | NLL increase, first 10% of positions | last 10% | last-layer error, first 10% | last 10% |",
                "|---|---|---|---|---|"]
        for m in self.models:
            v = m["summary"]
            out.append(f"| {m['name']} | {_f(v['nll_increase_first_positions'])} | {_f(v['nll_increase_last_positions'])} | "
                       f"{_f(v['error_first_positions'])} | {_f(v['error_last_positions'])} |")
        if s.get("prompt_lens"):
            p_max = max(s["prompt_lens"])
            keys = ["0"] + [str(p) for p in s["prompt_lens"]]
            out += ["", f"With a full-precision system prompt of P tokens (positions >= {p_max}, NLL increase / last-layer error):", "",
                    "| model | " + " | ".join(f"P={k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for m in self.models:
                w = m["summary"]["with_fp_prompt"]
                out.append(f"| {m['name']} | " + " | ".join(
                    f"{_f(w[k]['nll_increase'])} / {_f(w[k]['error'])}" for k in keys) + " |")
        inj = self.injection
        if inj:
            dist = [d for d in DISTANCES if d < len(inj["by_distance"])]
            out += ["", f"## One token's K/V quantized ({inj['bits']}-bit, FP model otherwise)", "",
                    "Last-layer error at distance d after the injected position s (mean over the injected "
                    f"positions s > 0); before it: max {_f(inj['max_error_before_injection'])}. The first token "
                    f"(s = 0) injected: mean error {_f(inj.get('first_token_mean_error'), 3)} over every later position.", "",
                    "| d | " + " | ".join(str(d) for d in dist) + " |", "|---|" + "---|" * len(dist),
                    "| error | " + " | ".join(_f(inj["by_distance"][d], 3) for d in dist) + " |"]
        out += ["", f"## Worst linears (top {top}; all: {LINEARS_MD})", ""]
        for m in self.models:
            out += [f"### {m['name']}", ""] + self._linear_table(m["linears"][:top]) + [""]
        return "\n".join(out) + "\n"

    @staticmethod
    def _linear_table(rows) -> List[str]:
        out = ["| layer | linear | output error | kurtosis before | after | max/mean before | after |",
               "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['layer']} | {r['linear']} | {_f(r['output_error'])} | {_f(r['kurtosis_before'], 3)} | "
                       f"{_f(r['kurtosis_after'], 3)} | {_f(r['max_to_mean_before'], 3)} | {_f(r['max_to_mean_after'], 3)} |")
        return out

    def linears_markdown(self) -> str:
        out = ["# Output error of every decoder linear, worst first", "",
               "Output error: the quantized linear fed exactly the reference's input, vs the reference linear "
               "(per-token relative error). Kurtosis / max-to-mean: per token over channels, of the input before "
               "the method's transform (FP model) and of what the quantizer sees after it.", ""]
        for m in self.models:
            out += [f"## {m['name']}", ""] + self._linear_table(m["linears"]) + [""]
        return "\n".join(out) + "\n"

    # ------------------------------------------------------------------ files
    def save(self, out_dir, plots: bool = True) -> Dict[str, Path]:
        """Write report.json, report.md, linears.md (and vertical/horizontal/injection.png) to out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD, "linears": out / LINEARS_MD}
        files["json"].write_text(self.to_json() + "\n")
        files["markdown"].write_text(self.to_markdown())
        files["linears"].write_text(self.linears_markdown())
        if plots:
            from bisup.eval.diagnose import plots as P

            files["vertical"] = P.plot_vertical(self, out / PLOTS[0])
            files["horizontal"] = P.plot_horizontal(self, out / PLOTS[1])
            files["injection"] = P.plot_injection(self, out / PLOTS[2])
        return files
