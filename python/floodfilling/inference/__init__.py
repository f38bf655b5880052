"""Inference: seeds, the exact flood-fill canvas, the network predictor, drivers."""
