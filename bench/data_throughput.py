"""Data-loader throughput (not a test): samples/s and tokens/s of the full pipeline (record read, decode,
resize, tokenise, pack into the step's stacked batch) against what one train step consumes.

    python bench/data_throughput.py [--seconds 20] [--workers 1,2] [--res 512,1024] [--data-dir DIR]
                                    [--image-dtype uint8|float32]

Images travel as uint8 pixels (the pipeline default; the train step normalises them on device,
bit-identical); `--image-dtype float32` measures the older float32 batches (normalised in the packer).

Workloads (synthetic photo-like JPEGs, quality 90, written once into --data-dir):
  * 512 / 1024: Echo-4o-like mix, 2/3 t2i (GPT-4o sizes 1:1, 3:2, 2:3 at that scale) + 1/3 multiref with 2
    references at half that scale (two full-scale 1024 references make a ~11,900-token sample, over the
    recipe's per-sample limit: skipped, never decoded, as the official trainer skips it), loaded by the
    pipeline the trainer builds for the 7B recipe (configs/echo4o_7b.py with this dataset: `pipeline_config_from`,
    so its VAE / ViT transforms (official example.yaml: VAE (1024, 512, 16), 512-class images kept at 512; ViT
    (518, 224, 14)), token limits (expected 10240, max 11520, per sample 10240), static budget (text 1024 |
    vit 4224 | vae 11264 in 4 VAE images of up to 1024 x 1024; the first line of the run prints it),
    dropouts, drop_unfit and the trainer's worker / read buffers and threads). One process per host: 8 packs
    per step (one per device), built in the trainer's pack threads (--pack-threads overrides).
  * demo: configs/demo.py's own records pipeline (the offline demo set, 64 x 64 PNG, its budget).

Consumption per step (stated in the table):
  * 7B recipe: 8 GPUs per host, 1 pack of ~10K tokens each; the step time of the FULL 28-layer BAGEL-7B-MoT
    on one pack is the one-H100 step extrapolated from the measured 2- and 4-layer runs in bench/results/
    (configs/bagel_7b_geometry_small.py, 10,446-token packs, the recipe's remat), computed as
    bench/gpu_summary.py does (`layer_fits`: one decoder layer = the difference of the runs; 38.4% MFU by
    the official formula for remat full). The 4-layer runs' own MFU is not used: the embedding / LM-head
    term is half of their counted FLOPs.
  * demo: MEASURED in this run: the median time of configs/demo.py's train step on this machine and its
    packs per step; the demo rows run the demo's own records pipeline (its budget) per worker count.
`--latents`: the 7B workloads are measured a second time with precomputed VAE latents (`data.vae_latents`:
the loader reads the VAE images' posterior moments, bf16, instead of decoding and resizing them; ViT images
are still decoded). They are precomputed once into DATA_DIR/latents<res> (`echo4o_jax.data.latents`, rerun =
resume) with a small random VAE of the FLUX latent geometry (z 16, downsample 8): the loader's work depends
on the moments' shapes, not on the VAE's weights.
Target: loader >= 10x consumption. The CPU here has few cores; samples/s scale with worker processes
(one core each), so the table also gives samples/s per worker and the workers a host needs for 10x.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from echo4o_jax.config import BagelConfig, SpecialTokens  # noqa: E402
from echo4o_jax.train.data_sources import budget_from_config  # noqa: E402
from echo4o_jax.data import demo as demo_mod  # noqa: E402
from echo4o_jax.data.pipeline import DataPipeline, PipelineConfig  # noqa: E402
from echo4o_jax.data.records import RecordWriter, load_manifest, multiref_record, t2i_record  # noqa: E402
from echo4o_jax.image_transform import ImageTransform  # noqa: E402
from echo4o_jax.packing import PackBudget  # noqa: E402
from bench_common import out_file_problem  # noqa: E402
from train_throughput import apply_override, build_parser, load_config, measure  # noqa: E402

DEVICES_PER_HOST = 8
RECIPE = os.path.join(ROOT, "configs/echo4o_7b.py")  # the 7B fine-tune whose packs the 7B workloads build
# one-H100 runs of configs/bagel_7b_geometry_small.py differing only in their decoder layers (2026-11-27)
LAYER_RUNS = "bench/results/h100_train_pallas_gpu_*layers_2026-11-27.json"


def recipe_packing(path: str = RECIPE) -> dict:
    """The 7B recipe's packing, read from its config: budget, token limits, VAE / ViT transforms, remat."""
    c = load_config(path)
    d, r = c.data, c.data.records
    return dict(budget=budget_from_config(d.budget), expected=int(d.expected_tokens), max=int(d.max_tokens),
                per_sample=int(d.max_tokens_per_sample), vae_t=ImageTransform(*r.vae_transform),
                vit_t=ImageTransform(*r.vit_transform), remat=str(c.model.remat))


