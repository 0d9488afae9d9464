"""Many processes and BatchNorm statistics: the process group and replicas (``process_group``), exact
pooling of running statistics (``bn_statistics``), and ``bnexport recalibrate`` (``recalibrate``)."""
