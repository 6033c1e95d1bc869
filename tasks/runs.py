"""Reading and writing run manifests, and creating a run from a job (the prepare stage's bookkeeping)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from schemas.job import JobSpec
from schemas.manifest import RunManifest
from tasks.errors import BadInputError, RunNotFoundError, WriteConflictError
from tasks.layout import OPEN_RUNS_DIR, RunLayout, join_uri, run_id_for
from tasks.storage import ObjectStore


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def layout_for(job: JobSpec, run_date: str) -> RunLayout:
    return RunLayout(root=job.storage_root, job_name=job.name, run_date=run_date)


def manifest_layout(manifest: RunManifest) -> RunLayout:
    return layout_for(manifest.job, manifest.run_date)


UPDATE_ATTEMPTS = 25


def load_manifest(store: ObjectStore, layout: RunLayout) -> RunManifest:
    """The run's manifest, carrying the version it was read at (for the compare-and-swap)."""
    try:
        raw, version = store.read_versioned(layout.manifest)
    except FileNotFoundError:
        raise RunNotFoundError(
            f"no run {run_id_for(layout.job_name, layout.run_date)} under {layout.root}: "
            "`nightbatch run` starts it (or check the job name, run date and storage_root)"
        ) from None
    manifest = RunManifest.model_validate_json(raw)
    manifest._version = version
    return manifest


def find_manifest(store: ObjectStore, layout: RunLayout) -> RunManifest | None:
    if not store.exists(layout.manifest):
        return None
    return load_manifest(store, layout)


def save_manifest(store: ObjectStore, manifest: RunManifest) -> RunManifest:
    """Compare-and-swap: written only if the stored manifest is still the version this one was read
    at (a manifest never read, only if none exists); else WriteConflictError. Readers see the
    previous manifest or this one, never a mix. Returns the manifest at its new version."""
    layout = manifest_layout(manifest)
    uri = layout.manifest
    if manifest._version is None:  # a new run: into the index of open runs first
        store.write_bytes(layout.open_marker, manifest.run_id.encode())
    version = store.write_if_version(
        uri, manifest.model_dump_json(indent=1).encode(), manifest._version
    )
    saved = manifest.model_copy()
    saved._version = version
    return saved


def update_manifest(
    store: ObjectStore, manifest: RunManifest, change: Callable[[RunManifest], RunManifest]
) -> RunManifest:
    """Apply `change` (a pure function of the manifest, usually a transition) and save it. When
    another process wrote the manifest since it was read, read it again and apply `change` to what
    is there now: the loser of a race adopts the winner's state instead of overwriting it. A
    `change` that returns its argument unchanged writes nothing."""
    current = manifest
    for attempt in range(UPDATE_ATTEMPTS):
        changed = change(current)
        if changed is current:
            return current
        try:
            return save_manifest(store, changed)
        except WriteConflictError:
            time.sleep(random.uniform(0, 0.05 * min(attempt + 1, 8)))
            current = refresh_job(load_manifest(store, manifest_layout(manifest)), manifest.job)
    raise WriteConflictError(
        f"the manifest of run {manifest.run_id} kept changing under {UPDATE_ATTEMPTS} attempts to "
        "update it; rerun the stage"
    )


def list_manifests(store: ObjectStore, root: str) -> list[RunManifest]:
    found = store.list_files(join_uri(root, "runs"), suffix="/manifest.json")
    manifests = []
    for uri in found:
        raw, version = store.read_versioned(uri)
        manifest = RunManifest.model_validate_json(raw)
        manifest._version = version
        manifests.append(manifest)
    return manifests


CLOSED_RUN_KEPT_SECONDS = 3600.0  # a closed run stays in the index this long (queue_state's hour)


def list_open_manifests(
    store: ObjectStore, root: str, now: datetime, tidy: bool = True
) -> list[RunManifest]:
    """The runs under `root` that are open, or closed (loaded, abandoned) within the past hour,
    from the index of open runs: the poller's and submit's cost stays the same whatever the
    history. With `tidy`, entries of runs closed longer are removed, and a root written before the
    index existed is indexed once, from every manifest (without, nothing is written)."""
    index = join_uri(root, OPEN_RUNS_DIR)
    if not store.exists(join_uri(index, ".indexed")):
        everything = [m for m in list_manifests(store, root) if not _closed_long_ago(m, now)]
        if not tidy:
            return everything
        for manifest in everything:
            store.write_bytes(manifest_layout(manifest).open_marker, manifest.run_id.encode())
        store.write_bytes(join_uri(index, ".indexed"), b"1")
    manifests = []
    for marker in store.list_files(index):
        job_name, _, run_date = marker.rsplit("/", 1)[-1].rpartition("__")
        found = find_manifest(store, RunLayout(root=root, job_name=job_name, run_date=run_date))
        if found is None:  # being prepared, or its prepare lost a race: nothing to do yet
            continue
        if _closed_long_ago(found, now):
            if tidy:
                store.remove(marker)
            continue
        manifests.append(found)
    return manifests


def _closed_long_ago(manifest: RunManifest, now: datetime) -> bool:
    if manifest.status not in ("loaded", "abandoned"):
        return False
    closed = datetime.fromisoformat(manifest.updated_at)
    return (now - closed).total_seconds() > CLOSED_RUN_KEPT_SECONDS


def new_manifest(job: JobSpec, run_date: str, now: str) -> RunManifest:
    return RunManifest(
        run_id=run_id_for(job.name, run_date),
        job_name=job.name,
        run_date=run_date,
        job=job,
        created_at=now,
        updated_at=now,
    )


def refresh_job(manifest: RunManifest, job: JobSpec) -> RunManifest:
    """Apply the current job spec to an existing run. Limits, retry policy, tags and prices may change
    between stages (e.g. raising a budget after the gate stopped a run); what was rendered may not."""
    if manifest.job == job:
        return manifest  # (model_copy below keeps the manifest's version)
    for part in ("source", "request", "output_uri"):
        if getattr(manifest.job, part) != getattr(job, part):
            raise BadInputError(
                f"the job's {part} changed since run {manifest.run_id} was prepared. A prepared run "
                "keeps what it rendered: rerun with a new --run-date, or delete "
                f"{manifest_layout(manifest).run_dir} to prepare this date again."
            )
    return manifest.model_copy(update={"job": job})


def check_api(manifest: RunManifest, api: str) -> RunManifest:
    """A run is sent to, and collects from, the API it was prepared for; never a mix."""
    if manifest.api is not None and manifest.api != api:
        raise BadInputError(
            f"run {manifest.run_id} was prepared for the API {manifest.api!r}, but this process is "
            f"pointed at {api!r}. Point it at {manifest.api!r} again (OPENAI_BASE_URL, or "
            "`--emulator` for the bundled emulator) to finish that run, or start a new run under "
            "another --run-date (`nightbatch abandon` ends the old one)."
        )
    return manifest
