"""`nightbatch run` end to end on the bundled emulator with a fast clock, timed.

    .venv/bin/python benchmarks/e2e.py --rows 1000000
    .venv/bin/python benchmarks/e2e.py --rows 200000 --storage s3 --reference   # S3, and the reference

Uses the benchmark's products table and chat job (benchmarks/bench.py), the emulator with a clock
fast enough that batches finish as soon as the emulator has produced their lines, and the `pipeline`
flow (prepare, submit, wait, collect, retry-failures, load) on an embedded Prefect. The emulator runs
as its own process (`python -m emulator`), as the real API is remote: it does not share this
process's GIL; `--in-process` runs it in a thread of this process instead. `--storage s3` keeps the
source, the run's state and the output on a moto S3 server over HTTP; `--reference` then runs a
minimal sequential pipeline (benchmarks/reference.py) on the same table and emulator, for the
comparison."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def emulator_process(
    state: Path, config: dict[str, object], cpu: dict[str, float]
) -> Iterator[str]:
    """`python -m emulator` on a free port; yields its base URL, stops it (SIGTERM) at the end and
    puts the CPU seconds it used in `cpu["emulator"]`."""
    config_file = state / "emulator-config.json"
    config_file.write_text(json.dumps(config))
    log = state / "emulator.log"
    command = [sys.executable, "-m", "emulator", "--port", "0", "--state-dir", str(state / "emu")]
    with log.open("w") as sink:
        process = subprocess.Popen([*command, "--config", str(config_file)], cwd=ROOT, stderr=sink)
    try:
        deadline = time.monotonic() + 60
        while (found := re.search(r"listening on (\S+)", log.read_text())) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"emulator did not start: {log.read_text()}")
            time.sleep(0.05)
        yield found.group(1)
    finally:
        used = cpu_seconds(process.pid)
        if used is not None:
            cpu["emulator"] = used
        process.terminate()
        process.wait(timeout=30)
    if process.returncode != 0:
        print(f"emulator exited with {process.returncode}: {log.read_text()}", file=sys.stderr)


TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Watch:
    """Polls the emulator's stats every `every` seconds (printing them with `verbose`) and notes when
    the first batch input file arrived and when the last batch became terminal: the run's time
    splits into before the first upload (Prefect, prepare), the emulator at work, and after the
    last batch (the final collect and load)."""

    def __init__(self, root_url: str, every: float = 1.0, verbose: bool = False) -> None:
        self.root_url, self.every, self.verbose = root_url, every, verbose
        self.started = time.perf_counter()
        self.first_upload: float | None = None
        self.all_terminal: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watch:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import httpx

        with httpx.Client(base_url=self.root_url, timeout=30) as client:
            while not self._stop.wait(self.every):
                try:
                    stats = client.get("/_emulator/stats").json()
                except httpx.HTTPError:
                    continue
                now = time.perf_counter() - self.started
                by_status, files = stats["batches"]["by_status"], stats["files"]["by_purpose"]
                if self.first_upload is None and files.get("batch"):
                    self.first_upload = now
                open_batches = sum(n for k, n in by_status.items() if k not in TERMINAL)
                if by_status and not open_batches:
                    self.all_terminal = self.all_terminal or now
                else:
                    self.all_terminal = None
                if self.verbose:
                    items = stats["batches"]["items"]
                    done = sum(
                        b["request_counts"]["completed"] + b["request_counts"]["failed"]
                        for b in items
                    )
                    print(f"[{now:6.1f} s] batches {by_status} lines done {done:,} files {files}",
                          file=sys.stderr)  # fmt: skip

    def phases(self, total: float) -> str:
        if self.first_upload is None or self.all_terminal is None:
            return "phases: not observed"
        return (
            f"phases (±{self.every:.0f} s): until the first input file was uploaded (Prefect, prepare, one upload) "
            f"{self.first_upload:.1f} s; emulator at work (uploads, validation, replies) "
            f"{self.all_terminal - self.first_upload:.1f} s; after the last batch finished "
            f"(collect, load) {total - self.all_terminal:.1f} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path(".nightbatch/bench"))
    parser.add_argument("--clock-scale", type=float, default=1e6)
    parser.add_argument("--lines-per-second", type=float, default=1e9)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument(
        "--in-process", action="store_true", help="the emulator in a thread of this process"
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print the emulator's progress every second"
    )
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    parser.add_argument(
        "--reference", action="store_true", help="also time the minimal reference pipeline"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # a Prefect home kept between runs, as a nightly user's is (a fresh one migrates its database
    # first: ~20 s more)
    home = args.workdir.resolve() / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))

    from benchmarks.bench import _fresh, job_spec, moto_s3, run_child
    from emulator.config import EmulatorConfig
    from emulator.server import EmulatorServer

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    outer = contextlib.ExitStack()
    if args.storage == "s3":
        outer.enter_context(moto_s3())
    run_child("generate", workdir, args.rows, args.storage)
    job = job_spec(workdir, args.rows, args.storage)
    _fresh(workdir, args.rows, args.storage)
    settings = {
        "clock_scale": args.clock_scale,
        "lines_per_second": args.lines_per_second,
        "shuffle_output": True,
    }
    state = Path(tempfile.mkdtemp(prefix="nightbatch-e2e-emulator-"))
    cpu: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if args.in_process:
            server = stack.enter_context(
                EmulatorServer(state, config=EmulatorConfig.model_validate(settings))
            )
            base_url = server.base_url
        else:
            base_url = stack.enter_context(emulator_process(state, settings, cpu))
        os.environ["OPENAI_BASE_URL"] = base_url
        watch = stack.enter_context(Watch(base_url.removesuffix("/v1"), verbose=args.timeline))
        os.environ["OPENAI_API_KEY"] = "emulator-key"
        from flows.stages import pipeline

        watch.started = started = time.perf_counter()
        own = time.process_time()
        result = pipeline(job, run_date="2026-01-01", poll_interval_seconds=args.poll_interval)
        seconds = time.perf_counter() - started
        cpu["this process"] = time.process_time() - own
        reference = None
        if args.reference:
            from benchmarks.reference import reference_run
            from tasks.storage import ObjectStore

            started = time.perf_counter()
            answered = reference_run(job, ObjectStore(), poll_seconds=args.poll_interval)
            reference = (time.perf_counter() - started, answered)
    outer.close()
    shutil.rmtree(state, ignore_errors=True)
    where = "on local disk" if args.storage == "local" else "on S3 (moto, over HTTP)"
    print(
        f"\nnightbatch run of {args.rows:,} rows {where}, on the emulator: {seconds:.1f} s, {result}"
    )
    if reference is not None:
        print(f"reference pipeline, same table and emulator: {reference[0]:.1f} s, {reference[1]}")
    load = os.getloadavg()[0]
    used = ", ".join(f"{name} {value:.1f} s" for name, value in cpu.items())
    print(f"CPU: {used} (load average at the end {load:.2f}, {os.cpu_count()} CPUs)")
    print(watch.phases(seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
