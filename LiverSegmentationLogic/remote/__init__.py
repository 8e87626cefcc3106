"""Inference over the network: the ZeroMQ protocol, server and client.

Enters: requests from clients (a scan as raw array frames + a JSON header) and, on the server,
worker processes. Leaves: the same labels and readouts as local inference (the worker calls
:func:`~LiverSegmentationLogic.inference.pipeline.segment_case`), progress events, and queued
corrected cases, and for trainers fine-tuning runs (:mod:`finetune_runs`) and version changes.
Nothing from the network is ever unpickled (:mod:`protocol`).
Builds on ``io``, ``models``, ``readouts``, ``inference``, ``studies`` (and starts ``training`` in a
process of its own).
"""
