"""Which golden folders the golden tests run over (conftest.golden_dirs): a folder of the same layout with
other sizes, dropped into tests/golden/ or the checkout's ../shared/golden/, is picked up by default."""

from __future__ import annotations

import pytest

import conftest


def _folder(parent, name, content=b"{}"):
    d = parent / name
    d.mkdir(parents=True)
    (d / "llm_config.json").write_bytes(content)
    return d


def test_bundled_and_shared_folders_are_found_and_identical_copies_run_once(tmp_path, monkeypatch):
    bundled, shared = tmp_path / "tests" / "golden", tmp_path / "shared" / "golden"
    a = _folder(bundled, "bagel_tiny_a")
    _folder(shared, "bagel_tiny_a")                 # byte-identical copy: run once
    b = _folder(shared, "bagel_tiny_b", b'{"x": 1}')  # other sizes: run too
    (shared / "README.md").write_text("not a folder")
    (shared / "notes").mkdir()                      # no llm_config.json: not a golden folder
    monkeypatch.delenv("ECHO4O_GOLDEN_DIRS", raising=False)
    monkeypatch.setattr(conftest, "DEFAULT_GOLDEN", bundled / "bagel_tiny_a")
    monkeypatch.setattr(conftest, "SHARED_GOLDEN", shared)
    assert conftest.golden_dirs() == [a, b]

    changed = shared / "bagel_tiny_a" / "llm_config.json"
    changed.write_bytes(b'{"hidden_size": 96}')       # same name, other content: both run, ids told apart
    dirs = conftest.golden_dirs()
    assert dirs == [a, shared / "bagel_tiny_a", b]
    assert conftest.golden_ids(dirs) == ["tests-golden-bagel_tiny_a", "shared-golden-bagel_tiny_a", "bagel_tiny_b"]


def test_the_environment_variable_chooses_the_folders(tmp_path, monkeypatch):
    c = _folder(tmp_path, "c")
    monkeypatch.setenv("ECHO4O_GOLDEN_DIRS", str(c))
    assert conftest.golden_dirs() == [c]
    monkeypatch.setenv("ECHO4O_GOLDEN_DIRS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing has no llm_config.json"):
        conftest.golden_dirs()


def test_no_golden_folder_is_an_error_not_a_skip(tmp_path, monkeypatch):
    """An empty list would parametrize every golden test away (pytest skips an empty parameter set): refused."""
    monkeypatch.setenv("ECHO4O_GOLDEN_DIRS", ":")
    with pytest.raises(FileNotFoundError, match="no golden folder: ECHO4O_GOLDEN_DIRS=':' names none"):
        conftest.golden_dirs()
    monkeypatch.delenv("ECHO4O_GOLDEN_DIRS")
    monkeypatch.setattr(conftest, "DEFAULT_GOLDEN", tmp_path / "tests" / "golden" / "bagel_tiny_a")
    monkeypatch.setattr(conftest, "SHARED_GOLDEN", tmp_path / "shared" / "golden")
    with pytest.raises(FileNotFoundError, match="no golden folder under "):
        conftest.golden_dirs()
