"""Offline evaluation: datasets, baselines and prequential replay."""
