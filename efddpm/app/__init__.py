"""The application: Editor (the method on SD1.x networks), the CUDA fast path, images in and out, the command line."""
