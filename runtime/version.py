"""The gptkit version (one place; the distribution, the CLI and export metadata read it)."""

VERSION = "0.1.0"
