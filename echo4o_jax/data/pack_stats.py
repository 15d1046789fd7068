r"""How full a training config's static pack budget is on its own data, and what budget would fit it.

    python -m echo4o_jax.data.pack_stats --config configs/echo4o_7b.py --config.model.ckpt=ckpt/bagel7b \
        --config.data.records.root=data/echo4o_records [--packs 256]

Every pack has fixed segment capacities (`data.budget`: text | vit | vae tokens, VAE image slots), and the
step's compute is spent on all of them, padding included. The packing policy is the official one (a pack
is emitted at `expected_tokens`, never beyond `max_tokens`), plus one rule of ours: a sample that would
overflow a segment closes the pack early. So a budget that is too small in one segment cuts packs short
(fewer real tokens per step than the official trainer packs), and one that is too large pads every pack.

This runs the config's records pipeline (same datasets, transforms, dropout, seed) over its first
`--packs` packs twice: with unbounded segments (what the official policy puts into a pack: real tokens,
and per segment the text / ViT / VAE tokens and VAE images, mean / p50 / p99 / max), then with the
config's budget (real tokens per pack and fill = real tokens / capacity: the share of the step's token
compute that is not padding). It ends with the smallest budget under which the packer would have taken
every sample it took in the unbounded run (each segment's largest usage + no-dropout need at a sample's
admission; tokens rounded up to multiples of `--round`), i.e. would pack these samples as the official
policy does. If the config leaves `data.max_tokens` / `expected_tokens` unset they follow the budget's
total: set them before changing the budget.

Exit status 0, or 2 for bad input, reported as by the train command in one `error:` line: an unknown flag or
config key, a bad value, a model / data mismatch (transforms, tokenizer), missing, unreadable or incomplete
records (an incomplete dataset is used, with a warning, under --config.data.records.allow_incomplete=True).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..packing import PackBudget, PackedBatch

__all__ = ["segment_usage", "pack_stats", "suggested_budget", "format_report"]

SEGMENTS = ("text", "vit", "vae", "vae_images", "total")


def segment_usage(batch: PackedBatch) -> np.ndarray:
    """[packs, 5] int: text, ViT, VAE tokens, VAE images and real tokens of each pack of a stacked batch."""
    sid = np.asarray(batch.sample_id).reshape(-1, batch.total_tokens)
    t, v = batch.text_capacity, batch.vit_capacity
    hw = np.asarray(batch.vae_image_hw).reshape(sid.shape[0], -1, 2)
    return np.stack([(sid[:, :t] >= 0).sum(1), (sid[:, t:t + v] >= 0).sum(1), (sid[:, t + v:] >= 0).sum(1),
                     (hw[:, :, 0] > 0).sum(1), (sid >= 0).sum(1)], axis=1)


def _usage(pipe, packs: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """([packs, 5] `segment_usage`, [packs, 4] the packer's peak need per segment: `stats["pack_peaks"]`,
    the last step's stats: counters and skipped samples by task / reason)."""
    rows, peaks, it = [], [], pipe.iterator()
    stats = {}
    try:
        while sum(len(r) for r in rows) < packs:
            batch, stats = next(it)
            u = segment_usage(batch)
            rows.append(u[u[:, 4] > 0])  # a finite dataset's last step is padded with empty packs
            peaks.append(np.asarray(stats["pack_peaks"], np.int64).reshape(-1, 4))
            if stats.get("end_of_data"):
                break
    finally:
        it.close()
    return np.concatenate(rows)[:packs], np.concatenate(peaks)[:packs], stats


def pack_stats(config, model_cfg, *, packs: int = 256) -> dict:
    """For a training config with a records source (`data.kind="records"`): {"unbounded": [packs, 5],
    "budget": [packs, 5]} (`segment_usage`), "unbounded_peaks" [packs, 4] (the need each segment was checked
    against in the unbounded run), "budget_spec" (the config's PackBudget) and "unbounded_spec"."""
    from ..train.data_sources import budget_from_config
    from ..train.records_source import data_config_errors, pipeline_config_from
    from .pipeline import DataPipeline, PackBudgetError

    with data_config_errors(config):  # a bad data setting is reported as the trainer reports it
        budget = budget_from_config(config.data.budget)
        pc = pipeline_config_from(config, budget, local_packs=1)
        # the packing limits stay those of the config's budget (max_tokens defaults to the budget's total)
        # precomputed latents change no size, pack or dropout draw: measured on the records' images
        pc = dataclasses.replace(pc, max_num_tokens=pc.max_tokens, max_num_tokens_per_sample=pc.max_tokens_per_sample,
                                 vae_latents="", vae_fingerprint="")
        # unbounded: every segment can take a whole pack; the VAE slots as many images as max_tokens allows
        per_image = max(1, (pc.vae_transform.min_size // (model_cfg.vae.downsample * model_cfg.latent_patch_size)) ** 2)
        free = PackBudget(text_tokens=pc.max_tokens, vit_tokens=pc.max_tokens, vae_tokens=pc.max_tokens,
                          vae_images=max(budget.vae_images, pc.max_tokens // per_image),
                          vae_image_size=budget.vae_image_size)
        unbounded, budgeted = DataPipeline(dataclasses.replace(pc, budget=free), model_cfg), DataPipeline(pc, model_cfg)
    out = {}
    out["unbounded"], out["unbounded_peaks"], out["unbounded_stats"] = _usage(unbounded, packs)
    try:
        out["budget"], _, out["budget_stats"] = _usage(budgeted, packs)
    except PackBudgetError as e:  # nothing fits the config's budget: say which budget does
        sug = suggested_budget(out["unbounded_peaks"], budget)
        raise PackBudgetError(f"{e}; on this data: --config.data.budget.text_tokens={sug.text_tokens} "
                              f"--config.data.budget.vit_tokens={sug.vit_tokens} --config.data.budget.vae_tokens="
                              f"{sug.vae_tokens} --config.data.budget.vae_images={sug.vae_images}") from None
    out["max_tokens_per_sample"] = pc.max_tokens_per_sample
    out["budget_spec"], out["unbounded_spec"] = budget, free
    return out


def suggested_budget(peaks: np.ndarray, budget: PackBudget, round_to: int = 256) -> PackBudget:
    """The smallest budget (tokens rounded up to `round_to`) under which the packer takes every sample it took
    in the run whose per-pack peak needs are `peaks` ([packs, 4]: text, vit, vae tokens, VAE images)."""
    up = lambda x: int(math.ceil(max(int(x), 1) / round_to) * round_to)
    mx = peaks.max(0)
    return PackBudget(text_tokens=up(mx[0]), vit_tokens=up(mx[1]), vae_tokens=up(mx[2]),
                      vae_images=max(1, int(mx[3])), vae_image_size=budget.vae_image_size)


def format_report(s: dict, round_to: int = 256) -> str:
    b: PackBudget = s["budget_spec"]
    caps = (b.text_tokens, b.vit_tokens, b.vae_tokens, b.vae_images, b.total_tokens)
    lines = [f"{'':<26}" + "".join(f"{n:>11}" for n in SEGMENTS)]
    for name in ("unbounded", "budget"):
        u = s[name]
        for stat, f in (("mean", np.mean), ("p50", np.median), ("p99", lambda x: np.percentile(x, 99)), ("max", np.max)):
            lines.append(f"{name + ' ' + stat + f' ({len(u)} packs)':<26}" + "".join(f"{f(u[:, j]):>11.0f}" for j in range(5)))
    lines.append(f"{'config budget':<26}" + "".join(f"{c:>11}" for c in caps))
    real_free, real = s["unbounded"][:, 4].mean(), s["budget"][:, 4].mean()
    sug = suggested_budget(s["unbounded_peaks"], b, round_to)
    lines += [
        f"real tokens per pack: {real:.0f} with the config's budget, {real_free:.0f} as the official policy packs "
        f"({real / real_free:.1%})",
        f"fill (real tokens / {b.total_tokens} capacity): {real / b.total_tokens:.1%}",
        f"smallest budget taking every sample the official policy packed here: text_tokens={sug.text_tokens}, vit_tokens={sug.vit_tokens}, "
        f"vae_tokens={sug.vae_tokens}, vae_images={sug.vae_images} ({sug.total_tokens} tokens; fill "
        f"{real_free / sug.total_tokens:.1%} at the official policy's {real_free:.0f} real tokens per pack)",
    ]
    budget_reasons = set()
    for name in ("unbounded", "budget"):
        st = s.get(f"{name}_stats") or {}
        if not st:
            continue
        by = st.get("skipped_by", {})
        detail = ", ".join(f"{k}: {n}" for k, n in by.items())
        lines.append(f"{name} run: {st['samples_packed']} samples packed, {st['skipped_too_long']} skipped as too long"
                     + (f" ({detail})" if detail else "") + f", {st['skipped_errors']} failed to load")
        if name == "budget":
            budget_reasons = {k.split("/", 1)[1] for k in by} - {"max_tokens_per_sample", "max_tokens"}
    if any(k.endswith("/max_tokens_per_sample") for k in (s.get("unbounded_stats") or {}).get("skipped_by", {})):
        lines.append(f"note: samples over max_tokens_per_sample={s.get('max_tokens_per_sample')} are skipped (as by the "
                     "official trainer); to train on them lower their dataset's image transforms or raise "
                     "data.max_tokens_per_sample (with data.max_tokens and the budget)")
    if budget_reasons:
        lines.append(f"note: the config's budget ({', '.join(sorted(budget_reasons))}) is too small for some samples "
                     "the official policy packs: they are skipped; raise it (see the smallest budget above)")
    if "unbounded_spec" in s and s["unbounded_peaks"][:, 3].max() >= s["unbounded_spec"].vae_images:
        lines.append(f"note: the unbounded run's {s['unbounded_spec'].vae_images} VAE image slots were all used in "
                     "some pack: the official policy may pack more images than shown")
    return "\n".join(lines)


def _cli() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from ..train.config_cli import bad_input, flags_parser, reporting_main

    config = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
    packs = flags.DEFINE_integer("packs", 256, "packs to sample (the first ones of the training order)")
    round_to = flags.DEFINE_integer("round", 256, "round the suggested token capacities up to this multiple")

    def main(argv) -> int:
        del argv
        from ..train.trainer import model_config_from

        if config.value is None:
            bad_input("--config is required")
        if packs.value < 1:
            bad_input(f"--packs={packs.value}: need at least 1")
        if round_to.value < 1:
            bad_input(f"--round={round_to.value}: need at least 1")
        if config.value.data.kind != "records":
            bad_input(f"data.kind={config.value.data.kind!r}: pack statistics need a records source")
        s = pack_stats(config.value, model_config_from(config.value), packs=packs.value)
        print(format_report(s, round_to.value))
        return 0

    app.run(reporting_main("pack_stats", main, interrupted="nothing was written"), flags_parser=flags_parser(config))


if __name__ == "__main__":
    _cli()
