"""OpenAI-compatible Files + Batches API emulator: see emulator/README.md.

In-process: `from emulator.server import EmulatorServer`; settings: `emulator.config.EmulatorConfig`;
command line: `python -m emulator` (`emulator.cli.main`).
"""
