"""`aift launch` with hostile values: each is refused before anything is written or queued, or it reaches the job
as the plain value it is. The queued script is run with bash, with stub srun/scontrol/aift/sbatch on PATH that record
what they are given, so what the job would really execute is checked, not the text of the script."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import aift

BASE = ["recipe=plastic_sorting", "cluster=local_slurm", "trainer.accelerator=cpu", "tracking=none"]
# the job's own additions to the training command (after the user's overrides; hydra.run.dir is checked apart)
PINNED = ["ckpt_path=auto", "trainer.devices=1", "trainer.num_nodes=1"]
STUB = '#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORD/$(basename "$0").argv"\n'
STUBS = {
    "srun": STUB + 'printf "%s" "${PROBE-unset}" > "$RECORD/srun.probe"\n',
    "scontrol": STUB + "echo node1\n",
    "aift": STUB,
    "sbatch": STUB + 'cp "${@: -1}" "$RECORD/queued.sbatch"\necho 4242\n',
}
HOSTILE = 'a b;$(touch marker)`touch marker`"q"|touch marker&'  # as a Hydra string: quoted, no ' or \ inside
HOSTILE_DIR = "it's \"a\" run $(touch marker) `touch marker`; touch marker #x %j&|*"


def hydra_quoted(text: str) -> str:
    return "'" + text + "'"


@pytest.fixture
def stubs(tmp_path) -> tuple[Path, Path]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir, record


def _launch(tmp_path: Path, stubs: tuple[Path, Path], args: list[str], run_name: str | None):
    bin_dir, record = stubs
    work = tmp_path / "work"
    work.mkdir()
    run_dir = ["--run-dir", str(work / run_name)] if run_name is not None else []
    result = aift("launch", *BASE, *args, "--no-data-check", *run_dir, cwd=work,
                  env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)})
    return result, work


REFUSED = [
    ("job name: newline + command", ["--job-name", "x\ntouch marker"], "run", "--job-name 'x\\ntouch marker'"),
    ("job name: $()", ["--job-name", "a$(touch marker)"], "run", "--job-name 'a$(touch marker)'"),
    ("job name: ; and a space", ["--job-name", "a; touch marker"], "run", "--job-name 'a; touch marker'"),
    ("partition: newline + command", ["cluster.partition='debug\ntouch marker'"], "run",
     "'cluster.partition': 'debug\\ntouch marker'"),
    ("partition: ;", ["cluster.partition='debug;touch marker'"], "run", "'cluster.partition': 'debug;touch marker'"),
    ("qos: backticks", ["cluster.qos='normal`touch marker`'"], "run", "'cluster.qos': 'normal`touch marker`'"),
    ("account: $()", ["cluster.accounts.default='acct$(touch marker)'"], "run",
     "'cluster.accounts.default': 'acct$(touch marker)'"),
    ("profile name: newline (a comment line)", ["cluster.name='x\ntouch marker'"], "run",
     "'cluster.name': 'x\\ntouch marker'"),
    ("env value: newline", ["+cluster.env.PROBE='a\ntouch marker'"], "run", "'cluster.env.PROBE': 'a\\ntouch marker'"),
    ("override: newline", ["tracking.run_name='a\ntouch marker'"], "run",
     "override \"tracking.run_name='a\\ntouch marker'\""),
    ("run dir: newline + command", [], "run\ntouch marker", "\\ntouch marker' is not valid"),
    ("run dir: Hydra interpolation", [], "${oc.env:HOME}", "/${oc.env:HOME}' is not valid"),
    ("run dir: backslash", [], "a\\b", "a\\\\b' is not valid"),
]


@pytest.mark.parametrize("args, run_name, message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_a_hostile_value_is_refused_in_one_line_before_anything_is_written_or_queued(args, run_name, message,
                                                                                      stubs, tmp_path):
    result, work = _launch(tmp_path, stubs, args, run_name)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "is not valid" in lines[0] or "may not contain" in lines[0]
    assert list(stubs[1].iterdir()) == []  # sbatch never ran
    assert list(work.iterdir()) == []  # no run folder, no script
    assert not list(tmp_path.rglob("marker"))


def _directives(script: str) -> list[list[str]]:
    """The #SBATCH lines as sbatch reads them: only the comment block before the first command, each line's value
    split with shell-like quotes (as sbatch does; an unquoted # starts a comment)."""
    header = []
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH"):
            header.append(shlex.split(line[len("#SBATCH"):], comments=True))
    return header


INERT = [
    ("run dir with a space", [], "run dir", None),
    ("run dir, override and env value with quotes, $(), backticks, ;, #, %, &, |",
     [f"tracking.run_name={hydra_quoted(HOSTILE)}", f"+cluster.env.PROBE={hydra_quoted(HOSTILE)}"], HOSTILE_DIR, HOSTILE),
]


@pytest.mark.parametrize("args, run_name, probe", [case[1:] for case in INERT], ids=[case[0] for case in INERT])
def test_a_hostile_value_that_is_accepted_reaches_the_job_as_itself(args, run_name, probe, stubs, tmp_path):
    bin_dir, record = stubs
    result, work = _launch(tmp_path, stubs, [*args, "--job-name", "probe.job+1"], run_name)
    assert result.returncode == 0, result.stderr[-3000:]
    run = work / run_name
    queued = (record / "queued.sbatch").read_text()
    assert queued == (run / "launch.sbatch").read_text()
    output = str(run).replace("%", "%%")  # Slurm's log file name pattern: %% is a literal %
    assert _directives(queued) == [
        ["--job-name=probe.job+1"], ["--partition=debug"], ["--nodes=1"], ["--ntasks-per-node=1"],
        ["--cpus-per-task=1"], ["--time=00:30:00"], ["--signal=USR1@60"], ["--requeue"],
        [f"--output={output}/slurm/%x-%j.out"], [f"--error={output}/slurm/%x-%j.err"],
    ]
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    job = subprocess.run(["bash", str(run / "launch.sbatch")], cwd=job_dir, capture_output=True, text=True, timeout=60,
                         env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record),
                              "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1"})
    assert job.returncode == 0, job.stderr
    assert not list(tmp_path.rglob("marker")), "an injected command ran"
    argv = (record / "srun.argv").read_bytes().decode().split("\0")[:-1]
    assert argv[:-1] == ["--kill-on-bad-exit=1", "aift", "train", *BASE, *args, *PINNED]
    run_dir = OverridesParser.create().parse_override(argv[-1])  # what the job's Hydra will make of it
    assert run_dir.key_or_group == "hydra.run.dir" and run_dir.value() == str(run)
    assert (record / "srun.probe").read_text() == (probe if probe is not None else "unset")


def test_an_override_hydra_cannot_parse_is_one_line_naming_it(tmp_path):
    for override, reason in [("trainer.max_epochs=[1", "no viable alternative at input '[1'"),
                             ("junk", "missing EQUAL")]:
        result = aift("launch", "--dry-run", "recipe=plastic_sorting", override, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: override {override!r} cannot be parsed ({reason}"), lines
