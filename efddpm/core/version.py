"""The version of efddpm, in one place: the package, the command line, the outputs' metadata and the wheel read it."""
VERSION = "0.1.0"
