"""Batch sources for the trainer: every source yields, per step, this process's packs stacked
(`PackedBatch` with a leading axis) and has `get_state()` (JSON-able) and `resume(states, reshard=...)`,
which continues from every process's saved state (exactly; or, for the records pipeline on another process
count or packs per process, with `reshard`, from about where the old run had read).

* `synthetic`: random token ids and images in a fixed per-pack recipe (throughput runs, tests);
* `records`: the ArrayRecord / Grain pipeline of `echo4o_jax.data` (the demo dataset included).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import packing
from ..config import BagelConfig

__all__ = ["DataStateError", "SyntheticSource", "make_source", "budget_from_config"]


def budget_from_config(b) -> packing.PackBudget:
    """The PackBudget of `config.data.budget`; a bad value is a ValueError naming the config key."""
    try:
        return packing.PackBudget(text_tokens=int(b.text_tokens), vit_tokens=int(b.vit_tokens),
                                  vae_tokens=int(b.vae_tokens), vae_images=int(b.vae_images),
                                  vae_image_size=tuple(int(x) for x in b.vae_image_size))
    except ValueError as e:  # (PackBudget names its own fields)
        raise ValueError(str(e).replace("PackBudget.", "data.budget.")) from None


class DataStateError(ValueError):
    """A data state this run cannot resume exactly; `reshardable`: `train.data_resume=reshard` could go on."""

    def __init__(self, msg: str, reshardable: bool = False):
        super().__init__(msg)
        self.reshardable = reshardable


class SyntheticSource:
    """Deterministic random packs: per pack, `t2i` text-to-image samples, `edit` samples (clean VAE +
    ViT reference, instruction, noisy target) and `und` understanding samples (ViT image + CE text)."""

    def __init__(self, cfg: BagelConfig, budget: packing.PackBudget, *, packs: int, seed: int, image_size,
                 text_len: int, t2i: int, edit: int, und: int, process_index: int = 0):
        self.cfg, self.budget, self.packs, self.seed = cfg, budget, packs, seed
        self.image_size = tuple(int(x) for x in image_size)
        self.text_len, self.t2i, self.edit, self.und = text_len, t2i, edit, und
        self.process_index = process_index
        self.step = 0

    @property
    def fingerprint(self) -> str:
        """What the packs of a step depend on, besides the step and their global index: the seed, the samples'
        recipe and the budget (not the process count or packs per process)."""
        import hashlib

        what = ["synthetic", self.seed, self.image_size, self.text_len, self.t2i, self.edit, self.und,
                dataclasses.astuple(self.budget)]
        return hashlib.sha256(repr(what).encode()).hexdigest()[:16]

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "fingerprint": self.fingerprint}

    def resume(self, states: list[dict[str, Any]], *, reshard: bool) -> None:
        """Exact with any process count and packs per process (`reshard` is not needed): the state is the step,
        the same on every process, and packs are seeded by their global index. A state of other synthetic
        settings (seed, recipe, budget), or a records pipeline's, is a DataStateError (the trainer names the
        settings that differ; `train.data_resume=restart` starts this stream from its beginning)."""
        st = states[0]
        if "step" not in st:
            raise DataStateError("the checkpoint's data state is a records pipeline's (data.kind='records'), this "
                                 "run reads synthetic packs")
        if st.get("fingerprint", self.fingerprint) != self.fingerprint:  # (none: saved before it was recorded)
            raise DataStateError(f"synthetic packs of other settings ({st['fingerprint']} != {self.fingerprint})")
        self.step = int(st["step"])

    def _sample(self, rng, kind: str) -> dict:
        H, W = self.image_size
        vit_side = self.cfg.vit.patch_size
        vh, vw = max(vit_side, H // vit_side * vit_side), max(vit_side, W // vit_side * vit_side)
        special = set(self.cfg.special_tokens.as_dict().values())
        def text():
            ids = rng.integers(0, self.cfg.llm.vocab_size, self.text_len)
            return [int(i) if int(i) not in special else 0 for i in ids]
        img = lambda h, w: rng.uniform(-1, 1, (3, h, w)).astype(np.float32)
        item = lambda t, loss=0, cfg_=0: dict(type=t, loss=loss, enable_cfg=cfg_, special_token_loss=0,
                                              special_token_label=None)
        if kind == "t2i":
            return dict(text_ids_list=[text()], sequence_plan=[item("text", 0, 1), item("vae_image", 1)],
                        image_tensor_list=[img(H, W)])
        if kind == "edit":
            return dict(text_ids_list=[text()],
                        sequence_plan=[item("vae_image", 0, 1), item("vit_image", 0, 1), item("text", 0, 1),
                                       item("vae_image", 1)],
                        image_tensor_list=[img(H, W), img(vh, vw), img(H, W)])
        return dict(text_ids_list=[text(), text()], sequence_plan=[item("vit_image"), item("text"), item("text", 1)],
                    image_tensor_list=[img(vh, vw)])

    def __iter__(self):
        return self

    def __next__(self) -> packing.PackedBatch:
        out = []
        for k in range(self.packs):
            # seeded by the pack's global index: the global batch does not depend on how many processes share it
            rng = np.random.default_rng([self.seed, self.step, 0, self.process_index * self.packs + k])
            samples = [self._sample(rng, "t2i") for _ in range(self.t2i)]
            samples += [self._sample(rng, "edit") for _ in range(self.edit)]
            samples += [self._sample(rng, "und") for _ in range(self.und)]
            out.append(packing.pack_samples(samples, self.cfg, self.budget, rng=rng))
        self.step += 1
        return packing.stack_batches(out)


def make_source(config, cfg: BagelConfig, *, process_index: int, process_count: int, local_packs: int,
                vae_fingerprint: str = ""):
    """`vae_fingerprint`: of the VAE the step uses (`data.latents.vae_fingerprint`), checked against the
    precomputed latents of `data.vae_latents` (records only)."""
    d = config.data
    budget = budget_from_config(d.budget)
    if d.kind == "synthetic":
        s = d.synthetic
        return SyntheticSource(cfg, budget, packs=local_packs, seed=int(d.seed), image_size=s.image_size,
                               text_len=int(s.text_len), t2i=int(s.t2i), edit=int(s.edit), und=int(s.und),
                               process_index=process_index)
    if d.kind == "records":
        from .records_source import RecordsSource

        return RecordsSource(config, cfg, budget, process_index=process_index, process_count=process_count,
                             local_packs=local_packs, vae_fingerprint=vae_fingerprint)
    raise ValueError(f"data.kind={d.kind!r}: expected synthetic|records")
