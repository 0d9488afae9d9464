"""fold_module on a BatchNorm after a concatenation or a sum of layers: the BN is split over the layers.

The oracle is the original module in eager float64; the BN count is the batch_norm calls a forward
executes (``CountBatchNorm``), counted apart from bnexport's report.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnexport.fold import REASON_CODES, fold_module
from fold.models import BottleneckCSP, CountBatchNorm, randomize_bn, relative_error

BN_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def executed_batch_norms(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), CountBatchNorm() as counter:
        module(x)
    return counter.calls


def float64_error(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    """The folded copy against the original, both run eagerly in float64 on ``x`` scaled up."""
    x = 3 * x.double()
    with torch.no_grad():
        return relative_error(copy.deepcopy(model).double()(x), copy.deepcopy(folded).double()(x))


def assert_folds_exactly(model: nn.Module, x: torch.Tensor, *, bns: int = 1):
    """Fold; the copy computes the original's numbers with no batch_norm left. Returns the report."""
    assert executed_batch_norms(model, x) == bns
    folded, report = fold_module(model, example_input=x)
    assert len(report.folded) == bns, report.table()
    assert executed_batch_norms(folded, x) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert float64_error(model, folded, torch.randn_like(x)) < 1e-6
    return folded, report


class Join(nn.Module):
    """Branch layers on one input, joined by ``join``, then a BN."""

    def __init__(self, branches, join: str = "cat", *, bn: nn.Module | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.join = join
        rank = branches[0].weight.dim() if not isinstance(branches[0], nn.Linear) else 2
        channels = [b.out_features if isinstance(b, nn.Linear) else b.out_channels for b in branches]
        self.bn = bn if bn is not None else BN_FOR_RANK[rank](sum(channels) if "cat" in join or "conc" in join else channels[0])

    def forward(self, x):
        ys = [branch(x) for branch in self.branches]
        return self.bn(joined(ys, self.join))


def joined(ys, join: str):
    if join == "cat":
        return torch.cat(ys, 1)
    if join == "concat":
        return torch.concat(tuple(ys), dim=1)
    if join == "concatenate":
        return torch.concatenate(ys, axis=1)
    if join == "cat_negative":
        return torch.cat(ys, dim=-3)  # 4-D tensors only
    if join == "add":
        total = ys[0]
        for y in ys[1:]:
            total = total + y
        return total
    if join == "iadd":
        total = ys[0]
        for y in ys[1:]:
            total += y
        return total
    if join == "torch.add":
        return torch.add(torch.add(ys[0], ys[1]), ys[2]) if len(ys) == 3 else torch.add(ys[0], ys[1])
    if join == "Tensor.add":
        return ys[0].add(ys[1], alpha=1)
    raise ValueError(join)


def conv2d(cin, cout, **kw):
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


@pytest.mark.parametrize("join", ["cat", "concat", "concatenate", "cat_negative"])
@pytest.mark.parametrize("splits", [(3, 5), (1, 2, 4)], ids=["2-branches", "3-branches"])
def test_bn_after_a_concatenation_is_split_over_its_layers(join, splits):
    model = randomize_bn(Join([conv2d(3, c, bias=i % 2 == 0) for i, c in enumerate(splits)], join))
    x = torch.randn(2, 3, 7, 7)
    _, report = assert_folds_exactly(model, x)
    record = report.records[0]
    paths = [f"branches.{i}" for i in range(len(splits))]
    assert (record.folded_into, record.position, record.split_over, record.through) == (paths[0], "after", paths, "Concat")


@pytest.mark.parametrize("join", ["add", "iadd", "torch.add", "Tensor.add"])
def test_bn_after_a_sum_of_layers_scales_every_layer_and_shifts_one(join):
    branches = [conv2d(3, 5), conv2d(3, 5, bias=False)] + ([nn.Conv2d(3, 5, 1)] if join in ("add", "torch.add") else [])
    model = randomize_bn(Join(branches, join))
    x = torch.randn(2, 3, 6, 6)
    folded, report = assert_folds_exactly(model, x)
    assert report.records[0].through == "Add" and report.records[0].split_over == [f"branches.{i}" for i in range(len(branches))]
    # the shift is added once: the first layer holds b·s + t, the others b·s (a bias-less one gets 0·s)
    scale = model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()
    torch.testing.assert_close(folded.branches[1].bias, torch.zeros(5))
    torch.testing.assert_close(folded.branches[1].weight, model.branches[1].weight * scale[:, None, None, None])


@pytest.mark.parametrize("branches, shape", [
    ([nn.Conv1d(2, 3, 3), nn.Conv1d(2, 2, 3, bias=False)], (2, 2, 9)),
    ([nn.Conv3d(2, 1, 3, padding=1), nn.Conv3d(2, 3, 1)], (1, 2, 4, 4, 4)),
    ([nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.ConvTranspose2d(4, 3, 3, stride=2, bias=False)], (2, 4, 4, 4)),
    ([nn.Linear(6, 3), nn.Linear(6, 4, bias=False), nn.Linear(6, 1)], (5, 6)),
], ids=["conv1d", "conv3d", "conv-transpose2d", "linear"])
@pytest.mark.parametrize("join", ["cat", "add"])
def test_every_layer_kind_splits(branches, shape, join):
    if join == "add":  # a sum needs one shape: every branch gets the first one's channels
        first = branches[0]
        branches = [copy.deepcopy(first) for _ in branches]
        for branch in branches:
            nn.init.normal_(branch.weight)
    model = randomize_bn(Join(branches, join))
    assert_folds_exactly(model, torch.randn(shape))


class LayerThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], 1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer3 = LayerThree()

    def forward(self, x):
        return self.layer3(x).relu()


