"""ResNet-18..152 with torchvision's names and sizes; units cut by Part; --init files checked by name."""

from __future__ import annotations

import pytest
import torch

from hvdhybrid.models.resnet import ARCHS, InitFile, resnet_layer_fns, torchvision_layer_fns
from hvdhybrid.models.resnet.weights import InitError
from hvdhybrid.parallel.staged import Part, Unit, keyed_layers, meta_layers, sequential_model

# torchvision 0.2x's figures: sum of parameters and len(state_dict()) at 1000 classes (BatchNorm)
TORCHVISION = {"resnet18": (11_689_512, 122), "resnet34": (21_797_672, 218), "resnet50": (25_557_032, 320),
               "resnet101": (44_549_160, 626), "resnet152": (60_192_808, 932)}


def whole(arch: str, **kw: object) -> Part:
    return Part(meta_layers(torchvision_layer_fns(arch, **kw)), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sizes_and_names_are_torchvisions(arch: str) -> None:
    m = whole(arch, norm="batch")
    params, entries = TORCHVISION[arch]
    assert sum(p.numel() for p in m.parameters()) == params
    assert len(m.state_dict()) == entries
    names = list(m.state_dict())
    assert names[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                         "bn1.num_batches_tracked"]
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert "layer1.0.conv1.weight" in names and "layer4.1.bn2.running_var" in names
    assert ("layer2.0.downsample.1.weight" in names) and ("layer2.1.downsample.0.weight" not in names)
    if arch in ("resnet50", "resnet101", "resnet152"):
        assert f"layer3.{len(m.layer3) - 1}.conv3.weight" in names  # type: ignore[arg-type]
        assert tuple(m.get_parameter("fc.weight").shape) == (1000, 2048)


def test_group_norm_has_the_same_parameter_names_and_no_statistics() -> None:
    g, b = whole("resnet50").state_dict(), whole("resnet50", norm="batch").state_dict()
    assert list(g) == [n for n in b if n.rsplit(".", 1)[-1] not in
                       ("running_mean", "running_var", "num_batches_tracked")]
    assert isinstance(whole("resnet18").bn1, torch.nn.GroupNorm)


def test_six_units_cut_anywhere_give_the_whole_models_forward_and_names() -> None:
    fns = torchvision_layer_fns("resnet18", 3, 10)
    assert len(fns) == 6 and all(isinstance(f(), Unit) for f in fns)
    ref = Part(keyed_layers(fns, 7), 0)
    x = torch.randn(2, 3, 32, 32)
    for sizes in ([6], [4, 2], [1, 1, 1, 1, 1, 1], [2, 3, 1]):
        staged = sequential_model(fns, sizes, torch.nn.functional.cross_entropy, 7)
        parts = [staged.build(s) for s in range(len(sizes))]
        got = dict(p for part in parts for p in part.named_parameters())
        assert got.keys() == dict(ref.named_parameters()).keys()
        assert all(torch.equal(got[n], p) for n, p in ref.named_parameters())
        y = x
        for part in parts:
            y = part(y)
        assert torch.allclose(y, ref(x), atol=1e-6)


def test_each_residual_branch_starts_at_zero_so_blocks_start_as_the_identity() -> None:
    m = Part([f() for f in torchvision_layer_fns("resnet50")], 0)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for layer in (m.layer1, m.layer4) for b in layer)
    assert float(m.bn1.weight.detach().sum()) == 64
    m18 = Part([f() for f in torchvision_layer_fns("resnet18")], 0)
    assert float(m18.layer2[1].bn2.weight.detach().abs().sum()) == 0


def test_batch_norm_small_model_and_unknown_norm() -> None:
    layers = [f() for f in resnet_layer_fns(1, 10, 8, norm="batch")]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for layer in layers for m in layer.modules())
    with pytest.raises(ValueError, match="choose one of group, batch"):
        resnet_layer_fns(1, 10, 8, norm="layer")[0]()
    with pytest.raises(ValueError, match="unknown ResNet 'resnet20'"):
        torchvision_layer_fns("resnet20")


