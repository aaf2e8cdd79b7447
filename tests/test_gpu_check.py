"""bench/gpu_check.py, the one-command GPU check, exercised on the CPU with --dry-run (tiny shapes, the Triton
interpreter, no extension build).

No timing is asserted (the dry run makes no performance claim).  What is asserted is the bookkeeping a one-shot GPU
run depends on: every stage runs or says it was cut and what it skipped, the summary printed last fits in 40
lines, every CSV row carries the device, versions and date, and a budget too small for the stages cuts them and
records them as cut instead of crashing or overrunning.
"""

import csv
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import load_repo_module, repo_path

pytest.importorskip("triton")

SCRIPT = repo_path("bench", "gpu_check.py")
STAMP = ("date", "device", "torch", "triton")
STAGES = ("env", "correct", "ratios", "rsvd", "e2e")


def _run(outdir, budget, timeout):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, SCRIPT, str(outdir), "--dry-run", "--budget", str(budget)], env=env,
                          cwd=repo_path(), capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def _summary_block(stdout):
    lines = stdout.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("== gpu_check"))
    return lines[start:]


def _check_csv_stamps(outdir):
    paths = sorted(glob.glob(os.path.join(str(outdir), "*.csv")))
    assert paths
    devices = set()
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            assert set(STAMP) <= set(reader.fieldnames), f"{os.path.basename(path)}: header {reader.fieldnames}"
            rows = list(reader)
        assert rows, os.path.basename(path)
        for row in rows:
            assert all(row[k] for k in STAMP), f"{os.path.basename(path)}: unstamped row {row}"
            devices.add(row["device"])
    assert len(devices) == 1, f"device column overwritten by a record field somewhere: {devices}"
    return [os.path.basename(p) for p in paths]


