"""The application: Editor (the method on SD1.x networks), the CUDA fast path, images in and out, datasets and
dataset runs (datasets.py, dataset_run.py, manifest.py), the command line."""
