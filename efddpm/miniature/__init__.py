"""The embedded-model kit: the picture world of the shipped model, its training recipe, the running and measuring of
its edits (shared by the edit benchmark and the tests), and the paper's trade-off in miniature (tradeoff.py)."""
