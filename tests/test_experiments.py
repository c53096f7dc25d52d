import json

import pytest
import torch
from conftest import SHARED_DATA

from memory_distill.cli import main

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "fireact").exists(), reason="../shared/data not present")


def test_experiment_command_compares_all_curricula_and_routes(tmp_path, capsys):
    out = tmp_path / "exp"
    before = torch.random.get_rng_state()
    code = main(["-q", "experiment", "--data", str(SHARED_DATA), "--out", str(out), "--seeds", "0",
                 "--epochs", "4", "--max-records", "600", "--curricula", "uniform", "easy_to_hard", "sec_bandit"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["variants"] == ["uniform", "easy_to_hard", "sec_bandit", "uniform+adaptive_teaching"]
    assert len(res["rows"]) == len(res["datasets"]) * 4 and len(res["datasets"]) >= 2
    bandit = next(r for r in res["rows"] if r["curriculum"] == "sec_bandit")
    assert sum(bandit["curriculum_state"]["pulls"]) > 0 and len(bandit["curriculum_state"]["q"]) == 5
    adaptive = next(r for r in res["rows"] if r["curriculum"] == "uniform+adaptive_teaching")
    assert 0 <= adaptive["adaptive"]["agreement_rate"] <= 1 and adaptive["adaptive"]["cumulative_reward"] >= 0
    assert (out / "curricula.png").stat().st_size > 1000 and "| uniform |" in (out / "report.md").read_text()
    router = json.loads((out / "router.json").read_text())
    pts = router["curves"][0]["student"]
    assert pts[0]["cheap_fraction"] <= pts[-1]["cheap_fraction"]
    assert "quality-vs-cheap-share AUC" in capsys.readouterr().out
    assert torch.equal(torch.random.get_rng_state(), before)  # the runs' seeding leaves the caller's RNG alone