def test_the_report_names_every_layer_of_the_split():
    model = randomize_bn(Net())
    _, report = fold_module(model, example_input=torch.randn(1, 3, 5, 5))
    assert "split over layer3.conv_a, layer3.conv_b (Concat)" in report.table()
    record = report.to_json()["records"][0]
    assert record["split_over_modules"] == ["layer3.conv_a", "layer3.conv_b"]
    assert record["folded_into_module"] == "layer3.conv_a" and record["module"] == "layer3.bn"


class FunctionalJoin(nn.Module):
    """F.batch_norm on the module's own buffers, after a concatenation or a sum."""

    def __init__(self, join: str):
        super().__init__()
        self.join = join
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2 if join == "cat" else 4, 3, bias=False)
        channels = 6 if join == "cat" else 4
        g = torch.Generator().manual_seed(1)
        for name, value in (("mean", torch.randn(channels, generator=g)), ("var", torch.rand(channels, generator=g) + 0.5),
                            ("gamma", torch.rand(channels, generator=g) + 0.5), ("beta", torch.randn(channels, generator=g))):
            self.register_buffer(name, value)

    def forward(self, x):
        y = joined([self.a(x), self.b(x)], self.join)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


@pytest.mark.parametrize("join", ["cat", "add"])
def test_functional_batch_norm_site_splits(join):
    model = nn.Sequential(FunctionalJoin(join), nn.ReLU()).eval()
    _, report = assert_folds_exactly(model, torch.randn(2, 3, 6, 6))
    assert report.records[0].split_over == ["0.a", "0.b"] and report.records[0].batchnorm == "F.batch_norm(0.mean)"


class BnBeforeBranch(nn.Module):
    """A branch conv that already absorbs the BN before it: the two folds compose in one layer."""

    def __init__(self, join: str):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4 if join == "add" else 3, 3)
        self.join = join
        self.bn = nn.BatchNorm2d(4 if join == "add" else 7)

    def forward(self, x):
        return self.bn(joined([self.a(self.bn_in(x)), self.b(x)], self.join))


@pytest.mark.parametrize("join", ["cat", "add"])
def test_a_layer_with_a_bn_before_it_composes_both_folds(join):
    model = randomize_bn(BnBeforeBranch(join))
    _, report = assert_folds_exactly(model, torch.randn(2, 3, 6, 6), bns=2)
    assert [(r.batchnorm, r.folded_into, r.position) for r in report.records] == [("bn_in", "a", "before"), ("bn", "a", "after")]


class ActBN(nn.BatchNorm2d):
    """A BN subclass whose forward goes on after normalising: the activation stays, the BN folds."""

    def forward(self, x):
        return F.hardswish(super().forward(x))


def test_a_norm_act_module_after_a_concatenation_keeps_its_activation():
    model = randomize_bn(Join([conv2d(3, 2), conv2d(3, 3)], bn=ActBN(5)))
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_module(model, example_input=x)
    assert report.records[0].split_over == ["branches.0", "branches.1"] and executed_batch_norms(folded, x) == 0
    assert float64_error(model, folded, x) < 1e-6


