"""scripts/mutate.py (``make mutate``): the bookkeeping around mutmut, not mutmut itself."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("mutate_script", ROOT / "scripts" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forget_survivors_clears_only_the_surviving_mutants(tmp_path):
    m = load()
    meta = tmp_path / "mutants" / "src" / "cifarlab" / "optim" / "slbi.py.meta"
    meta.parent.mkdir(parents=True)
    codes = {"a__mutmut_1": 0, "a__mutmut_2": 1, "a__mutmut_3": 0, "a__mutmut_4": 33, "a__mutmut_5": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {"a__mutmut_1": 0.5}}))
    assert m.forget_survivors(tmp_path, "optim/slbi.py") == 2
    data = json.loads(meta.read_text())
    assert data["exit_code_by_key"] == {"a__mutmut_1": None, "a__mutmut_2": 1, "a__mutmut_3": None,
                                        "a__mutmut_4": 33, "a__mutmut_5": None}
    assert data["durations_by_key"] == {"a__mutmut_1": 0.5}  # the rest of mutmut's record is kept
    assert m.forget_survivors(tmp_path, "optim/other.py") == 0  # never run: nothing to forget


def test_unknown_module_is_one_clear_error(capsys):
    m = load()
    assert m.main(["no/such.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not configured") and "optim/slbi.py" in err


def test_definitions_are_the_functions_and_methods_mutmut_mutates_one_by_one(tmp_path):
    m = load()
    src = tmp_path / "mod.py"
    src.write_text("X = 1\n\n\ndef a():\n    def inner():\n        pass\n\n\nclass K:\n    y = 2\n\n"
                   "    def b(self):\n        pass\n\n    async def c(self):\n        pass\n\n\nasync def d():\n    pass\n")
    assert m.definitions(src) == ["a", "b", "c", "d"]  # not the nested one, not the class itself


def test_trainer_config_mutates_only_selection_and_resume():
    m = load()
    _, modules = m.load_config()
    skip = set(modules["train/trainer.py"]["skip"])
    kept = set(m.definitions(ROOT / "code" / "cifarlab" / "train" / "trainer.py")) - skip
    assert kept == {"best_payload", "_checkpoint_payload", "_load_last", "_fit", "_finish", "_step_scheduler"}


def test_survivors_are_tested_again_when_the_module_tests_change(tmp_path, monkeypatch, capsys):
    m = load()
    root, work = tmp_path / "repo", tmp_path / "work"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "test_x.py").write_text("def test_a(): pass\n")
    meta = work / "mutants" / "src" / "cifarlab" / "x.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"f__mutmut_1": 0, "f__mutmut_2": 1}}))
    seen = []  # the survivor's recorded result when mutmut starts: None = it will be tested again

    def fake_mutmut(w, args, log):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        seen.append(codes["f__mutmut_1"])
        codes["f__mutmut_1"] = 0  # survives again
        meta.write_text(json.dumps({"exit_code_by_key": codes}))
        return 0

    monkeypatch.setattr(m, "ROOT", root)
    monkeypatch.setattr(m, "stage", lambda *a: work)
    monkeypatch.setattr(m, "mutmut", fake_mutmut)
    monkeypatch.setattr(m, "show", lambda w, name: name)

    def run(**kw):
        return m.run_module("x.py", ["tests/test_x.py"], [], {}, 1, **kw)

    run()  # first run: nothing recorded to compare with
    run()  # same tests: mutmut's own record stands
    (root / "tests" / "test_x.py").write_text("def test_a(): pass\ndef test_b(): pass\n")
    row = run()  # a test added: the survivor is tested again
    run()
    (root / "tests" / "conftest.py").write_text("# a fixture changed\n")
    run()
    run(retest_survivors=True)  # forced
    assert seen == [0, 0, None, 0, None, None]
    assert row["survivors"] == ["f__mutmut_1"] and row["killed"] == 1
    assert "survivors to test again (tests changed since the last run)" in capsys.readouterr().out
