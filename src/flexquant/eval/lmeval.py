"""Bridge to lm-evaluation-harness: run its tasks on a flexquant model (or an imported GPTQ /
compressed-tensors one) through its Python API, with the model as loaded by flexquant.

Tasks whose datasets live on the Hugging Face hub need the hub or a filled local datasets cache; when
the hub cannot be reached the bridge switches the hub clients to offline mode (so nothing hangs on
retries) and says which task could not find its data. Local tasks (``--include-path`` with YAML task
files whose ``dataset_path: json`` points at local files) always work offline.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

from ..errors import FlexQuantError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'flexquant[lmeval]'  (lm-eval>=0.4.9)"


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise FlexQuantError(f"--tasks needs lm-evaluation-harness, which is not installed ({e}); "
                             f"{INSTALL_HINT}") from e
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=4)
def _default_manager(include_path: str | None):
    """lm-eval's task index (its own tasks + ``include_path``), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


@contextlib.contextmanager
def hub_offline(offline: bool):
    """Put the Hugging Face hub and datasets clients in offline mode (cache only) for the duration."""
    if not offline:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched = []
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hc

        patched.append((hc, "HF_HUB_OFFLINE", hc.HF_HUB_OFFLINE))
        hc.HF_HUB_OFFLINE = True
    with contextlib.suppress(ImportError):
        import datasets.config as dc

        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(dc, attr):
                patched.append((dc, attr, getattr(dc, attr)))
                setattr(dc, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_tasks(tasks: list[str], task_manager, offline: bool) -> dict:
    from lm_eval.tasks import get_task_dict

    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise FlexQuantError(f"unknown lm-eval task(s) {', '.join(unknown)}; list them with `lm-eval ls tasks`, "
                             "or pass --include-path with their YAML files")
    loaded = {}
    for t in tasks:
        try:
            loaded.update(get_task_dict([t], task_manager))
        except Exception as e:  # datasets/hub raise many types (ConnectionError, OfflineModeIsEnabled, ...)
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            where = ("the Hugging Face hub cannot be reached from this machine and the dataset is not in the "
                     "local datasets cache" if offline else "its dataset could not be loaded")
            raise FlexQuantError(f"lm-eval task {t!r}: {where} ({why}); run it once where the hub is reachable "
                                 "to fill the cache, or use a local task (--include-path)") from e
    return loaded


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
              limit: float | None = None, batch_size: int = 1, device: str = "cpu") -> dict:
    """lm-eval results for ``tasks`` on an in-memory causal LM: {"results": {task: {metric: value}}, ...}."""
    lm_eval, HFLM, TaskManager = import_lm_eval()
    from ..models.loader import _hub_reachable

    if include_path is not None and not Path(include_path).is_dir():
        raise FlexQuantError(f"--include-path {include_path} is not a folder of lm-eval task YAML files")
    offline = not _hub_reachable()
    if tokenizer is None:
        raise FlexQuantError("this model has no tokenizer; lm-eval needs one to encode the task texts")
    with hub_offline(offline):
        manager = None
        if include_path:  # indexing lm-eval's own thousands of tasks takes a while: only when needed
            manager = TaskManager(include_path=include_path, include_defaults=False)
            if not all(t in manager.all_tasks for t in tasks):
                manager = None
        manager = manager or _default_manager(include_path)
        task_dict = _load_tasks(tasks, manager, offline)
        model.config.use_cache = True  # generation tasks decode token by token
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(task_dict.values()), num_fewshot=num_fewshot,
                                      limit=limit, task_manager=manager, log_samples=False,
                                      bootstrap_iters=0)
    results = {t: {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
               for t, r in (out or {}).get("results", {}).items()}
    return {"results": results, "n_samples": (out or {}).get("n-samples", {}),
            "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
            "num_fewshot": num_fewshot, "limit": limit, "offline": offline}