# guards: the BN is kept, the copy computes exactly the original ------------------------------

class Guarded(nn.Module):
    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a, self.b, self.c = (nn.Conv2d(3, 4, 3, padding=1) for _ in range(3))
        self.wide = nn.Conv2d(3, 4, 5)  # 5×5 input → 1×1: broadcasts in a sum
        self.fc, self.fc2 = nn.Linear(5, 4), nn.Linear(5, 4)
        concatenated = ("producer_feeds_more", "called_twice", "not_a_layer", "join_feeds_more", "computed_dim")
        channels = 8 if case in concatenated else 4
        self.bn = nn.BatchNorm1d(5) if case == "linear_3d" else nn.BatchNorm2d(channels)

    def forward(self, x):
        case = self.case
        if case == "linear_3d":
            return self.bn(self.fc(x) + self.fc2(x))
        a = self.a(x)
        if case == "producer_feeds_more":
            return self.bn(torch.cat([a, self.b(x)], 1)) + a.mean()
        if case == "called_twice":
            return self.bn(torch.cat([a, self.a(2 * x)], 1))
        if case == "same_output_twice":
            return self.bn(a + a)
        if case == "not_a_layer":
            return self.bn(torch.cat([a, torch.relu(self.b(x))], 1))
        if case == "other_dim":
            return self.bn(torch.cat([a, self.b(x)], 0))
        if case == "negative_other_dim":
            return self.bn(torch.cat([a, self.b(x)], -1))
        if case == "computed_dim":
            return self.bn(torch.cat([a, self.b(x)], a.dim() - 3))
        if case == "join_feeds_more":
            y = torch.cat([a, self.b(x)], 1)
            return self.bn(y) + y
        if case == "partial_sum_feeds_more":
            s = a + self.b(x)
            return self.bn(s + self.c(x)) + s
        if case == "alpha":
            return self.bn(torch.add(a, self.b(x), alpha=2))
        raise ValueError(case)


@pytest.mark.parametrize("case, code, words", [
    ("producer_feeds_more", "multiple_consumers", "Conv2d 'a''s output feeds more than the concatenation"),
    ("called_twice", "multiple_consumers", "called at 2 sites"),
    ("same_output_twice", "multiple_consumers", "enters the sum more than once"),
    ("not_a_layer", "no_linear_neighbour", "input 1 of the concatenation before it comes from relu"),
    ("other_dim", "shape_mismatch", "along axis 0"),
    ("negative_other_dim", "shape_mismatch", "along axis 3"),
    ("computed_dim", "shape_mismatch", "a computed dim"),
    ("join_feeds_more", "multiple_consumers", "the concatenation before it also feeds something else"),
    ("partial_sum_feeds_more", "multiple_consumers", "a partial sum before it also feeds something else"),
    ("alpha", "no_linear_neighbour", "comes from add"),
])
def test_each_guard_keeps_the_bn_with_its_reason_code(case, code, words):
    model = randomize_bn(Guarded(case))
    x = torch.randn(2, 3, 5, 5)
    folded, report = fold_module(model, example_input=x)
    record = report.records[0]
    assert (record.status, record.reason_code) == ("kept", code) and code in REASON_CODES
    assert words in record.reason
    assert not report.folded and record.split_over is None
    with torch.no_grad():  # nothing was folded: not one layer half-changed
        assert torch.equal(folded(x), model(x))
        assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), folded.state_dict().values()))


class SpatialBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.wide = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 5)  # 5×5 input → 1×1
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.wide(x))


def test_a_sum_broadcast_over_spatial_axes_folds():
    model = randomize_bn(SpatialBroadcast())
    x = torch.randn(2, 3, 5, 5)
    _, report = assert_folds_exactly(model, x)
    assert report.records[0].split_over == ["a", "wide"]


class MixedRanks(nn.Module):
    """A 1-D conv's [4, C, W] output broadcast against a 2-D conv's [N, C, H, W]: its channels land on H."""

    def __init__(self):
        super().__init__()
        self.flat, self.image, self.bn = nn.Conv1d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, image, rows):
        return self.bn(self.image(image) + self.flat(rows))