def step_7b_seconds(remat: str) -> tuple[float, str]:
    """Seconds per ~10K-token pack of the full 28-layer 7B-MoT on one H100: the step extrapolated from the
    measured 2- and 4-layer runs with this remat, as bench/gpu_summary.py computes it (see the docstring)."""
    import glob

    import gpu_summary

    runs = [(os.path.basename(f), json.load(open(f))) for f in sorted(glob.glob(os.path.join(ROOT, LAYER_RUNS)))]
    fits = [f for f in gpu_summary.layer_fits(runs) if f["remat"] == remat and not f["tuning"]]
    if len(fits) != 1:
        raise SystemExit(f"error: {LAYER_RUNS}: expected one group of remat {remat!r} runs, found {len(fits)}")
    f = fits[0]
    b = f["run"]
    return f["t28"], (f"7B: {gpu_summary.REAL_DEPTH}-layer step on one {b['device_kind']} extrapolated from its "
                      f"{f['lo']}- and {f['hi']}-layer runs (remat {remat}, {b['tokens_per_step']:.0f}-token pack): "
                      f"{f['t28']:.3f} s, {f['mfu28']:.1%} MFU (official formula)")


def _photo(rng, w, h) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ph = rng.uniform(0, 6, 6)
    a = np.stack([128 + 100 * np.sin(x / (20 + 40 * ph[c] / 6) + ph[c]) * np.cos(y / (30 + 30 * ph[c + 3] / 6))
                  for c in range(3)], -1)
    a += rng.normal(0, 12, a.shape)
    b = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(b, format="JPEG", quality=90)
    return b.getvalue()


def _words(rng, n):
    vocab = demo_mod.demo_vocabulary()[6:]
    return " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), n))


