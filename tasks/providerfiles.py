"""Which files a run still holds at the provider and may delete: a shard's input, output and error
files once its results are stored (state `collected`), a stray batch's once its usage is counted —
unless the job keeps them (`provider_files: keep`). The prompts and answers then stay only in the
job's own storage. Pure."""

from __future__ import annotations

from schemas.manifest import RunManifest, Shard, StrayBatch


def _ids(*ids: str | None) -> list[str]:
    return [i for i in ids if i]


def shard_files(shard: Shard) -> list[str]:
    return _ids(shard.file_id, shard.output_file_id, shard.error_file_id)


def stray_files(stray: StrayBatch) -> list[str]:
    return _ids(stray.input_file_id, stray.output_file_id, stray.error_file_id)


def deletable_shards(manifest: RunManifest) -> list[Shard]:
    if manifest.job.provider_files == "keep":
        return []
    return [
        s
        for s in manifest.shards
        if s.state == "collected" and not s.provider_files_deleted and shard_files(s)
    ]


def deletable_strays(manifest: RunManifest) -> list[StrayBatch]:
    if manifest.job.provider_files == "keep":
        return []
    return [
        s
        for s in manifest.stray_batches
        if s.usage_counted and not s.provider_files_deleted and stray_files(s)
    ]


def held_files(manifest: RunManifest) -> list[str]:
    """Every file of the run the provider may still hold (for `nightbatch status`)."""
    held = [f for s in manifest.shards if not s.provider_files_deleted for f in shard_files(s)]
    held += [
        f for s in manifest.stray_batches if not s.provider_files_deleted for f in stray_files(s)
    ]
    return held
