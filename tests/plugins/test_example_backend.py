"""The template third-party backend of examples/third-party-backend, installed as a distribution:
discovered through its real entry point, selectable by name, used by priority, listed by
``natten-mlx info``, unregistered cleanly. ``nox -s plugins`` installs it; elsewhere these tests skip."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import mlx.core as mx
import natten_mlx
import pytest
from natten_mlx import cli, plugins
from natten_mlx.hookspecs import ENTRY_POINT_GROUP
from plugin_toys import qkv

DIST = "natten-mlx-example-backend"
NAME = "example-dense"


def _installed() -> bool:
    try:
        metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return False
    return True


# nox -s plugins sets NATTEN_MLX_EXAMPLE_REQUIRED=1: there a missing example fails instead of skipping
REQUIRED = os.environ.get("NATTEN_MLX_EXAMPLE_REQUIRED") == "1"

pytestmark = pytest.mark.skipif(
    not (_installed() or REQUIRED),
    reason=f"{DIST} is not installed (pip install -e examples/third-party-backend; nox -s plugins)",
)


def _entry_point():
    (ep,) = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.dist and ep.dist.metadata["Name"] == DIST]
    return ep


def _close(a, b, atol=1e-5):
    return float(mx.abs(a - b).max()) <= atol


def test_discovered_through_its_real_entry_point():
    ep = _entry_point()
    assert (ep.name, ep.value) == ("example", "natten_mlx_example_backend")
    reg = plugins.reload_plugins()
    row = next(r for r in reg.plugins if r["name"] == ep.name)
    assert row == {"name": "example", "distribution": DIST, "version": metadata.version(DIST), "status": "ok"}
    registration = reg.backends[NAME]
    assert (registration.plugin, registration.distribution) == ("example", DIST)
    assert type(registration.backend).__module__ == "natten_mlx_example_backend"
    assert registration.backend.priority == 10


def test_selectable_by_name_and_exact():
    backend = natten_mlx.get_backend(NAME)
    q, k, v = qkv(spatial=(7, 6), heads=4, kv_heads=2)
    ek, ev = (mx.random.normal((1, 2, 2, 4), key=mx.random.key(seed)) for seed in (1, 2))  # [B, N_extra, H_kv, D]
    call = dict(kernel_size=(3, 4), stride=(2, 1), dilation=(2, 1), is_causal=(False, True), return_lse=True,
                additional_keys=ek, additional_values=ev)
    out, lse = natten_mlx.na2d(q, k, v, **call, backend=NAME)
    want_out, want_lse = natten_mlx.na2d(q, k, v, **call, backend="pure")
    assert _close(out, want_out) and _close(lse, want_lse)
    with natten_mlx.use_backend(NAME):
        assert natten_mlx.explain(q, k, v, 3).chosen == NAME
    assert natten_mlx.dispatch.select(natten_mlx.explain(q, k, v, 3).problem, NAME) is backend


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_matches_pure(dtype):
    q, k, v = qkv(heads=4, kv_heads=2, dtype=dtype)
    out, lse = natten_mlx.na2d(q, k, v, 3, dilation=2, is_causal=True, return_lse=True, backend=NAME)
    want_out, want_lse = natten_mlx.na2d(q, k, v, 3, dilation=2, is_causal=True, return_lse=True, backend="pure")
    assert (out.dtype, lse.dtype) == (dtype, mx.float32)
    assert _close(out.astype(mx.float32), want_out.astype(mx.float32), 1e-2) and _close(lse, want_lse, 1e-3)


def test_refuses_large_problems_and_says_why():
    q, k, v = qkv(spatial=(20, 20))
    e = natten_mlx.explain(q, k, v, 3)
    assert e.chosen != NAME
    assert "400 tokens" in e.reasons[NAME] and "limit of 256" in e.reasons[NAME]
    with pytest.raises(ValueError, match=r"'example-dense' .* cannot serve this call: 400 tokens"):
        natten_mlx.na2d(q, k, v, 3, backend=NAME)
    q, k = qkv()[:2]
    split = natten_mlx.explain("na2d_qk", q, k, 3)
    assert split.reasons[NAME] == "has no split qk op (qk_forward)"
    assert natten_mlx.get_backend(NAME).supports(split.problem) == "has no split ops (it computes the fused op only)"


def test_used_by_priority_when_it_serves():
    q, k, v = qkv()
    above = [b.name for b in natten_mlx.list_backends() if b.priority > 10]
    e = natten_mlx.explain(q, k, v, 3)
    if above:  # a compiled tier (priority 100 and up) that serves the call would rightly come first
        assert e.chosen == NAME or e.chosen in above
    else:
        assert (e.chosen, e.how) == (NAME, "automatic")
    assert e.reasons[NAME] is None
    # a problem it refuses goes past it, with its reason in the log and in explain
    big = qkv(spatial=(17, 16))
    assert natten_mlx.explain(*big, 3).chosen != NAME
    # gradients through it come from the core (it has no backward of its own)
    backend = natten_mlx.get_backend(NAME)
    assert not hasattr(backend, "fused_backward")
    got = mx.grad(lambda q, k, v: (natten_mlx.na2d(q, k, v, 3, backend=NAME) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(lambda q, k, v: (natten_mlx.na2d(q, k, v, 3, backend="pure") ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(_close(g, w, 1e-4) for g, w in zip(got, want, strict=True))


def test_listed_by_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:4] == ["example", DIST, metadata.version(DIST), "ok"] for line in out.splitlines())
    assert f"{NAME} (priority 10, {DIST} {metadata.version(DIST)}): available" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("feature"))
    assert NAME in header.split()
    assert f"{NAME} / na3d: 4096 tokens" in out
    assert f"{NAME} / rpb: does not implement the relative positional bias" in out
    assert f"{NAME} / split_qk: has no split qk op" in out


def test_listed_by_the_info_command():
    env = {k: v for k, v in os.environ.items() if k not in ("NATTEN_BACKEND", plugins.DISABLE_ENV)}
    run = subprocess.run([sys.executable, "-m", "natten_mlx", "info"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{NAME} (priority 10, {DIST}" in run.stdout
    disabled = subprocess.run([sys.executable, "-m", "natten_mlx", "info"], env={**env, plugins.DISABLE_ENV: "1"},
                              capture_output=True, text=True, timeout=300)
    assert disabled.returncode == 0, disabled.stderr
    assert NAME not in disabled.stdout


def test_passes_check(capsys):
    assert cli.main(["check", "--cases", "8", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(f"{NAME}:"))
    assert " 0 mismatched" in line and not line.startswith(f"{NAME}: 0 checked")


def test_unregistered_cleanly():
    q, k, v = qkv()
    try:
        natten_mlx.unregister_backend(NAME)
        assert NAME not in [b.name for b in natten_mlx.list_backends()]
        assert NAME not in plugins.registry().backends
        assert all(row["name"] != NAME for row in natten_mlx.get_support_matrix())
        e = natten_mlx.explain(q, k, v, 3)
        assert NAME not in e.reasons and e.chosen is not None
        out = natten_mlx.na2d(q, k, v, 3)
        assert _close(out, natten_mlx.na2d(q, k, v, 3, backend="pure"))
        with pytest.raises(ValueError, match=f"unknown backend '{NAME}'; installed backends: "):
            natten_mlx.na2d(q, k, v, 3, backend=NAME)
        with pytest.raises(ValueError, match=f"backend '{NAME}' is not registered"):
            natten_mlx.unregister_backend(NAME)
    finally:
        plugins.reload_plugins()
    # rediscovery brings it back through the entry point
    assert natten_mlx.get_backend(NAME).priority == 10