def make_photo_dataset(path: str, res: int, n: int, seed: int = 0) -> str:
    """2/3 text-to-image at `res` (1:1, 3:2, 2:3), 1/3 multi-reference: 2 references at res / 2, target at res."""
    if os.path.exists(os.path.join(path, "manifest.json")) and load_manifest(path)["records"] == n:
        return path
    rng = np.random.default_rng(seed)
    shapes = [(res, res), (res * 3 // 2, res), (res, res * 3 // 2)]
    with RecordWriter(path, name=os.path.basename(path), overwrite=True, shard_bytes=64 << 20) as w:
        for i in range(n):
            wh = shapes[i % 3]
            if i % 3 == 2:
                refs = [_photo(rng, *(x // 2 for x in shapes[(i + k) % 3])) for k in range(2)]
                w.write(multiref_record(f"p{i}", refs, _words(rng, 30), _photo(rng, *wh)))
            else:
                w.write(t2i_record(f"p{i}", _words(rng, int(rng.integers(20, 80))), _photo(rng, *wh)))
    return path


def precompute_latents(path: str, out: str, tok_path: str, budget: PackBudget, vae_t: ImageTransform,
                       vit_t: ImageTransform) -> tuple[str, str]:
    """Precomputed VAE latents (bf16 moments) of the photo dataset `path`, as `python -m echo4o_jax.data.latents`
    writes them for a records training config of that dataset and the 7B workloads' transforms, with a small
    random VAE of the FLUX latent geometry. Returns (folder, VAE fingerprint)."""
    from echo4o_jax.data.latents import precompute
    from echo4o_jax.train.config_base import base_config

    c = base_config()
    g = c.model.geometry
    g.vae = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16, downsample=8)
    g.max_latent_size, g.vit_max_num_patch_per_side = 64, 70
    g.vit.image_size = 70 * g.vit.patch_size  # (SigLIP's position table holds the 70 x 70 grid; the ViT is unused)
    c.data.kind, c.data.tokenizer = "records", tok_path
    c.data.budget = dataclasses.asdict(budget)
    c.data.records = dict(datasets=[dict(path=path, weight=1.0)], root="", demo_dir="", workers=0,
                          vae_transform=(vae_t.max_size, vae_t.min_size, vae_t.stride),
                          vit_transform=(vit_t.max_size, vit_t.min_size, vit_t.stride))
    stats = precompute(c, out, dtype="bfloat16", batch=4, log=None)
    return out, stats["vae_fingerprint"]


def recipe_pipeline_config(path: str, tok_path: str, workers: int, latents: str = "", fingerprint: str = "",
                           pack_threads: int | None = None, image_dtype: str = "uint8") -> PipelineConfig:
    """The PipelineConfig the trainer builds (`pipeline_config_from`) for the 7B recipe trained on the dataset
    at `path` alone, with `workers` loader processes (and precomputed `latents`), 8 packs per host."""
    from echo4o_jax.train.records_source import pipeline_config_from

    c = load_config(RECIPE)
    c.data.records.datasets = [dict(path=path, weight=1.0)]
    c.data.records.root, c.data.records.workers = "", workers
    c.data.tokenizer, c.data.vae_latents = tok_path, latents
    pc = pipeline_config_from(c, budget_from_config(c.data.budget), local_packs=DEVICES_PER_HOST,
                              vae_fingerprint=fingerprint)
    return dataclasses.replace(pc, image_dtype=image_dtype,
                               **({} if pack_threads is None else dict(pack_threads=pack_threads)))


def run(pipe: DataPipeline, seconds: float, warmup_steps: int = 1) -> dict:
    it = pipe.iterator()
    t_start = time.perf_counter()
    for _ in range(warmup_steps):
        next(it)
    t_first = time.perf_counter() - t_start
    n = samples = tokens = packs = 0
    tm0 = dict(it.timing)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _, st = next(it)
        n += 1
        samples += st["samples"]
        tokens += st["tokens"]
        packs += st["packs"]
    dt = time.perf_counter() - t0
    c = it.counters
    wait = (it.timing["wait_s"] - tm0["wait_s"]) / dt
    pack = (it.timing["pack_s"] - tm0["pack_s"]) / dt
    it.close()
    return {"steps": n, "samples_s": samples / dt, "tokens_s": tokens / dt, "packs_s": packs / dt,
            "fill": tokens / max(1, packs * pipe.config.budget.total_tokens), "startup_s": t_first,
            "skipped_too_long": c["skipped_too_long"], "read": c["elements_read"], "main_wait": wait,
            "main_pack": pack, "tokens_per_pack": tokens / max(1, packs)}


def demo_pipeline(config_path: str, overrides: list[str]) -> DataPipeline:
    """The DataPipeline the trainer's records source builds for this config (budget, packs per step, workers)."""
    from echo4o_jax.train.data_sources import budget_from_config
    from echo4o_jax.train.records_source import RecordsSource
    from echo4o_jax.train.trainer import model_config_from

    c = load_config(config_path)
    for kv in overrides:
        apply_override(c, kv)
    src = RecordsSource(c, model_config_from(c), budget_from_config(c.data.budget), process_index=0, process_count=1,
                        local_packs=int(c.data.packs_per_step))
    src._it.close()
    return src.pipe


def print_table(rows: list[dict]) -> None:
    print()
    print(f"CPU cores here: {os.cpu_count()}")
    hdr = ("workload", "workers", "samples/s", "tokens/s", "packs/s", "tokens/pack", "skipped", "main: wait / pack",
           "main ceiling packs/s", "step consumes", "packs/s needed", "x what a step needs", "samples/s/worker",
           "workers for 10x")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        ratio = r["packs_s"] / r["need_packs_s"]
        per_w = r["samples_s"] / max(1, r["workers"])
        samples_per_pack = r["samples_s"] / max(r["packs_s"], 1e-9)
        need_samples = 10 * r["need_packs_s"] * samples_per_pack
        w10 = "-" if r["workers"] == 0 else f"{int(np.ceil(need_samples / per_w))}"
        ceiling = r["packs_s"] / max(r["main_pack"], 1e-9)  # packs/s if the main process never waited
        print(f"| {r['workload']} | {r['workers']} | {r['samples_s']:.1f} | {r['tokens_s']:.0f} | {r['packs_s']:.2f} | "
              f"{r['tokens_per_pack']:.0f} | {r['skipped_too_long']}/{r['read']} | "
              f"{100 * r['main_wait']:.0f}% / {100 * r['main_pack']:.0f}% | {ceiling:.0f} | {r['need_note']} | "
              f"{r['need_packs_s']:.1f} | {ratio:.2f} | {per_w:.1f} | {w10} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration")
    ap.add_argument("--workers", default="1,2", help="worker processes (0 = threads in the main process, "
                                                         "always measured too)")
    ap.add_argument("--res", default="512,1024")
    ap.add_argument("--samples", type=int, default=96, help="records per synthetic dataset")
    ap.add_argument("--data-dir", default="/tmp/echo4o_bench_data")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--pack-threads", type=int, default=None, help="threads building a step's packs (default: "
                                                                    "the trainer's)")
    ap.add_argument("--demo-steps", type=int, default=5, help="timed demo train steps (consumption)")
    ap.add_argument("--table-from", default=None, help="only print the table of a --json file")
    ap.add_argument("--latents", action="store_true", help="also measure the 7B workloads with precomputed VAE "
                                                          "latents (see the docstring)")
    ap.add_argument("--image-dtype", default="uint8", choices=("uint8", "float32"),
                    help="dtype of the batches' images (PipelineConfig.image_dtype)")
    a = ap.parse_args(argv)
    if a.table_from:
        try:
            with open(a.table_from) as f:
                rows = json.load(f)
        except (OSError, ValueError) as e:  # (json's errors are ValueErrors)
            ap.error(f"--table-from {a.table_from}: {getattr(e, 'strerror', None) or e}")
        print_table(rows)
        return 0
    try:
        workers = [int(x) for x in a.workers.split(",") if x]
        resolutions = [int(r) for r in a.res.split(",") if r]
    except ValueError:
        ap.error(f"--workers {a.workers!r} / --res {a.res!r}: expected comma lists of integers")
    if any(w < 0 for w in workers) or any(r <= 0 for r in resolutions):
        ap.error("--workers must be >= 0 and --res > 0")
    if a.seconds <= 0 or a.samples <= 0 or a.demo_steps < 1 or (a.pack_threads is not None and a.pack_threads < 1):
        ap.error("--seconds and --samples must be > 0, --demo-steps and --pack-threads >= 1")
    why = out_file_problem(a.json) if a.json else None
    if why:  # (found now, not when the first row is written)
        ap.error(f"--json {a.json}: {why}")
    os.makedirs(a.data_dir, exist_ok=True)
    rows = []

    # ---------------------------------------------------------------- 7B recipe workloads
    cfg7 = BagelConfig.bagel_7b_mot()
    tok_path = os.path.join(a.data_dir, "tokenizer.json")
    demo_tok = demo_mod.build_tokenizer()
    demo_tok.save(tok_path)
    st = demo_mod.special_tokens_info(demo_tok)
    specials = SpecialTokens(st["bos_token_id"], st["eos_token_id"], st["start_of_image"], st["end_of_image"])
    cfg7 = cfg7.replace(special_tokens=specials)
    rp = recipe_packing()
    budget7 = rp["budget"]
    step7, note7 = step_7b_seconds(rp["remat"])
    need7_packs = DEVICES_PER_HOST / step7
    print(f"# 7B packs as {os.path.relpath(RECIPE, ROOT)}: budget {budget7}, expected / max / per-sample tokens "
          f"{rp['expected']} / {rp['max']} / {rp['per_sample']}", flush=True)
    print(f"# {note7}: {step7:.2f} s per pack per GPU -> {need7_packs:.1f} packs/s per {DEVICES_PER_HOST}-GPU host",
          flush=True)

    def done(r):  # one row measured: printed, and the JSON rewritten (a later stage that fails loses nothing)
        rows.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)

    for res in resolutions:
        t = time.perf_counter()
        path = make_photo_dataset(os.path.join(a.data_dir, f"photo{res}_halfrefs"), res, a.samples)
        print(f"# dataset photo{res}: {a.samples} records ready in {time.perf_counter() - t:.1f} s", flush=True)
        modes = [("", "", "")]
        if a.latents:
            t = time.perf_counter()
            out, fp = precompute_latents(path, os.path.join(a.data_dir, f"latents{res}"), tok_path, budget7,
                                         rp["vae_t"], rp["vit_t"])
            print(f"# latents{res}: ready in {time.perf_counter() - t:.1f} s", flush=True)
            modes.append((out, fp, ", latents"))
        for latents, fp, tag in modes:
            for nw in [0] + [w for w in workers if w]:  # threads (0) always, once
                pc = recipe_pipeline_config(path, tok_path, nw, latents, fp, a.pack_threads, a.image_dtype)
                r = run(DataPipeline(pc, cfg7), a.seconds)
                r.update(workload=f"{res}^2 mix{tag}", workers=nw, need_packs_s=need7_packs,
                         need_note=f"{DEVICES_PER_HOST} GPUs x 1 pack / {step7:.2f} s (H100, 28 layers extrapolated)")
                done(r)

    # ---------------------------------------------------------------- demo workload (configs/demo.py itself)
    # consumption MEASURED in this run: the demo train step's median time on this machine, fed by the
    # demo's own records source; then that source alone (the config's budget, 2 packs per step) per worker count
    demo_dir = os.path.join(a.data_dir, "demo_cfg")
    over = [f"data.records.demo_dir={demo_dir}", f"data.tokenizer={demo_dir}/tokenizer/tokenizer.json"]
    demo_cfg = os.path.join(ROOT, "configs/demo.py")
    # train_throughput's own command line (its defaults for every other setting)
    step = measure(build_parser().parse_args(["--config", demo_cfg, "--steps", str(a.demo_steps)]
                                             + [x for kv in over for x in ("--set", kv)]), None)
    step_s, packs_per_step = step["step_seconds"], step["packs_per_step"]
    print(f"# demo train step: {step_s * 1e3:.0f} ms median of {a.demo_steps} ({packs_per_step} packs per step)",
          flush=True)
    for nw in [0] + [w for w in workers if w]:  # threads (0) always, once
        r = run(demo_pipeline(demo_cfg, over + [f"data.records.workers={nw}"]), a.seconds / 2)
        r.update(workload="demo (configs/demo.py)", workers=nw, need_packs_s=packs_per_step / step_s,
                 need_note=f"{packs_per_step} packs / {step_s * 1e3:.0f} ms (measured)")
        done(r)

    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
