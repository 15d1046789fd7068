"""The three synthesis tracks against the fake OpenAI server: valid records, the calls they make, plans,
dry-run numbers (echo4o_jax.synth, python -m data_gen)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from synth_fakes import (API_KEY, _api_key, data_gen, fast_cli_args, fast_config, message_images,  # noqa: F401
                         one_line_error, server, small_image_folder)

from echo4o_jax.data.records import RecordReader
from echo4o_jax.synth import SynthConfig, dry_run, get_template, make_track, run_track
from echo4o_jax.synth.client import chat_cost, image_cost

SURREAL_TYPES = {"attribute_shift", "hybridization", "spatiotemporal_anomaly", "multi_object"}


def make_cfg(server, **kw) -> SynthConfig:
    return fast_config(server, **kw)


def read_records(path):
    r = RecordReader(path, verify=True)
    recs = list(r)
    for rec in recs:
        rec.validate()
    return r.manifest, recs


def test_surreal_records(server, tmp_path):
    track = make_track("surreal", make_cfg(server, concurrency=3))
    s = run_track(track, tmp_path / "ds", limit=10, progress=False)
    assert s.complete and s.written == 10 and s.failed == 0 and not s.skipped
    manifest, recs = read_records(tmp_path / "ds")
    assert manifest["complete"] and manifest["counts"]["subset"] == {"surreal": 10}
    assert [r.id for r in recs] == [f"gpt4o/surreal/{i:07d}" for i in range(10)]  # sample order
    objects = set()
    deflect_prompts = {}
    for req in server.calls("/v1/chat/completions"):
        assert req.headers["authorization"] == f"Bearer {API_KEY}"
    for rec in recs:
        assert (rec.task, rec.source, rec.subset) == ("t2i", "gpt4o", "surreal")
        m = rec.meta
        assert m["type"] in SURREAL_TYPES
        assert len(m["objects"]) == (2 if m["type"] == "multi_object" else 1)
        assert [a["object"] for a in m["attributes"]] == m["objects"]
        assert m["templates"] == {"surreal_attributes": "surreal_attributes/1", "surreal_deflect": "surreal_deflect/1"}
        assert rec.texts[0].startswith("A surreal photo") and m["type"] in rec.texts[0]
        assert rec.image_info[0].format == "png" and (rec.image_info[0].width, rec.image_info[0].height) == (32, 32)
        objects.update(m["objects"])
        deflect_prompts[rec.texts[0]] = rec.images[0]
    # one attribute call per distinct object (shared), one deflection + one image per sample
    chats = server.calls("/v1/chat/completions")
    attr_calls = [c for c in chats if "List the normal attributes" in c.json["messages"][-1]["content"]]
    assert len(attr_calls) == len(objects)
    assert len(chats) - len(attr_calls) == 10
    gens = server.calls("/v1/images/generations")
    assert len(gens) == 10
    for g in gens:  # each record's image is the image generated from its own prompt
        assert g.json["prompt"] in deflect_prompts and g.json["model"] == "gpt-image-1" and g.json["size"] == "32x32"
    assert all(c.json["model"] == "gpt-4o" for c in chats)


def test_instruction_records_keep_both_texts(server, tmp_path):
    cfg = make_cfg(server, concurrency=2)
    track = make_track("instruction", cfg)
    s = run_track(track, tmp_path / "ds", limit=9, progress=False)
    assert s.complete and s.written == 9
    _, recs = read_records(tmp_path / "ds")
    rewrites = [c for c in server.calls("/v1/chat/completions") if message_images(c)]
    assert len(rewrites) == 9
    sent_images = {hashlib.sha256(base64.b64decode(message_images(c)[0].split(",", 1)[1])).hexdigest()
                   for c in rewrites}
    for rec in recs:
        m = rec.meta
        assert rec.subset == "instruction" and rec.task == "t2i"
        lo, hi = cfg.instruction_bins[m["difficulty"]][:2]
        assert lo <= m["num_constraints"] == len(m["constraints"]) <= hi
        assert rec.texts[0] == f"{m['prompt_original']} (rewritten " + rec.texts[0].rsplit("(rewritten ", 1)[1]
        assert m["prompt_original"].startswith("A natural prompt") and m["rewrite"]["changed"] is True
        assert m["rewrite"]["mismatches"] == ["count"] and m["rewrite"]["matches"] is False
        assert hashlib.sha256(rec.images[0]).hexdigest() in sent_images  # the vision model saw this image
        assert set(m["templates"]) == {"instruction_prompt", "instruction_rewrite"}


def test_multiref_generated_references(server, tmp_path):
    cfg = make_cfg(server, concurrency=3, generated_refs_per_category=3)
    track = make_track("multiref", cfg)
    s = run_track(track, tmp_path / "ds", limit=8, progress=False)
    assert s.complete and s.written == 8
    _, recs = read_records(tmp_path / "ds")
    edits = server.calls("/v1/images/edits")
    assert len(edits) == 8
    by_prompt = {e.form["prompt"]: e for e in edits}
    used_refs = set()
    for rec in recs:
        assert rec.task == "multiref" and rec.subset == "multiref"
        refs = rec.meta["references"]
        assert 2 <= len(refs) <= 4 and len(rec.images) == len(refs) + 1
        assert rec.meta["type"] in cfg.multiref_combos and len(rec.meta["uses"]) == len(refs)
        used_refs.update(r["id"] for r in refs)
        e = by_prompt[rec.texts[0]]
        sent = [hashlib.sha256(d).hexdigest() for _, d in next(iter(e.files.values()))]
        assert sent == [hashlib.sha256(b).hexdigest() for b in rec.images[:-1]]  # every reference, in order
        assert rec.plan[-1] == {"type": "vae_image", "loss": 1, "enable_cfg": 0, "special_token_loss": 0,
                                "special_token_label": None, "image": len(refs)}
    # each generated reference is made once, however many samples use it
    assert len(server.calls("/v1/images/generations")) == len(used_refs)


def test_multiref_folder_references_kept_verbatim(server, tmp_path):
    refs = small_image_folder(tmp_path / "refs", {"humans": 2, "object": 3, "scenes": 2})
    track = make_track("multiref", make_cfg(server, concurrency=2), refs_dir=refs)
    s = run_track(track, tmp_path / "ds", limit=6, progress=False)
    assert s.complete and s.written == 6
    assert not server.calls("/v1/images/generations")
    _, recs = read_records(tmp_path / "ds")
    for rec in recs:
        for info, b in zip(rec.meta["references"], rec.images[:-1]):
            assert info["source"] == "folder"
            assert (Path(refs) / info["file"]).read_bytes() == b  # bytes as found, never re-encoded
        cats = [r["category"] for r in rec.meta["references"]]
        assert len({r["id"] for r in rec.meta["references"]}) == len(cats)  # distinct references
        assert cats == sorted(cats, key=("human", "object", "scene").index)


def test_reference_folders_in_any_case_and_dropped_combinations_named(server, tmp_path, caplog):
    """`Scene/` or `HUMANS/` are the scene and human pools (they were ignored, and every combination with a
    scene silently dropped); combinations the pools cannot fill are named in a warning."""
    from echo4o_jax.synth.tracks import scan_refs

    refs = small_image_folder(tmp_path / "refs", {"HUMANS": 2, "Object": 3, "Scene": 2})
    assert {c: len(p) for c, p in scan_refs(refs).items()} == {"human": 2, "object": 3, "scene": 2}
    track = make_track("multiref", make_cfg(server), refs_dir=refs)
    assert "hum_obj_sce" in track.combos and "hum_hum_obj_sce" in track.combos
    small = small_image_folder(tmp_path / "small", {"human": 1, "object": 3})
    caplog.set_level("WARNING")
    track = make_track("multiref", make_cfg(server), refs_dir=small)
    assert set(track.combos) == {"obj_obj", "any_two", "hum_obj"}
    warned = [r.getMessage() for r in caplog.records if "too small for the combinations" in r.getMessage()]
    assert len(warned) == 1 and "'hum_hum'" in warned[0] and "'hum_obj_sce'" in warned[0]
    assert "{'human': 1, 'object': 3, 'scene': 0}" in warned[0]


def test_reference_folder_with_a_file_that_is_no_image_is_refused(server, tmp_path):
    """Refused before any call, naming the file (a truncated file, whose header reads, fails only the
    samples that use it: test_synth_faults)."""
    refs = small_image_folder(tmp_path / "refs", {"humans": 2, "object": 3, "scenes": 2})
    Path(refs, "object", "object_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(ValueError, match=r"1 image file\(s\) cannot be read: object/object_0.png \("):
        make_track("multiref", make_cfg(server), refs_dir=refs)
    assert not server.requests


def test_plans_are_deterministic_and_seeded():
    cfg = SynthConfig()
    for name in ("surreal", "instruction", "multiref"):
        a, b = make_track(name, cfg), make_track(name, SynthConfig())
        assert [a.plan(i) for i in range(30)] == [b.plan(i) for i in range(30)]
        c = make_track(name, SynthConfig(seed=1))
        assert [a.plan(i) for i in range(30)] != [c.plan(i) for i in range(30)]
    surreal = make_track("surreal", cfg)
    types = {surreal.plan(i)["type"] for i in range(200)}
    assert types == SURREAL_TYPES
    instr = make_track("instruction", cfg)
    bins = {instr.plan(i)["difficulty"] for i in range(200)}
    assert bins == {"easy", "medium", "hard"}


def test_templates_are_versioned_files():
    for name in ("surreal_attributes", "surreal_deflect", "multiref_instruction", "instruction_prompt",
                 "instruction_rewrite", "ref_human", "ref_object", "ref_scene"):
        t = get_template(name)
        assert t.version.startswith(name + "/") and os.path.isfile(t.path)


def test_template_override_changes_version(server, tmp_path):
    src = get_template("instruction_prompt").path
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    text = Path(src).read_text().replace("instruction_prompt/1", "instruction_prompt/2-lab")
    (tdir / "instruction_prompt.txt").write_text(text)
    track = make_track("instruction", make_cfg(server, template_dir=str(tdir)))
    run_track(track, tmp_path / "ds", limit=2, progress=False)
    _, recs = read_records(tmp_path / "ds")
    assert all(r.meta["templates"]["instruction_prompt"] == "instruction_prompt/2-lab" for r in recs)


def test_dry_run_numbers(server, tmp_path):
    cfg = make_cfg(server)
    track = make_track("surreal", cfg)
    n = 20
    plans = [track.plan(i) for i in range(n)]
    objects = {o for p in plans for o in p["objects"]}
    est = dry_run(track, tmp_path / "ds", limit=n)
    rows = {(r["model"], r["kind"]): r for r in est["calls"]}
    assert rows[("gpt-4o", "chat")]["calls"] == len(objects) + n
    assert rows[("gpt-image-1", "image")]["calls"] == n
    per_image = cfg.prices["gpt-image-1"]["per_image"]["1024x1024"]["high"]  # 32x32 is not in the table
    assert rows[("gpt-image-1", "image")]["usd"] == pytest.approx(n * per_image, rel=1e-6)
    assert est["total_calls"] == len(objects) + 2 * n
    assert not (tmp_path / "ds").exists() and not server.requests  # no file, no call
    # after 5 samples: 15 to make, and attribute calls already journaled are free
    run_track(track, tmp_path / "ds", limit=5, progress=False)
    est2 = dry_run(track, tmp_path / "ds", limit=n)
    assert (est2["mode"], est2["start"], est2["samples"]) == ("append", 5, 15)
    rest = {o for p in plans[5:] for o in p["objects"]}
    first = {o for p in plans[:5] for o in p["objects"]}
    rows2 = {(r["model"], r["kind"]): r for r in est2["calls"]}
    assert rows2[("gpt-4o", "chat")]["calls"] == len(rest - first) + 15
    assert est2["journaled_calls_skipped"] == len(rest & first)
    # multiref: an edit per sample with its references priced in, generated references counted once
    mcfg = make_cfg(server, generated_refs_per_category=4)
    mt = make_track("multiref", mcfg)
    m = dry_run(mt, None, limit=10)
    mrows = {(r["model"], r["kind"]): r for r in m["calls"]}
    mplans = [mt.plan(i) for i in range(10)]
    assert mrows[("gpt-image-1", "edit")]["calls"] == 10
    assert mrows[("gpt-image-1", "image")]["calls"] == len({r for p in mplans for r in p["refs"]})
    n_in = sum(len(p["refs"]) for p in mplans)
    assert mrows[("gpt-image-1", "edit")]["usd"] == pytest.approx(
        10 * per_image + n_in * mcfg.prices["gpt-image-1"]["per_input_image"], rel=1e-6)
    assert mrows[("gpt-4o", "chat")]["calls"] == 10


def test_cost_functions():
    prices = SynthConfig().prices
    assert chat_cost(prices, "gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    assert chat_cost(prices, "gpt-4o", 0, 1_000_000) == pytest.approx(10.0)
    assert chat_cost(prices, "unknown-model", 10**6, 10**6) == 0.0
    assert image_cost(prices, "gpt-image-1", "1024x1024", "medium") == pytest.approx(0.042)
    assert image_cost(prices, "gpt-image-1", "1536x1024", "high", n_inputs=2) == pytest.approx(0.25 + 2 * 0.0065)
    # size auto (the model picks the shape): priced as the dearest shape (1536x1024), not as the square one
    for q in ("high", "medium", "low"):
        auto = image_cost(prices, "gpt-image-1", "auto", q)
        assert auto == image_cost(prices, "gpt-image-1", "1536x1024", q) > image_cost(prices, "gpt-image-1",
                                                                                     "1024x1024", q)
    usage = {"input_tokens": 50, "output_tokens": 4160, "input_tokens_details": {"text_tokens": 50, "image_tokens": 0}}
    assert image_cost(prices, "gpt-image-1", "1024x1024", "high", usage=usage) == pytest.approx(
        (50 * 5 + 4160 * 40) / 1e6)


def test_config_file_and_manifest_info(server, tmp_path, monkeypatch):
    from echo4o_jax.synth import load_config

    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"seed": 7, "surreal_types": {"attribute_shift": 1.0}, "prices": {"x": {}}}))
    cfg = load_config(p, base_url=server.base_url, image_size="32x32", chat_rpm=0, image_rpm=0)
    assert cfg.seed == 7 and "gpt-4o" in cfg.prices and "x" in cfg.prices
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(None, **{"no_such_key": 1})
    s = run_track(make_track("surreal", cfg), tmp_path / "ds", limit=3, progress=False)
    assert s.complete
    manifest, recs = read_records(tmp_path / "ds")
    assert {r.meta["type"] for r in recs} == {"attribute_shift"}
    info = manifest["info"]["synth"]
    assert info["config"]["seed"] == 7 and info["items"] == 3 and info["config"]["base_url"] == server.base_url
    # credentials in a base URL are refused (the client would send them instead of the environment's key), in
    # the environment's OPENAI_BASE_URL too (it was not checked); that one is recorded as the client's base URL
    with pytest.raises(ValueError, match="carries credentials"):
        SynthConfig(base_url="http://user:pw@example.test:8000/v1")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:pw@example.test:8000/v1")
    with pytest.raises(ValueError, match=r"^the environment variable OPENAI_BASE_URL .*: 'http://example.test:8000/v1' "
                                         r"carries credentials") as ei:
        SynthConfig()
    assert "pw" not in str(ei.value)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.test:8000/v1/")
    assert SynthConfig().to_public_dict()["base_url"] == "http://example.test:8000/v1/"
    with pytest.raises(ValueError, match="carries a query"):  # (a query is refused: the client appends paths)
        SynthConfig(base_url="http://example.test:8000/v1?token=abc")


def test_data_dir_overrides_word_lists(tmp_path):
    (tmp_path / "humans.txt").write_text("# mine\na lab technician in a white coat\n")
    cfg = SynthConfig(data_dir=str(tmp_path), generated_refs_per_category=2)
    track = make_track("multiref", cfg)
    assert {r.subject for r in track.pools["human"]} == {"a lab technician in a white coat"}
    assert "a lab technician in a white coat" in track.ref_prompt(track.pools["human"][0])
    from echo4o_jax.synth import fingerprint

    assert fingerprint(track) != fingerprint(make_track("multiref", SynthConfig(generated_refs_per_category=2)))


def test_progress_bar_shows_calls_failures_spend(server, tmp_path):
    import io

    buf = io.StringIO()
    run_track(make_track("surreal", make_cfg(server)), tmp_path / "ds", limit=3, progress=True, stream=buf)
    text = buf.getvalue()
    for field in ("calls=", "failed=", "usd=", "3/3"):
        assert field in text, text


@pytest.mark.parametrize("content,expected", [
    ('{"concurrency": "4"}', 'concurrency: expected an integer >= 1, got string "4"'),
    ('{"image_size": 1024}', "image_size: expected a string, got integer 1024"),
    ('{"max_failures": "x"}', 'max_failures: expected an integer >= 0, got string "x"'),
    ('{"timeout": -1}', "timeout: expected a number > 0, got integer -1"),
    ('{"refusal_patterns": "sorry"}', 'refusal_patterns: expected a list of strings, got string "sorry"'),
    ('{"surreal_types": {"hybridization": "1"}}', "surreal_types: expected an object of numbers, got object"),
    ('{"prices": {"gpt-4o": {"input_per_1m": "2.5"}}}',
     "prices['gpt-4o']['input_per_1m']: expected a number >= 0 (USD), got string \"2.5\""),
    ('{"seed": 1,\n}', "not valid JSON (Expecting property name enclosed in double quotes: line 2"),
    ('[1, 2]', "expected a JSON object, got list"),
], ids=["str-int", "int-str", "max_failures", "timeout", "patterns", "weights", "prices", "bad-json", "not-object"])
def test_bad_config_file_is_refused_before_any_call(server, tmp_path, content, expected):
    """Each value of a --config file is checked (type and range) up front: one line naming the file, the
    key, what it expects and what it got; exit status 2; no call, no file (dry run or not)."""
    cfg = tmp_path / "my config.json"
    cfg.write_text(content)
    for dry in ([], ["--dry-run"]):
        rc, out, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 2, "--config", cfg,
                                *fast_cli_args(server), *dry)
        assert rc == 2 and not out
        assert one_line_error(err).startswith(f"error: config file {cfg}: {expected}")
    assert not server.requests and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("option,value,expected", [
    ("--timeout", "-1", "timeout: expected a number > 0, got number -1.0"),
    ("--concurrency", "0", "concurrency: expected an integer >= 1, got integer 0"),
    ("--backoff-max", "nan", "backoff_max: expected a number >= 0, got number NaN"),
    ("--shard-bytes", "0", "shard_bytes: expected an integer >= 1, got integer 0"),
    ("--image-size", "1024", 'image_size: expected WIDTHxHEIGHT (e.g. 1024x1024) or auto, got string "1024"'),
    ("--image-quality", "hihg", "image_quality: gpt-image-1 knows ['auto', 'high', 'low', 'medium'], got string "
     "\"hihg\" (the qualities of prices['gpt-image-1']['per_image']: add one there if your server takes it)"),
])
def test_bad_command_line_setting_is_refused_before_any_call(server, tmp_path, option, value, expected):
    rc, out, err = data_gen("instruction", "--out", tmp_path / "ds", "--limit", 2, *fast_cli_args(server),
                            option, value)
    assert rc == 2 and one_line_error(err) == f"error: command line: {expected}"
    assert not server.requests and not (tmp_path / "ds").exists()


def test_config_values_are_checked_in_code_too():
    with pytest.raises(ValueError, match=r"^max_image_pixels: expected an integer >= 1 or null, got integer 0$"):
        SynthConfig(max_image_pixels=0)
    with pytest.raises(ValueError, match=r"^multiref_combos\['x'\]: expected \[list of categories, weight >= 0\]"):
        SynthConfig(multiref_combos={"x": ["human", 1.0]})
    with pytest.raises(ValueError, match=r"^instruction_bins\['easy'\]: expected \[min constraints, .* got a list of 3"):
        SynthConfig().update({"instruction_bins": {"easy": [1, 2, 1]}})
    with pytest.raises(ValueError, match=r"^prices\['gpt-4o'\]: unknown key 'input_per_1M'"):
        SynthConfig().update({"prices": {"gpt-4o": {"input_per_1M": 2.5}}})
    with pytest.raises(ValueError, match=r"^refusal_patterns\[0\]: not a regular expression"):
        SynthConfig(refusal_patterns=["(sorry"])
    with pytest.raises(ValueError, match=r"^image_quality: gpt-image-1 knows .* got string \"standard\""):
        SynthConfig(image_model="dall-e-3", edit_model="gpt-image-1", image_quality="standard")
    assert SynthConfig(image_model="dall-e-3", image_quality="standard").image_quality == "standard"  # no table
    assert SynthConfig(prices={"gpt-image-1": {"per_image": {"32x32": {"draft": 0.001}}}}, image_quality="draft")
    cfg = SynthConfig().update({"timeout": 30, "refusal_patterns": ["^no"], "max_image_pixels": None})
    assert cfg.timeout == 30 and cfg.refusal_patterns == ("^no",) and cfg.max_image_pixels is None


def _edited_templates(tmp_path, name: str, old: str, new: str) -> Path:
    tdir = tmp_path / "templates"
    tdir.mkdir(exist_ok=True)
    text = Path(get_template(name).path).read_text()
    assert old in text
    (tdir / f"{name}.txt").write_text(text.replace(old, new))
    return tdir


def test_template_with_an_unknown_placeholder_is_refused_before_any_call(server, tmp_path):
    """Checked when the track is built, so --dry-run finds it too: one line naming the template file and
    the placeholder, exit status 2, no call and no file."""
    tdir = _edited_templates(tmp_path, "surreal_deflect", "Variation hint: {{hint}}",
                             "Variation hint: {{hint}} {{nothing}}")
    tfile = tdir / "surreal_deflect.txt"
    with pytest.raises(ValueError) as ei:
        make_track("surreal", make_cfg(server, template_dir=str(tdir)))
    assert str(ei.value) == (f"template file {tfile} uses {{{{nothing}}}}, which the surreal track does not fill in "
                             "surreal_deflect (it fills {{deflection_type}}, {{hint}}, {{objects}})")
    for dry in ([], ["--dry-run"]):
        rc, out, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 2, "--template-dir", tdir,
                                *fast_cli_args(server), *dry)
        assert rc == 2 and not out
        assert one_line_error(err) == f"error: {ei.value}"
    assert not server.requests and not (tmp_path / "ds").exists()


def test_template_option_and_folder_errors_name_the_file(server, tmp_path):
    """A template option that does not parse, or a template / word list folder that does not exist: one line
    naming the file or folder, before any call (a bad temperature once failed each sample after its
    calls)."""
    tdir = _edited_templates(tmp_path, "instruction_rewrite", "# temperature: 0", "# temperature: warm")
    with pytest.raises(ValueError, match=f"^template file {tdir / 'instruction_rewrite.txt'}: '# temperature: warm' "
                                         "is not a number$"):
        make_track("instruction", make_cfg(server, template_dir=str(tdir)))
    (tdir / "ref_scene.txt").write_bytes(b"# version: \xff\n")  # not UTF-8
    rc, _, err = data_gen("multiref", "--out", tmp_path / "ds", "--limit", 1, "--template-dir", tdir, "--dry-run")
    assert rc == 2 and str(tdir / "ref_scene.txt") in one_line_error(err)
    # a --template-dir / --data-dir that does not exist is refused (not silently replaced by the built-ins)
    rc, _, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 1, "--template-dir", tmp_path / "nope",
                          "--dry-run")
    assert rc == 2
    assert one_line_error(err) == f"error: template folder {tmp_path / 'nope'} does not exist (or is not a folder)"
    rc, _, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 1, "--data-dir", tmp_path / "nope",
                          "--dry-run")
    assert rc == 2
    assert one_line_error(err) == f"error: word list folder {tmp_path / 'nope'} does not exist (or is not a folder)"
    # an edited copy under a misspelt name would be ignored (the built-in used): refused, naming it
    typo = tmp_path / "typo"
    typo.mkdir()
    (typo / "surreal_deflec.txt").write_text("# version: mine\n[user]\nhi\n")
    rc, _, err = data_gen("surreal", "--out", tmp_path / "ds", "--limit", 1, "--template-dir", typo, "--dry-run")
    assert rc == 2
    line = one_line_error(err)
    assert line.startswith(f"error: template folder {typo}: surreal_deflec.txt is no synthesis template (the "
                           "templates: ") and "surreal_deflect.txt" in line, line
    assert not server.requests
