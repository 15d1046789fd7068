"""The trainer's `records` source: the ArrayRecord / Grain pipeline of `echo4o_jax.data`.

`data.records.demo_dir` set: the offline demo dataset (written there on first use); otherwise the
datasets `data.records.datasets` ([{path, weight}], paths relative to `data.records.root`).
`data.vae_latents` set: the VAE images' posterior moments come from that precomputed folder
(`python -m echo4o_jax.data.latents`) instead of being decoded and encoded in the step.
A dataset whose manifest says it is incomplete (a failed or interrupted import / synthesis run) is refused
unless `data.records.allow_incomplete` (then a warning names it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any

from ..checkpoint import config_dir
from ..config import BagelConfig
from ..image_transform import ImageTransform
from ..packing import PackBudget
from .data_sources import DataStateError

__all__ = ["RecordsSource", "data_config_errors", "ensure_demo", "pipeline_config_from"]


@contextlib.contextmanager
def data_config_errors(config):
    """The data settings' errors as the train command reports them: a ValueError of the data source (no
    datasets, transforms too large for the model geometry, tokenizer ids, an unreadable tokenizer ...)
    becomes a `ConfigValueError` "data (<kind>): ..."; RecordError, LatentStoreError and CheckpointError pass
    as they are (they name their file)."""
    from ..checkpoint import CheckpointError
    from ..data.latents import LatentStoreError
    from ..data.records import RecordError
    from .trainer import ConfigValueError

    try:
        yield
    except (RecordError, LatentStoreError, CheckpointError, ConfigValueError):
        raise
    except ValueError as e:
        raise ConfigValueError(f"data ({config.data.kind}): {e}") from e


def ensure_demo(out: str, **kw) -> dict:
    """The demo dataset under `out`, written on first use (multi-host: by process 0, the others wait for it;
    `out` must be a path every host sees)."""
    import json

    import jax

    from ..data.demo import write_demo

    meta = pathlib.Path(out) / "demo.json"

    def written() -> dict:
        demo = json.loads(meta.read_text())
        if "size" in kw and demo.get("size") != kw["size"]:  # (a setting the existing data would silently ignore)
            raise ValueError(f"data.records.demo_image_size={kw['size']}, but the demo data in {out} was written at "
                             f"{demo.get('size')} px: set data.records.demo_dir to another folder (or delete {out})")
        return demo

    if jax.process_count() == 1:
        return written() if meta.exists() else write_demo(out, overwrite=_demo_leftovers(out), **kw)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0 and not meta.exists():
        write_demo(out, overwrite=_demo_leftovers(out), **kw)
    multihost_utils.sync_global_devices(f"echo4o_jax demo data {out}")
    if not meta.exists():
        raise FileNotFoundError(f"demo data {out}: process 0 wrote it, process {jax.process_index()} does not see "
                                f"{meta}: data.records.demo_dir must be a path every host sees")
    return written()


def _demo_leftovers(out: str) -> bool:
    """Whether `out` (no demo.json: the demo was never finished) holds only what an interrupted demo write left,
    which is written again; a dataset of anything else there is refused by the writer, never overwritten."""
    from ..data.demo import DEMO_DATASETS
    from ..data.records import MANIFEST_NAME, load_manifest

    for name in DEMO_DATASETS:
        if (pathlib.Path(out) / name / MANIFEST_NAME).exists():  # (a write killed outright leaves shards only)
            if load_manifest(str(pathlib.Path(out) / name)).get("info", {}).get("generator") != "echo4o_jax.data.demo":
                return False
    return True


def pipeline_config_from(config, budget: PackBudget, *, local_packs: int, vae_fingerprint: str = ""):
    """The `PipelineConfig` of a training config's records source (also used by `echo4o_jax.data.latents`,
    which precomputes the VAE latents of exactly these datasets and transforms). `vae_fingerprint`: of the
    VAE the step uses, checked against the `data.vae_latents` folder when that is set."""
    from ..data.pipeline import DatasetSpec, PipelineConfig

    d = config.data
    r = d.records
    common = dict(packs_per_step=local_packs, seed=int(d.seed), text_dropout=float(d.text_dropout),
                  vit_dropout=float(d.vit_dropout), vae_dropout=float(d.vae_dropout),
                  worker_count=int(r.get("workers", 0)), vae_latents=str(d.get("vae_latents", "") or ""),
                  vae_fingerprint=vae_fingerprint, allow_incomplete=bool(r.get("allow_incomplete", False)),
                  drop_unfit=bool(d.get("drop_unfit", False)))
    # packs close once they reach expected_num_tokens: by default 80% of the budget, at most max_tokens (it was
    # 80% of the budget even above a lower data.max_tokens: every pack then closed on an overflow)
    common["expected_num_tokens"] = int(d.expected_tokens) if d.get("expected_tokens") else min(
        int(budget.total_tokens * 0.8), int(d.get("max_tokens") or budget.total_tokens))
    if d.get("max_tokens"):
        common["max_num_tokens"] = int(d.max_tokens)
    if d.get("max_tokens_per_sample"):
        common["max_num_tokens_per_sample"] = int(d.max_tokens_per_sample)
    if r.get("demo_dir"):
        from ..data.demo import demo_pipeline_config

        ensure_demo(r.demo_dir, size=int(r.get("demo_image_size", 64)))
        return demo_pipeline_config(r.demo_dir, budget, **common)
    root = r.get("root", "")
    if not r.get("datasets"):
        raise ValueError("data.kind='records' needs data.records.datasets (or data.records.demo_dir)")
    for i, ds in enumerate(r.datasets):
        keys = set(ds) if hasattr(ds, "keys") else None
        if keys is None or not {"path", "weight"} <= keys or keys - {"path", "weight"}:
            raise ValueError(f"data.records.datasets[{i}]: expected dict(path=..., weight=...), got {ds!r}")
        if not isinstance(ds["path"], str) or not ds["path"]:
            raise ValueError(f"data.records.datasets[{i}]: path must be a non-empty string, got {ds['path']!r}")
        if isinstance(ds["weight"], bool) or not isinstance(ds["weight"], (int, float)):
            raise ValueError(f"data.records.datasets[{i}] ({ds['path']}): weight must be a number, got "
                             f"{ds['weight']!r}")
        if not root and not os.path.isabs(ds["path"]) and not any(ch in ds["path"] for ch in "*?[") \
                and not os.path.exists(ds["path"]):  # (the recipe's names, relative to a root it leaves empty)
            raise ValueError(f"data.records.root is not set, and dataset {ds['path']!r} is not in the current folder "
                             f"{os.getcwd()}: set --config.data.records.root=<the folder holding the datasets>")
    specs = tuple(DatasetSpec(os.path.join(root, ds["path"]), weight=float(ds["weight"]),
                              name=os.path.basename(os.path.normpath(ds["path"]))) for ds in r.datasets)
    # default: the tokenizer files of model.ckpt (a training workdir keeps them in model_config/)
    tok = d.get("tokenizer") or (str(config_dir(config.model.ckpt)) if config.model.ckpt else "")
    if not tok:
        raise ValueError("data.tokenizer is not set and model.ckpt is empty: no tokenizer to use")
    kw: dict[str, Any] = dict(common)
    for key in ("vae_transform", "vit_transform"):
        if r.get(key):
            kw[key] = _transform(f"data.records.{key}", r[key])
    return PipelineConfig(datasets=specs, tokenizer=tok, budget=budget, **kw)


def _transform(key: str, value) -> ImageTransform:
    """An ImageTransform from a config's (max_size, min_size, stride[, max_pixels]); a ValueError naming `key`."""
    try:
        if isinstance(value, (str, bytes)) or len(value) not in (3, 4):
            raise ValueError("expected (max_size, min_size, stride) or (max_size, min_size, stride, max_pixels)")
        return ImageTransform(*[int(x) for x in value])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}={value!r}: {e}") from None


