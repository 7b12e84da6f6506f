"""Evaluation: .bin verification sets, inference, embeddings (python -m ds_face.eval)."""
