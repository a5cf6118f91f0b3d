import json
import subprocess
import sys

import pytest

from qapruner.evaluate import cells, parse_method, table


def test_parse_method():
    assert parse_method("fp") == ("fp", "dense")
    assert parse_method("w4a4-qapruner") == ("w4a4", "qapruner")
    assert parse_method("w8a8-semantic") == ("w8a8", "semantic")
    for bad in ("w3a3-qapruner", "w4a4-magic", "qapruner"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_cells_cover_the_grid_without_redundant_float_cells():
    g = cells(["fp", "fp-semantic", "w4a4-dense", "w4a4-qapruner", "w4a16-qapruner"], [1.0, 0.5], "cls", "static",
              [0, 1, 2])
    count = {m: sum(c["method"] == m for c in g) for m in ("fp", "fp-semantic", "w4a4-dense", "w4a4-qapruner")}
    assert count == {"fp": 1, "fp-semantic": 2, "w4a4-dense": 3, "w4a4-qapruner": 6}
    assert all(c["act"] is None for c in g if c["method"].startswith(("fp", "w4a16")))
    assert all(c["act"] == "static" for c in g if c["method"].startswith("w4a4"))


def test_table_mean_and_std():
    recs = [{"method": "w4a4-qapruner", "retention": 0.5, "semantic": "cls", "act": "dynamic", "alpha": 0.7,
             "calib_seed": s, "accuracy": a} for s, a in enumerate((0.5, 0.6, 0.7))]
    md = table(recs)
    assert "| w4a4-qapruner | 60.0 ± 10.0 |" in md and "simulated" in md


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from qapruner.model import save, tiny

    return save(tiny(seed=0), tmp_path_factory.mktemp("m") / "tiny")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "qapruner.evaluate", "--no-progress", *args], capture_output=True,
                          text=True)


def test_tiny_grid_writes_well_formed_results_and_resumes(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    args = ["--model", str(tiny_dir), "--questions", "6", "--retention", "1.0", "0.25", "--methods", "fp",
            "w4a4-qapruner", "w4a4-semantic", "--calib-seeds", "2", "--act", "static", "--out", str(out)]
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())
    assert len(recs) == 1 + 2 * 2 * 2
    keys = {"method", "retention", "keep", "semantic", "act", "calib_seed", "accuracy", "n"}
    for rec in recs:
        assert keys <= rec.keys() and 0 <= rec["accuracy"] <= 1 and rec["n"] == 6
    assert {rec["keep"] for rec in recs} == {64, 16}
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 1000
    before = out.read_text()
    r = _run(*args)  # everything cached: nothing re-evaluated
    assert r.returncode == 0 and out.read_text() == before


@pytest.mark.parametrize("args,match", [
    (["--methods", "w4a4-magic"], "unknown method"), (["--retention", "0"], "retention"),
    (["--retention", "1.5"], "retention"), (["--model", "/nonexistent/dir"], "not found"),
])
def test_bad_flags_one_line_errors(tiny_dir, tmp_path, args, match):
    base = ["--model", str(tiny_dir), "--questions", "2", "--out", str(tmp_path / "x.json")]
    r = _run(*base, *args)
    assert r.returncode == 2 and match in r.stderr and r.stderr.strip().count("\n") == 0


def test_quota_is_a_method_of_the_grid(tiny_dir, tmp_path):
    from qapruner.model import save, tiny

    deep = save(tiny(seed=1, text_layers=6), tmp_path / "deep")
    out = tmp_path / "q.json"
    r = _run("--model", str(deep), "--questions", "4", "--retention", "0.5", "--methods", "w4a16-quota",
             "--calib-seeds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(out.read_text())
    assert rec["method"] == "w4a16-quota" and 0 <= rec["accuracy"] <= 1
    assert rec["processed"] <= 0.5 + 1 / 64 and rec["layers"][0] >= 2
    assert rec["pre_retention"] == pytest.approx(min(1.0, 0.5 * 6 / (2 + 4 * 0.25)))
    assert "w4a16-quota" in out.with_suffix(".md").read_text()
    # a 2-layer decoder has no layer QUOTA may prune at (never the first two): a one-line error
    shallow = _run("--model", str(tiny_dir), "--questions", "2", "--methods", "w4a4-quota",
                   "--retention", "0.5", "--calib-seeds", "1", "--out", str(tmp_path / "x.json"))
    assert shallow.returncode == 2 and "no layer to prune" in shallow.stderr, shallow.stderr
    assert shallow.stderr.strip().count("\n") == 0
