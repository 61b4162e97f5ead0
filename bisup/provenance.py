"""Where a result came from: the git commit of the bisup source that produced it (results JSON,
export provenance)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional


def git_commit(short: bool = False) -> Optional[str]:
    """The commit bisup's source tree is at (with "-dirty" when it has uncommitted changes), or None
    outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=here).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != here.parent:
            return None  # bisup installed inside some other repository: its commit is not bisup's
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if dirty else head
