"""The run folder and how stages execute in it: its files, fingerprints, manifest, export and import
(:mod:`~iss.runs.folder`), the engine that runs a stage once per fingerprint (:mod:`~iss.runs.engine`) and the
processes of a data-parallel run (:mod:`~iss.runs.processes`, DDP under ``accelerate launch``). The lowest layer:
it imports nothing else of iss.
"""

from iss.runs.folder import (
    DIGESTED_BYTES,
    EXPORT_FILE,
    MANIFEST_FILE,
    MAX_HEADER_BYTES,
    RECORD_REMEDY,
    RUN_MARKER,
    STAGE_FILE,
    STAGE_NAME,
    WRITER_FILE,
    WRITER_LOCK,
    ExportHeader,
    RunFolder,
    StageResult,
    atomic_savez,
    cache_root,
    check_stage_name,
    content_digest,
    damaged_files,
    file_records,
    file_signature,
    fingerprint,
    package_versions,
    read_json,
    write_json,
)

__all__ = [
    "DIGESTED_BYTES",
    "EXPORT_FILE",
    "MANIFEST_FILE",
    "MAX_HEADER_BYTES",
    "RECORD_REMEDY",
    "RUN_MARKER",
    "STAGE_FILE",
    "STAGE_NAME",
    "WRITER_FILE",
    "WRITER_LOCK",
    "ExportHeader",
    "RunFolder",
    "StageResult",
    "atomic_savez",
    "cache_root",
    "check_stage_name",
    "content_digest",
    "damaged_files",
    "file_records",
    "file_signature",
    "fingerprint",
    "package_versions",
    "read_json",
    "write_json",
]
