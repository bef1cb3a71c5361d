"""`saferl study strpo-ablation` (the sTRPO paper's Appendix C): the variants' overrides, that each
built config differs from sTRPO's in exactly one factor, one-line usage errors, and a real tiny
study on FunctionEnv-v0 whose stage-1 runs are shared and whose table is
recomputed here from the runs' own metrics.csv."""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import yaml

from saferl.tools.studies import strpo_ablation as study
from saferl.tools.studies.runner import final_performance, format_mean_std, read_curve


def test_variants_overrides_and_stage1_kinds():
    assert study.variant_keys(["sTRPO", "no unsafe term", "Unsafe-TRPO", "δ = 1e-3", "strpo"]) == [
        "strpo", "no-unsafe-term", "unsafe-trpo", "delta-1e-3"]  # names or labels, any case, table order
    assert study.variant_overrides("strpo", "/r/dtrpo") == ["algo_params.unsafe_policy=/r/dtrpo"]
    assert study.variant_overrides("no-joint-advantage", "/r") == ["algo_params.joint_advantage=false",
                                                                   "algo_params.unsafe_policy=/r"]
    assert study.variant_overrides("no-unsafe-term", "/r") == ["algo_params.exclusion=false"]  # no π_unsafe
    assert study.variant_overrides("lambda2-1") == ["algo_params.lambda2=1.0", "algo_params.adapt_lambda2=false"]
    assert study.variant_overrides("lambda2-0.01") == ["algo_params.lambda2=0.01", "algo_params.adapt_lambda2=false"]
    assert study.variant_overrides("delta-1e-4") == ["algo_params.target_kl=0.0001", "algo_params.delta2=0.0001"]
    assert study.stage1_kinds(["no-unsafe-term"]) == []
    assert study.stage1_kinds(["unsafe-trpo", "lambda2-1"]) == ["dtrpo", "trpo"]
    assert study.stage1_kinds(["unsafe-trpo"]) == ["trpo"]
    assert study.plot_rows(["strpo", "no-unsafe-term"]) == [["strpo", "no-unsafe-term"]]
    assert study.plot_rows(list(study.VARIANTS)) == [
        ["strpo", "no-joint-advantage", "no-unsafe-term"], ["strpo", "lambda2-0.01", "lambda2-1", "unsafe-trpo"],
        ["strpo", "delta-1e-2", "delta-1e-3", "delta-1e-4"]]


def test_planned_configs(tmp_path):
    """Every variant's stage-2 config carries its change; stage 1 its critic kind and budget."""
    p = argparse.ArgumentParser()
    study.add_arguments(p)
    s = study._settings(p.parse_args(["--task", "FunctionEnv-v0", "--steps", "4000", "--unsafe-steps", "2000",
                                      "--steps-per-iteration", "1000", "--envs", "10", "--seeds", "0,3"]))
    stage1 = study.plan_stage1(s, tmp_path)
    assert sorted(stage1) == [("dtrpo", 0), ("dtrpo", 3), ("trpo", 0), ("trpo", 3)]
    assert stage1["trpo", 3]["name"] == "trpo_unsafe-FunctionEnv-v0-trpo-s3"
    assert stage1["trpo", 3]["cfg"].algo_params["distributional"] is False
    assert stage1["dtrpo", 0]["cfg"].algo_params["distributional"] is True
    assert stage1["dtrpo", 0]["cfg"].total_env_steps == 2000
    unsafe = {}
    for kind, seed in stage1:  # an existing directory per stage-1 run passes the validator
        (tmp_path / f"{kind}{seed}").mkdir()
        unsafe[kind, seed] = str(tmp_path / f"{kind}{seed}")
    jobs = {(j["variant"], j["seed"]): j["cfg"] for j in study.plan_stage2(s, tmp_path, unsafe)}
    assert len(jobs) == 18 and all(c.total_env_steps == 4000 and c.resources.envs_per_host == 10
                                   for c in jobs.values())
    ap = {k: c.algo_params for k, c in jobs.items()}
    assert ap["strpo", 0]["unsafe_policy"] == unsafe["dtrpo", 0]
    assert (ap["strpo", 0]["target_kl"], ap["strpo", 0]["delta2"], ap["strpo", 0]["lambda2"]) == (0.01, 1e-4, 0.01)
    assert ap["no-joint-advantage", 3]["joint_advantage"] is False
    assert ap["no-unsafe-term", 0]["exclusion"] is False and ap["no-unsafe-term", 0].get("unsafe_policy") is None
    assert ap["lambda2-1", 0]["lambda2"] == 1.0 and ap["lambda2-1", 0]["adapt_lambda2"] is False
    assert ap["delta-1e-3", 0]["target_kl"] == ap["delta-1e-3", 0]["delta2"] == 1e-3
    # each arm differs from sTRPO (same seed) in its one factor only, the learner's resolved
    # parameters compared (defaults filled in)
    from saferl.learners.strpo import STRPO

    def resolved(variant, seed):
        return STRPO.Params(**ap[variant, seed]).model_dump()

    for seed in (0, 3):
        full = resolved("strpo", seed)
        assert full["adapt_lambda2"] is True and full["fallback"] == "reverse" and full["exclusion"] is True
        for key in study.VARIANTS:
            diff = {k for k, v in resolved(key, seed).items() if v != full[k]}
            factor, keys = study.FACTORS[key]
            assert (diff == set()) if key == "strpo" else (diff and diff <= set(keys)), (key, factor, diff)
    # the λ2 sweep: its two arms differ from each other in λ2 alone
    assert {k for k, v in resolved("lambda2-1", 0).items() if v != resolved("lambda2-0.01", 0)[k]} == {"lambda2"}


