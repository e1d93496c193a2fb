"""The README's commands as the README tests read and type them: its ```bash blocks, and
`fedvault` run as a user would (`python -m fedvault`, plain output, a wide terminal)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.deployment import fedvault_env

README = Path(__file__).resolve().parent.parent / "README.md"


def bash_commands(heading: str) -> list[list[list[str]]]:
    """Each ```bash block under the README heading ``heading`` (``## Name`` or ``### Name``,
    up to the next heading of its level or above): its commands, as argument lists."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = README.read_text(encoding="utf-8").splitlines()
    body: list[str] = []
    fenced = False
    for line in lines[lines.index(heading) + 1 :]:
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            break  # the next heading of this level or above (a `# comment` in a block is not)
        body.append(line)
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", "\n".join(body) + "\n", re.DOTALL):
        rows = block.replace("\\\n", " ").splitlines()
        blocks.append([w for w in (shlex.split(row, comments=True) for row in rows) if w])
    return blocks


def run_fedvault(words: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``words`` (a README line starting with `fedvault`) run in ``cwd``; output captured."""
    assert words[0] == "fedvault", words
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *words[1:]],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=fedvault_env(), check=False,
    )  # fmt: skip