class RecordsSource:
    def __init__(self, config, cfg: BagelConfig, budget: PackBudget, *, process_index: int, process_count: int,
                 local_packs: int, vae_fingerprint: str = ""):
        from ..data.pipeline import DataPipeline

        pc = pipeline_config_from(config, budget, local_packs=local_packs, vae_fingerprint=vae_fingerprint)
        self.pipe = DataPipeline(pc, cfg, process_index=process_index, process_count=process_count)
        self._it = self.pipe.iterator()
        self.last_stats: dict = {}

    def __iter__(self):
        return self

    def __next__(self):
        batch, self.last_stats = next(self._it)
        return batch

    @property
    def skipped_errors(self) -> int:
        """Unreadable records skipped so far (restored with the iterator's state on resume)."""
        return int(self._it.counters["skipped_errors"])

    @property
    def recent_errors(self) -> list[dict]:
        """The last unreadable records skipped ({"k", "id", "error"}, up to 20)."""
        return list(self._it.recent_errors)

    def get_state(self) -> dict:
        return self._it.get_state()

    def resume(self, states: list[dict], *, reshard: bool) -> dict | None:
        """Continue from the checkpoint's data states (one per process of its run). Saved by this process count
        and data settings (packs per process included): exactly, from this process's own state. Else, with
        `reshard`, from where the old processes had read (`DataPipeline.resharded_state`; returns its info),
        else a `DataStateError` saying whether `reshard` could go on (only the process count / packs changed).
        A state of other data settings is refused either way."""
        pipe = self.pipe
        own = states[pipe.process_index] if len(states) == pipe.process_count else None
        info = None
        if own is not None and own.get("fingerprint") in pipe.accepted_fingerprints:
            pipe.check_contents(own)  # (before the running iterator is closed)
            state = own
        elif reshard:
            state, info = pipe.resharded_state(states)
        else:
            why = (f"iterator state was saved by a pipeline with another configuration ({own.get('fingerprint')} != "
                   f"{pipe.fingerprint})" if own is not None else
                   f"the checkpoint holds the data states of {len(states)} processes, this run has "
                   f"{pipe.process_count}")
            raise DataStateError(why, reshardable=_reshardable(pipe, states))
        self._it.close()
        self._it = pipe.iterator(state=state)
        return info


def _reshardable(pipe, states: list[dict]) -> bool:
    try:
        pipe.resharded_state(states)
    except ValueError:
        return False
    return True
