"""A deployment pull step that finds the project at run time, on the machine that runs the flow.

`prefect.yaml`'s `{{ $VAR }}` in a pull step is resolved when deploying (on the deployer's machine),
so `set_working_directory: {{ $PWD }}` ties every flow run to the deployer's checkout. This step
reads its directory where the flow runs: `NIGHTBATCH_HOME` if the worker (or image) sets it, else
the checkout nightbatch is installed from (an editable install), else the current directory."""

from __future__ import annotations

import os
from pathlib import Path


def project_directory(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("NIGHTBATCH_HOME"):
        return Path(env["NIGHTBATCH_HOME"])
    installed_from = Path(__file__).resolve().parents[1]
    if (installed_from / "prefect.yaml").exists():
        return installed_from
    return Path.cwd()


def enter_project() -> dict[str, str]:
    """Change into the project directory (entrypoints and job paths are relative to it)."""
    directory = project_directory()
    os.chdir(directory)
    return {"directory": str(directory)}
