"""`python -m emulator --port 8089 --state-dir DIR [--clock-scale X] [--seed N] [--config FILE]`."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from emulator.config import EmulatorConfig, FaultConfig
from emulator.server import EmulatorServer

GC_THRESHOLD_OBJECTS = 100_000  # allocations between young-generation collections (default 700)


def load_config_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML file of EmulatorConfig fields; a file of FaultConfig fields only means `faults`."""
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of emulator settings")
    if data and set(data) <= set(FaultConfig.model_fields) - set(EmulatorConfig.model_fields):
        return {"faults": data}
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emulator",
        description="OpenAI-compatible Files + Batches API emulator (see emulator/README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8089, help="port (default 8089; 0 = any free)")
    parser.add_argument("--state-dir", type=Path, required=True, help="where all state is kept")
    parser.add_argument("--clock-scale", type=float, help="emulated seconds per real second")
    parser.add_argument("--seed", type=int, help="seed of the fault injection")
    parser.add_argument("--config", type=Path, help="JSON/YAML file of settings (or of faults)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    if args.clock_scale is not None:
        settings["clock_scale"] = args.clock_scale
    if args.seed is not None:
        settings["seed"] = args.seed
    config = EmulatorConfig.model_validate(settings)
    # This process is the emulator's. It holds every running batch's parsed lines (millions of small
    # acyclic dicts), which the collector's default thresholds rescan over and over.
    gc.set_threshold(GC_THRESHOLD_OBJECTS, 50, 100)
    server = EmulatorServer(args.state_dir, port=args.port, config=config, host=args.host)
    server.serve_forever(announce=sys.stderr)
    return 0
