"""Reported numbers shown beside ours, public file locations and checksums.

Sources (see ``shared/docs/echo4o.md`` §4-6): Echo-4o paper figures (``assets/radar.jpg``) for the
BAGEL / Echo-4o overall numbers; per-category GenEval++ numbers exist only for third-party rows (the
paper's per-category values for BAGEL / Echo-4o could not be retrieved), so those cells are empty.
"""

from __future__ import annotations

# --- public benchmark files (for --fetch; never bundled with the package) -----------------------
ECHO4O_RAW = "https://raw.githubusercontent.com/yejy53/Echo-4o/master/test_scripts"
GENEVAL_PP_URL = f"{ECHO4O_RAW}/Geneval%2B%2B.jsonl"
GENEVAL_PP_MD5 = "957bd4aea2d3ce4f702d5c854d7d89d3"  # 280 lines, 64,253 bytes
IMAGINE_BENCH_URL = f"{ECHO4O_RAW}/Imagine.jsonl"
IMAGINE_BENCH_MD5 = "6624cfafa28587d6018bcf4d78c06248"  # 270 records, 191,440 bytes
# the official judge scripts (--judge-prompts official reads their prompts at run time: echo4o_jax.eval.official);
# no checksum pinned: the copies they were read from could not be compared with the upstream files here
GENEVAL_PP_SCRIPT_URL = f"{ECHO4O_RAW}/Eval-gpt-4.1-geneval%2B%2B.py"
IMAGINE_BENCH_SCRIPT_URL = f"{ECHO4O_RAW}/Eval-gpt-4.1-Imagine.py"
OMNICONTEXT_URL = "https://huggingface.co/datasets/OmniGen2/OmniContext"  # user-supplied (see omnicontext.py)
# OmniContext's judge prompts (--judge-prompts official: echo4o_jax.eval.official); no checksum pinned, as above
OMNIGEN2_RAW = "https://raw.githubusercontent.com/VectorSpaceLab/OmniGen2/main/omnicontext"
OMNICONTEXT_SCRIPT_URL = f"{OMNIGEN2_RAW}/prompt_generator.py"
# GenEval's own prompt file (553 prompts, short ones); no checksum pinned: the copy it was read from
# (../shared/benchmarks/geneval_metadata.jsonl, 85,209 bytes) could not be compared with the upstream file here
GENEVAL_URL = "https://raw.githubusercontent.com/djghosh13/geneval/main/prompts/evaluation_metadata.jsonl"

# --- GenEval++ -----------------------------------------------------------------------------------
GENEVAL_PP_TAGS = (  # (tag in the jsonl, paper column)
    ("color_attr", "Color"),
    ("counting", "Count"),
    ("color_count_attr", "Color/Count"),
    ("color_spatial_attr", "Color/Pos"),
    ("spatial_count_attr", "Pos/Count"),
    ("size_spatial_attr", "Pos/Size"),
    ("multi_object_count_attr", "Multi-Count"),
)
GENEVAL_PP_REPORTED = {  # row label -> {tag or "overall": value}
    "BAGEL (paper)": {"overall": 0.371},
    "Echo-4o (paper)": {"overall": 0.679},
    "GPT-4o (3rd party: Mind-Brush)": {
        "color_attr": 0.900, "counting": 0.675, "color_count_attr": 0.725, "color_spatial_attr": 0.625,
        "spatial_count_attr": 0.600, "size_spatial_attr": 0.800, "multi_object_count_attr": 0.850,
        "overall": 0.739},
}

# --- Imagine-Bench -------------------------------------------------------------------------------
IMAGINE_TYPE_TO_CATEGORY = {
    "COLOR": "Attribute shift", "SHAPE": "Attribute shift", "SIZE": "Attribute shift",
    "MATERIAL": "Hybridization", "COMBINATION": "Hybridization",
    "TIME": "Spatiotemporal", "ENVIRONMENT": "Spatiotemporal",
    "Multi-Object": "Multi-Object",
}
IMAGINE_CATEGORIES = ("Attribute shift", "Hybridization", "Spatiotemporal", "Multi-Object")
IMAGINE_WEIGHTS = {"Attribute shift": 3, "Hybridization": 2, "Spatiotemporal": 2, "Multi-Object": 2}
# The official script's weight table names the last category "TWO_OBJECT" while its type map (and the
# released jsonl) says "Multi-Object": the category gets no weight and drops out of its overall.
IMAGINE_OFFICIAL_SCRIPT_WEIGHTS = {"Attribute shift": 3, "Hybridization": 2, "Spatiotemporal": 2,
                                   "TWO_OBJECT": 2}
IMAGINE_REPORTED = {
    "BAGEL (paper)": {"overall": 6.20},
    "Echo-4o (paper)": {"overall": 7.80},
}

# --- OmniContext ---------------------------------------------------------------------------------
OMNICONTEXT_TASKS = (
    "single_character", "single_object",
    "multiple_character", "multiple_object", "multiple_character_object",
    "scene_character", "scene_object", "scene_character_object",
)
OMNICONTEXT_GROUPS = {
    "SINGLE": ("single_character", "single_object"),
    "MULTIPLE": ("multiple_character", "multiple_object", "multiple_character_object"),
    "SCENE": ("scene_character", "scene_object", "scene_character_object"),
}
OMNICONTEXT_REPORTED = {  # group / overall numbers; "echo4o_avg" = mean(MULTIPLE, SCENE)
    "BAGEL (Echo-4o paper)": {"MULTIPLE": 6.08, "SCENE": 5.08, "echo4o_avg": 5.58},
    "Echo-4o (paper)": {"MULTIPLE": 7.94, "SCENE": 8.23, "echo4o_avg": 8.09},
    "Echo-4o (3rd party: Scone, 8 tasks)": {"overall_8": 7.95},
    "BAGEL (3rd party: Scone, 8 tasks)": {"overall_8": 6.03},
}

# --- GenEval (object detector; djghosh13/geneval) ---------------------------------------------------
GENEVAL_TASKS = (  # (tag in the metadata jsonl, column)
    ("single_object", "Single obj."),
    ("two_object", "Two obj."),
    ("counting", "Counting"),
    ("colors", "Colors"),
    ("position", "Position"),
    ("color_attr", "Color attr."),
)
GENEVAL_REPORTED = {  # overall only (echo4o.md 6.1); Echo-4o's run script defaults to the rewritten prompts
    "BAGEL (paper)": {"overall": 0.82},
    "BAGEL + prompt rewriter (BAGEL paper)": {"overall": 0.88},
    "Echo-4o (paper; likely rewritten prompts)": {"overall": 0.89},
}
