"""Storage of a run, by concept:

- ``data.atomic_io``          atomic file and directory writes, writer identity (re-exported here);
- ``pipeline.storage.trees``  the tree store: node-table shards, manifest with checksums, repair, garbage, and
  the tree writer that buffers finished trees into whole-problem shards;
- ``pipeline.storage.rundir`` the run directory: paths, stored config, completion markers;
- ``pipeline.storage.remote`` run directories on object storage (s3://, gs://) through a local staging copy;
- ``pipeline.storage.shipping`` work shipped to other nodes of such a run: its files travel through the store.

Everything public is importable from ``pipeline.storage`` as before the split.
"""

from data.atomic_io import (
                            StorageError,
                            atomic_dir,
                            atomic_path,
                            atomic_write_bytes,
                            atomic_write_json,
                            atomic_write_text,
                            file_digest,
                            host_identity,
                            pid_alive,
                            proc_start,
                            read_json,
                            remove_file,
                            tmp_prefix,
                            utc_now,
)
from pipeline.storage.remote import StagedRun, is_remote, local_run_dir
from pipeline.storage.rundir import EXPORT_TABLES, PHASES, RunDir, opened_run, stored_config
from pipeline.storage.trees import CORRUPT_DIR, MANIFEST_NAME, PLAN_NAME, ShardInfo, TreeStore, TreeWriter

__all__ = ["PHASES", "CORRUPT_DIR", "EXPORT_TABLES", "MANIFEST_NAME", "PLAN_NAME", "StorageError", "RunDir",
           "TreeStore", "TreeWriter", "ShardInfo", "StagedRun", "is_remote", "local_run_dir", "opened_run",
           "stored_config", "file_digest", "host_identity", "pid_alive", "proc_start", "tmp_prefix", "atomic_path",
           "atomic_dir", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json", "remove_file",
           "utc_now"]
