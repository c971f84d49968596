"""Out-dir state of a shard build (held by :class:`shards.writer.DatasetBuilder`): the build lock,
the checks that an ``--out`` holds nothing foreign, ``--overwrite``, and the progress record a
re-run resumes from."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shards import manifest as mf
from shards import outdir as od
from shards.hashing import sha256_file

PROGRESS = ".shards-progress.json"


class OutDirState:
    """Resume state of one build's ``out`` directory: ``done`` (file -> record of every finished
    file, mirrored in the progress record), the builder pids whose temp files may be deleted, and
    the build lock.

    Args:
        out: the dataset directory.
        build_id: identity of the dataset being built (a different one in ``out`` is refused).
        name: dataset name, recorded in the progress record.
        overwrite: replace a different dataset of ours at ``out`` (see :meth:`prepare`).
        say: prints a progress message (or drops it).
    """

    def __init__(self, out: Path, *, build_id: str, name: str, overwrite: bool, say: Callable[[str], None]):
        self.out, self.build_id, self.name = Path(out), build_id, name
        self.overwrite, self._say = overwrite, say
        self.done: dict[str, dict[str, Any]] = {}
        self.pids: set[int] = set()
        self._lock: od.BuildLock | None = None

    def release(self) -> None:
        """Release the build lock if :meth:`prepare` took it."""
        if self._lock is not None:
            self._lock.release()

    def prepare(self) -> dict[str, Any] | None:
        """Lock ``out``, check it and load resume state; returns the manifest if complete.

        Only files that our own manifest / progress record list are ever deleted or reused
        (:mod:`shards.outdir`); a complete build is "up to date" only if every listed file
        exists with its recorded size, otherwise the missing files are rebuilt.
        """
        out = self.out
        man, prog = out / mf.MANIFEST, out / PROGRESS
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        self._lock = od.BuildLock(out)
        self._lock.acquire()
        old = od.read_json(man) if man.exists() else None
        state = od.read_json(prog) if prog.exists() else None
        if man.exists() and not od.manifest_is_ours(old):
            raise ValueError(
                f'--out {out}: {man} was not written by bmb-shards (no "tool": '
                f'"{od.TOOL}" marker, or not a valid format-v1 manifest); refusing to touch '
                "anything in this directory, --overwrite included. Choose another --out"
            )
        if prog.exists() and not od.progress_is_ours(state):
            raise ValueError(
                f"--out {out}: {prog} is not a bmb-shards progress record; refusing to touch "
                "this directory. Choose another --out"
            )
        # Builders that wrote into ``out``: only their temp files are ever deleted.
        self.pids = od.recorded_pids(state) | {os.getpid()}
        if self.overwrite and (old is not None or state is not None):
            owned = od.owned_files(old, state)
            unknown = od.unknown_files(out, owned)
            if unknown:
                raise ValueError(
                    f"--out {out}: --overwrite deletes only files listed in the dataset's "
                    "manifest.json / .shards-progress.json, and this directory also holds "
                    f"other files: {od.describe(unknown)}. Nothing was deleted; move those "
                    "files away or choose another --out"
                )
            n = od.delete_owned(out, owned, self.pids)
            self.pids = {os.getpid()}
            self._say(f"{out}: --overwrite deleted {n} file(s) of the previous build")
            old = state = None
        if old is not None:
            if old.get("build_id") != self.build_id:
                raise ValueError(
                    f"--out {out} already holds a different dataset ({old.get('name')!r}, "
                    f"build_id {str(old.get('build_id'))[:12]}); choose another --out or pass "
                    "--overwrite to replace it (it deletes only the files its manifest lists)"
                )
            bad = od.check_complete(out, old)
            if not bad:
                return mf.load_manifest(out)
            print(
                f"WARNING: {out} holds this dataset, but {len(bad)} file(s) its manifest lists "
                f"are missing or changed size: {od.describe(bad)}; rebuilding them (the build "
                "is deterministic: the result is byte-identical to a fresh build)",
                file=sys.stderr,
            )
            # Back to an unfinished build whose done files are the manifest's: the resume path
            # below re-hashes what is there and rebuilds the rest.
            state = {"build_id": self.build_id, "done": self._done_from_manifest(old)}
            self.done = {}
            mf.atomic_write_text(
                prog, mf.dumps({**state, "tool": od.TOOL, "pids": sorted(self.pids)})
            )
            man.unlink()
        if state is not None:
            if state.get("build_id") != self.build_id:
                raise ValueError(
                    f"--out {out} holds an unfinished build of a different dataset "
                    f"({state.get('name')!r}); choose another --out or pass --overwrite"
                )
            for rel, rec in state.get("done", {}).items():
                p = out / rel
                if p.is_file() and sha256_file(p) == rec.get("sha256"):
                    self.done[rel] = rec
        else:
            unknown = od.unknown_files(out, set())
            if unknown:
                raise ValueError(
                    f"--out {out}: directory is not empty and is not a shards dataset "
                    f"({od.describe(unknown)}); refusing to write into it (choose an empty or "
                    "new directory)"
                )
        self._save_progress()  # records our pid before we write anything else
        od.delete_temps(out, self.pids)  # temp files of an interrupted build (we hold the lock)
        return None

    @staticmethod
    def _done_from_manifest(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Progress records equivalent to a finished manifest's files."""
        done: dict[str, dict[str, Any]] = {}
        for sp in m["splits"].values():
            for sh in sp["shards"]:
                done[sh["file"]] = {k: v for k, v in sh.items() if k != "file"}
            a = sp.get("arrays")
            if a:
                for k in ("images", "labels"):
                    rec = {"sha256": a["sha256"][k]}
                    if isinstance(a.get("size"), dict) and k in a["size"]:
                        rec["size"] = a["size"][k]
                    done[a[k]] = rec
            f = sp.get("ffcv")
            if f:
                done[f["file"]] = {k: v for k, v in f.items() if k != "file"}
        return done

    def _save_progress(self) -> None:
        mf.atomic_write_text(
            self.out / PROGRESS,
            mf.dumps(
                {
                    "tool": od.TOOL,
                    "build_id": self.build_id,
                    "name": self.name,
                    "done": self.done,
                    "pids": sorted(self.pids),
                }
            ),
        )

    def record_done(self, rel: str, rec: dict[str, Any]) -> None:
        self.done[rel] = rec
        self._save_progress()
