"""Trainer failures and resumes that are not the golden computation: a full disk while logging, a data state of
other settings (split from test_train.py, which CI runs on one worker: `-n 2 --dist loadfile`)."""

from __future__ import annotations

import pytest

from echo4o_jax.train.trainer import Trainer
from test_train import load_config


def test_a_full_disk_while_logging_is_one_error_and_the_steps_trained_are_saved_first(tmp_path, monkeypatch):
    """log.jsonl that cannot be written (a full disk) was chained OSError tracebacks (the write, then the close),
    the steps since the last checkpoint lost: one LogWriteError (a failed save: one line, exit 2), those steps
    saved first."""
    import echo4o_jax.checkpoint as ck
    from echo4o_jax.train import trainer as trainer_mod

    class FullFromStep3:
        def __init__(self, f):
            self.f, self.full = f, False

        def write(self, line):
            self.full = self.full or ('"step": 3,' in line and '"loss"' in line)
            if self.full:
                raise OSError(28, "No space left on device")
            return self.f.write(line)

        def flush(self):
            if self.full:
                raise OSError(28, "No space left on device")
            self.f.flush()

        def close(self):
            self.f.close()
            if self.full:
                raise OSError(28, "No space left on device")

    real_init = trainer_mod._Logger.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.f = FullFromStep3(self.f)

    monkeypatch.setattr(trainer_mod._Logger, "__init__", init)
    c = load_config("synthetic_tiny")
    c.train.steps, c.checkpoint.every, c.checkpoint.async_save, c.log.tensorboard = 6, 100, False, False
    with pytest.raises(trainer_mod.LogWriteError) as ei:
        Trainer(c, tmp_path).run()
    assert str(ei.value) == (f"cannot write the training log {tmp_path / 'log.jsonl'}: No space left on device [the 3 "
                             f"step(s) this run trained were saved: checkpoint 3 in {tmp_path / 'checkpoints'}; the "
                             "same command resumes from it once the disk has room]")
    assert ck.list_train_steps(tmp_path) == [3] and ei.value.__cause__ is None


def test_a_synthetic_data_state_of_other_settings_is_refused_and_restart_goes_on(tmp_path):
    """The synthetic source's state records what its packs depend on (seed, recipe, budget): a resume with another
    data.seed was accepted silently (another data stream), and a records checkpoint resumed with data.kind=synthetic
    was a KeyError traceback even with train.data_resume=restart. Now: refused naming the setting; restart goes
    on; the packs per process are not part of it (the packs are seeded by their global index)."""
    from echo4o_jax.checkpoint import CheckpointError

    c = load_config("synthetic_tiny")
    c.checkpoint.async_save, c.log.tensorboard = False, False
    Trainer(c, tmp_path).save(force=True)
    c.data.seed = int(c.data.seed) + 1
    with pytest.raises(CheckpointError, match=rf"synthetic packs of other settings .*data.seed: checkpoint "
                                              rf"{c.data.seed - 1}, config {c.data.seed}"):
        Trainer(c, tmp_path).restore()
    c.train.data_resume = "restart"
    tr = Trainer(c, tmp_path)
    assert tr.restore() and "data.seed" in tr.data_restarted
    from echo4o_jax.train.data_sources import DataStateError, SyntheticSource

    src = tr.source
    other = SyntheticSource(src.cfg, src.budget, packs=src.packs + 1, seed=src.seed, image_size=src.image_size,
                            text_len=src.text_len, t2i=src.t2i, edit=src.edit, und=src.und)
    other.resume([dict(src.get_state(), step=3)], reshard=False)  # (another packs per process: exact)
    assert other.step == 3
    other.resume([{"step": 2}], reshard=False)  # (a state saved before the fingerprint was: its step)
    assert other.step == 2
    with pytest.raises(DataStateError, match="a records pipeline's"):  # as data.kind=records saved it
        src.resume([{"fingerprint": "x", "iterator": {}}], reshard=False)
