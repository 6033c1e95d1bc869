"""Reading and writing run manifests, and creating a run from a job (the prepare stage's bookkeeping)."""

from __future__ import annotations

from datetime import UTC, datetime

from schemas.job import JobSpec
from schemas.manifest import RunManifest
from tasks.errors import BadInputError, RunNotFoundError
from tasks.layout import RunLayout, join_uri, run_id_for
from tasks.storage import ObjectStore


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def layout_for(job: JobSpec, run_date: str) -> RunLayout:
    return RunLayout(root=job.storage_root, job_name=job.name, run_date=run_date)


def manifest_layout(manifest: RunManifest) -> RunLayout:
    return layout_for(manifest.job, manifest.run_date)


def load_manifest(store: ObjectStore, layout: RunLayout) -> RunManifest:
    try:
        raw = store.read_bytes(layout.manifest)
    except FileNotFoundError:
        raise RunNotFoundError(
            f"no run {run_id_for(layout.job_name, layout.run_date)} under {layout.root}: "
            "run prepare first (or check the job name, run date and storage_root)"
        ) from None
    return RunManifest.model_validate_json(raw)


def find_manifest(store: ObjectStore, layout: RunLayout) -> RunManifest | None:
    if not store.exists(layout.manifest):
        return None
    return load_manifest(store, layout)


def save_manifest(store: ObjectStore, manifest: RunManifest) -> None:
    """Atomic: readers see the previous manifest or this one, never a mix."""
    store.write_bytes(
        manifest_layout(manifest).manifest, manifest.model_dump_json(indent=1).encode()
    )


def list_manifests(store: ObjectStore, root: str) -> list[RunManifest]:
    found = store.list_files(join_uri(root, "runs"), suffix="/manifest.json")
    return [RunManifest.model_validate_json(store.read_bytes(uri)) for uri in found]


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
        return manifest
    for part in ("source", "request", "output_uri"):
        if getattr(manifest.job, part) != getattr(job, part):
            raise BadInputError(
                f"the job's {part} changed since run {manifest.run_id} was prepared. A prepared run "
                "keeps what it rendered: rerun with a new --run-date, or delete "
                f"{manifest_layout(manifest).run_dir} to prepare this date again."
            )
    return manifest.model_copy(update={"job": job})
