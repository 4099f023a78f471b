"""Tiled inference (run_tiled): blending, resume, refusals, and a ledger that tells models apart
(a changed model recomputes every block, the same one resumes)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emdata.access import tiling
from emdata.access.tiling import run_tiled
from emdata.access.volume import Volume
from emdata.errors import ConfigError
from emdata.testing.volumes import coordinate_volume, write_canonical

SHAPE = (13, 21, 27)  # odd and non-cubic: 2 x 2 x 2 = 8 blocks of (8, 16, 16)
BLOCK, HALO = (8, 16, 16), (1, 2, 2)
TOTAL = 8
OFFSET = 3.0


class Interrupted(Exception):
    pass


@pytest.fixture
def volume(tmp_path) -> Volume:
    return Volume(write_canonical(tmp_path / "v.h5", coordinate_volume(SHAPE, np.uint8), chunks=(8, 16, 16)))


@pytest.fixture
def raw(volume) -> np.ndarray:
    return volume[()].astype(np.float32)


@pytest.fixture
def counted(monkeypatch):
    """Count model calls, and interrupt after ``stop_after`` of them, without touching the model itself."""
    state = {"calls": 0, "stop_after": None}
    predict = tiling.predict_block

    def wrapper(volume, fn, b, pad):
        if state["stop_after"] is not None and state["calls"] >= state["stop_after"]:
            raise Interrupted
        state["calls"] += 1
        return predict(volume, fn, b, pad)

    monkeypatch.setattr(tiling, "predict_block", wrapper)
    return state


def _run(volume, fn, out, counted, *, stop_after=None, blend="crop", **kw):
    counted["calls"], counted["stop_after"] = 0, stop_after
    if stop_after is None:
        run_tiled(volume, fn, out, block_shape=BLOCK, halo=HALO, blend=blend, **kw)
    else:
        with pytest.raises(Interrupted):
            run_tiled(volume, fn, out, block_shape=BLOCK, halo=HALO, blend=blend, **kw)
    return counted["calls"]


def _result(out) -> np.ndarray:
    import h5py

    with h5py.File(out, "r") as f:
        return f["prediction"][()]


def _same_name(new, old):
    new.__qualname__, new.__module__ = old.__qualname__, old.__module__
    return new


def _pairs():
    """(model A, model B, B's expected output from the input): same qualname, different behaviour."""

    def body_a(x):
        return x.astype(np.float32) * 2

    def body_b(x):
        return x.astype(np.float32) * 3

    def make_scaled(scale):
        def model(x):
            return x * scale
        return model

    def default_a(x, scale=2.0):
        return x * scale

    def default_b(x, scale=5.0):
        return x * scale

    def name_a(x):
        return np.add(x, OFFSET)

    def name_b(x):
        return np.subtract(x, OFFSET)

    weights_a, weights_b = np.full(3, 2.0), np.full(3, 7.0)

    def make_weighted(weights):
        return lambda x: x * weights[0]

    return {
        "body": (body_a, _same_name(body_b, body_a), lambda r: r * 3),
        "closure value": (make_scaled(2.0), make_scaled(4.0), lambda r: r * 4),
        "default": (default_a, _same_name(default_b, default_a), lambda r: r * 5),
        "called name": (name_a, _same_name(name_b, name_a), lambda r: r - OFFSET),
        "closure array": (make_weighted(weights_a), make_weighted(weights_b), lambda r: r * 7),
    }


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
@pytest.mark.parametrize("change", list(_pairs()))
def test_a_changed_model_with_the_same_name_recomputes_every_block(volume, raw, counted, tmp_path, change,
                                                                     blend) -> None:
    model_a, model_b, expected = _pairs()[change]
    assert model_a.__qualname__ == model_b.__qualname__
    out = tmp_path / "p.h5"
    assert _run(volume, model_a, out, counted, stop_after=5, blend=blend) == 5  # interrupted with A
    assert _run(volume, model_b, out, counted, blend=blend) == TOTAL  # B recomputes all, A's blocks unused
    np.testing.assert_allclose(_result(out), expected(raw), rtol=1e-6)
    assert _run(volume, model_a, out, counted, blend=blend) == TOTAL  # a completed run is not reused either
    np.testing.assert_allclose(_result(out), model_a(raw), rtol=1e-6)


@pytest.mark.parametrize("blend", ["crop", "average"])
def test_changed_settings_restart_with_a_clean_ledger(volume, raw, counted, tmp_path, blend) -> None:
    """Resetting the ledger must clear it: HDF5 reuses the deleted ledger's space without zeroing it."""
    out = tmp_path / "p.h5"
    _run(volume, _double, out, counted, stop_after=5, blend=blend, pad="reflect")
    assert _run(volume, _double, out, counted, blend=blend, pad="edge") == TOTAL
    np.testing.assert_array_equal(_result(out), raw * 2)


def _double(x):
    return x.astype(np.float32) * 2


@pytest.mark.parametrize("blend", ["crop", "average"])
def test_the_same_model_resumes(volume, raw, counted, tmp_path, blend) -> None:
    out = tmp_path / "p.h5"
    _run(volume, _double, out, counted, stop_after=5, blend=blend)
    assert _run(volume, _double, out, counted, blend=blend) == TOTAL - 5
    np.testing.assert_array_equal(_result(out), raw * 2)
    # a fresh but identical closure (a restarted process builds a new one) is the same model
    make = lambda scale: (lambda x: x * scale)
    _run(volume, make(2.0), out, counted, stop_after=4, blend=blend)
    assert _run(volume, make(2.0), out, counted, blend=blend) == TOTAL - 4


def test_the_identity_is_the_same_in_a_new_process() -> None:
    """A restart runs in a new process: the key must not depend on ids, hash seeds or addresses."""
    here = Path(__file__).parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import json, numpy as np, test_tiling as t; "
            "from emdata.access.tiling import model_identity as m; "
            "print(json.dumps([m(t._double), m(t._pairs()['closure array'][1]), m(t._pairs()['called name'][0])]))")
    other = json.loads(subprocess.run([sys.executable, "-c", code, str(here)], check=True, capture_output=True,
                                      text=True, env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout)
    pairs = _pairs()
    mine = [tiling.model_identity(f) for f in (_double, pairs["closure array"][1], pairs["called name"][0])]
    assert other == mine and all("sha256" in m for m in mine)


class Scaler:
    """A callable without state_dict: the ledger cannot see its state."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, x):
        return x * self.scale


def test_opaque_callables_need_a_model_id_or_recompute(volume, raw, counted, tmp_path, caplog) -> None:
    out = tmp_path / "p.h5"
    _run(volume, Scaler(2.0), out, counted, stop_after=5)
    with caplog.at_level(logging.WARNING, logger="emdata.access.tiling"):
        assert _run(volume, Scaler(2.0), out, counted) == TOTAL  # never silently reused
    assert "model_id" in caplog.text
    np.testing.assert_array_equal(_result(out), raw * 2)
    # an explicit model_id identifies it: the same id resumes, a new one recomputes
    _run(volume, Scaler(3.0), out, counted, stop_after=5, model_id="scaler-3")
    assert _run(volume, Scaler(3.0), out, counted, model_id="scaler-3") == TOTAL - 5
    _run(volume, Scaler(3.0), out, counted, stop_after=5, model_id="scaler-3")
    assert _run(volume, Scaler(4.0), out, counted, model_id="scaler-4") == TOTAL
    np.testing.assert_array_equal(_result(out), raw * 4)


@pytest.mark.torch
def test_torch_modules_are_identified_by_their_weights(volume, raw, counted, tmp_path) -> None:
    torch = pytest.importorskip("torch")

    def net(value):
        conv = torch.nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            conv.weight.fill_(value)
        return conv.eval()

    def run(module, **kw):
        def fn(x):  # torch modules take tensors: wrap once, as users do
            with torch.no_grad():
                return module(torch.from_numpy(x.astype(np.float32))[None, None])[0, 0].numpy()
        fn.__qualname__ = "fn"
        return _run(volume, module if kw.pop("direct", False) else fn, tmp_path / "t.h5", counted, **kw)

    class Wrapped(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.conv = net(value)

        def forward(self, x):
            with torch.no_grad():
                return self.conv(torch.from_numpy(x.astype(np.float32))[None, None])[0, 0].numpy()

    # two modules in one closure, the second one changed: a different model
    first, second, changed = net(2.0), net(3.0), net(3.0)
    with torch.no_grad():
        changed.weight.fill_(4.0)
    both = lambda pair: (lambda x: pair[1](pair[0](x)))
    assert tiling.model_identity(both((first, second))) == tiling.model_identity(both((net(2.0), net(3.0))))
    assert tiling.model_identity(both((first, second))) != tiling.model_identity(both((first, changed)))
    assert tiling.model_identity(net(2.0).train()) != tiling.model_identity(net(2.0).eval())
    run(net(2.0), stop_after=5)
    assert run(net(3.0)) == TOTAL  # other weights in the closure: all recomputed
    np.testing.assert_allclose(_result(tmp_path / "t.h5"), raw * 3, rtol=1e-6)
    run(net(3.0), stop_after=5)
    assert run(net(3.0)) == TOTAL - 5  # the same weights in a new object: resumed
    run(Wrapped(2.0).eval(), stop_after=5, direct=True)
    assert run(Wrapped(2.0).eval(), direct=True) == TOTAL - 5
    run(Wrapped(2.0).eval(), stop_after=5, direct=True)
    assert run(Wrapped(5.0).eval(), direct=True) == TOTAL
    np.testing.assert_allclose(_result(tmp_path / "t.h5"), raw * 5, rtol=1e-6)


# -- blending, resume and refusals, on a 29 x 45 x 61 volume of (8, 16, 16) chunks -----------------

@pytest.fixture
def odd_raw() -> np.ndarray:
    return coordinate_volume((29, 45, 61), np.uint8)


@pytest.fixture
def odd_volume(tmp_path, odd_raw) -> Volume:
    return Volume(write_canonical(tmp_path / "odd.h5", odd_raw, chunks=(8, 16, 16)))


@pytest.mark.parametrize("blend", ["crop", "average", "gaussian"])
def test_tiled_identity_reproduces_the_volume(odd_volume, odd_raw, tmp_path, blend) -> None:
    import h5py

    raw = odd_raw
    out = run_tiled(odd_volume, lambda x: x.astype(np.float32), tmp_path / f"pred_{blend}.h5",
                    block_shape=(8, 16, 16), halo=(2, 4, 4), blend=blend)
    with h5py.File(out, "r") as f:
        pred = f["prediction"]
        assert pred.chunks == (8, 16, 16) and pred.dtype == np.float32
        np.testing.assert_array_equal(pred.attrs["resolution"], odd_volume.resolution)
        np.testing.assert_array_equal(pred[()], raw.astype(np.float32))
    assert not (tmp_path / f"pred_{blend}.h5.tiling.h5").exists()


def test_gaussian_blend_weights_the_centre(odd_volume, tmp_path) -> None:
    import h5py

    # Each window answers with its own origin's z: blended values mix neighbours near seams.
    def window_id(x):
        return np.full(x.shape, float(x[0, 0, 0]), np.float32)

    out = run_tiled(odd_volume, window_id, tmp_path / "mix.h5", block_shape=(8, 16, 16), halo=(4, 8, 8), blend="gaussian")
    with h5py.File(out, "r") as f:
        assert len(np.unique(f["prediction"][()])) > 10


def _twice(x):
    return x.astype(np.float32) * 2


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_interrupted_tiled_run_resumes_without_recomputing(odd_volume, odd_raw, tmp_path, blend, monkeypatch) -> None:
    """The same model, restarted, resumes. The interruption comes from outside the model: the ledger
    identifies a model by its code and state, so an instrumented copy would be another model."""
    import h5py

    raw = odd_raw
    calls = []
    predict = tiling.predict_block

    class Interrupted(Exception):
        pass

    def interrupt_after_five(odd_volume, fn, b, pad):
        if len(calls) == 5:
            raise Interrupted
        calls.append(1)
        return predict(odd_volume, fn, b, pad)

    monkeypatch.setattr(tiling, "predict_block", interrupt_after_five)
    out_path = tmp_path / "p.h5"
    with pytest.raises(Interrupted):
        run_tiled(odd_volume, _twice, out_path, block_shape=(8, 16, 16), halo=(1, 2, 2), blend=blend)
    assert not out_path.exists()
    second = []
    monkeypatch.setattr(tiling, "predict_block", lambda *args: second.append(1) or predict(*args))
    run_tiled(odd_volume, _twice, out_path, block_shape=(8, 16, 16), halo=(1, 2, 2), blend=blend)
    total = 4 * 3 * 4
    assert len(second) == total - 5
    with h5py.File(out_path, "r") as f:
        np.testing.assert_array_equal(f["prediction"][()], raw.astype(np.float32) * 2)


def test_tiled_rejects_wrong_output_shapes(odd_volume, tmp_path) -> None:
    with pytest.raises(ConfigError, match="same-size 3D output"):
        run_tiled(odd_volume, lambda x: x[1:], tmp_path / "bad.h5", block_shape=(8, 16, 16))


def test_damaged_ledger_restarts_cleanly(odd_volume, odd_raw, tmp_path) -> None:
    import h5py

    raw = odd_raw
    out_path = tmp_path / "p.h5"
    (tmp_path / "p.h5.tiling.h5").write_bytes(b"not an HDF5 file")
    run_tiled(odd_volume, lambda x: x.astype(np.float32), out_path, block_shape=(8, 16, 16))
    with h5py.File(out_path, "r") as f:
        np.testing.assert_array_equal(f["prediction"][()], raw.astype(np.float32))
