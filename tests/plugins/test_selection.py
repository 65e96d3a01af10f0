"""Selection: ``backend=``, the thread-local ``use_backend`` context, ``NATTEN_BACKEND``, priority,
the errors of a named backend, ``explain`` and the debug log of an automatic fallback."""

from __future__ import annotations

import logging
import threading

import mlx.core as mx
import natten_mlx
import pytest
from natten_mlx.dispatch import BACKEND_ENV, KNOWN_TIERS, explain_problem, select
from plugin_toys import DenseToy, SplitToy, fused, qkv


def _close(a, b, atol=1e-5):
    return float(mx.abs(a - b).max()) <= atol


@pytest.fixture
def toys(register):
    """Registered next to pure: ``high`` (priority 9), ``low`` (priority 1)."""
    high, low = DenseToy("toy-high", priority=9), DenseToy("toy-low", priority=1)
    register(high)
    register(low)
    return high, low


# ---- per call, context, environment, priority ------------------------------------------------------
def test_list_backends_is_highest_priority_first(toys):
    assert [b.name for b in natten_mlx.list_backends()] == ["toy-high", "toy-low", "pure"]


def test_automatic_choice_is_the_highest_priority_backend_that_serves(toys):
    high, low = toys
    q, k, v = qkv()
    out = natten_mlx.na2d(q, k, v, 3)
    assert (high.forward_calls, low.forward_calls) == (1, 0)
    assert _close(out, natten_mlx.na2d(q, k, v, 3, backend="pure"))
    high.refuse["dilation"] = "toy-high: no dilated kernels"
    assert select(fused(q, k, v, 3, dilation=2)) is low
    low.unavailable = "toy-low: needs a device this machine lacks"
    assert select(fused(q, k, v, 3, dilation=2)).name == "pure"
    assert select(fused(q, k, v, 3)) is high


def test_per_call_backend_argument(toys):
    high, low = toys
    q, k, v = qkv()
    out = natten_mlx.na2d(q, k, v, 3, backend="toy-low")
    assert (high.forward_calls, low.forward_calls) == (0, 1)
    assert _close(out, natten_mlx.na2d(q, k, v, 3, backend="pure"))
    # a backend object is accepted too (protocol v2), and serves the call
    natten_mlx.na2d(q, k, v, 3, backend=low)
    assert (high.forward_calls, low.forward_calls) == (0, 2)
    with pytest.raises(TypeError, match="backend="):
        natten_mlx.na2d(q, k, v, 3, backend=3)


def test_use_backend_context_nests_and_yields_to_the_argument(toys):
    high, low = toys
    p = fused(*qkv(), 3)
    with natten_mlx.use_backend("toy-low"):
        assert select(p) is low
        assert explain_problem(p).how == "use_backend context"
        with natten_mlx.use_backend("pure"):
            assert select(p).name == "pure"
        assert select(p) is low
        assert select(p, "toy-high") is high
        q, k, v = qkv()
        natten_mlx.na2d(q, k, v, 3)
        assert low.forward_calls == 1 and high.forward_calls == 0
    assert select(p) is high
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with natten_mlx.use_backend("nope"):
            pass
    with natten_mlx.use_backend(low):
        assert select(p) is low
    with pytest.raises(TypeError, match="use_backend="):
        with natten_mlx.use_backend(3.5):
            pass


def test_use_backend_is_thread_local(toys):
    p = fused(*qkv(), 3)
    worker_inside, main_done = threading.Event(), threading.Event()
    seen = {}

    def worker():
        try:
            seen["no context"] = explain_problem(p)
            with natten_mlx.use_backend("pure"):
                seen["own context"] = explain_problem(p)
                worker_inside.set()
                main_done.wait(30)
            seen["after"] = explain_problem(p)
        except BaseException as exc:  # surface a failure of the thread in the test
            seen["error"] = exc
            worker_inside.set()

    with natten_mlx.use_backend("toy-low"):
        thread = threading.Thread(target=worker)
        thread.start()
        assert worker_inside.wait(30)
        # the worker holds its own context right now; this thread keeps its own
        main = explain_problem(p)
        main_done.set()
        thread.join(30)
    assert "error" not in seen, seen.get("error")
    assert (main.chosen, main.how) == ("toy-low", "use_backend context")
    assert (seen["no context"].chosen, seen["no context"].how) == ("toy-high", "automatic")
    assert (seen["own context"].chosen, seen["own context"].how) == ("pure", "use_backend context")
    assert seen["after"].chosen == "toy-high"
    assert explain_problem(p).how == "automatic"


