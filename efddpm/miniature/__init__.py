"""The embedded-model kit: the picture world of the shipped model, its training recipe and charts."""
