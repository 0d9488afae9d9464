"""The viz stage: figures, report.html and Netron.

visualize     the stage itself: read a run's artifacts, write every figure and report.html
html_report   report.html, one self-standing page
netron        serve models in Netron on 127.0.0.1
common        what every figure shares

Figures, one module per family, each a pure function from data to a figure file:

bn_layer      one BN layer's channels before and after (histograms, and one sample's maps)
bn_params     per-channel parameters, the BN health checks (dead, float16 range, drift) and their severity
running_stats running statistics against batch statistics during training
activations   BN inputs in one pass (moments of all, tensors of a few), and the train-mode vs eval-mode gap
training      training curves with and without BN, and the measured effect
graph         the ONNX graph before and after folding, whole or as each BN's neighbourhood
parity_errors every |Δ| of every parity comparison against its threshold
"""