def test_environment_variable_comes_after_argument_and_context(toys, monkeypatch):
    high, low = toys
    p = fused(*qkv(), 3)
    monkeypatch.setenv(BACKEND_ENV, "toy-low")
    assert select(p) is low
    assert explain_problem(p).how == f"{BACKEND_ENV} environment variable"
    with natten_mlx.use_backend("pure"):
        assert select(p).name == "pure"
    assert select(p, "toy-high") is high
    q, k, v = qkv()
    natten_mlx.na2d(q, k, v, 3)
    assert low.forward_calls == 1
    monkeypatch.setenv(BACKEND_ENV, "")
    assert select(p) is high
    monkeypatch.setenv(BACKEND_ENV, "not-installed")
    with pytest.raises(ValueError, match=r"unknown backend 'not-installed'.*installed backends: pure, toy-high, toy-low"):
        natten_mlx.na2d(q, k, v, 3)


# ---- a named backend that cannot serve, an unknown name ---------------------------------------------
NAMED_BY = ["argument", "context", "environment"]


def _call_named(how, name, monkeypatch, **kw):
    q, k, v = qkv()
    if how == "argument":
        return natten_mlx.na2d(q, k, v, 3, backend=name, **kw)
    if how == "context":
        with natten_mlx.use_backend(name):
            return natten_mlx.na2d(q, k, v, 3, **kw)
    monkeypatch.setenv(BACKEND_ENV, name)
    return natten_mlx.na2d(q, k, v, 3, **kw)


@pytest.mark.parametrize("how", NAMED_BY)
def test_named_backend_that_cannot_serve_raises_with_its_reason(toys, monkeypatch, how):
    high, _ = toys
    high.refuse["dilation"] = "toy-high: no dilated kernels yet"
    with pytest.raises(ValueError, match=r"backend 'toy-high' \(from the .*\) cannot serve this call: toy-high: no dilated kernels yet"):
        _call_named(how, "toy-high", monkeypatch, dilation=2)
    assert high.forward_calls == 0
    # no silent fallback to another backend either
    _call_named(how, "toy-high", monkeypatch)  # a call it does serve
    assert high.forward_calls == 1


@pytest.mark.parametrize("how", NAMED_BY)
def test_named_backend_that_is_unavailable_raises_with_its_reason(toys, monkeypatch, how):
    _, low = toys
    low.unavailable = "toy-low: Metal device not found"
    with pytest.raises(ValueError, match="cannot serve this call: toy-low: Metal device not found"):
        _call_named(how, "toy-low", monkeypatch)


def test_a_backend_whose_supports_raises_is_skipped_with_that_as_reason(toys):
    high, low = toys

    def broken(problem):
        raise ZeroDivisionError("bad table")

    high.supports = broken
    p = fused(*qkv(), 3)
    assert select(p) is low
    assert explain_problem(p).reasons["toy-high"] == "raised ZeroDivisionError: bad table"
    with pytest.raises(ValueError, match="cannot serve this call: raised ZeroDivisionError: bad table"):
        select(p, "toy-high")


@pytest.mark.parametrize("tier", sorted(KNOWN_TIERS))
def test_unknown_known_tier_names_its_pip_extra(toys, tier):
    q, k, v = qkv()
    with pytest.raises(ValueError) as info:
        natten_mlx.na2d(q, k, v, 3, backend=tier)
    message = str(info.value)
    assert f"unknown backend {tier!r}" in message
    assert f'--find-links dist "{KNOWN_TIERS[tier]}==' in message and f"./packages/natten-mlx-{tier}" in message
    assert f"natten-mlx[{tier}]" in message
    assert "installed backends: pure, toy-high, toy-low" in message


def test_unknown_name_lists_installed_backends_and_every_known_tier(toys):
    with pytest.raises(ValueError) as info:
        natten_mlx.get_backend("fast-thing")
    message = str(info.value)
    assert "unknown backend 'fast-thing'" in message
    assert "installed backends: pure, toy-high, toy-low" in message
    for tier, extra in KNOWN_TIERS.items():
        assert f"{tier} ({extra})" in message


def test_when_no_backend_serves_the_error_gives_every_reason(register):
    register(DenseToy("only", refuse={"causal": "only: no causal masking"}))
    natten_mlx.unregister_backend("pure")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"no installed backend can serve this call: \{'only': 'only: no causal masking'\}"):
        natten_mlx.na2d(q, k, v, 3, is_causal=True)


