"""Introspection: ``get_support_matrix()``, ``natten-mlx info`` and ``natten-mlx check``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import natten_mlx
import pytest
from natten_mlx import cli, plugins
from natten_mlx.plugins import DISABLE_ENV
from natten_mlx.support import FEATURES
from plugin_toys import DenseToy, FakeEntryPoint, OwnBackwardToy, RaisingToy, WrongToy, plugin_module

ISSUES = "see tests/plugins/CORE_ISSUES.md"

PICKY = {
    "float16": "toy-picky: half precision not implemented",
    "bfloat16": "toy-picky: bfloat16 not implemented",
    "dilation": "toy-picky: no dilated kernels",
    "rpb": "toy-picky: no positional bias",
    "na3d": "toy-picky: 1D and 2D only",
}


def _rows():
    return {r["name"]: r for r in natten_mlx.get_support_matrix()}


# ---- the support matrix ----------------------------------------------------------------------------
def test_matrix_covers_every_feature_the_contract_names():
    # ranks, dtypes, stride, dilation, causal, GQA, rpb, extra KV, lse, split ops (backward is its own column)
    assert set(FEATURES) == {"na1d", "na2d", "na3d", "float32", "float16", "bfloat16", "stride", "dilation", "causal",
                             "gqa", "rpb", "extra_kv", "return_lse", "split_qk", "split_av"}


def test_matrix_rows_show_a_toy_backends_reasons(register):
    register(DenseToy("toy-picky", refuse=PICKY), distribution="picky-dist")
    register(OwnBackwardToy("toy-bwd", unavailable="toy-bwd: needs the Metal device"), distribution="bwd-dist")
    rows = _rows()
    assert list(rows) == ["toy-picky", "toy-bwd", "pure"]  # highest priority first (ties keep registration order)

    picky = rows["toy-picky"]
    assert (picky["priority"], picky["distribution"], picky["plugin"], picky["available"]) == (5, "picky-dist", "runtime", None)
    assert picky["description"] == DenseToy.description
    assert picky["backward"] == "the pure backend's"
    expected = {f: None for f in FEATURES}
    expected.update(PICKY)
    expected["split_qk"] = "has no split qk op (qk_forward)"
    expected["split_av"] = "has no split av op (av_forward)"
    assert picky["features"] == expected

    bwd = rows["toy-bwd"]
    assert bwd["available"] == "toy-bwd: needs the Metal device"
    assert bwd["backward"] == "own"
    assert bwd["features"]["na2d"] == "toy-bwd: needs the Metal device"

    pure = rows["pure"]
    assert pure["available"] is None and pure["backward"] == "own"
    assert all(why is None for why in pure["features"].values())
    assert pure["distribution"] == "natten-mlx" and pure["plugin"] == plugins.BUILTIN


def test_matrix_row_of_a_discovered_plugin_has_its_distribution_and_version():
    ep = FakeEntryPoint("picky-ep", plugin_module("picky_ep", DenseToy("toy-picky", refuse=PICKY)),
                        distribution="natten-mlx-picky", version="3.1.4")
    try:
        plugins.reload_plugins(entry_points=[ep])
        row = _rows()["toy-picky"]
        assert (row["distribution"], row["version"], row["plugin"]) == ("natten-mlx-picky", "3.1.4", "picky-ep")
    finally:
        plugins.reload_plugins()


def test_matrix_survives_a_backend_whose_available_raises(register):
    toy = DenseToy("toy-flaky")
    toy.available = lambda: 1 / 0
    register(toy)
    row = _rows()["toy-flaky"]
    assert row["available"] == "available() raised ZeroDivisionError: division by zero"
    assert row["features"]["na2d"] == "raised ZeroDivisionError: division by zero"


# ---- natten-mlx info --------------------------------------------------------------------------------
def test_info_in_process_lists_plugins_matrix_and_every_reason(capsys):
    eps = [
        FakeEntryPoint("picky-ep", plugin_module("picky_ep", DenseToy("toy-picky", refuse=PICKY)),
                       distribution="natten-mlx-picky", version="3.1.4"),
        FakeEntryPoint("broken-ep", ImportError("libpicky.so: cannot open shared object file"),
                       distribution="natten-mlx-broken", version="0.0.1"),
    ]
    try:
        with pytest.warns(RuntimeWarning, match="broken-ep"):
            plugins.reload_plugins(entry_points=eps)
        natten_mlx.register_backend(OwnBackwardToy("toy-bwd", unavailable="toy-bwd: needs the Metal device"),
                                    distribution="bwd-dist")
        assert cli.main(["info"]) == 0
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].startswith(f"natten-mlx {natten_mlx.__version__}")
        assert lines[1].startswith("mlx ") and "default device:" in lines[1]
        assert "plugins (entry-point group natten_mlx.backends):" in out
        assert any(line.split()[:2] == ["natten_mlx.builtin", "natten-mlx"] and line.split()[-1] == "ok" for line in lines)
        assert any(line.split()[:4] == ["picky-ep", "natten-mlx-picky", "3.1.4", "ok"] for line in lines)
        broken = next(line for line in lines if line.split()[:1] == ["broken-ep"])
        assert "natten-mlx-broken 0.0.1" in broken and "failed to import: ImportError: libpicky.so" in broken
        assert "toy-picky (priority 5, natten-mlx-picky 3.1.4): available" in out
        assert "toy-bwd (priority 5, bwd-dist unknown): UNAVAILABLE: toy-bwd: needs the Metal device" in out
        assert "support matrix" in out
        header = next(line for line in lines if line.strip().startswith("feature"))
        assert header.split()[1:] == ["toy-picky", "toy-bwd", "pure"]
        for row in natten_mlx.get_support_matrix():
            for feature, why in row["features"].items():
                if why is not None:
                    assert f"{row['name']} / {feature}: {why}" in out
        assert "backward: the pure backend's" in out and "backward: own" in out
        # each feature line of the matrix says yes or points at a reason
        for feature in FEATURES:
            line = next(line for line in lines if line.split()[:1] == [feature])
            assert len([c for c in line.split()[1:] if c in ("yes", "no")]) == 3
    finally:
        plugins.reload_plugins()


def _run_cli(args, env_changes=None):
    env = {k: v for k, v in os.environ.items() if k not in ("NATTEN_BACKEND", DISABLE_ENV)}
    core = os.path.dirname(os.path.dirname(os.path.abspath(natten_mlx.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([core] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(env_changes or {})
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _commands():
    yield pytest.param([sys.executable, "-m", "natten_mlx"], id="python -m natten_mlx")
    script = Path(sys.executable).parent / "natten-mlx"
    yield pytest.param([str(script)], id="natten-mlx script", marks=pytest.mark.skipif(
        not script.exists(), reason="the natten-mlx console script is not installed next to this interpreter"))


@pytest.mark.parametrize("command", list(_commands()))
def test_info_command_lists_installed_plugins(command):
    run = _run_cli(command + ["info"])
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith("natten-mlx ")
    assert "plugins (entry-point group natten_mlx.backends):" in out
    assert "natten_mlx.builtin" in out
    assert "pure (priority 0, natten-mlx" in out
    assert "support matrix" in out
    for name, dist in [(r["name"], r["distribution"]) for r in natten_mlx.get_support_matrix()]:
        assert f"{name} (priority" in out and dist in out
    for row in plugins.registry().plugins:
        assert row["name"] in out


def test_info_command_with_plugins_disabled():
    run = _run_cli([sys.executable, "-m", "natten_mlx", "info"], {DISABLE_ENV: "1"})
    assert run.returncode == 0, run.stderr
    assert f"skipped: {DISABLE_ENV} is set" in run.stdout
    header = next(line for line in run.stdout.splitlines() if line.strip().startswith("feature"))
    assert header.split()[1:] == ["pure"]


# ---- natten-mlx check ---------------------------------------------------------------------------------
CASES = ["--cases", "5", "--seed", "0"]


def test_check_passes_with_only_correct_backends(register, capsys):
    register(DenseToy("toy-dense"))
    assert cli.main(["check", *CASES]) == 0
    out = capsys.readouterr().out
    assert "toy-dense: 5 checked, 0 mismatched, 0 not supported" in out
    assert "pure (tiled strategy vs gather strategy): 5 checked, 0 mismatched" in out
    assert "MISMATCH" not in out


def test_check_fails_with_a_wrong_backend(register, capsys):
    register(DenseToy("toy-dense"))
    register(WrongToy("toy-wrong", priority=7))
    assert cli.main(["check", *CASES]) != 0
    out = capsys.readouterr().out
    assert "MISMATCH toy-wrong" in out
    assert "toy-wrong: 5 checked, 5 mismatched" in out
    assert "toy-dense: 5 checked, 0 mismatched" in out
    assert "MISMATCH toy-dense" not in out


def test_check_skips_what_a_backend_does_not_support(register, capsys):
    register(WrongToy("toy-refuses-all", unavailable="toy: no device"))
    assert cli.main(["check", *CASES]) == 0
    assert "toy-refuses-all: 0 checked, 0 mismatched, 5 not supported" in capsys.readouterr().out


def test_check_reports_a_backend_that_crashes(register, capsys):
    register(RaisingToy("toy-crash"))
    register(DenseToy("toy-dense", priority=1))
    assert cli.main(["check", *CASES]) != 0
    out = capsys.readouterr().out
    assert "toy-crash" in out and "toy kernel crashed" in out
    assert "toy-dense: 5 checked, 0 mismatched" in out