def two_units_with_one_name() -> None:
    class A(Unit):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(2, 2)
    Part([A(), A()], 0)


def test_two_units_naming_one_module_are_refused() -> None:
    with pytest.raises(ValueError, match="both name a module 'fc'"):
        two_units_with_one_name()


# -- --init files ----------------------------------------------------------------
def saved(tmp_path, sd: dict[str, torch.Tensor], name: str = "w.pt") -> str:
    p = str(tmp_path / name)
    torch.save(sd, p)
    return p


def model_sd(arch: str = "resnet18", classes: int = 10, norm: str = "group") -> dict[str, torch.Tensor]:
    return Part([f() for f in torchvision_layer_fns(arch, 3, classes, norm)], 0).state_dict()


def test_a_file_of_the_same_model_loads_every_tensor(tmp_path) -> None:
    sd = {n: torch.randn_like(t.float()).to(t.dtype) for n, t in model_sd(norm="batch").items()}
    f = InitFile.read(saved(tmp_path, sd), whole("resnet18", num_classes=10, norm="batch").state_dict(), "x")
    assert f.notes == []
    m = f.load_into(Part([fn() for fn in torchvision_layer_fns("resnet18", 3, 10, "batch")], 0))
    assert all(torch.equal(m.state_dict()[n], t) for n, t in sd.items())


def test_statistics_and_another_head_are_forgiven_and_said(tmp_path) -> None:
    sd = model_sd(classes=1000, norm="batch")  # an ImageNet-style file
    f = InitFile.read(saved(tmp_path, sd), whole("resnet18", num_classes=10).state_dict(), "--arch resnet18")
    assert len(f.notes) == 2
    assert "BatchNorm statistics" in f.notes[0] and "head for 1000 classes, the data 10" in f.notes[1]
    assert "fc.weight" not in f.tensors and "bn1.running_mean" not in f.tensors


def test_a_ddp_prefix_or_a_wrapping_dict_is_accepted(tmp_path) -> None:
    sd = model_sd()
    for obj in ({f"module.{n}": t for n, t in sd.items()}, {"state_dict": sd}):
        f = InitFile.read(saved(tmp_path, obj), whole("resnet18", num_classes=10).state_dict(), "x")
        assert f.tensors.keys() == sd.keys()


@pytest.mark.parametrize("case, expect", [
    ("missing", "no such file"),
    ("garbage", "cannot be read as a PyTorch state dict"),
    ("not a dict", "is not a state dict"),
    ("other arch", "does not fit --arch resnet50: it lacks 99 of the model's (layer1.0.bn3.bias, "
                   "layer1.0.bn3.weight, layer1.0.conv3.weight and 96 more); give a file saved from this"),
    ("channels", "conv1.weight has shape (64, 3, 7, 7), the model (64, 1, 7, 7); the data has 1 image"),
    ("needs statistics", "lacks 60 of the model's (bn1.num_batches_tracked, bn1.running_mean, "
                         "bn1.running_var and 57 more); the file has no BatchNorm statistics: "
                         "use --norm group"),
])
def test_bad_files_are_one_line_with_the_fix(tmp_path, case: str, expect: str) -> None:
    path, arch, kw = str(tmp_path / "w.pt"), "resnet50", {"num_classes": 10}
    if case == "garbage":
        open(path, "wb").write(b"not a checkpoint")
    elif case == "not a dict":
        torch.save([torch.zeros(1)], path)
    elif case == "other arch":
        torch.save(model_sd(norm="batch"), path)
    elif case in ("channels", "needs statistics"):
        arch = "resnet18"
        torch.save(model_sd(), path)
        kw = {"num_classes": 10, "in_channels": 1} if case == "channels" else \
            {"num_classes": 10, "norm": "batch"}
    with pytest.raises(InitError) as e:
        InitFile.read(path, whole(arch, **kw).state_dict(), f"--arch {arch}")
    assert expect in str(e.value) and "\n" not in str(e.value)