# ---- explain ------------------------------------------------------------------------------------------
def test_explain_fused_gives_the_choice_and_every_reason(toys):
    high, low = toys
    high.refuse["causal"] = "toy-high: causal masking not implemented"
    q, k, v = qkv()
    e = natten_mlx.explain(q, k, v, 3, is_causal=(True, False))
    assert (e.chosen, e.how) == ("toy-low", "automatic")
    assert e.reasons == {"toy-high": "toy-high: causal masking not implemented", "toy-low": None, "pure": None}
    assert e.problem == fused(q, k, v, 3, is_causal=(True, False))
    text = str(e)
    assert "chosen: toy-low (automatic)" in text
    assert "toy-high: toy-high: causal masking not implemented" in text
    assert "toy-low: can serve" in text and "pure: can serve" in text
    # what explain says is what the call does
    natten_mlx.na2d(q, k, v, 3, is_causal=(True, False))
    assert (high.forward_calls, low.forward_calls) == (0, 1)


def test_explain_a_named_backend_that_cannot_serve(toys):
    high, _ = toys
    high.refuse["stride"] = "toy-high: stride > 1 not supported"
    q, k, v = qkv()
    e = natten_mlx.explain(q, k, v, 3, stride=2, backend="toy-high")
    assert (e.chosen, e.how) == (None, "backend= argument")
    assert e.reasons["toy-high"] == "toy-high: stride > 1 not supported"
    with natten_mlx.use_backend("toy-high"):
        assert natten_mlx.explain(q, k, v, 3).how == "use_backend context"
    with pytest.raises(ValueError, match="unknown backend 'metal'"):
        natten_mlx.explain(q, k, v, 3, backend="metal")


@pytest.mark.parametrize("na_dim", [1, 2, 3])
def test_explain_split_ops_names_backends_without_split_ops(register, na_dim):
    register(DenseToy("toy-fused-only", priority=9))
    split = SplitToy("toy-split", priority=3)
    register(split)
    spatial = (7, 6, 5)[:na_dim]
    q, k, v = qkv(spatial=spatial)
    e = natten_mlx.explain(f"na{na_dim}d_qk", q, k, 3)
    assert e.chosen == "toy-split"
    assert e.reasons == {"toy-fused-only": "has no split qk op (qk_forward)", "toy-split": None, "pure": None}
    attn = mx.softmax(getattr(natten_mlx, f"na{na_dim}d_qk")(q, k, 3), axis=-1)
    assert split.split_calls["qk"] == 1
    e = natten_mlx.explain(f"na{na_dim}d_av", attn, v, 3)
    assert e.chosen == "toy-split"
    assert e.reasons["toy-fused-only"] == "has no split av op (av_forward)"
    e = natten_mlx.explain(f"na{na_dim}d", q, k, v, 3)
    assert e.chosen == "toy-fused-only"
    with pytest.raises(ValueError, match="'toy-fused-only' .* cannot serve this call: has no split qk op"):
        getattr(natten_mlx, f"na{na_dim}d_qk")(q, k, 3, backend="toy-fused-only")


def test_explain_rejects_what_is_not_an_op(toys):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="is not an op"):
        natten_mlx.explain("na2d_qv", q, k, 3)
    with pytest.raises(TypeError, match="missing kernel_size"):
        natten_mlx.explain(q, k, v)


# ---- the debug log of automatic fallback ---------------------------------------------------------------
def test_automatic_fallback_is_logged_at_debug(toys, caplog):
    high, low = toys
    high.refuse["dilation"] = "toy-high: no dilated kernels yet"
    low.unavailable = "toy-low: library libtoy.so not found"
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger="natten_mlx"):
        natten_mlx.na2d(q, k, v, 3, dilation=2)
    records = [r for r in caplog.records if r.name == "natten_mlx" and r.levelno == logging.DEBUG]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "fused op uses 'pure'" in message
    assert "toy-high: no dilated kernels yet" in message and "toy-low: library libtoy.so not found" in message


def test_split_op_fallback_is_logged_at_debug(toys, caplog):
    q, k, _ = qkv()
    with caplog.at_level(logging.DEBUG, logger="natten_mlx"):
        natten_mlx.na2d_qk(q, k, 3)
    messages = [r.getMessage() for r in caplog.records if r.name == "natten_mlx"]
    assert any("qk op uses 'pure'" in m and "has no split qk op" in m for m in messages), messages


def test_no_fallback_no_log(toys, caplog):
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger="natten_mlx"):
        natten_mlx.na2d(q, k, v, 3)
    assert not [r for r in caplog.records if r.name == "natten_mlx"]
