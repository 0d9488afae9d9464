"""Figures: one module per family, each a pure function from data to a figure file.

bn_layer      one BN layer's channels before and after (histograms, and one sample's maps)
bn_params     per-channel parameters and the BN health checks (dead, float16 range)
running_stats running statistics against batch statistics during training
activations   activations before/after every BN, and the train-mode vs eval-mode gap
training      training curves with and without BN, and the measured effect
graph         the ONNX graph before and after folding
parity        every |Δ| of every parity comparison against its threshold
"""
