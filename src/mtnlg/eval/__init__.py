"""Evaluation: held-out loss / perplexity / bits per byte (:mod:`.perplexity`), the lm-evaluation-harness
model ``mtnlg`` (:mod:`.lm_eval_adapter`, :mod:`.harness`, :mod:`.lm_eval_hook`) and local tasks built
from the held-out poems (:mod:`.poem_tasks`, ``tasks/``). Heavy imports happen in the submodules."""
