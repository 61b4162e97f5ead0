"""Evaluation: held-out text (embedded corpus, WikiText2, C4) and perplexity."""
from bisup.eval.data import calibration_batches, eval_tokens  # noqa: F401
from bisup.eval.perplexity import perplexity, perplexity_on_tokens  # noqa: F401
from bisup.eval.diagnose import Report, diagnose  # noqa: F401