def test_a_sum_of_different_ranks_is_kept():
    model = randomize_bn(MixedRanks())
    inputs = (torch.randn(2, 3, 4, 6), torch.randn(4, 3, 6))
    folded, report = fold_module(model, example_inputs=inputs)
    record = report.records[0]
    assert (record.status, record.reason_code) == ("kept", "shape_mismatch")
    assert "[2, 4, 4, 6], [4, 4, 6]" in record.reason
    with torch.no_grad():
        assert torch.equal(folded(*inputs), model(*inputs))


def test_linear_summed_on_3d_input_is_kept():
    model = randomize_bn(Guarded("linear_3d"))
    x = torch.randn(2, 5, 5)
    folded, report = fold_module(model, example_input=x)
    assert report.records[0].reason_code == "shape_mismatch" and "3-D input" in report.records[0].reason


def test_channel_counts_must_add_up():
    """Without an example nothing runs, so a concatenation of 4 + 4 channels before a BN of 5 is possible input."""
    model = randomize_bn(Join([conv2d(3, 4), conv2d(3, 4)], bn=nn.BatchNorm2d(5)))
    _, report = fold_module(model, check=False)
    assert report.records[0].reason_code == "shape_mismatch" and "4 + 4 = 8 output channels, the BN 5" in report.records[0].reason
    model = randomize_bn(Join([conv2d(3, 4), conv2d(3, 3)], "add", bn=nn.BatchNorm2d(4)))
    _, report = fold_module(model, check=False)
    assert report.records[0].reason_code == "shape_mismatch" and "4, 3 output channels" in report.records[0].reason


def test_a_sum_needs_an_example_and_a_negative_dim_its_rank():
    model = randomize_bn(Join([conv2d(3, 4), conv2d(3, 4)], "add"))
    _, report = fold_module(model, check=False)
    assert report.records[0].reason_code == "shape_mismatch" and "pass example_input" in report.records[0].reason
    model = randomize_bn(Join([conv2d(3, 4), conv2d(3, 4)], "cat_negative"))
    _, report = fold_module(model, check=False)
    assert report.records[0].reason_code == "shape_mismatch" and "dim -3" in report.records[0].reason
    _, report = fold_module(model, check=False, example_input=torch.zeros(1, 3, 4, 4))
    assert report.records[0].status == "folded"


