"""Reading and writing checkpoints and saved models; below both ``train/`` and ``infer/``.

* :mod:`~mtnlg.checkpoint.resolve`: ``resolve_checkpoint(path)``, the one interpretation of a
  ``--checkpoint`` path; finding the newest complete checkpoint; abandoned histories; output checks.
* :mod:`~mtnlg.checkpoint.sharded`: save / load sharded training checkpoints (DCP), layout-portable.
* :mod:`~mtnlg.checkpoint.inference`: read a training checkpoint into a model for inference.
* :mod:`~mtnlg.checkpoint.outer`: local SGD's outer and per-replica state inside those checkpoints.
* :mod:`~mtnlg.checkpoint.stream`: read a training checkpoint one tensor at a time (int8 loading).
* :mod:`~mtnlg.checkpoint.manifest`: sha256 manifests, verified on every load.
* :mod:`~mtnlg.checkpoint.safe_read`: DCP reading without unpickling anything but its metadata classes.
* :mod:`~mtnlg.checkpoint.trainer_state`: trainer state and RNG states as JSON.
"""

from mtnlg.checkpoint.inference import load_for_inference, load_weights, run_config, run_tokenizer
from mtnlg.checkpoint.manifest import MANIFEST, verify_checkpoint, verify_files, verify_saved_model, write_manifest
from mtnlg.checkpoint.resolve import (
    STEP_RE,
    Resolved,
    abandon_after,
    check_output_dir,
    find_checkpoint,
    list_checkpoints,
    newest_complete,
    resolve_checkpoint,
    resolve_resume,
    step_dir_name,
)
from mtnlg.checkpoint.sharded import (
    load_checkpoint,
    model_state,
    optimizer_state,
    prune,
    remove_stale_temps,
    save_checkpoint,
)
from mtnlg.checkpoint.trainer_state import rng_state, set_rng_state

__all__ = [
    "MANIFEST", "STEP_RE", "Resolved", "abandon_after", "check_output_dir", "find_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_for_inference", "load_weights", "model_state", "newest_complete", "optimizer_state",
    "prune", "remove_stale_temps", "resolve_checkpoint", "resolve_resume", "rng_state", "run_config",
    "run_tokenizer", "save_checkpoint", "set_rng_state", "step_dir_name", "verify_checkpoint", "verify_files",
    "verify_saved_model", "write_manifest",
]
