"""Test helpers that ship with the package (importable from tests and scripts): a fake OpenAI server."""
