"""Judge-based evaluation: GenEval++, Imagine-Bench and OmniContext with a GPT-4.1 (or any
OpenAI-compatible) vision judge; and the original GenEval, whose official object-detector evaluator runs
outside this tool (:mod:`.geneval` lays the images out for it and reads its results back).

Command lines::

    python -m echo4o_jax.eval.geneval_pp    --images DIR --prompts geneval_pp.jsonl    --out DIR
    python -m echo4o_jax.eval.imagine_bench --images DIR --prompts imagine_bench.jsonl --out DIR
    python -m echo4o_jax.eval.omnicontext   --images DIR --data metadata.jsonl         --out DIR
    python -m echo4o_jax.eval.geneval       --images DIR --prompts geneval_metadata.jsonl --out DIR
    python -m echo4o_jax.eval.run --ckpt DIR --bench geneval_pp,imagine_bench --out DIR

Images inside ``--images DIR`` are named ``<stem>_<k>.png`` (k = 0 .. num_images-1), the names
``echo4o_jax.generate.generate_batch`` writes for a request id ``<stem>``; see
:mod:`echo4o_jax.eval.common`. The API key comes from the environment (``OPENAI_API_KEY`` or
``--api-key-env NAME``) and is never written anywhere.

Modules: :mod:`.judge` (client, templates, parsing, cache), :mod:`.geneval_pp`, :mod:`.imagine_bench`,
:mod:`.omnicontext`, :mod:`.geneval`, :mod:`.run`, :mod:`.reference` (reported numbers, public URLs), :mod:`.common`.
"""