class SharedBranch(nn.Module):
    """One conv registered under two names: each name's call is a site of the same weights."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = self.a
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(torch.cat([self.a(x), self.b(x)], 1))


def test_a_layer_registered_twice_is_not_split_into():
    model = randomize_bn(SharedBranch())
    x = torch.randn(1, 3, 4, 4)
    folded, report = fold_module(model, example_input=x)
    assert report.records[0].reason_code == "multiple_consumers"
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(1, 4), min_size=2, max_size=4), join=st.sampled_from(["cat", "add"]),
       kind=st.sampled_from(["conv1d", "conv2d", "linear"]), biases=st.lists(st.booleans(), min_size=4, max_size=4))
def test_any_branch_count_and_channel_split_folds_exactly(splits, join, kind, biases):
    if join == "add":
        splits = [splits[0]] * len(splits)
    make = {"conv1d": lambda c, bias: nn.Conv1d(2, c, 3, padding=1, bias=bias),
            "conv2d": lambda c, bias: nn.Conv2d(2, c, 3, bias=bias),
            "linear": lambda c, bias: nn.Linear(2, c, bias=bias)}[kind]
    torch.manual_seed(len(splits))
    model = randomize_bn(Join([make(c, bias) for c, bias in zip(splits, biases)], join), seed=sum(splits))
    x = torch.randn({"conv1d": (2, 2, 5), "conv2d": (2, 2, 4, 4), "linear": (3, 2)}[kind])
    assert_folds_exactly(model, x)


# other forms fold_module recognises: through a pad, flatten or identity ---------------------

class BnPadConv(nn.Module):
    def __init__(self, mode: str, module_pad: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.mode = mode
        self.pad = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d, "circular": nn.CircularPad2d,
                    "constant": nn.ZeroPad2d}[mode]((1, 2, 0, 1)) if module_pad else None
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.bn(x)
        y = self.pad(y) if self.pad is not None else F.pad(y, (1, 2, 0, 1), mode=self.mode)
        return self.conv(y)


@pytest.mark.parametrize("module_pad", [False, True], ids=["F.pad", "module"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "constant"])
def test_bn_then_pad_then_conv(mode, module_pad):
    """Reflect, replicate and circular pads copy normalised values: exact. A constant pad is kept."""
    model = randomize_bn(BnPadConv(mode, module_pad))
    x = torch.randn(2, 3, 6, 6)
    if mode == "constant":
        folded, report = fold_module(model, example_input=x)
        assert report.records[0].reason_code == "zero_padding"
        with torch.no_grad():
            assert torch.equal(folded(x), model(x))
        return
    _, report = assert_folds_exactly(model, x)
    assert (report.records[0].folded_into, report.records[0].position, report.records[0].through) == ("conv", "before", "Pad")


class LinearFlattenBn(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.fc(x)
        flat = torch.flatten(y, 0, 1) if self.how == "torch.flatten" else y.view(-1, 4) if self.how == "view" else y.reshape(-1, 4)
        return self.bn(flat)


@pytest.mark.parametrize("how", ["torch.flatten", "view", "reshape"])
def test_linear_then_flatten_then_batchnorm1d(how):
    _, report = assert_folds_exactly(randomize_bn(LinearFlattenBn(how)), torch.randn(2, 3, 6))
    assert (report.records[0].folded_into, report.records[0].position) == ("fc", "after")


@pytest.mark.parametrize("between", [nn.Identity, lambda: nn.Dropout(0.3), lambda: nn.Sequential(nn.Dropout(0.1), nn.Identity())])
def test_bn_then_identity_or_eval_dropout_then_linear(between):
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(5), between(), nn.Linear(5, 3)))
    _, report = assert_folds_exactly(model, torch.randn(4, 5))
    assert (report.records[0].folded_into, report.records[0].position) == ("2", "before")


class BnChannelPadConv(nn.Module):
    """A copying pad whose amounts reach the channel axis: (1, -1) there keeps three channels but shifts them."""

    def __init__(self, mode: str, module_pad: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.mode = mode
        amounts = (1, 1, 0, 0, 1, -1)
        self.amounts = amounts
        self.pad = {"reflect": nn.ReflectionPad3d, "replicate": nn.ReplicationPad3d,
                    "circular": nn.CircularPad3d}[mode](amounts) if module_pad else None
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.bn(x)
        y = self.pad(y) if self.pad is not None else F.pad(y, self.amounts, mode=self.mode)
        return self.conv(y)


@pytest.mark.parametrize("module_pad", [False, True], ids=["F.pad", "module"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_pad_that_reaches_the_channel_axis_is_kept(mode, module_pad):
    model = randomize_bn(BnChannelPadConv(mode, module_pad))
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold_module(model, example_input=x, check=False)
    assert [(r.status, r.reason_code) for r in report.records] == [("kept", "shape_mismatch")], report.table()
    assert executed_batch_norms(folded, x) == 1
    assert float64_error(model, folded, x) < 1e-12


class Unbatched(nn.Module):
    """A Conv1d run on (C, L): its channels are axis 0, while BatchNorm1d on that 2-D tensor normalises axis 1."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.bn = nn.BatchNorm1d(4)
        self.conv = nn.Conv1d(4, 4, 1) if order == "conv_bn" else nn.Conv1d(4, 2, 3)

    def forward(self, x):
        if self.order == "conv_bn":
            return self.bn(self.conv(x))
        y = self.bn(x)
        return self.conv(F.pad(y, (1, 1), mode="reflect") if self.order == "bn_pad_conv" else y)


@pytest.mark.parametrize("order", ["conv_bn", "bn_conv", "bn_pad_conv"])
def test_a_conv_on_unbatched_input_is_kept(order):
    model = randomize_bn(Unbatched(order))
    x = torch.randn(4, 4)
    folded, report = fold_module(model, example_input=x, check=False)
    assert [(r.status, r.reason_code) for r in report.records] == [("kept", "shape_mismatch")], report.table()
    assert executed_batch_norms(folded, x) == 1
    assert float64_error(model, folded, x) < 1e-12


# a block people write: YOLOv5's CSP bottleneck normalises the concatenation of two bias-less convs ------

def test_yolov5_csp_bottleneck_folds_every_bn():
    model = randomize_bn(BottleneckCSP())
    x = torch.randn(2, 4, 8, 8)
    _, report = assert_folds_exactly(model, x, bns=5)
    record = next(r for r in report.records if r.module == "bn")
    assert (record.split_over, record.through) == (["cv3", "cv2"], "Concat")
