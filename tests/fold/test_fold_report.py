"""The fold report's wording: what a reader sees for each kind of fold."""

from bnexport.fold.fold_report import FOLDED, KEPT, FoldRecord, FoldReport, describe_decision


def test_a_split_fold_names_every_layer_and_the_op():
    record = FoldRecord("bn", FOLDED, folded_into="/conv_a/Conv", position="after", module="layer3.bn",
                        folded_into_module="layer3.conv_a", split_over=["/conv_a/Conv", "/conv_b/Conv"],
                        split_over_modules=["layer3.conv_a", "layer3.conv_b"], through="Concat")
    assert describe_decision(record.__dict__) == "split over layer3.conv_a, layer3.conv_b (Concat)"
    assert "split over layer3.conv_a, layer3.conv_b (Concat)" in FoldReport("onnx", [record]).table()


def test_node_names_stand_in_for_unknown_module_paths():
    record = FoldRecord("bn", FOLDED, folded_into="a", position="after", split_over=["a", "b", "c"], through="Add")
    assert describe_decision(record.__dict__) == "split over a, b, c (Add)"


def test_single_layer_folds_say_where_the_bn_was():
    assert describe_decision({"status": FOLDED, "folded_into": "conv", "position": "after"}) == "conv (BN after it)"
    assert describe_decision({"status": FOLDED, "folded_into": "conv", "position": "before", "through": "Pad"}) == \
        "conv (BN before it, through Pad)"


def test_a_kept_bn_reads_its_reason_and_old_records_still_read():
    assert describe_decision({"status": KEPT, "reason": "its output feeds several nodes"}) == "its output feeds several nodes"
    assert describe_decision({"status": FOLDED, "folded_into": "fc"}) == "fc"  # a fold.json from before positions
