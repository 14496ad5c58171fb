"""The benchmark suite end to end on one tiny case: files written and well formed, nothing timed."""

import importlib
import json
import pathlib
import sys

import pytest

# bench/ is a folder of the repository, not an installed package: make it importable however
# pytest was started (``python -m pytest`` already has the repository root on sys.path).
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
bench = importlib.import_module("bench")
Case = bench.Case
run_case = bench.runner.run_case

TINY = Case("max_pool", "max 2x2 s2", (2, 8, 8, 4), mode="fwdbwd", window=(2, 2), stride=(2, 2))
ONCE = bench.Settings(repeats=1, min_repeats=1, warmup=0, budget_s=0.0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench.run_suite([TINY], str(out), device_name="smoke", settings=ONCE, copy_mb=1)
    return out


def test_json_has_machine_case_peers_and_ratios(report):
    data = json.loads((report / "smoke.json").read_text())
    for key in ("cpu", "cores", "versions", "date_utc", "jax_backend"):
        assert key in data["machine"]
    assert data["machine"]["torch_device"] == "cpu"
    assert not (report / "smoke.partial.json").exists()  # removed once the run completes
    assert data["copy"]["reference_gbps"] > 0
    (case,) = data["cases"]
    assert case["name"] == TINY.name
    peers = case["peers"]
    assert set(peers) == set(bench.runner.PEERS)
    assert peers["jaxconv"]["status"] in ("ok", "missing")
    assert case["reference_peer"] == "torch_nchw"
    for peer in ("flax", "equinox", "torch_nchw", "torch_cl"):
        assert peers[peer]["status"] == "ok", peers[peer]
        assert peers[peer]["bandwidth_fraction"] > 0
        # same inputs and cotangent in every layout: outputs and input gradients must agree
        assert peers[peer]["agrees"], peers[peer]["max_rel_diff"]
    assert len(peers["flax"]["program"]) == 16
    assert peers["flax"]["memory"]["peak_bytes"] > 0
    assert peers["lax"]["status"] == "n/a"
    if peers["jaxconv"]["status"] == "ok":
        assert set(case["ratios"]) == {"flax", "equinox", "torch_nchw", "torch_cl"}
        assert {t["peer"] for t in case["targets"]} == {"flax", "torch_cl"}


def _tables(md: str) -> list[list[str]]:
    tables, current = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_tables_list_the_case(report):
    md = (report / "smoke.md").read_text()
    assert md.startswith("# jaxconv benchmarks: smoke")
    tables = _tables(md)
    assert len(tables) == 3  # summary, all peers, memory
    for table in tables:
        assert table[1].startswith("|---")
        assert {row.count("|") for row in table} == {table[0].count("|")}
        (row,) = table[2:]
        assert row.startswith("| max 2x2 s2 |")
        assert "2x8x8x4" in row


def test_png_chart_is_written(report):
    assert (report / "smoke.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_an_op_jaxconv_lacks_is_missing_not_a_crash():
    case = Case("no_such_pool", "nothing", (1, 4, 4, 1), window=(2, 2), stride=(2, 2))
    result = run_case(case, ("jaxconv", "flax", "torch_cl"), ONCE, reference_gbps=1.0)
    assert result["peers"]["jaxconv"]["status"] == "missing"
    assert result["peers"]["flax"]["status"] == "n/a"
    assert result["peers"]["torch_cl"]["status"] == "n/a"
    assert result["ratios"] == {}


def test_each_case_is_handed_on_as_soon_as_it_is_measured():
    seen = []
    out = bench.runner.run_cases(
        [TINY, TINY], ("flax",), ONCE, 1.0, log=lambda msg: None, on_case=seen.append
    )
    assert seen == out and len(out) == 2
    assert out[0]["peers"]["flax"]["status"] == "ok"


def test_cli_lists_and_filters_cases(capsys):
    assert bench.main(["--quick", "--list", "--filter", "max 3x3"]) == 0
    names = capsys.readouterr().out.split("\n")
    assert names[0].startswith("max 3x3 s2 p1 fwd float32")
    assert all("max 3x3" in n for n in names if n)
    assert bench.main(["--filter", "no case has this name"]) == 1
    full = bench.all_cases()
    assert len({c.name for c in full}) == len(full)
    assert {c.op for c in full} >= {"max_pool", "avg_pool", "lp_pool", "conv", "max_unpool"}


def test_render_rewrites_markdown_and_chart_from_json(report, tmp_path):
    results = tmp_path / "again.json"
    results.write_text((report / "smoke.json").read_text())
    assert bench.main(["--render", str(results)]) == 0
    assert (tmp_path / "again.md").read_text() == (report / "smoke.md").read_text()
    assert (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")


def test_fast_calls_repeat_until_the_minimum_time():
    """A fast call repeats beyond ``repeats`` while under ``min_time_s``, up to
    ``max_repeats``; with no minimum time it runs ``repeats`` times."""
    base = dict(repeats=3, min_repeats=1, warmup=0, budget_s=100.0)
    more = bench.Settings(**base, min_time_s=100.0, max_repeats=50)
    assert len(bench.measure.time_calls(lambda: None, more)) == 50
    assert len(bench.measure.time_calls(lambda: None, bench.Settings(**base))) == 3


def test_peers_take_turns_and_share_the_repeats():
    """Each round times every peer, the order reversed every other round; the repeats split
    exactly over the rounds; a failing peer keeps its exception; a peer whose first call
    exceeded the budget is timed by one more call, not by its first."""
    calls = []

    def peer(name):
        return bench.measure.Prepared(lambda: calls.append(name), 0.0, {})

    def broken():
        raise RuntimeError("no")

    prepared = {
        "a": peer("a"),
        "b": peer("b"),
        "bad": bench.measure.Prepared(broken, 0.0, {}),
        "slow": bench.measure.Prepared(lambda: calls.append("slow"), 9.0, {}),
    }
    settings = bench.Settings(repeats=4, min_repeats=1, warmup=0, budget_s=5.0, rounds=3)
    times = bench.measure.time_in_turn(prepared, settings)
    assert calls == ["slow", "a", "a", "b", "b", "b", "a", "a", "b"]
    assert len(times["a"]) == len(times["b"]) == 4
    assert isinstance(times["bad"], RuntimeError)
    assert len(times["slow"]) == 1 and times["slow"][0] < 1.0
