"""The `plan` and `launch --dry-run` subcommands and their helpers (no MPI needed)."""

import shlex
import sys

from click.testing import CliRunner

from hvdhybrid.cli.launcher import launch_command
from hvdhybrid.cli.main import cli
from hvdhybrid.cli.plan import render_plan
from hvdhybrid.layout.topology import Layout

GOLDEN_GROUPS = [
    "bundle groups: [0, 1, 2, 3] [4, 5, 6, 7]",
    "stage groups:  [0] [1, 2, 3] [4] [5, 6, 7]",
    "data groups:   [0, 4] [1, 5] [2, 6] [3, 7]",
]


def invoke(*args):
    return CliRunner().invoke(cli, list(args), prog_name="hvdtrain")


def test_plan_golden():
    res = invoke("plan", "-np", "8", "--bundle-shape", "1,3")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    for golden in GOLDEN_GROUPS:
        assert any(line.startswith(golden) for line in lines), golden
    rows = [f for f in map(str.split, lines) if len(f) == 4 and all(x.isdigit() for x in f)]
    assert len(rows) == 8
    assert rows[0] == ["0", "0", "0", "0"] and rows[5] == ["5", "1", "1", "0"]


def test_plan_with_hostfile(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=2\nb slots=2\n")
    res = invoke("plan", "-np", "4", "--stages", "2", "--hostfile", str(hf))
    assert res.exit_code == 0, res.output
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] in (["0"], ["3"])]
    assert rows == [["0", "0", "0", "0", "a"], ["3", "1", "1", "0", "b"]]


def test_plan_bad_layout_one_line_exit_2():
    res = invoke("plan", "-np", "6", "--bundle-shape", "2,2")
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hvdtrain: error:")
    assert "world size 6" in err[0]
    assert "Traceback" not in res.output and res.stdout == ""


def test_plan_both_stages_and_shape():
    res = invoke("plan", "-np", "4", "--stages", "2", "--bundle-shape", "1,1")
    assert res.exit_code == 2 and "not both" in res.stderr


def test_plan_bad_hostfile_exit_2(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=2\nb:2\n")
    res = invoke("plan", "-np", "2", "--hostfile", str(hf))
    assert res.exit_code == 2
    assert res.stderr.startswith("hvdtrain: error:") and f"{hf}:2" in res.stderr
    assert "Traceback" not in res.output


def test_plan_too_few_slots_exit_2(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=2\n")
    res = invoke("plan", "-np", "4", "--hostfile", str(hf))
    assert res.exit_code == 2 and "-np 4 needs 4 slots" in res.stderr


def test_launch_dry_run():
    res = invoke("launch", "-np", "2", "--dry-run", "--", "mlp", "--steps", "1")
    assert res.exit_code == 0, res.output
    argv = shlex.split(res.stdout.strip())
    assert argv[0] == "mpirun" and "-np 2" in res.stdout
    assert argv[argv.index("-np") + 1] == "2"
    assert argv[-5:] == ["-m", "hvdhybrid", "mlp", "--steps", "1"]


def test_launch_without_args_exit_2():
    res = invoke("launch", "-np", "2", "--dry-run")
    assert res.exit_code == 2 and "nothing to launch" in res.stderr


def test_launch_command_variants():
    cmd = launch_command(4, "hosts.txt", False, ["resnet"])
    assert cmd[:3] == ["mpirun", "-np", "4"]
    assert cmd[cmd.index("--hostfile") + 1] == "hosts.txt"
    assert cmd[-4:] == [sys.executable, "-m", "hvdhybrid", "resnet"]
    hr = launch_command(3, None, True, ["mlp"])
    assert hr[1:3] == ["-np", "3"] and hr[hr.index("-H") + 1] == "localhost:3"
    assert "--hostfile" not in launch_command(2, None, False, ["mlp"])


def test_render_plan_hosts_column():
    text = render_plan(Layout(2, (1,)), ["h0", "h1"])
    lines = text.splitlines()
    assert lines[0] == "2 bundle(s) x stages of width 1 = 2 ranks"
    assert lines[1].split() == ["rank", "bundle", "stage", "replica", "host"]
    assert lines[2].split() == ["0", "0", "0", "0", "h0"]
    assert lines[-1].startswith("data groups:   [0, 1]")
