"""The tools layer: command-line tools (``cli``), their argument checks, model loaders, benchmark
inputs and timing. Imports the library above it; no tool is imported by the library."""
