"""Synthesised data trains: the three GPT-4o tracks (against the fake OpenAI server) write datasets that the
records pipeline packs and the train command trains on, beside each other as the README says."""

from __future__ import annotations

import json
import pathlib

from synth_fakes import _api_key, data_gen, fast_cli_args, small_image_folder, synth_server  # noqa: F401

from echo4o_jax.data.demo import build_tokenizer
from echo4o_jax.train.__main__ import run
from test_train import load_config

TRACKS = ("surreal", "instruction", "multiref")


def test_synthesised_tracks_train_together(tmp_path):
    root = tmp_path / "records"
    with synth_server() as server:
        args = ["64x64" if a == "32x32" else a for a in fast_cli_args(server)]  # the demo model's image size
        refs = small_image_folder(tmp_path / "refs", {"human": 2, "object": 2, "scene": 2})
        for track in TRACKS:
            extra = ["--refs", refs] if track == "multiref" else []
            rc, _, err = data_gen(track, "--out", root / f"my_{track}", "--limit", 4, *args, *extra)
            assert rc == 0, err
    tok = tmp_path / "tokenizer.json"
    build_tokenizer().save(str(tok))
    c = load_config("demo")
    c.data.records = dict(demo_dir="", workers=0, root=str(root), allow_incomplete=False,
                          datasets=[dict(path=f"my_{t}", weight=1.0) for t in TRACKS],
                          vae_transform=(64, 32, 16), vit_transform=(56, 28, 14))
    c.data.tokenizer = str(tok)
    c.train.steps, c.log.every, c.log.sample_every, c.log.tensorboard = 3, 1, 0, False
    wd = tmp_path / "wd"
    assert run(c, str(wd)) == 0
    logged = [json.loads(x) for x in pathlib.Path(wd, "log.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # every step trains on synthesised images: the flow-matching loss over their target tokens (generation
    # samples carry no CE tokens: BAGEL trains text only on understanding data)
    assert all(r["mse_tokens"] > 0 and r["loss_mse"] > 0 and r["ce_tokens"] == 0 and r["ok"] for r in steps), steps
