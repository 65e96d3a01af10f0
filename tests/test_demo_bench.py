"""The tools of ``natten_mlx.cli``: demo, bench, check's strategy comparison, the command line.
No timing is asserted."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

pytest.importorskip("sklearn")

from natten_mlx import cli  # noqa: E402
from natten_mlx.cli import bench, demo, strategies  # noqa: E402


# ---- demo ----------------------------------------------------------------------------------------
def test_demo_default_schedule_passes_its_bar():
    """The promise of `natten-mlx demo`: the fixed schedule passes on any machine (same steps)."""
    result = demo.run(seed=0, verbose=False)
    assert result["epochs"] == demo.EPOCHS
    assert result["steps"] == demo.EPOCHS * (1438 // demo.BATCH_SIZE)
    assert result["passed"] and result["test_accuracy"] > demo.ACCURACY_BAR, result


def test_demo_fixed_epochs_is_reproducible():
    a = demo.run(epochs=1, seed=3, verbose=False)
    b = demo.run(epochs=1, seed=3, verbose=False)
    assert a["epochs"] == b["epochs"] == 1 and a["steps"] == b["steps"] == 1438 // demo.BATCH_SIZE
    assert a["test_accuracy"] == b["test_accuracy"] and a["train_accuracy"] == b["train_accuracy"]
    assert a["test_accuracy"] > 0.3  # one epoch already learns most digits


def test_demo_time_budget_trains_whole_epochs():
    result = demo.run(seconds=0.1, seed=0, verbose=False)
    assert result["epochs"] == 1 and result["steps"] == 1438 // demo.BATCH_SIZE
    assert set(result) >= {"test_accuracy", "train_accuracy", "passed", "bar", "backend", "epochs", "steps", "seconds"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=2, seconds=3.0), "give one of them"),
    (dict(epochs=0), "epochs=0"),
    (dict(seconds=-1.0), "seconds=-1.0"),
])
def test_demo_rejects_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.run(verbose=False, **kwargs)


def test_demo_split_is_stratified_and_disjoint():
    x_train, y_train, x_test, y_test = demo.load_digits_split(seed=0)
    assert x_train.shape[1:] == (8, 8, 1) and len(x_train) + len(x_test) == 1797
    assert set(y_test.tolist()) == set(range(10))
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0


def test_demo_verdict_says_why_it_failed():
    failed = dict(test_accuracy=0.883, passed=False, bar=0.9, epochs=1)
    text = demo.verdict(failed, seconds=30.0)
    assert text.startswith("demo FAILED") and "88.30%" in text and "90%" in text and "without --seconds" in text
    assert demo.verdict(dict(failed, test_accuracy=0.95, passed=True)).startswith("demo PASSED")


def test_demo_without_scikit_learn_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert cli.main(["demo", "--epochs", "1"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "[demo] extra" in out[0] and "pip install scikit-learn" in out[0], out


def test_demo_help_describes_every_option(capsys):
    demo_parser = cli._parser()._subparsers._group_actions[0].choices["demo"]
    helps = {a.option_strings[-1]: a.help for a in demo_parser._actions if a.option_strings}
    for option in ("--epochs", "--seconds", "--backend", "--seed"):
        assert helps.get(option) and len(helps[option]) > 20, (option, helps.get(option))
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--epochs", "--seconds", "--backend"))


@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["demo", "--seconds", "0"],
                                  ["demo", "--epochs", "2", "--seconds", "3"], ["demo", "--backend", "no-such"]])
def test_demo_cli_refuses_bad_options(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: mutually exclusive options
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert argv[-2] in captured.out + captured.err  # the message names the option


# ---- bench ---------------------------------------------------------------------------------------
TINY = [
    bench.Case("T1", (24,), 5),
    bench.Case("T2", (9, 11), (3, 4), dilation=(2, 1), heads=2, head_dim=8),
    bench.Case("T3", (4, 6, 6), 3, dilation=(1, 2, 1), heads=2, head_dim=8),
]
FAST = dict(target_seconds=0.01, max_repeats=2, min_repeats=1)


def test_bench_tiny_cases_return_checked_rows():
    rows = bench.run(TINY, quick=True, progress=False, timing=FAST)
    impls = {r["impl"] for r in rows}
    assert "pure" in impls and bench.BASELINE in impls
    for r in rows:
        assert {"case", "impl", "mode", "pass", "median_ms", "repeats", "note"} <= set(r)
        assert not r["note"].startswith("error"), r
    timed = [r for r in rows if r["median_ms"] is not None]
    assert {(r["case"], r["mode"]) for r in timed if r["impl"] == "pure"} == {
        (c.name, m) for c in TINY for m in bench.MODES
    }
    # every forward output matches the float64 reference; gradients match the dense baseline's
    assert all(r["pass"] for r in rows if r["mode"] == "fwd")
    assert all(r["pass"] for r in rows if r["mode"] == "fwdbwd" and r["impl"] != bench.BASELINE)


def test_bench_pure_strategies_get_rows_of_their_own():
    rows = bench.run(TINY[:1], quick=False, progress=False, timing=FAST, baseline=False)
    impls = {r["impl"] for r in rows}
    others = {f"pure[{s}]" for s in strategies.names() if s != strategies.here()}
    assert len(others) == 2 and others <= impls
    assert all(r["pass"] for r in rows if r["mode"] == "fwd")
    assert all(r["pass"] for r in rows if r["mode"] == "fwdbwd" and r["impl"] != "pure")


def test_bench_quick_skips_the_dense_baseline_beyond_small_problems():
    big = bench.Case("B", (bench.QUICK_DENSE_TOKENS + 1,), 3, heads=1, head_dim=4)
    rows = bench.run([big], modes=("fwd",), quick=True, progress=False, timing=FAST)
    base = next(r for r in rows if r["impl"] == bench.BASELINE)
    assert base["median_ms"] is None and "--quick" in base["note"]


def test_bench_table_is_aligned():
    rows = bench.run(TINY[:2], quick=True, progress=False, timing=FAST)
    table = bench.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2
    assert len({len(line) for line in lines}) == 1, table
    # the column separators line up in every line
    assert len({tuple(m.start() for m in re.finditer(r"\|", line)) for line in lines}) == 1


def test_bench_progress_draws_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, drawn in [(io.StringIO(), False), (Tty(), True)]:
        bar = bench.Progress(3, stream=stream)
        bar.describe("C1 pure fwd")
        bar.step()
        bar.close()
        assert bool(stream.getvalue()) is drawn
    quiet = bench.Progress(3, enabled=False, stream=Tty())
    quiet.describe("x")
    quiet.close()
    assert quiet.stream.getvalue() == ""


def test_bench_reference_matches_dense_masked_attention():
    import numpy as np

    case = TINY[1]
    q, k, v, _ = bench.make_inputs(case)
    rows = np.arange(case.tokens)
    ref = bench.reference_rows(case, q, k, v, rows)
    mask = bench.neighborhood_mask(case)
    assert mask.shape == (case.tokens, case.tokens) and mask.dtype == bool
    f = lambda x: np.asarray(x, dtype=np.float64).reshape(case.tokens, case.heads, case.head_dim)  # noqa: E731
    s = np.einsum("nhd,mhd->hnm", f(q), f(k)) * case.head_dim**-0.5
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dense = np.einsum("hnm,mhd->nhd", p, f(v))
    np.testing.assert_allclose(ref[0], dense, atol=1e-10)


def test_bench_time_callable_counts_runs():
    calls = []
    t = bench.time_callable(lambda: calls.append(1), sync=lambda _: None, warmup=2, min_repeats=3, max_repeats=4,
                            target_seconds=10.0)
    assert t.repeats == 4 and len(calls) == 2 + 4 and t.median_ms >= 0


def test_bench_main_writes_json_and_no_carriage_returns(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.CASES["T1"] = TINY[0]
    try:
        code = cli.main(["bench", "--cases", "T1", "--modes", "fwd", "--quick", "--json", str(out)])
    finally:
        del bench.CASES["T1"]
    assert code == 0
    data = json.loads(out.read_text())
    assert data["rows"] and all(r["case"] == "T1" for r in data["rows"])
    captured = capsys.readouterr()
    assert re.search(r"^\| T1 +\|", captured.out, re.M)
    assert "pure strategy here:" in captured.out
    assert "\r" not in captured.out + captured.err  # not a terminal: no progress bar


def test_bench_cli_rejects_unknown_case():
    with pytest.raises(SystemExit):
        bench.main(["--cases", "C9"])


# ---- the pure strategies as the tools see them -----------------------------------------------------
def test_strategies_here_is_one_of_three_and_forcing_each_gives_the_same_output():
    import mlx.core as mx
    import natten_mlx

    assert set(strategies.names()) == {"slices", "gather", "tiled"}
    assert strategies.here() in strategies.names()
    q = mx.random.normal((1, 9, 7, 2, 8), key=mx.random.key(0))
    outs = {}
    for s in strategies.names():
        outs[s] = natten_mlx.na2d(q, q, q, (3, 5), dilation=(2, 1), backend=strategies.configured(s))
    for s in strategies.names():
        assert mx.allclose(outs[s], outs["gather"], atol=1e-5).item(), s
    with pytest.raises(ValueError, match="not a pure strategy"):
        strategies.configured("fast")


def test_check_compares_the_three_strategies(capsys):
    assert cli.main(["check", "--cases", "3"]) == 0
    out = capsys.readouterr().out
    assert "the pure backend runs the" in out
    for s in ("slices", "tiled"):
        assert f"pure ({s} strategy vs gather strategy): 3 checked, 0 mismatched" in out


def test_info_says_which_pure_strategy_runs_here(capsys):
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("pure strategy"))
    assert strategies.here() in line


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("info", "check", "bench", "demo"):
        assert command in text