def test_usage_errors_are_one_line(tmp_path, capsys):
    from saferl.cli import main

    out = tmp_path / "s"
    for argv, msg in ((["--variants", "sTRPO,bogus"], "--variants 'bogus': unknown variant"),
                      (["--task", "Nope-v0"], "unknown task 'Nope-v0'"),
                      (["--seeds", "0,x"], "--seeds"),
                      (["--steps", "0"], "--steps must be > 0"),
                      (["--task", "FunctionEnv-v0", "--envs", "7"], "steps_per_iteration")):
        assert main(["study", "strpo-ablation", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert not out.exists()  # validated before anything is created


def _cell(values: list) -> str:
    return format_mean_std(values)


@pytest.mark.slow
def test_tiny_study_function_env(ray_session, run_root, tmp_path, capsys):
    """sTRPO, "no unsafe term" and "unsafe policy by TRPO" on FunctionEnv-v0, one seed: stage 1
    (2,000 steps) once per kind, shared; stage 2 4,000 steps, 1,000 per iteration on 1 host × 10
    envs (one 100-step episode per env per iteration); a rerun retrains nothing."""
    from saferl.cli import main

    out = tmp_path / "abl"
    argv = ["study", "strpo-ablation", "--task", "FunctionEnv-v0", "--variants",
            "sTRPO,no unsafe term,unsafe policy by TRPO", "--seeds", "1", "--steps", "4000", "--unsafe-steps", "2000",
            "--steps-per-iteration", "1000", "--hosts", "1", "--envs", "10", "--out", str(out),
            "--set", "logging.tensorboard=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "start stage 1 (DTRPO) on FunctionEnv-v0 seed 0" in printed and "start stage 1 (TRPO)" in printed
    for name in ("ablation.md", "summary.csv", "runs.csv", "curves.csv", "ablation.png", "study.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    # stage 1 once per kind, shared: no stage-2 run trained its own
    runs_dir = out / "runs"
    dtrpo, trpo = runs_dir / "trpo_unsafe-FunctionEnv-v0-dtrpo-s0", runs_dir / "trpo_unsafe-FunctionEnv-v0-trpo-s0"
    stage2 = {k: runs_dir / f"strpo-FunctionEnv-v0-{k}-s0" for k in ("strpo", "no-unsafe-term", "unsafe-trpo")}
    assert sorted(p.name for p in runs_dir.iterdir()) == sorted([dtrpo.name, trpo.name, *(p.name for p in
                                                                                          stage2.values())])
    for key, path in stage2.items():
        assert not (path / "unsafe_policy").exists(), key
        ap = yaml.safe_load((path / "config.yaml").read_text())["algo_params"]
        want = {"strpo": str(dtrpo), "unsafe-trpo": str(trpo), "no-unsafe-term": None}[key]
        assert ap.get("unsafe_policy") == want and ap.get("exclusion", True) is (key != "no-unsafe-term"), ap
    assert yaml.safe_load((trpo / "config.yaml").read_text())["algo_params"]["distributional"] is False

    # the table: each row recomputed from the run's own metrics.csv
    runs = {r["variant"]: r for r in csv.DictReader(open(out / "runs.csv", newline=""))}
    assert set(runs) == {"stage1-dtrpo", "stage1-trpo", *stage2} and all(r["status"] == "ok" for r in runs.values())
    table = (out / "ablation.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| Variant")}
    assert list(rows) == ["sTRPO", "no unsafe term", "unsafe policy by TRPO"]
    for key, path in stage2.items():
        x, ret, cost = read_curve(path / "metrics.csv")
        assert len(x) == 4  # one episode of every env per iteration
        r, c, k = final_performance(ret, cost)
        metrics = list(csv.DictReader(open(path / "metrics.csv", newline="")))
        cases = [float(row["strpo/case"]) for row in metrics]
        assert len(cases) == 4 and set(cases) <= {0.0, 1.0, 2.0}
        shares = [sum(v == c for v in cases) / len(cases) for c in (0, 1, 2)]
        # the learner's own one-hot and cumulative shares agree with the case column
        for i, m in enumerate(metrics):
            assert [float(m[f"strpo/{c}"]) for c in ("forward", "reverse", "kept")] == [
                float(cases[i] == c) for c in (0, 1, 2)]
        assert [float(metrics[-1][f"strpo/{c}_share"]) for c in ("forward", "reverse", "kept")] == pytest.approx(shares)
        if key == "no-unsafe-term":
            assert shares[1] == 0  # TRPO has no reverse step
        row = rows[study.VARIANTS[key][0]]
        assert row[2:7] == [_cell([r]), _cell([c]), *(_cell([x]) for x in shares[:2]), _cell([shares[2]]) + " |"], \
            (key, row)
        assert float(runs[key]["final_return"]) == pytest.approx(r) and k == 1
        assert [float(runs[key][f"{c}_fraction"]) for c in ("forward", "reverse", "kept")] == pytest.approx(shares)
    assert runs["stage1-dtrpo"]["forward_fraction"] == ""

    # same --out: nothing is trained again, the outputs are recomputed
    stamps = {p: (p / "metrics.csv").stat().st_mtime for p in [dtrpo, trpo, *stage2.values()]}
    assert main(argv + ["--last-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, kept") == 5 and " start " not in printed
    assert all((p / "metrics.csv").stat().st_mtime == t for p, t in stamps.items())
    again = {r["variant"]: r for r in csv.DictReader(open(out / "runs.csv", newline=""))}
    assert all(again[k]["last_k"] == "2" for k in stage2)
    assert Path(again["strpo"]["run_dir"]) == stage2["strpo"]