def test_dry_run_runs_every_stage(tmp_path):
    proc, wall = _run(tmp_path, 120, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert wall < 120 + 20, f"the 120 s budget overran: {wall:.0f} s"
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert tuple(stages) == STAGES
    for name, st in stages.items():
        assert st["status"] in ("ok", "cut"), f"{name}: {st}"
        if st["status"] == "cut":
            assert st["cut"], f"{name} was cut without saying what it skipped"
        assert (tmp_path / "logs").is_dir()
    for name in STAGES[1:]:
        assert glob.glob(str(tmp_path / "logs" / f"{name}*.log")), f"no log for {name}"

    block = _summary_block(proc.stdout)
    assert len(block) <= 40, "\n".join(block)
    assert block[-1].startswith("result: PASS"), block[-1]
    assert (tmp_path / "summary.txt").read_text().splitlines() == block
    assert summary["summary_lines"] == len(block)

    written = _check_csv_stamps(tmp_path)
    for name in ("env.csv", "stages.csv", "correct.csv", "correct_families.csv", "ratios.csv", "rsvd.csv"):
        assert name in written, written
    with open(tmp_path / "stages.csv", newline="") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == list(STAGES)

    # every kernel family was checked (tiny shapes, interpreter) and passed, when the stage was not cut
    if stages["correct"]["status"] == "ok":
        with open(tmp_path / "correct_families.csv", newline="") as f:
            fams = list(csv.DictReader(f))
        assert len(fams) == 15
        assert all(r["result"] == "PASS" and int(r["checks"]) > 0 for r in fams), fams
        # the NF4 base: each arrangement x mode AB / B, bf16 and fp32, dropout 0.1, and the path each one took
        with open(tmp_path / "correct.csv", newline="") as f:
            nf4 = [r for r in csv.DictReader(f) if r["case"].startswith("NF4")]
        assert nf4 and all(r["ok"] == "True" for r in nf4), nf4
        labels = {r["label"] for r in nf4}
        for dt in ("bfloat16", "float32"):
            for arrangement in ("fused", "split"):
                for mode in ("AB", "B"):
                    assert f"{arrangement} {dt} 37x100->70 r7 {mode} p=0.1" in labels, labels
                assert f"{dt} {arrangement} path taken" in labels, labels
    if stages["ratios"]["status"] == "ok":
        with open(tmp_path / "ratios.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {"linear", "addmm", "ours", "ours-fused", "ours-split"} <= {r["provider"] for r in rows}
        assert all(float(r["ratio"]) > 0 and r["numerics_ok"] == "True" for r in rows)
        # fp32 lora_A / lora_B on the 16-bit base (PEFT parity): AB and B rows, with the ratio to ours' own row
        f32 = [r for r in rows if r["provider"] == "ours-fp32-adapters"]
        assert {r["mode"] for r in f32} == {"fwdbwd-AB", "fwdbwd-B"}, f32
        assert all(float(r["ratio_vs_ours"]) > 0 and r["adapter_dtype"] == "float32" and r["grad_dtypes_ok"] == "True"
                   for r in f32), f32
        assert any("fp32A(/ours)" in line for line in block), block
        # QLoRA on the NF4 base: forward and forward+backward, the floor, PEFT (+ bitsandbytes where it imports) or
        # its composition, ours AB and B; numerics checked; the target line on the summary
        qlora = [r for r in rows if r["case"].startswith("qlora")]
        assert {r["mode"] for r in qlora} == {"fwd", "fwdbwd"}, qlora
        want = {"nf4-dequant+linear", "peft-style", "ours-AB", "ours-B"}
        assert want <= {r["provider"] for r in qlora if r["mode"] == "fwdbwd"}, qlora
        assert all(float(r["speedup_vs_peft"]) > 0 for r in qlora)
        assert any(line.startswith("qlora (") for line in block), block
        assert any("target ours-B fwd+bwd >= 1.5x faster than peft-" in line and "numerics ok" in line
                   for line in block), block
    if stages["e2e"]["status"] == "ok":
        with open(tmp_path / "e2e.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        patched = [r for r in rows if r["provider"] == "peft+patch"]
        assert {r["mode"] for r in patched} == {"AB", "B"}, rows
        assert all(float(r["ms"]) > 0 and int(r["patched_layers"]) > 0 and not r["error"] for r in patched), patched
        assert {"peft", "lora_kernels"} <= {r["provider"] for r in rows}
        assert any("peft+patch" in line for line in block if line.startswith("e2e")), block


def test_tiny_budget_cuts_stages_without_crashing(tmp_path):
    budget = 6
    proc, wall = _run(tmp_path, budget, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert wall < budget + 15, f"the {budget} s budget overran: {wall:.0f} s"
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert tuple(stages) == STAGES
    assert all(st["status"] in ("ok", "cut") for st in stages.values()), stages
    cut = [name for name, st in stages.items() if st["status"] == "cut"]
    assert cut, "a 6 s budget cannot run every stage"
    for name in cut:
        assert stages[name]["cut"] or "not started" in stages[name]["note"], stages[name]
    block = _summary_block(proc.stdout)
    assert len(block) <= 40
    assert "cut: " in block[-1] and all(name in block[-1] for name in cut), block[-1]
    _check_csv_stamps(tmp_path)


def test_schedule_and_arguments():
    gc = load_repo_module("bench", "gpu_check.py")
    deadlines, scale = gc.schedule(list(STAGES), 450.0, 1000.0)
    assert scale == 1.0
    ends = [deadlines[s] for s in STAGES]
    assert ends == sorted(ends) and ends[0] == 1010.0 and ends[-1] == 1000.0 + 450.0 - gc.RESERVE
    assert sum(gc.SHARE.values()) + gc.RESERVE == 450
    deadlines, _ = gc.schedule(["rsvd"], 450.0, 0.0)  # a single stage gets everything but the reserve
    assert deadlines == {"rsvd": 450.0 - gc.RESERVE}
    with pytest.raises(SystemExit):
        gc.parse_args(["out", "--stages", "env,tests"])
    assert gc.parse_args(["out", "--stages", "rsvd,env"]).stages == ["rsvd", "env"]
