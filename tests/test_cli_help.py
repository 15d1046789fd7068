"""Every command-line entry point builds its parser and renders --help (catches e.g. a stray '%')."""

import importlib

import pytest

MODULES = ["echo4o_jax.eval.geneval", "echo4o_jax.eval.geneval_pp", "echo4o_jax.eval.imagine_bench",
           "echo4o_jax.eval.omnicontext", "echo4o_jax.eval.run", "echo4o_jax.generate"]


@pytest.mark.parametrize("name", MODULES)
def test_help_renders(name):
    mod = importlib.import_module(name)
    text = mod.build_parser().format_help()
    assert "usage:" in text and "--" in text
