"""ResNet-50 as the bundle paper runs it, through the CLI: shape 4,2 and 2 bundles x 1,1 against one process;
a torchvision-format --init file in and out unchanged; BatchNorm statistics averaged over bundles."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import HVDTRAIN, max_diff, mpirun, params, run

R50 = ["resnet", "--arch", "resnet50", "--steps", "2", "--batch-size", "16", "--no-progress", "--save-params",
       "--no-fp16-compression", "--seed", "3"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = str(tmp_path_factory.mktemp("r50") / "one")
    r = run([HVDTRAIN, *R50, "--out", out])
    assert r.rc == 0, r.err[-3000:]
    return params(out)


@pytest.mark.parametrize("np_, layout, described", [
    (6, ["--bundle-shape", "4,2"], "1 bundle(s) x stages of width 4,2"),
    (4, ["--bundle-shape", "1,1"], "2 bundle(s) x stages of width 1,1"),
], ids=["shape-4,2", "2-bundles-x-1,1"])
def test_resnet50_layouts_match_one_process(one_process: dict[str, torch.Tensor], tmp_path, np_: int,
                                            layout: list[str], described: str) -> None:
    out = str(tmp_path / "run")
    r = mpirun(np_, *R50, *layout, "--out", out, timeout=300)
    assert r.rc == 0, r.err[-3000:]
    assert described in r.err
    got = params(out)
    assert len(got) == 161 and "layer4.2.conv3.weight" in got and "fc.bias" in got
    assert max_diff(got, one_process) <= 1e-5


def test_a_torchvision_format_file_loads_at_2x2_and_comes_back_unchanged(tmp_path) -> None:
    from hvdhybrid.models.resnet import torchvision_layer_fns
    from hvdhybrid.parallel.staged import Part

    torch.manual_seed(0)
    model = Part([f() for f in torchvision_layer_fns("resnet18", 3, 10, "batch")], 0)
    sd = {n: (torch.randn_like(t) if t.is_floating_point() else t + 5) for n, t in model.state_dict().items()}
    sd = {n: (t.abs() if n.endswith("running_var") else t) for n, t in sd.items()}
    init = str(tmp_path / "resnet18.pt")
    torch.save(sd, init)
    out = str(tmp_path / "run")
    r = mpirun(4, "resnet", "--arch", "resnet18", "--norm", "batch", "--init", init, "--bundle-shape", "1,1",
               "--steps", "0", "--save-params", "--no-progress", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    got = params(out)
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[n], sd[n]) for n in sd)


def test_batch_norm_statistics_are_averaged_over_bundles(tmp_path) -> None:
    """The first BatchNorm sees the same inputs at any layout, and its running mean is linear in them:
    averaged over 2 bundles of 16 rows it equals one process's over 32 rows."""
    base = ["resnet", "--norm", "batch", "--steps", "1", "-m", "1", "--batch-size", "32", "--no-progress",
            "--save-params", "--no-fp16-compression"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run([HVDTRAIN, *base, "--out", one]).rc == 0
    r = mpirun(2, *base, "--dp-only", "--out", two)
    assert r.rc == 0, r.err[-3000:]
    a, b = params(one), params(two)
    assert a["0.1.running_mean"].abs().max() > 1e-3
    assert torch.allclose(a["0.1.running_mean"], b["0.1.running_mean"], atol=1e-6)
    assert os.path.exists(os.path.join(two, "summary.json"))
