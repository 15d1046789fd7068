"""FLUX autoencoder: numerics against the official PyTorch VAE, the key table, and checkpoint errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save, save_file

from conftest import load_npz
from echo4o_jax.config import VAEConfig
from echo4o_jax.model import keymap
from echo4o_jax.model.keymap import CheckpointMismatchError
from echo4o_jax.model.loading import load_vae_file
from echo4o_jax.model.vae import AutoEncoder, vae_key_rules


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x) -> jax.Array:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def read_all(path) -> tuple[dict[str, np.ndarray], dict | None]:
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def export_official(model: AutoEncoder, cfg: VAEConfig) -> dict[str, np.ndarray]:
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    entries = keymap.expand_rules(vae_key_rules(cfg))
    return dict(keymap.flax_to_official(entries, lambda p: np.asarray(flat[p].get_value())))


_encode_moments = nnx.jit(lambda m, x: m.encode_moments(x))
_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))
_encode_sample = nnx.jit(lambda m, x, key: m.encode(x, sample=True, rng=key))


@pytest.fixture(scope="module")
def ae(golden_dir):
    cfg = VAEConfig.from_dict(json.loads((golden_dir / "meta.json").read_text())["ae"])
    model = load_vae_file(str(golden_dir / "ae.safetensors"), cfg)
    return cfg, model


# ---------------------------------------------------------------------------------------- numerics
def test_encode_matches_official(golden_dir, ae):
    cfg, model = ae
    ref = load_npz(golden_dir / "vae.npz")
    x = nhwc(ref["image"])
    moments = nchw(_encode_moments(model, x))
    latent = nchw(_encode(model, x))
    assert moments.shape == ref["moments"].shape and latent.shape == ref["latent"].shape
    np.testing.assert_allclose(moments, ref["moments"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(latent, ref["latent"], atol=1e-4, rtol=0)


def test_decode_matches_official(golden_dir, ae):
    cfg, model = ae
    ref = load_npz(golden_dir / "vae.npz")
    decoded = nchw(_decode(model, nhwc(ref["latent"])))
    assert decoded.shape == ref["decoded"].shape
    np.testing.assert_allclose(decoded, ref["decoded"], atol=5e-4, rtol=0)


def test_encode_sample(golden_dir, ae):
    cfg, model = ae
    x = nhwc(load_npz(golden_dir / "vae.npz")["image"])
    with pytest.raises(ValueError, match="rng"):
        model.encode(x, sample=True)
    key = jax.random.key(0)
    a = _encode_sample(model, x, key)
    b = _encode_sample(model, x, key)
    mean = _encode(model, x)
    assert a.shape == mean.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(mean))


# ---------------------------------------------------------------------------------------- key table
def test_export_round_trip_is_bit_exact(golden_dir, ae):
    cfg, model = ae
    src = golden_dir / "ae.safetensors"
    orig, metadata = read_all(src)
    out = export_official(model, cfg)
    assert sorted(out) == sorted(orig)
    for k, v in orig.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert out[k].tobytes() == v.tobytes(), k
    if all(v.dtype == np.float32 for v in orig.values()):  # params are float32: the file itself is reproduced
        assert save(out, metadata=metadata) == src.read_bytes()


def _expect_mismatch(tmp_path, cfg, tensors, *needles):
    path = tmp_path / "bad_ae.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointMismatchError) as ei:
        load_vae_file(str(path), cfg)
    msg = str(ei.value)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg


def test_checkpoint_mismatches_are_named(golden_dir, ae, tmp_path):
    cfg, _ = ae
    orig, _ = read_all(golden_dir / "ae.safetensors")
    missing = "encoder.mid.attn_1.q.weight"
    _expect_mismatch(tmp_path, cfg, {k: v for k, v in orig.items() if k != missing}, "missing", missing)
    _expect_mismatch(tmp_path, cfg, {**orig, "encoder.quant_conv.weight": np.zeros((2, 2), np.float32)},
                     "unexpected", "encoder.quant_conv.weight")
    bad = "decoder.conv_in.weight"
    _expect_mismatch(tmp_path, cfg, {**orig, bad: orig[bad][:, :-1]}, "wrong shapes", bad)
    # Several problems at once: one error lists them all.
    many = {k: v for k, v in orig.items() if k != missing}
    many["extra.key"] = np.zeros(1, np.float32)
    many[bad] = orig[bad][:, :-1]
    _expect_mismatch(tmp_path, cfg, many, missing, "extra.key", bad)
    # Integer tensors are refused.
    ints = {**orig, bad: orig[bad].astype(np.int32)}
    _expect_mismatch(tmp_path, cfg, ints, "wrong dtypes", bad)


def test_bfloat16_checkpoint_loads(golden_dir, ae, tmp_path):
    cfg, model = ae
    orig, _ = read_all(golden_dir / "ae.safetensors")
    path = tmp_path / "ae_bf16.safetensors"
    save_file({k: v.astype(jnp.bfloat16) for k, v in orig.items()}, str(path))
    m16 = load_vae_file(str(path), cfg)  # float32 params from a bfloat16 file
    k = "encoder.conv_in.weight"
    np.testing.assert_array_equal(export_official(m16, cfg)[k], orig[k].astype(jnp.bfloat16).astype(np.float32))


@pytest.mark.parametrize("keep", [0.5, 0.999, 7])
def test_truncated_file_names_the_path(golden_dir, ae, tmp_path, keep):
    cfg, _ = ae
    data = (golden_dir / "ae.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "truncated_ae.safetensors"
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated_ae.safetensors"):
        load_vae_file(str(path), cfg)


# ---------------------------------------------------------------------------------------- other sizes
def random_checkpoint(cfg: VAEConfig, seed: int) -> dict[str, np.ndarray]:
    """Official-layout tensors with torch-like scales, shapes taken from the (abstract) model."""
    abstract = nnx.eval_shape(lambda: AutoEncoder(cfg, rngs=nnx.Rngs(0)))
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    rng = np.random.default_rng(seed)
    out = {}
    for e in keymap.expand_rules(vae_key_rules(cfg)):
        shape = keymap.official_shape(e, shapes[e.path])
        if e.key.endswith(".weight") and len(shape) == 4:
            bound = 1.0 / np.sqrt(np.prod(shape[1:]))
            out[e.key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        elif e.key.endswith(".weight"):  # GroupNorm scale
            out[e.key] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[e.key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, downsample=2),
        VAEConfig(ch=32, ch_mult=(2, 1, 2), num_res_blocks=2, z_channels=8, in_channels=4, out_ch=5, downsample=4),
    ],
    ids=["ch32_x2", "ch32_x4"],
)
def test_other_sizes(cfg, tmp_path):
    tensors = random_checkpoint(cfg, seed=0)
    path = tmp_path / "ae.safetensors"
    save_file(tensors, str(path))
    model = load_vae_file(str(path), cfg)
    # The key table covers the model exactly: export gives back the file.
    again = export_official(model, cfg)
    assert sorted(again) == sorted(tensors)
    assert all(np.array_equal(again[k], v) for k, v in tensors.items())

    f = cfg.downsample
    x = jax.random.uniform(jax.random.key(1), (2, 4 * f, 3 * f, cfg.in_channels), minval=-1.0, maxval=1.0)
    assert _encode_moments(model, x).shape == (2, 4, 3, 2 * cfg.z_channels)
    z = _encode(model, x)
    assert z.shape == (2, 4, 3, cfg.z_channels)
    y = _decode(model, z)
    assert y.shape == (2, 4 * f, 3 * f, cfg.out_ch)
    assert bool(jnp.isfinite(y).all())


def test_inconsistent_downsample_is_refused():
    with pytest.raises(ValueError, match="downsample"):
        AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 2), downsample=8), rngs=nnx.Rngs(0))
