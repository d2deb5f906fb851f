"""Pinned toolchain of the twin: versions.toml, the Go tools modules and the build steps."""
