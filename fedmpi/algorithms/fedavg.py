"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017), the default algorithm.

Client: local SGD from w^t (the configured optimiser, and the SAM estimator's ascent
when ``sam.name`` names one), upload ``Delta = w_K - w^t`` through the configured
compressor. Server: ``server.lr`` x the ``server.aggregation`` of the decoded updates
(mean, sample-weighted, or signSGD's majority vote). No broadcast beside the model.

Bytes: one payload, ``update``: the compressor's payload of Delta (4 d B uncompressed).

With the compressors (error feedback included), the downlinks and the estimators this
is every method fedmpi had before the algorithm API: 3SFC, FedSynth, FedSAM, MoFedSAM,
FedLESAM, FedSynSAM, STC up/down, ... (docs/algorithms.md §0.2).
"""

from __future__ import annotations

from fedmpi.algorithms.base import Algorithm


class FedAvg(Algorithm):
    name = "fedavg"
